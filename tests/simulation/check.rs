//! What must hold, checked as the run goes and once it has settled.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use ridelock::core::booking::TripRecord;
use ridelock::core::lock::{Ending, LockState, TripId};
use ridelock::core::search::{OfferOutcome, SearchSettings};
use ridelock::protocol::{RequestId, ServerMessage};

use super::world::{driver_name, World};

type Request = (usize, RequestId);

#[derive(Default)]
pub struct Ledger {
    /// Requests acknowledged (`searching`): by which node incarnation, when.
    acked: BTreeMap<Request, (usize, u32, Instant)>,
    finals: HashMap<Request, ServerMessage>,
    /// Trips booked: driver and request.
    accepted: HashMap<TripId, (usize, Request)>,
    /// Cluster mode: which servers recorded each trip's confirm.
    confirms: HashMap<TripId, std::collections::BTreeSet<usize>>,
    /// Accepts sent by drivers' apps: (driver, offer).
    app_accepts: std::collections::HashSet<(usize, u64)>,
    /// Trips drivers' apps were told of: (driver, trip).
    app_trips: std::collections::HashSet<(usize, TripId)>,
    matched: Vec<(Request, String, TripId)>,
    /// Offers told to drivers so far (a resend is not a new offer).
    offers: std::collections::HashSet<(usize, u64)>,
    /// When each node incarnation died.
    deaths: HashMap<(usize, u32), Instant>,
    /// How many vehicles each request asked for.
    vehicles: HashMap<Request, u8>,
    /// Group requests (more than one vehicle) matched, and ended without.
    pub groups_matched: u64,
    pub groups_failed: u64,
}

/// The rider's own request id of a search key's request id: a group
/// member's is the group's, a control character and the member's number
/// after it (see `core::search::group`).
fn public(request_id: &RequestId) -> RequestId {
    match request_id.split_once('\u{1f}') {
        Some((public, _)) => public.into(),
        None => request_id.clone(),
    }
}

impl Ledger {
    /// A rider's app asked for `vehicles` vehicles.
    pub fn requested(&mut self, rider: usize, request_id: &RequestId, vehicles: u8) {
        self.vehicles.insert((rider, request_id.clone()), vehicles);
    }

    pub fn node_died(&mut self, node: usize, inc: u32, now: Instant) {
        self.deaths.insert((node, inc), now);
    }

    /// A matcher told a rider something.
    pub fn rider_told(
        &mut self,
        now: Instant,
        node: usize,
        inc: u32,
        rider: usize,
        message: &ServerMessage,
    ) -> Result<(), String> {
        match message {
            ServerMessage::Searching { request_id } => {
                let key = (rider, request_id.clone());
                if self.acked.insert(key, (node, inc, now)).is_some() {
                    return Err(format!("r{rider} request {request_id} acknowledged twice"));
                }
            }
            ServerMessage::Matched {
                request_id,
                trip_id,
                driver_id,
                drivers,
                ..
            } => {
                self.final_(rider, request_id, message)?;
                let key = (rider, request_id.clone());
                // Never a partial group: as many distinct drivers (and
                // trips) as vehicles asked for, the first repeated on top.
                let wanted = self.vehicles.get(&key).copied().unwrap_or(1);
                let mut distinct: Vec<&str> = drivers.iter().map(|d| &*d.driver_id).collect();
                distinct.sort_unstable();
                distinct.dedup();
                let first = drivers.first().map(|d| (&d.driver_id, d.trip_id));
                if drivers.len() != usize::from(wanted)
                    || distinct.len() != drivers.len()
                    || first != Some((driver_id, *trip_id))
                {
                    return Err(format!(
                        "r{rider} request {request_id} for {wanted} vehicles matched with {drivers:?} (top: {driver_id} trip {trip_id})"
                    ));
                }
                for d in drivers {
                    self.matched
                        .push((key.clone(), d.driver_id.to_string(), d.trip_id));
                }
                self.groups_matched += u64::from(wanted > 1);
            }
            ServerMessage::NoDriver { request_id, .. }
            | ServerMessage::Cancelled { request_id } => {
                self.final_(rider, request_id, message)?;
                let wanted = self.vehicles.get(&(rider, request_id.clone()));
                self.groups_failed += u64::from(wanted.is_some_and(|&n| n > 1));
            }
            _ => {}
        }
        Ok(())
    }

