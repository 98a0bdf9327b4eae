//! Wound-wait between group requests (see `group.rs` for why): a member of
//! an older group that finds no free driver in reach takes one from a
//! member of a younger group, and gets it handed over once it is free.
//!
//! Two moments can find such a pair: the older member looking (and finding
//! nobody free: [`Searches::preempt`]), and a younger member being granted a
//! driver while an older member waits parked in its reach
//! ([`Searches::older_group_takes`]); without the second, an older member
//! that parked while the younger one's lock was still on its way would wait
//! for its deadline beside a driver it may take.
//!
//! Across nodes (cluster mode) a node sees neither the other nodes' groups
//! nor the drivers they hold (held drivers are in no index). So a member
//! that finds nobody free in reach, nor a younger group's driver on its
//! own node, asks every other node to wound for it (`Wound`, with its
//! group's age as a wall-clock start, its pickup and its reach): each node
//! takes the nearest driver in that reach from a member of one of its own
//! younger groups ([`Searches::wounded`]). The driver is let go
//! (`preempted`), the wounded group won't ask it again, and once it is
//! free it is announced as any driver is and wakes the older member, which
//! is parked with it in reach. There is no handover across nodes: another
//! search may take the freed driver first, and the older member asks again
//! every [`WOUND_REPEAT`] while it waits. Ages are compared by wall clock
//! (then node id): a total order across nodes as long as their clocks
//! agree to within the time between two groups' requests.

use std::time::{Duration, Instant};

use super::{Phase, SearchEffect, SearchKey, Searches};
use crate::cluster::wire::NodeId;
use crate::core::lock::{Ending, OfferId};
use crate::location::LatLon;
use crate::metrics as m;
use crate::protocol::DriverId;

/// Cluster mode: how often a parked group member asks other nodes again to
/// take a driver from a younger group for it.
pub(super) const WOUND_REPEAT: Duration = Duration::from_secs(1);

impl<R: Clone> Searches<R> {
    /// Member `key`, finding no free driver in reach, takes the nearest
    /// driver in reach from a member of a younger group. Whether it did (it
    /// then parks until the driver is handed over).
    pub(super) fn preempt(&mut self, now: Instant, key: &SearchKey) -> bool {
        let Some(search) = self.searches.get(key) else {
            return false;
        };
        let Some(group) = search.group.as_ref().and_then(|g| self.groups.get(g)) else {
            return false;
        };
        if search.preempting || search.cancel_requested || group.ending.is_some() {
            return false;
        }
        let radius = self.radius_of(search, now);
        let mut victim: Option<(f64, u64, SearchKey)> = None;
        for younger in self.groups.values() {
            // A group being booked in Redis is past taking from: its
            // members' locks may already be its trips.
            if younger.seq <= group.seq || younger.ending.is_some() || younger.committing.is_some()
            {
                continue;
            }
            for member in &younger.members {
                let Some(other) = self.searches.get(member) else {
                    continue;
                };
                let Some((driver, _)) = other.takeable() else {
                    continue;
                };
                let Some(at) = other.driver_at else {
                    continue;
                };
                let metres = at.distance_m(search.pickup);
                if metres > radius || search.excluded.contains(driver) {
                    continue;
                }
                let candidate = (metres, other.seq, member.clone());
                if victim
                    .as_ref()
                    .is_none_or(|v| (candidate.0, candidate.1) < (v.0, v.1))
                {
                    victim = Some(candidate);
                }
            }
        }
        let Some((_, _, victim)) = victim else {
            return false;
        };
        self.take(now, key, &victim)
    }

    /// Member `key` of a younger group was just granted its driver: the
    /// oldest member of an older group parked with that driver in reach
    /// takes it.
    pub(super) fn older_group_takes(&mut self, now: Instant, key: &SearchKey) {
        let Some(victim) = self.searches.get(key) else {
            return;
        };
        let Some(group) = victim.group.as_ref().and_then(|g| self.groups.get(g)) else {
            return;
        };
        let (Some((driver, _)), Some(at)) = (victim.takeable(), victim.driver_at) else {
            return;
        };
        let mut taker: Option<(u64, u64, SearchKey)> = None;
        for older in self.groups.values() {
            if older.seq >= group.seq || older.ending.is_some() {
                continue;
            }
            for member in &older.members {
                let Some(search) = self.searches.get(member) else {
                    continue;
                };
                let parked = matches!(search.phase, Phase::Looking)
                    && self.waiting.contains_key(&search.seq)
                    && !search.preempting
                    && !search.cancel_requested;
                if !parked
                    || search.excluded.contains(driver)
                    || at.distance_m(search.pickup) > self.radius_of(search, now)
                {
                    continue;
                }
                let candidate = (older.seq, search.seq, member.clone());
                if taker
                    .as_ref()
                    .is_none_or(|t| (candidate.0, candidate.1) < (t.0, t.1))
                {
                    taker = Some(candidate);
                }
            }
        }
        if let Some((_, _, taker)) = taker {
            self.take(now, &taker, key);
        }
    }

