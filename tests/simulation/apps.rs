//! The apps: drivers and riders doing anything the protocol allows, in any
//! order, and the faults done to the city.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::Rng;
use ridelock::core::booking::{DriverEffect, DriverEvent, TRIP_HOLD};
use ridelock::core::lock::{FencingToken, OfferId, TripId};
use ridelock::location::LatLon;
use ridelock::protocol::{DriverCommand, RequestId, ServerMessage};

use super::redis::ServerOp;
use super::world::{
    lane_driver, lane_driver_app, lane_matcher, lane_rider, new_node, AppIn, Ev, Fault, MatcherIn,
    World,
};

pub struct DriverApp {
    pub conn: Option<(usize, u64)>,
    pub at: LatLon,
    pub offers: Vec<(OfferId, RequestId)>,
    pub trip: Option<TripId>,
    pub last_token: FencingToken,
    /// Trips this app completed: a resend of one (the engine had not yet
    /// seen the completion) is not a new trip.
    pub completed: Vec<TripId>,
    /// The newest offer, so that a resend (after a reconnect) is known.
    pub last_offer: Option<(OfferId, FencingToken)>,
    /// Every offer seen, with its token: an offer sent again (the app came
    /// back to a node that still holds it) is not a new lock.
    pub seen: std::collections::HashMap<OfferId, FencingToken>,
}

pub struct RiderApp {
    pub conn: Option<(usize, u64)>,
    pub at: LatLon,
    pub pending: Vec<RequestId>,
    pub next: u32,
}

/// Somewhere in a small city (about 4 km across).
fn spot(rng: &mut StdRng) -> LatLon {
    LatLon::new(
        rng.random_range(52.50..52.53),
        rng.random_range(13.38..13.43),
    )
    .expect("in range")
}

impl DriverApp {
    pub fn new(rng: &mut StdRng) -> Self {
        DriverApp {
            conn: None,
            at: spot(rng),
            offers: Vec::new(),
            trip: None,
            last_token: 0,
            last_offer: None,
            seen: std::collections::HashMap::new(),
            completed: Vec::new(),
        }
    }
}

impl RiderApp {
    pub fn new(rng: &mut StdRng) -> Self {
        RiderApp {
            conn: None,
            at: spot(rng),
            pending: Vec::new(),
            next: 0,
        }
    }
}

impl World {
    fn pick_node(&mut self) -> Option<usize> {
        let up: Vec<usize> = (0..self.nodes.len())
            .filter(|n| self.nodes[*n].up)
            .collect();
        (!up.is_empty()).then(|| up[self.rng.random_range(0..up.len())])
    }

    fn send_to_driver_actor(&mut self, driver: usize, node: usize, event: DriverEvent) {
        let inc = self.nodes[node].inc;
        self.lane(
            lane_driver_app(driver),
            lane_driver(node, driver),
            300,
            Ev::ToDriver {
                node,
                inc,
                driver,
                event,
            },
        );
    }

    fn command(&mut self, driver: usize, command: DriverCommand) {
        if let Some((node, session)) = self.drivers[driver].conn {
            self.send_to_driver_actor(driver, node, DriverEvent::Command { session, command });
        }
    }

    fn driver_connect(&mut self, driver: usize) {
        let Some(node) = self.pick_node() else { return };
        if let Some((old, session)) = self.drivers[driver].conn.take() {
            // The app opens the new connection; half the time it closes the
            // old one, otherwise the old node hears of it over the bus.
            if self.rng.random_bool(0.5) {
                self.send_to_driver_actor(driver, old, DriverEvent::Detach { session });
            }
        }
        self.next_session += 1;
        let session = self.next_session;
        let app = &mut self.drivers[driver];
        app.conn = Some((node, session));
        app.offers.clear();
        self.send_to_driver_actor(driver, node, DriverEvent::Attach { session });
        let at = self.drivers[driver].at;
        self.command(
            driver,
            DriverCommand::Location {
                lat: at.lat,
                lon: at.lon,
            },
        );
        if !self.quiet {
            self.command(driver, DriverCommand::Available);
        }
    }

