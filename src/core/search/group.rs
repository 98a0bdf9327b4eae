//! Group requests: several vehicles for one request, all of them or none.
//!
//! A group of `n` is `n` member searches, each the usual search (nearest
//! untried driver first, parking, a radius that grows) under one deadline,
//! with three differences:
//!
//! - a member's driver who accepts is *held* for the group
//!   ([`LockState::Held`](crate::core::lock::LockState::Held)) instead of
//!   booked; once every member is held, the matcher commits them all at once
//!   (each driver goes on its trip, the rider gets one `matched`). The
//!   matcher is the one place that decides, and a held driver can't back out
//!   (a disconnect or `unavailable` does not free it), so a group is never
//!   half booked;
//! - a member that loses its driver (a decline, an expiry, a disconnect
//!   before accepting) looks for the next one while the others stay held; a
//!   member that runs out of time or candidates fails the group, and every
//!   other member's driver is let go at once (`group_incomplete`, or
//!   `rider_cancelled` when the rider cancels);
//! - no deadlock, no starvation: *wound-wait* by age. A member of an older
//!   group that finds no free driver in reach takes one from the nearest
//!   member of a younger group (offered or held: `preempted`), and the
//!   driver is handed to it as soon as it is free. A younger group never
//!   takes from an older one, it waits. So the oldest group is never
//!   wounded, and with enough drivers in reach it completes; a cycle of
//!   groups each waiting for the next can't form. Plain requests hold one
//!   driver and never wait while holding, so they take no part.
//!
//! In cluster mode a group's members may be drivers on several nodes. Each
//! member's accept keeps its lock in Redis for the group's hold, and the
//! commit is one Redis script over every member's lock (see `commit.rs`),
//! so that the group is booked whole or not at all there too. Wound-wait
//! takes drivers from this node's younger groups only: drivers held for a
//! group on another node are not in this node's index.

use std::collections::BTreeMap;
use std::time::Instant;

use super::{Phase, Search, SearchEffect, SearchKey, Searches};
use crate::cluster::wire::NodeId;
use crate::core::lock::{Ending, FencingToken, OfferId, TripId};
use crate::core::search::OfferOutcome;
use crate::location::LatLon;
use crate::metrics as m;
use crate::protocol::{DriverId, MatchedDriver, RequestId, ServerMessage};

/// When a booked group's news to a driver on another node is said again.
const RESEND_NEWS: [std::time::Duration; 2] = [
    std::time::Duration::from_secs(1),
    std::time::Duration::from_secs(3),
];

/// Between a group's request id and a member's number in the member's
/// search key: a control character, which request ids can't contain (see
/// `protocol`), so a member's key is never a rider's own request.
const MEMBER_SEPARATOR: char = '\u{1f}';

/// One group request in flight.
pub(super) struct Group<R> {
    /// Its age: the first member's sequence number (older is smaller).
    pub(super) seq: u64,
    /// How many vehicles.
    pub(super) size: u8,
    rider: R,
    session: u64,
    pub(super) pickup: LatLon,
    pub(super) started: Instant,
    /// Member searches not ended yet.
    pub(super) members: Vec<SearchKey>,
    /// Members whose driver accepted and is held, by member.
    pub(super) held: BTreeMap<SearchKey, Holding>,
    /// Set once the group fails: why its drivers are let go.
    pub(super) ending: Option<Ending>,
    /// Cluster mode: every member is held and the booking is being asked
    /// of Redis (see `commit.rs`); nothing else decides meanwhile.
    pub(super) committing: Option<super::commit::Commit>,
    /// Why the group is to fail if Redis refuses the booking (the rider
    /// cancelled, or the deadline passed, while it was asked).
    pub(super) pending_end: Option<Ending>,
    /// Drivers asked by members that ended (for the candidates metric).
    tried: u32,
}

/// A driver held for a group.
pub(super) struct Holding {
    pub(super) driver: DriverId,
    /// The driver's node, when it is another one.
    pub(super) node: Option<NodeId>,
    pub(super) offer_id: OfferId,
    pub(super) fencing_token: FencingToken,
    pub(super) at: LatLon,
}

/// The search key of member `i` of the group request `request_id`.
fn member_id(request_id: &RequestId, i: u8) -> RequestId {
    format!("{request_id}{MEMBER_SEPARATOR}{i}").into()
}