    /// Member `taker` takes the driver of member `victim` (of a younger
    /// group): the victim's offer is cancelled (`preempted`) and stops
    /// counting for its group, and the driver is handed to the taker once
    /// its ending is in. Whether it was taken.
    fn take(&mut self, now: Instant, taker: &SearchKey, victim: &SearchKey) -> bool {
        let Some(other) = self.searches.get_mut(victim) else {
            return false;
        };
        let Phase::Offered {
            driver,
            offer_id,
            fencing_token,
            node: None,
        } = other.phase.clone()
        else {
            return false;
        };
        if other.revoking.is_some() {
            return false;
        }
        other.revoking = Some(offer_id);
        let at = other.driver_at;
        let seq = other.seq;
        self.unhold(victim, offer_id);
        self.await_outcome(now, victim, seq, offer_id);
        tracing::debug!(driver = %driver, offer_id, "an older group takes a driver from a younger one");
        m::preemption();
        self.effects.push(SearchEffect::Cancel {
            driver,
            node: None,
            offer_id,
            fencing_token,
            why: Ending::Preempted,
        });
        let Some(search) = self.searches.get_mut(taker) else {
            return true;
        };
        search.preempting = true;
        self.handovers
            .insert(offer_id, (taker.clone(), search.seq, at));
        self.park(now, taker);
        true
    }

    /// Cluster mode: member `key` finds nobody to take on this node; every
    /// other node is asked to take a driver in its reach from a younger
    /// group (at most once per [`WOUND_REPEAT`]).
    pub(super) fn wound_elsewhere(&mut self, now: Instant, key: &SearchKey) {
        if self.node.is_none() {
            return;
        }
        let Some(search) = self.searches.get(key) else {
            return;
        };
        let Some(group) = search.group.as_ref().and_then(|g| self.groups.get(g)) else {
            return;
        };
        let recent = search
            .wounded_at
            .is_some_and(|at| now.saturating_duration_since(at) < WOUND_REPEAT);
        if recent || search.cancel_requested || group.ending.is_some() {
            return;
        }
        let (started, seq, pickup) = (group.started, group.seq, search.pickup);
        let radius_m = self.radius_of(search, now);
        let effect = SearchEffect::Wound {
            started_ago: now.saturating_duration_since(started),
            pickup,
            radius_m,
        };
        if let Some(search) = self.searches.get_mut(key) {
            search.wounded_at = Some(now);
        }
        self.effects.push(effect);
        // A younger group of this node may hold a driver of another node in
        // reach (`preempt` takes only this node's drivers, which it can
        // hand over).
        self.take_in_reach(now, |g| g.seq > seq, pickup, radius_m, true);
    }

    /// Cluster mode: a member of a group on node `from`, whose request came
    /// at `started_unix_ms` (wall clock), finds no free driver within
    /// `radius_m` of `pickup`. The nearest driver in that reach held or
    /// offered for a younger group of this node is taken from it
    /// (`preempted`); that group will not ask it again. `unix_now_ms` is
    /// the wall clock at `now`, to give this node's groups their start.
    pub fn wounded(
        &mut self,
        now: Instant,
        unix_now_ms: u64,
        from: &NodeId,
        started_unix_ms: u64,
        pickup: LatLon,
        radius_m: f64,
    ) {
        let Some(node) = self.node.clone() else {
            return;
        };
        let younger = |started: Instant| {
            let ago = now.saturating_duration_since(started).as_millis() as u64;
            let ours = unix_now_ms.saturating_sub(ago);
            (ours, &node) > (started_unix_ms, from)
        };
        self.take_in_reach(now, |g| younger(g.started), pickup, radius_m, false);
    }