    pub fn driver_app(&mut self, driver: usize, input: AppIn) -> Result<(), String> {
        match input {
            AppIn::Message {
                node,
                session,
                message,
            } => {
                if self.drivers[driver].conn != Some((node, session)) {
                    return Ok(()); // that connection is closed
                }
                self.driver_heard(driver, message)
            }
            AppIn::Closed { node, session } => {
                if self.drivers[driver].conn == Some((node, session)) {
                    self.drivers[driver].conn = None;
                    self.drivers[driver].offers.clear();
                }
                Ok(())
            }
            AppIn::Act => {
                self.driver_acts(driver);
                let next = self.rng.random_range(100..800);
                self.at(
                    Duration::from_millis(next),
                    Ev::DriverApp {
                        driver,
                        input: AppIn::Act,
                    },
                );
                Ok(())
            }
        }
    }

    fn driver_heard(&mut self, driver: usize, message: ServerMessage) -> Result<(), String> {
        let app = &mut self.drivers[driver];
        match message {
            ServerMessage::Offer {
                offer_id,
                request_id,
                fencing_token,
                ..
            } => {
                let resent = app.seen.get(&offer_id) == Some(&fencing_token);
                if fencing_token <= app.last_token && !resent {
                    return Err(format!("d{driver} got offer {offer_id} with fencing token {fencing_token}, not above {} seen before", app.last_token));
                }
                app.seen.insert(offer_id, fencing_token);
                app.last_token = app.last_token.max(fencing_token);
                app.last_offer = Some((offer_id, fencing_token));
                app.offers.retain(|(o, _)| *o != offer_id);
                app.offers.push((offer_id, request_id));
            }
            ServerMessage::OfferRevoked { offer_id, .. } => {
                app.offers.retain(|(o, _)| *o != offer_id)
            }
            ServerMessage::TripAssigned {
                trip_id, offer_id, ..
            } => {
                app.offers.retain(|(o, _)| *o != offer_id);
                self.ledger.app_assigned(driver, trip_id);
                let app = &mut self.drivers[driver];
                if app.completed.contains(&trip_id) {
                    // Told of a trip it completed (the completion went to a
                    // node that did not hold the trip yet): completed again.
                    self.command(driver, DriverCommand::TripCompleted { trip_id });
                    return Ok(());
                }
                if let Some(current) = app.trip.filter(|t| *t != trip_id) {
                    return Err(format!(
                        "d{driver} was assigned trip {trip_id} while on trip {current}"
                    ));
                }
                app.trip = Some(trip_id);
            }
            _ => {}
        }
        Ok(())
    }

    fn driver_acts(&mut self, driver: usize) {
        if self.quiet {
            // Winding down: everyone back online, trips completed, offers
            // declined, no more work.
            if self.drivers[driver].conn.is_none() {
                return self.driver_connect(driver);
            }
            if let Some(trip_id) = self.drivers[driver].trip.take() {
                self.drivers[driver].completed.push(trip_id);
                self.command(driver, DriverCommand::TripCompleted { trip_id });
            }
            for (offer_id, _) in std::mem::take(&mut self.drivers[driver].offers) {
                self.command(driver, DriverCommand::Decline { offer_id });
            }
            return self.command(driver, DriverCommand::Unavailable);
        }
        if self.drivers[driver].conn.is_none() {
            if self.rng.random_bool(0.6) {
                self.driver_connect(driver);
            }
            return;
        }
        let roll = self.rng.random_range(0..100);
        match roll {
            0..25 => {
                let app = &mut self.drivers[driver];
                let lat = (app.at.lat + self.rng.random_range(-0.002..0.002)).clamp(52.49, 52.54);
                let lon = (app.at.lon + self.rng.random_range(-0.003..0.003)).clamp(13.37, 13.44);
                self.drivers[driver].at = LatLon::new(lat, lon).expect("in range");
                self.command(driver, DriverCommand::Location { lat, lon });
            }
            25..50 => {
                let Some(&(offer_id, _)) = self.drivers[driver].offers.last() else {
                    return;
                };
                let answer = self.rng.random_range(0..100);
                if answer < 55 {
                    // Half the apps send the token back; now and then a
                    // stale one, which must be refused.
                    let token = self.drivers[driver]
                        .last_offer
                        .filter(|(o, _)| *o == offer_id)
                        .map(|(_, t)| t);
                    let fencing_token = match self.rng.random_range(0..10) {
                        0..5 => None,
                        5 => token.map(|t| t.saturating_sub(1)),
                        _ => token,
                    };
                    self.ledger.app_accepted(driver, offer_id);
                    self.command(
                        driver,
                        DriverCommand::Accept {
                            offer_id,
                            fencing_token,
                        },
                    );
                } else if answer < 85 {
                    self.drivers[driver].offers.pop();
                    self.command(driver, DriverCommand::Decline { offer_id });
                }
            }
            50..62 => {
                if let Some(trip_id) = self.drivers[driver].trip.take() {
                    self.drivers[driver].completed.push(trip_id);
                    self.command(driver, DriverCommand::TripCompleted { trip_id });
                }
            }
            62..67 => self.command(driver, DriverCommand::Unavailable),
            67..80 => self.command(driver, DriverCommand::Available),
            80..83 => {
                if let Some((node, session)) = self.drivers[driver].conn.take() {
                    self.drivers[driver].offers.clear();
                    self.send_to_driver_actor(driver, node, DriverEvent::Detach { session });
                }
            }
            83..86 => self.driver_connect(driver),
            _ => {}
        }
    }

