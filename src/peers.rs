//! What each kind of connection hands its commands to once upgraded: a
//! driver's session talks to that driver's actor, a rider's to the matcher.

use std::sync::Arc;

use actix::Addr;
use tokio::sync::watch;

use crate::actors::driver::{Detach, DriverActor, FromDriver};
use crate::actors::matcher::{Admission, CancelRide, Matcher, RequestRide, RiderGone, RiderLink};
use crate::auth::Identity;
use crate::protocol::{DriverCommand, ErrorCode, RiderCommand, ServerMessage};
use crate::server::Shared;
use crate::session::{self, Outbox, Peer, Settings};

/// Runs the session of an upgraded connection for `identity` until it ends.
pub(crate) async fn run_session(
    ws: session::Socket,
    identity: Identity,
    expires: Option<tokio::time::Instant>,
    shared: &Shared,
    shutdown: watch::Receiver<bool>,
) {
    let (outbox, inbox) = Outbox::new(shared.config.outbox_capacity as usize);
    let settings = Settings::from_config(&shared.config);
    match identity {
        Identity::Driver(driver_id) => {
            let session = shared.ids.next_session();
            let driver = shared.registry.attach(driver_id, session, outbox).await;
            let peer = DriverPeer { driver, session };
            session::run(ws, peer, inbox, settings, expires, shutdown).await;
        }
        Identity::Rider(rider_id) => {
            let rider = RiderLink {
                rider_id,
                session: shared.ids.next_session(),
                outbox,
            };
            let peer = RiderPeer {
                matcher: shared.matcher.clone(),
                admission: shared.admission.clone(),
                rider,
            };
            session::run(ws, peer, inbox, settings, expires, shutdown).await;
        }
        Identity::Ops(_) => {
            crate::ops::session::run(ws, &shared.ops, settings, expires, shutdown).await;
        }
    }
}

/// A driver connection hands commands to the driver's actor.
struct DriverPeer {
    driver: Addr<DriverActor>,
    session: u64,
}

impl Peer for DriverPeer {
    type Command = DriverCommand;
    const ROLE: &'static str = "driver";

    fn deliver(&mut self, command: DriverCommand) -> Result<(), ServerMessage> {
        self.driver.do_send(FromDriver {
            session: self.session,
            command,
        });
        Ok(())
    }

    fn closed(self) {
        self.driver.do_send(Detach {
            session: self.session,
        });
    }
}

/// A rider connection hands commands to the matcher.
struct RiderPeer {
    matcher: Addr<Matcher>,
    admission: Arc<Admission>,
    rider: RiderLink,
}

impl Peer for RiderPeer {
    type Command = RiderCommand;
    const ROLE: &'static str = "rider";

    fn deliver(&mut self, command: RiderCommand) -> Result<(), ServerMessage> {
        match command {
            RiderCommand::RequestRide {
                request_id,
                pickup,
                vehicles,
            } => {
                if !self.admission.try_enter() {
                    return Err(ServerMessage::request_error(
                        ErrorCode::Overloaded,
                        request_id,
                        "the engine is behind on ride requests; retry in a moment",
                    ));
                }
                self.matcher.do_send(RequestRide {
                    rider: self.rider.clone(),
                    request_id,
                    pickup,
                    vehicles,
                    received_at: std::time::Instant::now(),
                });
            }
            // Cancels are never refused: they free drivers.
            RiderCommand::Cancel { request_id } => self.matcher.do_send(CancelRide {
                rider: self.rider.clone(),
                request_id,
            }),
        }
        Ok(())
    }

    fn closed(self) {
        self.matcher.do_send(RiderGone {
            rider_id: self.rider.rider_id,
            session: self.rider.session,
        });
    }
}