    /// Takes the nearest driver within `radius_m` of `pickup` from a member
    /// of a group that `younger` says is younger than the one asking
    /// (offered or held, not being booked; with `remote_only`, a driver on
    /// another node).
    fn take_in_reach(
        &mut self,
        now: Instant,
        younger: impl Fn(&super::group::Group<R>) -> bool,
        pickup: LatLon,
        radius_m: f64,
        remote_only: bool,
    ) {
        let mut victim: Option<(f64, u64, SearchKey)> = None;
        for group in self.groups.values() {
            if group.ending.is_some() || group.committing.is_some() || !younger(group) {
                continue;
            }
            for member in &group.members {
                let Some(other) = self.searches.get(member) else {
                    continue;
                };
                let (Phase::Offered { node, .. }, None, Some(at)) =
                    (&other.phase, other.revoking, other.driver_at)
                else {
                    continue;
                };
                let metres = at.distance_m(pickup);
                if metres > radius_m || (remote_only && node.is_none()) {
                    continue;
                }
                let candidate = (metres, other.seq, member.clone());
                if victim
                    .as_ref()
                    .is_none_or(|v| (candidate.0, candidate.1) < (v.0, v.1))
                {
                    victim = Some(candidate);
                }
            }
        }
        if let Some((_, _, victim)) = victim {
            self.take_for_elsewhere(now, &victim);
        }
    }

    /// Cluster mode: the outcome of member `key`'s offer `offer_id` is due
    /// soon, or it is settled in Redis (a held member's was not awaited).
    fn await_outcome(&mut self, now: Instant, key: &SearchKey, seq: u64, offer_id: OfferId) {
        if self.node.is_some() {
            let due = now + super::REMOTE_ANSWER_WAIT;
            let entry = (due, seq, offer_id, 0, super::Awaited::Outcome, key.clone());
            self.remote_due.push(std::cmp::Reverse(entry));
        }
    }

    /// Member `victim`'s driver is taken for an older group on another
    /// node: its offer is cancelled (`preempted`), stops counting for its
    /// group, and its group won't ask that driver again.
    fn take_for_elsewhere(&mut self, now: Instant, victim: &SearchKey) {
        let Some(other) = self.searches.get_mut(victim) else {
            return;
        };
        let Phase::Offered {
            driver,
            offer_id,
            fencing_token,
            node,
        } = other.phase.clone()
        else {
            return;
        };
        other.revoking = Some(offer_id);
        let seq = other.seq;
        self.unhold(victim, offer_id);
        self.exclude(victim, driver.clone());
        // Its news was not awaited while held: now it is, or the offer is
        // settled in Redis (the cancel or the ending may be lost).
        self.await_outcome(now, victim, seq, offer_id);
        tracing::debug!(driver = %driver, offer_id, "an older group on another node takes a driver from a younger one");
        m::preemption();
        self.effects.push(SearchEffect::Cancel {
            driver,
            node,
            offer_id,
            fencing_token,
            why: Ending::Preempted,
        });
    }

    /// Offer `offer_id` of `driver` ended: if an older group took it back,
    /// the driver goes to the member that took it (if it still looks).
    pub(super) fn hand_over(&mut self, now: Instant, offer_id: OfferId, driver: &DriverId) {
        let Some((taker, seq, at)) = self.handovers.remove(&offer_id) else {
            return;
        };
        // The same search (not a later one under the same request id).
        let Some(search) = self.searches.get_mut(&taker).filter(|s| s.seq == seq) else {
            return;
        };
        search.preempting = false;
        if !matches!(search.phase, Phase::Looking) || search.cancel_requested {
            return;
        }
        self.unpark(seq);
        // Where the driver is now, if it is indexed again already (else
        // where it was when taken): still in reach and in a served area?
        let position = self.drivers.position(driver).or(at);
        let search = &self.searches[&taker];
        let in_reach = position.is_some_and(|p| {
            self.offerable_at(p) && p.distance_m(search.pickup) <= self.radius_of(search, now)
        });
        if self.locking.contains(driver)
            || !in_reach
            || search.excluded.contains(driver)
            || search.candidates_tried >= self.settings.max_candidates
        {
            // Someone older took the freed driver first, or it is no longer
            // for this search: look again (and perhaps take another).
            self.advance(now, taker);
        } else {
            self.ask_for_lock(now, taker.clone(), driver.clone());
            if let Some(search) = self.searches.get_mut(&taker) {
                search.driver_at = search.driver_at.or(at);
            }
        }
    }
}