    // ----- riders -----

    fn send_to_matcher(&mut self, rider: usize, node: usize, input: MatcherIn) {
        let inc = self.nodes[node].inc;
        self.lane(
            lane_rider(rider),
            lane_matcher(node),
            300,
            Ev::ToMatcher { node, inc, input },
        );
    }

    pub fn rider_app(&mut self, rider: usize, input: AppIn) -> Result<(), String> {
        match input {
            AppIn::Message {
                node,
                session,
                message,
            } => {
                let app = &mut self.riders[rider];
                if app.conn != Some((node, session)) {
                    return Ok(());
                }
                match &message {
                    ServerMessage::Matched { request_id, .. }
                    | ServerMessage::NoDriver { request_id, .. }
                    | ServerMessage::Cancelled { request_id } => {
                        app.pending.retain(|r| r != request_id)
                    }
                    ServerMessage::Error {
                        request_id: Some(request_id),
                        ..
                    } => app.pending.retain(|r| r != request_id),
                    _ => {}
                }
                Ok(())
            }
            AppIn::Closed { node, session } => {
                let app = &mut self.riders[rider];
                if app.conn == Some((node, session)) {
                    app.conn = None;
                    app.pending.clear();
                }
                Ok(())
            }
            AppIn::Act => {
                if self.quiet {
                    return Ok(());
                }
                self.rider_acts(rider);
                let next = self.rng.random_range(200..1_500);
                self.at(
                    Duration::from_millis(next),
                    Ev::RiderApp {
                        rider,
                        input: AppIn::Act,
                    },
                );
                Ok(())
            }
        }
    }

    fn rider_leaves(&mut self, rider: usize) {
        if let Some((node, session)) = self.riders[rider].conn.take() {
            self.riders[rider].pending.clear();
            self.send_to_matcher(rider, node, MatcherIn::RiderGone { rider, session });
        }
    }

    fn rider_acts(&mut self, rider: usize) {
        let Some((node, session)) = self.riders[rider].conn else {
            if self.rng.random_bool(0.5) {
                if let Some(node) = self.pick_node() {
                    self.next_session += 1;
                    self.riders[rider].conn = Some((node, self.next_session));
                }
            }
            return;
        };
        let roll = self.rng.random_range(0..100);
        match roll {
            0..40 if self.riders[rider].pending.len() < 3 => {
                let app = &mut self.riders[rider];
                app.next += 1;
                let request_id: RequestId = format!("q{}", app.next).into();
                app.pending.push(request_id.clone());
                let pickup = app.at;
                let vehicles = match self.rng.random_range(0..100) {
                    0..70 => 1,
                    70..88 => 2,
                    88..96 => 3,
                    _ => 4,
                };
                self.ledger.requested(rider, &request_id, vehicles);
                self.send_to_matcher(
                    rider,
                    node,
                    MatcherIn::Request {
                        rider,
                        session,
                        request_id,
                        pickup,
                        vehicles,
                    },
                );
            }
            40..48 => {
                let pending = &self.riders[rider].pending;
                if pending.is_empty() {
                    return;
                }
                let request_id = pending[self.rng.random_range(0..pending.len())].clone();
                self.send_to_matcher(
                    rider,
                    node,
                    MatcherIn::Cancel {
                        rider,
                        session,
                        request_id,
                    },
                );
            }
            48..51 => self.rider_leaves(rider),
            51..53 => {
                self.rider_leaves(rider);
                if let Some(node) = self.pick_node() {
                    self.next_session += 1;
                    self.riders[rider].conn = Some((node, self.next_session));
                }
            }
            _ => {}
        }
    }

