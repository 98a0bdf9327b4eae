//! One virtual driver: moves, reports its location, answers offers, drives
//! trips, sometimes takes a break; and checks what the engine sends it.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use ridelock::auth::Role;
use ridelock::protocol::{DriverCommand, RevokeReason, ServerMessage};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::checker::DriverWatch;
use crate::city::Mover;
use crate::net::Ws;
use crate::run::Shared;

/// How long a break after a trip lasts, at most.
const LONGEST_BREAK: Duration = Duration::from_secs(5);

/// Something the driver will do by itself at a set time.
#[derive(Clone, Copy, Debug)]
enum Plan {
    Answer { offer_id: u64, accept: bool },
    FinishTrip { trip_id: u64 },
    EndBreak,
}

struct Driver {
    id: String,
    ws: Ws,
    rng: SmallRng,
    mover: Mover,
    watch: DriverWatch,
    /// The request behind the offer being decided on.
    deciding_request: Option<String>,
    plan: Option<(Instant, Plan)>,
    next_location: Instant,
}

/// Runs driver number `n` from `start_at` until `stop` turns true.
pub async fn run(
    n: usize,
    shared: Arc<Shared>,
    start_at: Instant,
    mut stop: watch::Receiver<bool>,
) {
    tokio::time::sleep_until(start_at).await;
    if *stop.borrow() {
        return;
    }
    // Drivers are numbered over every worker: the same number is the same
    // driver (its id, its node, where it starts) however the load is split;
    // source addresses are spread over this process's own connections.
    let local = n;
    let n = shared.plan.driver_offset + n;
    let id = format!("sim-d{n}");
    let target = shared.target_for(n);
    let source = shared.source_for(target, local);
    let (path, token) = shared.credentials(Role::Driver, &id);
    let ws = match target.connect(&path, token.as_deref(), source).await {
        Ok(ws) => ws,
        Err(e) => return shared.stats.connect_failed(&e),
    };
    shared.stats.driver_connected();
    let mut rng = SmallRng::seed_from_u64(
        shared
            .plan
            .seed
            .wrapping_mul(0x9E37_79B9)
            .wrapping_add(n as u64),
    );
    let start = shared.city.random_point(&mut rng);
    let mover = Mover::new(start, shared.plan.speed_mps, &shared.city, &mut rng);
    let interval = shared.plan.update_interval;
    let first_update = Instant::now() + interval.mul_f64(rng.random::<f64>());
    let mut driver = Driver {
        watch: DriverWatch::new(id.clone()),
        id,
        ws,
        rng,
        mover,
        deciding_request: None,
        plan: None,
        next_location: first_update,
    };
    let _ = driver.start(&shared).await;
    // One timer, moved only when the next planned moment changes: a fresh
    // timer per loop turn would register and cancel one per message.
    let timer = tokio::time::sleep_until(driver.next_wake());
    tokio::pin!(timer);
    loop {
        let wake = driver.next_wake();
        if timer.deadline() != wake {
            timer.as_mut().reset(wake);
        }
        let outcome = tokio::select! {
            frame = driver.ws.next() => match frame {
                Some(Ok(Message::Text(text))) => driver.on_message(&text, &shared),
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => Err(()),
                Some(Ok(_)) => Ok(()),
            },
            _ = &mut timer => driver.on_timer(&shared).await,
            _ = stop.changed() => Err(()),
        };
        if outcome.is_err() {
            break;
        }
    }
    let _ = driver.ws.close(None).await;
    shared.stats.driver_disconnected();
}

impl Driver {
    /// The next moment the driver acts by itself.
    fn next_wake(&self) -> Instant {
        self.plan
            .map_or(self.next_location, |(at, _)| at.min(self.next_location))
    }

    async fn send(&mut self, command: &DriverCommand) -> Result<(), ()> {
        let text = serde_json::to_string(command).map_err(|_| ())?;
        self.ws.send(Message::text(text)).await.map_err(|_| ())
    }

    async fn send_location(&mut self, shared: &Shared) -> Result<(), ()> {
        let at = self.mover.at;
        shared.stats.locations_sent.inc();
        self.send(&DriverCommand::Location {
            lat: at.lat,
            lon: at.lon,
        })
        .await
    }

    async fn start(&mut self, shared: &Shared) -> Result<(), ()> {
        self.send_location(shared).await?;
        self.send(&DriverCommand::Available).await
    }

