//! News from drivers, here or on other nodes: availability changes, lock
//! answers and how offers ended.

use std::cmp::Reverse;
use std::time::Instant;

use super::{
    Awaited, LockAnswer, OfferOutcome, Phase, SearchEffect, Searches, REMOTE_ANSWER_WAIT,
    STORE_FAILURES, STORE_RETRY,
};
use crate::core::lock::{Ending, LockRefused};
use crate::core::Granted;
use crate::location::LatLon;
use crate::metrics as m;
use crate::protocol::DriverId;

impl<R: Clone> Searches<R> {
    /// A driver connected to this node is offerable at `at`, or (`None`) no
    /// longer. Each call carries the driver's newest state: changes may be
    /// coalesced on the way, never reordered.
    pub fn driver_changed(&mut self, now: Instant, driver: DriverId, at: Option<LatLon>) {
        // Counted here only: each node counts its own drivers, once per
        // change the driver's actor reports (not per location update).
        let at = match at {
            Some(at) if !self.offerable_at(at) => {
                m::outside_service_area("driver");
                None
            }
            at => at,
        };
        match at {
            Some(at) => {
                // Connected here now, whatever another node said before.
                self.remote.remove(&driver);
                self.local.insert(driver.clone());
                self.drivers.upsert(driver.clone(), at);
                self.wake_parked(now, &driver, at);
            }
            None => {
                if self.local.remove(&driver) {
                    self.drivers.remove(&driver);
                }
                // Another node said it has this driver: believe it now.
                if let Some((node, at)) = self.shadowed.remove(&driver) {
                    self.remote_driver(now, node, driver, Some(at));
                }
            }
        }
    }

    /// A driver answered a lock request.
    pub fn lock_answered(&mut self, now: Instant, answer: LockAnswer) {
        let LockAnswer {
            driver_id,
            offer_id,
            search: seq,
            rider_id,
            request_id,
            result,
            node: from,
        } = answer;
        let key = (rider_id, request_id);
        let Some(search) = self
            .searches
            .get_mut(&key)
            .filter(|s| s.seq == seq && s.current_offer() == Some(offer_id))
        else {
            // The offer already ended (the driver reported it before this
            // answer arrived), or its settle gave up on it, or the search is
            // gone: whoever ended it took the driver out of `locking`. A
            // grant nobody waits for any more is withdrawn, so the driver
            // is not held for nothing (a no-op if the offer has ended).
            if let Ok(Granted { fencing_token }) = result {
                self.effects.push(SearchEffect::Cancel {
                    driver: driver_id,
                    node: from,
                    offer_id,
                    fencing_token,
                    why: Ending::RiderCancelled,
                });
            }
            return;
        };
        if !matches!(search.phase, Phase::Locking { .. }) {
            // A second answer to the lock it already holds (the request was
            // delivered twice): the first one decided.
            return;
        }
        self.locking.remove(&driver_id);
        match result {
            Ok(Granted { fencing_token }) => {
                let Phase::Locking { driver, node, .. } = search.phase.clone() else {
                    return;
                };
                let first_offer = search.candidates_tried == 0;
                search.store_failures = 0;
                search.candidates_tried += 1;
                search.phase = Phase::Offered {
                    driver,
                    node: node.clone(),
                    offer_id,
                    fencing_token,
                };
                // The driver's side records request→offer as it sends a
                // local offer; a remote one is recorded here, as granted.
                if node.is_some() {
                    search.offered_at = self.drivers.position(&driver_id);
                    if first_offer {
                        m::request_to_offer(now.saturating_duration_since(search.started));
                    }
                }
                // The outcome is due by the offer's deadline; past that (plus
                // the lock's margin), it is settled in Redis, or on one node
                // taken as lost (the driver's actor died holding it).
                let due = now
                    + self.settings.offer_timeout
                    + self.settings.lock_margin
                    + REMOTE_ANSWER_WAIT;
                self.remote_due.push(Reverse((
                    due,
                    seq,
                    offer_id,
                    0,
                    Awaited::Outcome,
                    key.clone(),
                )));
                if search.cancel_requested {
                    self.withdraw(now, &key);
                }
                // The driver will say it is unavailable too; taking it out now
                // spares other searches a refused attempt in between.
                self.drivers.remove(&driver_id);
                self.local.remove(&driver_id);
                self.remote.remove(&driver_id);
                // A group member: an older group waiting in reach takes it.
                let member = self.searches.get(&key);
                if member.is_some_and(|s| s.group.is_some() && !s.cancel_requested) {
                    self.older_group_takes(now, &key);
                }
            }
            Err(LockRefused::StoreUnavailable) => {
                // Redis could not decide. Once may be a slow reply: try again
                // shortly. Several times in a row, it is down: say so rather
                // than trying every driver in reach against it.
                search.store_failures += 1;
                if search.store_failures >= STORE_FAILURES {
                    return self.finish_without_locks(now, &key);
                }
                search.phase = Phase::Looking;
                self.retries.push(Reverse((now + STORE_RETRY, seq, key)));
            }
            Err(refused) => {
                let remote = matches!(search.phase, Phase::Locking { node: Some(_), .. });
                search.phase = Phase::Looking;
                if remote || refused == LockRefused::HeldElsewhere {
                    // The index was wrong about this driver (news between nodes
                    // is late): don't ask it again for this search, and drop
                    // a remote entry that names a driver gone from its node.
                    search.excluded.push(driver_id.clone());
                    if matches!(refused, LockRefused::Offline | LockRefused::NoLocation) {
                        self.forget_remote(&driver_id);
                    }
                }
                self.advance(now, key);
                // The refusing driver may still be offerable for someone parked.
                if let Some(at) = self.drivers.position(&driver_id) {
                    self.wake_parked(now, &driver_id, at);
                }
            }
        }
    }

    /// A driver's offer ended.
    pub fn offer_ended(&mut self, now: Instant, outcome: OfferOutcome) {
        let key = (outcome.rider_id, outcome.request_id);
        let driver_id = outcome.driver_id;
        self.hand_over(now, outcome.offer_id, &driver_id);
        self.unhold(&key, outcome.offer_id);
        let committing = self.group_committing(&key);
        let Some(search) = self
            .searches
            .get_mut(&key)
            .filter(|s| s.seq == outcome.search && s.current_offer() == Some(outcome.offer_id))
        else {
            return;
        };
        // Its current offer is over, taken back or not.
        search.revoking = None;
        if matches!(search.phase, Phase::Locking { .. }) {
            // The ending overtook the lock's answer; the answer will be stale.
            // The lock was granted all the same: the offer counts as made.
            self.locking.remove(&driver_id);
            search.candidates_tried += 1;
        }
        match (outcome.ending, outcome.trip_id) {
            (Ending::Accepted, Some(trip_id)) => {
                let at = outcome.driver_location.unwrap_or(search.pickup);
                self.finish_matched(now, &key, trip_id, driver_id, at);
            }
            (_, _) if committing => {
                // A held driver let go while its group is being booked: its
                // settle found no trip, so the booking did not land.
                search.phase = Phase::Looking;
                self.member_news(now, &key, None);
            }
            (ending, _) => {
                search.phase = Phase::Looking;
                if matches!(ending, Ending::Declined | Ending::Expired) {
                    self.exclude(&key, driver_id);
                }
                self.advance(now, key);
            }
        }
    }
}