    // ----- faults -----

    /// Schedules the next fault while the run is active.
    pub fn schedule_fault(&mut self) {
        if !self.shape.faults || self.quiet {
            return;
        }
        let cluster = self.is_cluster();
        let nodes = self.nodes.len();
        let servers = self.servers.len();
        let node = self.rng.random_range(0..nodes);
        let fault = match self.rng.random_range(0..6) {
            0 => Fault::Pause(node),
            1 if cluster => Fault::Kill(node),
            2 if servers > 0 => Fault::ServerDown(self.rng.random_range(0..servers)),
            // One server without its data is no lock store at all: only a
            // quorum of three survives a restart without persistence.
            3 if servers >= 3 => Fault::ServerWipe(self.rng.random_range(0..servers)),
            _ => Fault::CrashDriverActor(node, self.rng.random_range(0..self.drivers.len())),
        };
        let wait = self.rng.random_range(500..3_000);
        self.at(Duration::from_millis(wait), Ev::Fault(fault));
    }

    pub fn fault(&mut self, fault: Fault) {
        if self.quiet
            && !matches!(
                fault,
                Fault::Resume(_) | Fault::Restart(_) | Fault::ServerUp(_)
            )
        {
            return;
        }
        let before = self.faults_injected;
        let what = format!("{fault:?}");
        self.apply_fault(fault);
        if self.faults_injected > before
            || what.contains("Resume")
            || what.contains("Restart")
            || what.contains("Up")
        {
            self.note(|| format!("fault {what}"));
        }
    }