impl<R: Clone> Searches<R> {
    /// Starts group `key` of `vehicles` members, each a search like
    /// `search` (which carries the rider, the pickup and the first
    /// member's sequence number).
    pub(super) fn start_group(
        &mut self,
        now: Instant,
        key: SearchKey,
        search: Search<R>,
        vehicles: u8,
    ) {
        let group = Group {
            seq: search.seq,
            size: vehicles,
            rider: search.rider.clone(),
            session: search.session,
            pickup: search.pickup,
            started: search.started,
            members: Vec::new(),
            held: BTreeMap::new(),
            ending: None,
            committing: None,
            pending_end: None,
            tried: 0,
        };
        self.groups.insert(key.clone(), group);
        // Every member exists before any looks: one that ends at once
        // (no time left) fails a group whose members are all known.
        let mut members = Vec::new();
        for i in 0..vehicles {
            let seq = if i == 0 {
                search.seq
            } else {
                self.next_seq += 1;
                self.next_seq
            };
            let mut member = Search::new(
                seq,
                search.rider.clone(),
                search.session,
                search.pickup,
                search.started,
            );
            member.group = Some(key.clone());
            let member_key = (key.0.clone(), member_id(&key.1, i));
            self.searches.insert(member_key.clone(), member);
            members.push((seq, member_key));
        }
        if let Some(group) = self.groups.get_mut(&key) {
            group.members = members.iter().map(|(_, k)| k.clone()).collect();
        }
        for (seq, member_key) in members {
            let looking = self
                .searches
                .get(&member_key)
                .is_some_and(|s| matches!(s.phase, Phase::Looking));
            if looking {
                self.dispatch(now, member_key, seq);
            }
        }
    }

    /// A member's driver accepted and is held for the group: the group
    /// completes when it is the last one, else the rider and the held
    /// drivers hear how many have accepted.
    pub fn offer_held(&mut self, now: Instant, outcome: OfferOutcome, fencing_token: FencingToken) {
        let key = (outcome.rider_id, outcome.request_id);
        let driver = outcome.driver_id;
        let Some(search) = self
            .searches
            .get_mut(&key)
            .filter(|s| s.seq == outcome.search && s.current_offer() == Some(outcome.offer_id))
        else {
            // The member ended or moved on: the cancel that made it (on its
            // way to the driver, or sent now) ends the hold.
            return;
        };
        if search.revoking == Some(outcome.offer_id) {
            return; // taken back by an older group: the cancel ends the hold
        }
        let Some(group_key) = search.group.clone() else {
            debug_assert!(false, "only group offers are held");
            return;
        };
        let was_locking = matches!(search.phase, Phase::Locking { .. });
        let node = match &search.phase {
            Phase::Locking { node, .. } | Phase::Offered { node, .. } => node.clone(),
            Phase::Looking => None,
        };
        if was_locking {
            // The hold overtook the lock's answer (which will be ignored).
            self.locking.remove(&driver);
            search.candidates_tried += 1;
            search.phase = Phase::Offered {
                driver: driver.clone(),
                node: node.clone(),
                offer_id: outcome.offer_id,
                fencing_token,
            };
            if node.is_some() {
                // As its grant would have: the offer's end is due by its
                // deadline, else its lock is settled. The due date set for
                // the answer lapses with the answer (seed 10570: a
                // withdrawn member whose end was lost waited forever).
                let due = now
                    + self.settings.offer_timeout
                    + self.settings.lock_margin
                    + super::REMOTE_ANSWER_WAIT;
                self.remote_due.push(std::cmp::Reverse((
                    due,
                    search.seq,
                    outcome.offer_id,
                    0,
                    super::Awaited::Outcome,
                    key.clone(),
                )));
            }
        }
        if search.cancel_requested {
            // Withdrawn while locking: the withdrawal goes out now (once
            // offered, it went out already).
            if was_locking {
                self.withdraw(now, &key);
            }
            return;
        }
        let at = outcome.driver_location.unwrap_or(search.pickup);
        if was_locking {
            // Granted just now, as far as the matcher knows: an older
            // group waiting in reach takes it (see `wound.rs`).
            self.older_group_takes(now, &key);
            let taken = self.searches.get(&key).and_then(|s| s.revoking);
            if taken == Some(outcome.offer_id) {
                return;
            }
        }
        let search_timeout = self.settings.search_timeout;
        let Some(group) = self.groups.get_mut(&group_key) else {
            return;
        };
        if group.ending.is_some() || group.committing.is_some() {
            return; // failing: every member's driver is being let go
        }
        // Holds last until the search's deadline and a little more: past
        // the deadline the group is not completed, so that every commit
        // reaches its driver before the hold lapses (the matcher may be
        // running behind its timers).
        if now >= group.started + search_timeout {
            return self.end_group(now, &group_key, Ending::GroupIncomplete);
        }
        let holding = Holding {
            driver,
            node,
            offer_id: outcome.offer_id,
            fencing_token,
            at,
        };
        group.held.insert(key, holding);
        let accepted = group.held.len() as u8;
        if accepted == group.size {
            return self.complete_group(now, &group_key);
        }
        let progress = ServerMessage::GroupProgress {
            request_id: group_key.1.clone(),
            accepted,
            group_size: group.size,
        };
        let rider = group.rider.clone();
        for holding in group.held.values() {
            self.effects.push(SearchEffect::GroupNews {
                driver: holding.driver.clone(),
                node: holding.node.clone(),
                offer_id: holding.offer_id,
                fencing_token: holding.fencing_token,
                accepted,
                trip_id: None,
            });
        }
        self.tell(&rider, progress);
    }