    fn final_(
        &mut self,
        rider: usize,
        request_id: &RequestId,
        message: &ServerMessage,
    ) -> Result<(), String> {
        let key = (rider, request_id.clone());
        if !self.acked.contains_key(&key) {
            return Err(format!(
                "r{rider} request {request_id} ended without being acknowledged: {message:?}"
            ));
        }
        if let Some(first) = self.finals.insert(key, message.clone()) {
            return Err(format!(
                "r{rider} request {request_id} ended twice: {first:?}, then {message:?}"
            ));
        }
        Ok(())
    }

    /// A driver actor sent its app something.
    pub fn driver_told(
        &mut self,
        now: Instant,
        driver: usize,
        message: &ServerMessage,
        settings: &SearchSettings,
    ) -> Result<(), String> {
        if let ServerMessage::Offer {
            offer_id,
            rider_id,
            request_id,
            expires_in_ms,
            ..
        } = message
        {
            let rider: usize = rider_id[1..].parse().expect("r<n>");
            if !self.offers.insert((driver, *offer_id)) || *expires_in_ms == 0 {
                return Ok(()); // a resend after a reconnect
            }
            if let Some((_, _, started)) = self.acked.get(&(rider, request_id.clone())) {
                if now > *started + settings.search_timeout
                    && !self.finals.contains_key(&(rider, request_id.clone()))
                {
                    return Err(format!("d{driver} offered {offer_id} for r{rider} {request_id} after that search's deadline"));
                }
            }
        }
        Ok(())
    }

    /// A driver actor reported how an offer ended (one node: the trip is
    /// booked here).
    pub fn offer_ended(
        &mut self,
        world: &World,
        node: usize,
        driver: usize,
        outcome: &OfferOutcome,
    ) -> Result<(), String> {
        if outcome.ending != Ending::Accepted || world.is_cluster() {
            return Ok(());
        }
        let trip = outcome.trip_id.expect("an accepted offer has a trip");
        let rider: usize = outcome.rider_id[1..].parse().expect("r<n>");
        let request = (rider, public(&outcome.request_id));
        self.booked(world, node, driver, trip, outcome.offer_id, request)
    }

    /// Cluster mode: lock server `server` recorded a confirm; the trip is
    /// booked once `quorum` servers have.
    pub fn confirmed(
        &mut self,
        world: &World,
        server: usize,
        quorum: usize,
        driver: usize,
        record: &TripRecord,
    ) -> Result<(), String> {
        let servers = self.confirms.entry(record.trip_id).or_default();
        // Booked when the quorum is first reached (a confirm asked again
        // lands on servers that have it already).
        if !servers.insert(server) || servers.len() != quorum {
            return Ok(());
        }
        let rider: usize = record.rider_id[1..].parse().expect("r<n>");
        let request = (rider, public(&record.request_id));
        let node = world.node_index(&record.owner[..record.owner.find('/').expect("node/offer")]);
        self.booked(
            world,
            node,
            driver,
            record.trip_id,
            record.offer_id,
            request,
        )
    }

    fn booked(
        &mut self,
        world: &World,
        node: usize,
        driver: usize,
        trip: TripId,
        offer: u64,
        request: Request,
    ) -> Result<(), String> {
        if let Some((rider_node, inc, _)) = self.acked.get(&request) {
            // A search that died with its node must not book: once that node
            // has restarted, nobody could tell the rider.
            let restarted = world.nodes[*rider_node].inc > *inc;
            if restarted && self.deaths.contains_key(&(*rider_node, *inc)) {
                return Err(format!(
                    "n{node}/d{driver} booked trip {trip} for r{} {} whose search died with n{rider_node} (incarnation {inc}), which has restarted since",
                    request.0, request.1
                ));
            }
        }
        if !self.app_accepts.contains(&(driver, offer)) {
            return Err(format!(
                "trip {trip} booked for d{driver}, whose app never accepted offer {offer}"
            ));
        }
        let booking = (driver, request);
        match self.accepted.insert(trip, booking.clone()) {
            Some(earlier) if earlier != booking => Err(format!(
                "trip {trip} booked twice: {earlier:?}, then {booking:?}"
            )),
            _ => Ok(()),
        }
    }

    /// A driver's app sent an accept.
    pub fn app_accepted(&mut self, driver: usize, offer: u64) {
        self.app_accepts.insert((driver, offer));
    }

    /// A driver's app was told it is on a trip.
    pub fn app_assigned(&mut self, driver: usize, trip: TripId) {
        self.app_trips.insert((driver, trip));
    }