    fn apply_fault(&mut self, fault: Fault) {
        match fault {
            Fault::Pause(node) => {
                if self.nodes[node].up && !self.nodes[node].paused {
                    self.faults_injected += 1;
                    self.nodes[node].paused = true;
                    let wait = self.rng.random_range(1_000..8_000);
                    self.at(Duration::from_millis(wait), Ev::Fault(Fault::Resume(node)));
                }
                self.schedule_fault();
            }
            Fault::Resume(node) => {
                if !self.nodes[node].paused {
                    return;
                }
                self.nodes[node].paused = false;
                // What arrived meanwhile is handled now, in order.
                for (i, ev) in std::mem::take(&mut self.nodes[node].held)
                    .into_iter()
                    .enumerate()
                {
                    self.at(Duration::from_nanos(i as u64 + 1), ev);
                }
            }
            Fault::Kill(node) => {
                if self.nodes[node].up && self.nodes.iter().filter(|n| n.up).count() > 1 {
                    self.faults_injected += 1;
                    self.kill(node);
                    let wait = self.rng.random_range(500..8_000);
                    self.at(Duration::from_millis(wait), Ev::Fault(Fault::Restart(node)));
                }
                self.schedule_fault();
            }
            Fault::Restart(node) => {
                if self.nodes[node].up {
                    return;
                }
                // A process registers its incarnation on a majority of the
                // lock servers before it serves (as `Bus::register` does):
                // from then on, confirms for the old one's riders fail.
                let up = self.servers.iter().filter(|s| s.up).count();
                if up < ridelock::cluster::redlock::quorum(self.servers.len()) {
                    self.at(Duration::from_millis(500), Ev::Fault(Fault::Restart(node)));
                    return;
                }
                let inc = self.nodes[node].inc + 1;
                let nodes = self.nodes.len();
                let register = ServerOp::Alive {
                    node: self.nodes[node].id.to_string(),
                    ttl: Duration::from_secs(5),
                    incarnation: u64::from(inc) + 1,
                };
                let now = self.now;
                for server in self.servers.iter_mut().filter(|s| s.up) {
                    server.apply(&register, now);
                }
                self.nodes[node] =
                    new_node(node, inc, &self.settings, self.areas.as_ref(), true, nodes);
                self.at(Duration::ZERO, Ev::Liveness { node, inc });
                for other in 0..nodes {
                    if other != node {
                        self.at(
                            Duration::from_micros(10),
                            Ev::ToMatcher {
                                node,
                                inc,
                                input: MatcherIn::NodeBack(other),
                            },
                        );
                    }
                }
            }
            // The failure model Redlock is built for: one server in trouble
            // at a time; a server that restarts without its data stays away
            // for longer than an offer's lock lives ("delayed restart"), and
            // the next fault waits until trip renewals have repaired it.
            Fault::ServerDown(server) => {
                if self.servers.iter().all(|s| s.up) && self.now >= self.servers_calm_at {
                    self.faults_injected += 1;
                    self.servers[server].up = false;
                    let wait = Duration::from_millis(self.rng.random_range(200..4_000));
                    self.servers_calm_at = self.now + wait;
                    self.at(wait, Ev::Fault(Fault::ServerUp(server)));
                }
                self.schedule_fault();
            }
            // Back: it missed writes while away, which trip renewals repair
            // before the next trouble.
            Fault::ServerUp(server) => {
                self.servers[server].up = true;
                let repaired = self.now + TRIP_HOLD / 3 + Duration::from_secs(2);
                self.servers_calm_at = self.servers_calm_at.max(repaired);
            }
            Fault::ServerWipe(server) => {
                if self.servers.iter().all(|s| s.up) && self.now >= self.servers_calm_at {
                    self.faults_injected += 1;
                    self.servers[server].wipe();
                    self.servers[server].up = false;
                    let away = TRIP_HOLD + Duration::from_millis(self.rng.random_range(500..3_000));
                    self.servers_calm_at = self.now + away + TRIP_HOLD / 3 + Duration::from_secs(2);
                    self.at(away, Ev::Fault(Fault::ServerUp(server)));
                }
                self.schedule_fault();
            }
            Fault::CrashDriverActor(node, driver) => {
                // A single node keeps trips in memory only: losing one with
                // its actor is not something the engine could undo, so only
                // cluster mode (trips kept in Redis) crashes drivers on trips.
                // A driver held for a group is as good as on its trip.
                let on_trip = self.nodes[node]
                    .drivers
                    .get(&driver)
                    .is_some_and(|b| b.trip_id().is_some() || b.lock().held_offer().is_some());
                if self.nodes[node].up
                    && !self.nodes[node].paused
                    && (self.is_cluster() || !on_trip)
                {
                    if let Some(mut booking) = self.nodes[node].drivers.remove(&driver) {
                        self.faults_injected += 1;
                        booking.stop(self.now);
                        let inc = self.nodes[node].inc;
                        for effect in booking.take_effects() {
                            if matches!(
                                effect,
                                DriverEffect::Answer { .. }
                                    | DriverEffect::Ended { .. }
                                    | DriverEffect::Redis(_)
                            ) {
                                let _ = self.driver_effect(node, inc, driver, effect);
                            }
                        }
                        if let Some(session) = self.nodes[node].driver_sessions.remove(&driver) {
                            self.at(
                                Duration::from_micros(100),
                                Ev::DriverApp {
                                    driver,
                                    input: AppIn::Closed { node, session },
                                },
                            );
                        }
                    }
                }
                self.schedule_fault();
            }
        }
    }

    fn kill(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        n.up = false;
        n.paused = false;
        n.held.clear();
        n.drivers.clear();
        self.ledger.node_died(node, self.nodes[node].inc, self.now);
        for d in 0..self.drivers.len() {
            if let Some((n, session)) = self.drivers[d].conn {
                if n == node {
                    self.at(
                        Duration::from_micros(100),
                        Ev::DriverApp {
                            driver: d,
                            input: AppIn::Closed { node, session },
                        },
                    );
                }
            }
        }
        for r in 0..self.riders.len() {
            if let Some((n, session)) = self.riders[r].conn {
                if n == node {
                    self.at(
                        Duration::from_micros(100),
                        Ev::RiderApp {
                            rider: r,
                            input: AppIn::Closed { node, session },
                        },
                    );
                }
            }
        }
    }

    /// Everything back up, and the apps wind down.
    pub fn wind_down(&mut self) {
        self.quiet = true;
        for node in 0..self.nodes.len() {
            if self.nodes[node].paused {
                self.fault(Fault::Resume(node));
            }
            if !self.nodes[node].up {
                self.fault(Fault::Restart(node));
            }
        }
        // Servers come back when their own time is up: one restarted
        // without its data stays away as long as the failure model says.
    }
}