    /// Every member is held: each driver goes on its trip and the rider
    /// gets one `matched`, nearest driver first. In cluster mode the trips
    /// are booked in Redis first (see `commit.rs`).
    fn complete_group(&mut self, now: Instant, key: &SearchKey) {
        if self.node.is_some() {
            return self.start_commit(now, key);
        }
        let Some(group) = self.groups.get(key) else {
            return;
        };
        let trips = group
            .held
            .keys()
            .map(|member| (member.clone(), self.ids.next_trip()))
            .collect();
        self.book_group(now, key, trips);
    }

    /// Group `key` is booked, with each member's trip: each driver is told
    /// it goes on its trip, the rider gets one `matched`, nearest driver
    /// first.
    pub(super) fn book_group(
        &mut self,
        now: Instant,
        key: &SearchKey,
        trips: BTreeMap<SearchKey, TripId>,
    ) {
        let complete = self
            .groups
            .get(key)
            .is_some_and(|g| g.held.len() == usize::from(g.size));
        if !complete {
            // Never a partial `matched`: only a complete group is booked
            // (a booking's members stay held while Redis is asked).
            tracing::error!(request = %key.1, "a group to book is not complete; it fails");
            if let Some(group) = self.groups.get_mut(key) {
                group.committing = None;
            }
            return self.end_group(now, key, Ending::GroupIncomplete);
        }
        let Some(group) = self.groups.remove(key) else {
            return;
        };
        let mut held: Vec<(Holding, TripId)> = group
            .held
            .into_iter()
            .filter_map(|(member, holding)| trips.get(&member).map(|trip| (holding, *trip)))
            .collect();
        held.sort_by(|(a, _), (b, _)| {
            let (da, db) = (a.at.distance_m(group.pickup), b.at.distance_m(group.pickup));
            da.total_cmp(&db).then_with(|| a.driver.cmp(&b.driver))
        });
        let mut drivers = Vec::with_capacity(held.len());
        for (holding, trip_id) in held {
            let news = SearchEffect::GroupNews {
                driver: holding.driver.clone(),
                node: holding.node.clone(),
                offer_id: holding.offer_id,
                fencing_token: holding.fencing_token,
                accepted: group.size,
                trip_id: Some(trip_id),
            };
            if holding.node.is_some() {
                // Between nodes a message may be lost; the driver would
                // then learn of its trip only when its hold runs out, from
                // Redis, which a server losing its data meanwhile can leave
                // unable to tell. Said again twice (a repeat is a no-op).
                for after in RESEND_NEWS {
                    self.resends.push((now + after, news.clone()));
                }
            }
            self.effects.push(news);
            if self.node.is_some() {
                // Its app may have left the node that holds it (whose actor
                // may have died with the hold, on this node too): wherever
                // it is, it takes the trip over from Redis.
                self.effects.push(SearchEffect::TripBooked {
                    driver: holding.driver.clone(),
                });
            }
            let distance_m = holding.at.distance_m(group.pickup);
            m::pickup_distance(distance_m);
            drivers.push(MatchedDriver {
                driver_id: holding.driver,
                trip_id,
                driver_location: holding.at,
                distance_m,
            });
        }
        let mut tried = group.tried;
        for member in &group.members {
            if let Some(search) = self.searches.remove(member) {
                self.unpark(search.seq);
                tried += search.candidates_tried;
            }
        }
        self.forget_request(group.session, key);
        let first = drivers[0].clone();
        let message = ServerMessage::Matched {
            request_id: key.1.clone(),
            trip_id: first.trip_id,
            driver_id: first.driver_id,
            driver_location: first.driver_location,
            distance_m: first.distance_m,
            drivers,
        };
        let age = now.saturating_duration_since(group.started);
        m::group_completed(age);
        m::search_finished(&message, age, tried);
        self.tell(&group.rider, message);
    }