    /// After every driver event: the driver holds at most one live offer,
    /// over all nodes.
    pub fn check_driver(&self, world: &World, driver: usize) -> Result<(), String> {
        let mut live = Vec::new();
        for (n, node) in world.nodes.iter().enumerate() {
            if !node.up {
                continue;
            }
            if let Some(booking) = node.drivers.get(&driver) {
                // A driver held for a group is held as an offer is.
                if let LockState::Offered(offer) | LockState::Held(offer) = booking.lock().state() {
                    // Cluster mode: an offer its requester settled can't
                    // book any more; the driver's node hears of it shortly.
                    let owner = ridelock::core::owner(
                        offer.holder.node.as_ref().unwrap_or(&node.id),
                        offer.offer_id,
                    );
                    let settled = world
                        .servers
                        .iter()
                        .filter(|s| s.is_settled(&owner, world.now))
                        .count();
                    // Also once its requester has begun settling it and its
                    // lock no longer stands on a majority (a server that
                    // lost its data, the settle's release where it got
                    // through): nothing can book it any more, and Redis
                    // may lock the driver for someone else meanwhile.
                    let holding = world
                        .servers
                        .iter()
                        .filter(|s| s.holds(&format!("d{driver}"), &owner, world.now))
                        .count();
                    let quorum = ridelock::cluster::redlock::quorum(world.servers.len());
                    let dead = world.is_cluster()
                        && (settled >= quorum || (settled > 0 && holding < quorum));
                    if offer.deadline > world.now && !dead {
                        live.push((n, offer.offer_id));
                    }
                }
            }
        }
        if live.len() > 1 {
            return Err(format!(
                "d{driver} holds {} live offers at once: {live:?}",
                live.len()
            ));
        }
        Ok(())
    }

    /// Once the faults have stopped and every timeout has passed.
    pub fn settled(&self, world: &World) -> Result<(), String> {
        for ((rider, request_id), (node, inc, _)) in &self.acked {
            let alive = world.nodes[*node].inc == *inc && world.nodes[*node].up;
            if alive && !self.finals.contains_key(&(*rider, request_id.clone())) {
                return Err(format!(
                    "r{rider} request {request_id} (n{node}) never ended"
                ));
            }
        }
        for ((rider, request_id), driver, trip) in &self.matched {
            let d: usize = driver[1..].parse().expect("d<n>");
            if !self.app_trips.contains(&(d, *trip)) {
                return Err(format!(
                    "r{rider} {request_id} was told matched with {driver} on trip {trip}, but that driver's app was never told of the trip"
                ));
            }
            match self.accepted.get(trip) {
                Some((booked, key)) if *booked == d && key == &(*rider, request_id.clone()) => {}
                other => {
                    return Err(format!(
                        "r{rider} {request_id} was told matched with {driver} on trip {trip}, but that driver never booked it for that request ({other:?})"
                    ))
                }
            }
        }
        // The converse: every trip a driver's app was told of was booked,
        // and its rider was told `matched` with it, unless the rider's
        // search died with its node (then nobody is left to tell). A trip
        // recorded in Redis that neither side was ever told of (its record
        // lost with a server before anyone learnt of it) harms nobody.
        let mut told: Vec<&(usize, TripId)> = self.app_trips.iter().collect();
        told.sort();
        for (driver, trip) in told {
            let Some((booked_for, request)) = self.accepted.get(trip) else {
                return Err(format!(
                    "d{driver} was told of trip {trip}, which was never booked"
                ));
            };
            if booked_for != driver {
                return Err(format!(
                    "d{driver} was told of trip {trip}, booked for d{booked_for}"
                ));
            }
            let Some((node, inc, _)) = self.acked.get(request) else {
                continue;
            };
            if world.nodes[*node].inc != *inc || !world.nodes[*node].up {
                continue;
            }
            match self.finals.get(request) {
                Some(ServerMessage::Matched { drivers, .. })
                    if drivers.iter().any(|d| d.trip_id == *trip) => {}
                other => {
                    return Err(format!(
                    "d{driver} was told of trip {trip} for r{} {}, whose rider was told {other:?}",
                    request.0, request.1
                ))
                }
            }
        }
        for (n, node) in world.nodes.iter().enumerate() {
            let counts = node.searches.counts();
            if counts.searches > 0 {
                return Err(format!("n{n} still has {} searches", counts.searches));
            }
            for (d, booking) in &node.drivers {
                if booking.is_waiting() {
                    return Err(format!("n{n}/d{d} still waits for Redis"));
                }
                match booking.lock().state() {
                    LockState::Free => {}
                    state => return Err(format!("n{n}/d{d} is still locked: {state:?}")),
                }
            }
        }
        for (s, server) in world.servers.iter().enumerate() {
            if let Some((driver, owner)) = server.locked(world.now).first() {
                return Err(format!(
                    "server {s} still holds {driver}'s lock for {owner}"
                ));
            }
        }
        let _ = driver_name(0);
        Ok(())
    }
}
