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

use std::time::Instant;

use super::{Phase, SearchEffect, SearchKey, Searches};
use crate::core::lock::{Ending, OfferId};
use crate::metrics as m;
use crate::protocol::DriverId;

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
        self.unhold(victim, offer_id);
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