    /// Fails group `key` (`why`: the rider cancelled, or it can't be
    /// completed): every member is withdrawn and its driver let go; the
    /// rider hears once the last member has ended.
    pub(super) fn end_group(&mut self, now: Instant, key: &SearchKey, why: Ending) {
        let Some(group) = self.groups.get_mut(key) else {
            return;
        };
        if group.ending.is_some() {
            return;
        }
        if group.committing.is_some() {
            // Redis decides first: booked, it stands (the cancel or the
            // deadline came too late); refused, the group fails for this.
            group.pending_end.get_or_insert(why);
            return;
        }
        group.ending = Some(why);
        // Cluster mode: a held member's news was not awaited (see
        // `settle_due`); now its driver must answer the withdrawal, or the
        // hold is settled in Redis like any overdue offer (the driver's
        // node may have died, or its actor crashed and came back without
        // the hold).
        let cluster_held: Vec<(SearchKey, OfferId)> = group
            .held
            .iter()
            .filter(|_| self.node.is_some())
            .map(|(key, h)| (key.clone(), h.offer_id))
            .collect();
        group.held.clear();
        for (key, offer_id) in cluster_held {
            if let Some(search) = self.searches.get(&key) {
                let due = now + super::REMOTE_ANSWER_WAIT;
                self.remote_due.push(std::cmp::Reverse((
                    due,
                    search.seq,
                    offer_id,
                    0,
                    super::Awaited::Outcome,
                    key,
                )));
            }
        }
        let members = group.members.clone();
        for member in &members {
            if let Some(search) = self.searches.get_mut(member) {
                search.withdraw_why = why;
            }
        }
        for member in &members {
            self.withdraw(now, member);
        }
    }

    /// Member `key` of group `group_key` ended with `message` (which only
    /// the group's own final message reaches the rider as).
    pub(super) fn member_finished(
        &mut self,
        now: Instant,
        group_key: &SearchKey,
        key: &SearchKey,
        message: ServerMessage,
        tried: u32,
    ) {
        let Some(group) = self.groups.get_mut(group_key) else {
            return;
        };
        group.members.retain(|k| k != key);
        group.held.remove(key);
        group.tried += tried;
        if group.ending.is_none() {
            // Ended by itself: out of time or candidates.
            let why = match message {
                ServerMessage::Cancelled { .. } => Ending::RiderCancelled,
                _ => Ending::GroupIncomplete,
            };
            self.end_group(now, group_key, why);
        }
        if self
            .groups
            .get(group_key)
            .is_some_and(|g| g.members.is_empty())
        {
            self.close_group(now, group_key);
        }
    }

    /// A failed group's last member ended: the rider's final message.
    fn close_group(&mut self, now: Instant, key: &SearchKey) {
        let Some(group) = self.groups.remove(key) else {
            return;
        };
        self.forget_request(group.session, key);
        let why = group.ending.unwrap_or(Ending::GroupIncomplete);
        let request_id = key.1.clone();
        let message = match why {
            Ending::RiderCancelled => ServerMessage::Cancelled { request_id },
            _ => ServerMessage::NoDriver {
                request_id,
                reason: None,
            },
        };
        let age = now.saturating_duration_since(group.started);
        m::group_failed(why);
        m::search_finished(&message, age, group.tried);
        self.tell(&group.rider, message);
    }

    /// Member `key`'s offer `offer_id` no longer counts as held. Not while
    /// its group is being booked: Redis's answer (or a member's settle)
    /// decides then, and a booking names every member (see `commit.rs`).
    pub(super) fn unhold(&mut self, key: &SearchKey, offer_id: OfferId) {
        let Some(group) = self.group_of(key) else {
            return;
        };
        if let Some(group) = self.groups.get_mut(&group) {
            if group.committing.is_some() {
                return;
            }
            if group.held.get(key).is_some_and(|h| h.offer_id == offer_id) {
                group.held.remove(key);
            }
        }
    }

    /// Whether member `key`'s offer `offer_id` is held for its group.
    pub(super) fn is_held(&self, key: &SearchKey, offer_id: OfferId) -> bool {
        self.group_of(key)
            .and_then(|group| self.groups.get(&group))
            .and_then(|group| group.held.get(key))
            .is_some_and(|h| h.offer_id == offer_id)
    }

    /// `driver` turned search `key` down: it is not asked again for it, nor,
    /// for a group member, for any member of the group.
    pub(super) fn exclude(&mut self, key: &SearchKey, driver: DriverId) {
        let members = self
            .group_of(key)
            .and_then(|group| self.groups.get(&group))
            .map_or_else(|| vec![key.clone()], |group| group.members.clone());
        for member in members {
            if let Some(search) = self.searches.get_mut(&member) {
                search.excluded.push(driver.clone());
            }
        }
    }

    /// Whether member `key`'s group is being booked in Redis: its members
    /// neither look for drivers nor end meanwhile.
    pub(super) fn group_committing(&self, key: &SearchKey) -> bool {
        self.group_of(key)
            .and_then(|group| self.groups.get(&group))
            .is_some_and(|group| group.committing.is_some())
    }

    /// Booked groups' news due to be said again.
    pub(super) fn resends_due(&mut self, now: Instant) {
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.resends)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.resends = later;
        self.effects.extend(due.into_iter().map(|(_, news)| news));
    }

    fn group_of(&self, key: &SearchKey) -> Option<SearchKey> {
        self.searches.get(key).and_then(|s| s.group.clone())
    }
}