    fn on_message(&mut self, text: &str, shared: &Shared) -> Result<(), ()> {
        let now = Instant::now();
        let message: ServerMessage = match serde_json::from_str(text) {
            Ok(message) => message,
            Err(e) => {
                shared
                    .stats
                    .violation(format!("driver {} got unparsable {text}: {e}", self.id));
                return Ok(());
            }
        };
        match message {
            ServerMessage::Offer {
                offer_id,
                request_id,
                ..
            } => {
                shared.stats.offer_seen(&request_id, now);
                if let Some(v) = self.watch.offer(offer_id) {
                    shared.stats.violation(v);
                }
                if !self.watch.is_deciding(offer_id) {
                    return Ok(()); // on a break: the engine ends it for us
                }
                let plan = &shared.plan;
                let roll: f64 = self.rng.random();
                let delay = plan.answer_delay.mul_f64(self.rng.random::<f64>());
                self.deciding_request = Some(request_id.to_string());
                self.plan = if roll < plan.accept_prob {
                    Some((
                        now + delay,
                        Plan::Answer {
                            offer_id,
                            accept: true,
                        },
                    ))
                } else if roll < plan.accept_prob + plan.no_answer_prob {
                    None // let it expire
                } else {
                    Some((
                        now + delay,
                        Plan::Answer {
                            offer_id,
                            accept: false,
                        },
                    ))
                };
            }
            // Held for a group after accepting: nothing to do but wait.
            ServerMessage::WaitingForGroup { offer_id, .. } => {
                if let Some(v) = self.watch.waiting_for_group(offer_id) {
                    shared.stats.violation(v);
                }
            }
            ServerMessage::OfferRevoked { offer_id, reason } => {
                if let Some(v) = self.watch.revoked(offer_id) {
                    shared.stats.violation(v);
                }
                if reason == RevokeReason::Expired {
                    shared.stats.offers_expired.inc();
                }
                if matches!(self.plan, Some((_, Plan::Answer { offer_id: o, .. })) if o == offer_id)
                {
                    self.plan = None;
                }
            }
            ServerMessage::TripAssigned {
                trip_id, offer_id, ..
            } => {
                shared.stats.offers_accepted.inc();
                if let Some(v) = self.watch.trip_assigned(trip_id, offer_id) {
                    shared.stats.violation(v);
                }
                let trip = shared
                    .plan
                    .trip_time
                    .mul_f64(0.5 + self.rng.random::<f64>());
                self.plan = Some((now + trip, Plan::FinishTrip { trip_id }));
            }
            ServerMessage::Error { code, message, .. } => {
                // An answer that lost the race with the offer's end is normal.
                if code.as_str() != "offer_expired" {
                    shared.stats.driver_errors.inc();
                    print_first_errors(&self.id, code.as_str(), &message);
                }
            }
            other => shared.stats.violation(format!(
                "driver {} got a rider's message {other:?}",
                self.id
            )),
        }
        Ok(())
    }

    async fn on_timer(&mut self, shared: &Shared) -> Result<(), ()> {
        let now = Instant::now();
        if now >= self.next_location {
            let seconds = shared.plan.update_interval.as_secs_f64();
            self.mover.step(seconds, &shared.city, &mut self.rng);
            let jitter = 0.9 + 0.2 * self.rng.random::<f64>();
            self.next_location = now + shared.plan.update_interval.mul_f64(jitter);
            self.send_location(shared).await?;
        }
        let Some((at, plan)) = self.plan else {
            return Ok(());
        };
        if now < at {
            return Ok(());
        }
        self.plan = None;
        match plan {
            Plan::Answer { offer_id, accept } => {
                if !self.watch.is_deciding(offer_id) {
                    return Ok(());
                }
                let request = self.deciding_request.take().unwrap_or_default();
                self.watch.answered(offer_id, accept);
                if accept {
                    // Recorded before sending, so it precedes the rider's `matched`.
                    shared.stats.accept_sent(&request, &self.id);
                    self.send(&DriverCommand::Accept {
                        offer_id,
                        fencing_token: None,
                    })
                    .await?;
                } else {
                    shared.stats.offers_declined.inc();
                    self.send(&DriverCommand::Decline { offer_id }).await?;
                }
            }
            Plan::FinishTrip { trip_id } => {
                let drop_off = shared.city.random_point(&mut self.rng);
                self.mover.teleport(drop_off, &shared.city, &mut self.rng);
                // Location first, so the engine indexes the driver at the drop-off.
                self.send_location(shared).await?;
                self.watch.trip_completed();
                self.send(&DriverCommand::TripCompleted { trip_id }).await?;
                if self.rng.random_bool(shared.plan.break_prob) {
                    self.watch.unavailable();
                    self.send(&DriverCommand::Unavailable).await?;
                    let pause = LONGEST_BREAK.mul_f64(self.rng.random::<f64>());
                    self.plan = Some((now + pause, Plan::EndBreak));
                }
            }
            Plan::EndBreak => {
                self.watch.available();
                self.send(&DriverCommand::Available).await?;
            }
        }
        Ok(())
    }
}

/// Unexpected errors are counted; the first few are printed for a human.
fn print_first_errors(driver: &str, code: &str, message: &str) {
    static PRINTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    if PRINTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 5 {
        eprintln!("driver {driver} got error {code}: {message}");
    }
}
