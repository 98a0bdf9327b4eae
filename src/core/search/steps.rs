//! A search's steps: looking for the nearest free driver, parking, asking
//! for a lock, waking parked searches, and the final message.

use std::cmp::Reverse;
use std::sync::Arc;

use super::{
    Awaited, Phase, Search, SearchEffect, SearchKey, Searches, HOLD_MARGIN, REMOTE_ANSWER_WAIT,
};
use crate::areas::ServiceAreas;
use crate::core::lock::TripId;
use crate::core::{GroupTag, OfferHolder};
use crate::location::LatLon;
use crate::metrics as m;
use crate::protocol::{DriverId, MatchedDriver, NoDriverReason, ServerMessage};
use std::time::Instant;

/// Parked searches looked at oldest-first before falling back to a spatial
/// query when a driver frees up (see `wake_parked`).
const OLDEST_PARKED_SCAN: usize = 64;

impl<R: Clone> Searches<R> {
    /// Serves only `areas`: requests whose pickup is outside every area are
    /// refused (`outside_service_area`), and drivers outside every area are
    /// not offered. Every node of a cluster must serve the same areas.
    pub fn serve_only(&mut self, areas: Arc<ServiceAreas>) {
        self.areas = Some(areas);
    }

    /// Whether a driver at `at` may be offered.
    pub(super) fn offerable_at(&self, at: LatLon) -> bool {
        self.areas.as_ref().is_none_or(|a| a.area_of(at).is_some())
    }

    /// Moves a search that is `Looking` forward: ends it if it was cancelled
    /// or ran out of time, asks the nearest untried driver, or parks it.
    pub(super) fn advance(&mut self, now: Instant, key: SearchKey) {
        if self.group_committing(&key) {
            // Its group is being booked: Redis's answer decides (a member
            // whose hold ended meanwhile looks again only if it is refused,
            // and then ends with the group).
            return;
        }
        let Some(search) = self.searches.get(&key) else {
            return;
        };
        debug_assert!(matches!(search.phase, Phase::Looking));
        let request_id = key.1.clone();
        if search.cancel_requested {
            return self.finish(now, &key, ServerMessage::Cancelled { request_id });
        }
        let out_of_time =
            search.deadline_passed || now >= search.started + self.settings.search_timeout;
        if out_of_time || search.candidates_tried >= self.settings.max_candidates {
            let message = ServerMessage::NoDriver {
                request_id,
                reason: None,
            };
            return self.finish(now, &key, message);
        }
        // Drivers being locked for other searches and drivers who turned this
        // one down are skipped, however many: the walk ends at the first free
        // driver or the radius, so a search parks only when nobody in reach is
        // free for it, and then the next driver to free up wakes it.
        self.index_queries += 1;
        let member = search.group.is_some();
        let radius = self.radius_of(search, now);
        let candidate = self
            .drivers
            .nearest_within(search.pickup, radius)
            .find(|(id, _)| !search.excluded.contains(id) && !self.locking.contains(id));
        match candidate {
            Some((driver_id, _)) => self.ask_for_lock(now, key, driver_id),
            // A group member may take a driver from a younger group.
            None if member && self.preempt(now, &key) => {}
            None => {
                self.park(now, &key);
                if member {
                    self.wound_elsewhere(now, &key);
                }
            }
        }
    }

    /// How far from its pickup `search` looks at `now`.
    pub(super) fn radius_of(&self, search: &Search<R>, now: Instant) -> f64 {
        let age = now.saturating_duration_since(search.started);
        self.settings.radius_at(age)
    }

    pub(super) fn park(&mut self, now: Instant, key: &SearchKey) {
        let Some(search) = self.searches.get_mut(key) else {
            return;
        };
        if self.waiting.insert(search.seq, key.clone()).is_none() {
            self.waiting_at.upsert(search.seq, search.pickup);
        }
        // A search that can still look farther looks again when it may
        // (not past its deadline, when it ends anyway).
        let deadline = search.started + self.settings.search_timeout;
        let mut widen_at = self
            .settings
            .next_widening(search.started, now)
            .filter(|at| *at < deadline);
        if self.node.is_some() && search.group.is_some() {
            // Cluster mode: a parked group member looks again (and asks
            // other nodes again to take a driver for it) every so often,
            // not only when its radius grows: its wound may have found
            // nothing to take yet, or been lost.
            let again = now + super::wound::WOUND_REPEAT;
            if again < deadline {
                widen_at = Some(widen_at.map_or(again, |at| at.min(again)));
            }
        }
        if widen_at.is_some() && search.widen_at != widen_at {
            search.widen_at = widen_at;
            if let Some(at) = widen_at {
                self.widenings.push(Reverse((at, search.seq, key.clone())));
            }
        }
    }

    /// Parked searches whose radius has grown look again.
    pub(super) fn widen_due(&mut self, now: Instant) {
        while let Some(Reverse((at, ..))) = self.widenings.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((at, seq, key))) = self.widenings.pop() else {
                break;
            };
            let Some(search) = self.searches.get_mut(&key) else {
                continue;
            };
            if search.seq != seq || search.widen_at != Some(at) {
                continue;
            }
            search.widen_at = None;
            if self.waiting.contains_key(&seq) {
                self.unpark(seq);
                self.advance(now, key);
            }
        }
    }

    pub(super) fn unpark(&mut self, seq: u64) {
        if self.waiting.remove(&seq).is_some() {
            self.waiting_at.remove(&seq);
        }
    }

    pub(super) fn ask_for_lock(&mut self, now: Instant, key: SearchKey, driver_id: DriverId) {
        let node = match (self.local.contains(&driver_id), self.remote.get(&driver_id)) {
            (true, _) => None,
            (false, Some(node)) => Some(node.clone()),
            // On one node every driver is here (one handed over from a
            // younger group is not in the index).
            (false, None) if self.node.is_none() => None,
            (false, None) => return self.park(now, &key),
        };
        // One driver at a time per search: asking a second would leave the
        // first one's answer unheard and that driver "being locked".
        let Some(search) = self
            .searches
            .get_mut(&key)
            .filter(|s| matches!(s.phase, Phase::Looking))
        else {
            debug_assert!(false, "asked for a lock while not looking");
            return;
        };
        let offer_id = self.ids.next_offer();
        let seq = search.seq;
        search.phase = Phase::Locking {
            driver: driver_id.clone(),
            node: node.clone(),
            offer_id,
        };
        search.driver_at = self.drivers.position(&driver_id);
        search.preempting = false;
        let not_after = search.started + self.settings.search_timeout;
        let group = search.group.as_ref().map(|group| GroupTag {
            request_id: group.1.clone(),
            size: self.groups.get(group).map_or(1, |g| g.size),
            hold_until: not_after + HOLD_MARGIN,
        });
        let holder = OfferHolder {
            search: seq,
            rider_id: key.0.clone(),
            request_id: key.1.clone(),
            pickup: search.pickup,
            first_offer_since: (search.candidates_tried == 0).then_some(search.started),
            node: None,
            incarnation: 0,
            group,
        };
        self.unpark(seq);
        self.locking.insert(driver_id.clone());
        if node.is_some() {
            // A lost request or answer between nodes would leave the search
            // waiting: past this, the lock is settled in Redis instead.
            let due = now + REMOTE_ANSWER_WAIT;
            self.remote_due
                .push(Reverse((due, seq, offer_id, 0, Awaited::Answer, key)));
        }
        self.effects.push(SearchEffect::Lock {
            driver: driver_id,
            node,
            offer_id,
            holder,
            timeout: self.settings.offer_timeout,
            not_after,
        });
    }

    /// Offers a newly available driver to the oldest parked search in reach
    /// that hasn't had this driver before.
    ///
    /// Oldest-first over the first few parked searches finds it at once in
    /// the usual case (the oldest waiting rider is in reach); only when none
    /// of those is does it ask the spatial index for every parked search in
    /// reach. Either way the answer is the oldest eligible one.
    pub(super) fn wake_parked(&mut self, now: Instant, driver_id: &DriverId, at: LatLon) {
        if self.waiting.is_empty() || self.locking.contains(driver_id) {
            return;
        }
        // Each parked search has its own radius (it grows as it waits).
        let settings = &self.settings;
        let in_reach = |search: &Search<R>, metres: f64| {
            let age = now.saturating_duration_since(search.started);
            !search.excluded.contains(driver_id) && metres <= settings.radius_at(age)
        };
        let mut oldest = None;
        for (seq, key) in self.waiting.iter().take(OLDEST_PARKED_SCAN) {
            let Some(search) = self.searches.get(key) else {
                continue;
            };
            if in_reach(search, search.pickup.distance_m(at)) {
                oldest = Some(*seq);
                break;
            }
        }
        if oldest.is_none() && self.waiting.len() > OLDEST_PARKED_SCAN {
            self.index_queries += 1;
            let widest = self.settings.max_radius_m.max(self.settings.radius_m);
            oldest = self
                .waiting_at
                .nearest_within(at, widest)
                .filter_map(|(seq, metres)| {
                    let search = self.searches.get(self.waiting.get(&seq)?)?;
                    in_reach(search, metres).then_some(seq)
                })
                .min();
        }
        if let Some(seq) = oldest {
            let key = self.waiting[&seq].clone();
            self.ask_for_lock(now, key, driver_id.clone());
        }
    }

    /// Ends a search with its final message.
    pub(super) fn finish(&mut self, now: Instant, key: &SearchKey, message: ServerMessage) {
        let Some(search) = self.searches.remove(key) else {
            return;
        };
        self.unpark(search.seq);
        if let Some(group) = search.group {
            let tried = search.candidates_tried;
            return self.member_finished(now, &group, key, message, tried);
        }
        self.forget_request(search.session, key);
        let age = now.saturating_duration_since(search.started);
        m::search_finished(&message, age, search.candidates_tried);
        self.tell(&search.rider, message);
    }

    /// Request `key` of connection `session` is over: it no longer counts
    /// against the rider's limit, nor is cancelled when the connection
    /// closes.
    pub(super) fn forget_request(&mut self, session: u64, key: &SearchKey) {
        if let Some(requests) = self.by_session.get_mut(&session) {
            requests.remove(&key.1);
            if requests.is_empty() {
                self.by_session.remove(&session);
            }
        }
        if let Some(count) = self.by_rider.get_mut(&key.0) {
            *count -= 1;
            if *count == 0 {
                self.by_rider.remove(&key.0);
            }
        }
    }

    /// Ends a search with `matched`: trip `trip_id` with `driver_id`, who is
    /// at `driver_location`.
    pub(super) fn finish_matched(
        &mut self,
        now: Instant,
        key: &SearchKey,
        trip_id: TripId,
        driver_id: DriverId,
        driver_location: LatLon,
    ) {
        if self.group_committing(key) {
            // A member's driver went on its trip while Redis was asked (a
            // settle found it): the group's booking landed.
            if !self.member_news(now, key, Some(trip_id)) {
                if let Some(search) = self.searches.get_mut(key) {
                    search.phase = Phase::Looking;
                }
            }
            return;
        }
        let Some(search) = self.searches.get(key) else {
            return;
        };
        let distance_m = driver_location.distance_m(search.pickup);
        m::pickup_distance(distance_m);
        let message = ServerMessage::Matched {
            request_id: key.1.clone(),
            trip_id,
            driver_id: driver_id.clone(),
            driver_location,
            distance_m,
            drivers: vec![MatchedDriver {
                driver_id,
                trip_id,
                driver_location,
                distance_m,
            }],
        };
        self.finish(now, key, message);
    }

    /// Ends a search that can't lock drivers (Redis is down): `cancelled` if
    /// the rider asked for that, else `no_driver` saying why.
    pub(super) fn finish_without_locks(&mut self, now: Instant, key: &SearchKey) {
        let Some(search) = self.searches.get(key) else {
            return;
        };
        let request_id = key.1.clone();
        let message = if search.cancel_requested {
            ServerMessage::Cancelled { request_id }
        } else {
            ServerMessage::NoDriver {
                request_id,
                reason: Some(NoDriverReason::LocksUnavailable),
            }
        };
        self.finish(now, key, message);
    }

    /// The offer of search `key` to `driver` is over without news of it.
    pub(super) fn offer_lost(&mut self, now: Instant, key: SearchKey, driver: DriverId) {
        let Some(offer_id) = self.searches.get(&key).and_then(|s| s.current_offer()) else {
            return;
        };
        self.hand_over(now, offer_id, &driver);
        self.unhold(&key, offer_id);
        let Some(search) = self.searches.get_mut(&key) else {
            return;
        };
        if matches!(search.phase, Phase::Locking { .. }) {
            self.locking.remove(&driver);
        }
        search.revoking = None;
        search.phase = Phase::Looking;
        self.exclude(&key, driver);
        self.advance(now, key);
    }
}
