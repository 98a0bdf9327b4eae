//! Cluster mode: a driver held for a group.
//!
//! On one node the matcher commits a group in one step of its own. Across
//! nodes the group's members are driver actors on several nodes, and the
//! commit is a Redis script run by the rider's node (`CONFIRM_GROUP`),
//! which books every member's trip on a server or none. A member's part:
//!
//! - its accept keeps its lock in Redis until the group's hold ends
//!   (`HOLD`); only then is it held and the rider's node told. A hold Redis
//!   refuses, or can't confirm, ends the offer as an expired one;
//! - the rider's node's commit news (with the trip id) books the trip;
//! - anything else that would end the hold (the rider's node withdraws it,
//!   dies, or the hold's deadline passes) first *settles* the lock in
//!   Redis: that stops any later group commit and says whether one had
//!   landed. The driver goes on the trip if it had, and is free otherwise.
//!   Until Redis can tell, the driver stays held (freeing it could hand it
//!   to another rider while its group's trip stands).

use std::time::{Duration, Instant};

use super::{Booking, DriverEffect, DriverEvent, RedisOp, TripRecord, Waiting, LOCK_MARGIN};
use crate::core::lock::{Ending, FencingToken, LockState, OfferId, TripId};
use crate::core::Settled;
use crate::protocol::ErrorCode;

/// How often a hold Redis could not decide is asked, and how far apart.
const HOLD_ATTEMPTS: u32 = 3;
const HOLD_RETRY: Duration = Duration::from_millis(100);

/// How long apart a hold's settle is asked again while Redis can't tell.
const SETTLE_HOLD_RETRY: Duration = Duration::from_millis(500);

impl Booking {
    /// The app accepted `offer_id`, an offer of a group, until `until`:
    /// the lock is kept in Redis for that long before the driver is held.
    pub(super) fn hold_in_cluster(&mut self, now: Instant, offer_id: OfferId, until: Instant) {
        if let Err(e) = self.lock.check_answerable(offer_id, now) {
            return self.answer_failed(now, e);
        }
        if now >= until {
            return self.hold_lost(now, offer_id);
        }
        self.ask_hold(now, offer_id, until, now, 1);
    }

    fn ask_hold(
        &mut self,
        now: Instant,
        offer_id: OfferId,
        until: Instant,
        accepted_at: Instant,
        attempt: u32,
    ) {
        let offer = self.lock.current_offer().expect("an answerable offer");
        let op = RedisOp::Hold {
            owner: self.owner_of(&offer.holder, offer_id),
            ttl: until.saturating_duration_since(now) + LOCK_MARGIN,
            token: offer.fencing_token,
        };
        let wait = Waiting::Hold {
            offer_id,
            until,
            accepted_at,
            attempt,
            retry_at: None,
        };
        self.redis(op, Some(wait));
    }

    /// Redis's word on a hold.
    pub(super) fn hold_answered(
        &mut self,
        now: Instant,
        offer_id: OfferId,
        until: Instant,
        accepted_at: Instant,
        attempt: u32,
        kept: Option<bool>,
    ) {
        match kept {
            Some(true) => match self.lock.hold(offer_id, until, accepted_at) {
                Ok(offer) => {
                    let offer = offer.clone();
                    let outcome = self.outcome_of(&offer, Ending::Accepted, None);
                    self.group_accepted = 0;
                    self.effects.push(DriverEffect::Held(
                        outcome,
                        offer.fencing_token,
                        offer.holder.node.clone(),
                    ));
                }
                Err(e) => self.answer_failed(now, e),
            },
            None if attempt < HOLD_ATTEMPTS => {
                self.waiting = Some(Waiting::Hold {
                    offer_id,
                    until,
                    accepted_at,
                    attempt,
                    retry_at: Some(now + HOLD_RETRY),
                })
            }
            // Refused (the lock lapsed, or its requester gave up on it), or
            // Redis can't tell: not held. The offer ends as expired, and
            // its release frees the lock where the hold may have landed.
            _ => self.hold_lost(now, offer_id),
        }
    }

    fn hold_lost(&mut self, now: Instant, offer_id: OfferId) {
        if let Some(ended) = self.lock.lose(offer_id) {
            self.report(now, ended);
        }
        self.error(
            ErrorCode::OfferExpired,
            format!("offer {offer_id} lost its lock before your accept could be held"),
        );
    }

    /// A hold asked again when due (see [`Booking::confirm_retry_due`]).
    pub(super) fn hold_retry_due(&mut self, now: Instant) -> bool {
        match self.waiting.clone() {
            Some(Waiting::Hold {
                offer_id,
                until,
                accepted_at,
                attempt,
                retry_at: Some(at),
            }) if at <= now => {
                self.waiting = None;
                if self.lock.held_offer().is_some() || self.lock.current_offer().is_none() {
                    return true;
                }
                self.ask_hold(now, offer_id, until, accepted_at, attempt + 1);
                true
            }
            Some(Waiting::SettleHold {
                owner,
                retry_at: Some(at),
                ..
            }) if at <= now => {
                if let Some(Waiting::SettleHold { retry_at, .. }) = &mut self.waiting {
                    *retry_at = None;
                }
                self.effects
                    .push(DriverEffect::Redis(RedisOp::Settle { owner }));
                true
            }
            _ => false,
        }
    }

    /// The held offer ends for `why` (the rider's node withdrew it or is
    /// gone, or the hold ran out): settled in Redis first, which says
    /// whether the group was booked after all.
    pub(super) fn settle_hold(&mut self, offer_id: OfferId, token: FencingToken, why: Ending) {
        let Some(offer) = self
            .lock
            .held_offer()
            .filter(|o| o.offer_id == offer_id && o.fencing_token == token)
        else {
            return;
        };
        let owner = self.owner_of(&offer.holder, offer_id);
        let wait = Waiting::SettleHold {
            owner: owner.clone(),
            offer_id,
            token,
            why,
            retry_at: None,
        };
        self.redis(RedisOp::Settle { owner }, Some(wait));
    }

    /// What settling a hold found: the trip the group booked, or nothing
    /// (the driver is free), or (`None`) Redis can't tell yet.
    pub(super) fn hold_settled(
        &mut self,
        now: Instant,
        owner: String,
        offer_id: OfferId,
        token: FencingToken,
        why: Ending,
        settled: Option<Settled>,
    ) {
        match settled {
            Some(Settled::Trip(trip_id)) => self.commit_hold(now, offer_id, token, trip_id),
            Some(Settled::Dead) => {
                if let Some(ended) = self.lock.cancel(offer_id, token, why) {
                    self.report(now, ended);
                }
            }
            None => {
                // The rider's node's word that the group was booked, waiting
                // behind this settle, is proof enough: a majority booked it.
                // Its renewals then write the trip back where a server lost
                // it, which the settle alone could never tell.
                let booked = self.deferred.iter().position(|e| {
                    matches!(e, DriverEvent::CommitHold { offer_id: o, fencing_token: t, .. }
                        if *o == offer_id && *t == token)
                });
                if let Some(i) = booked {
                    if let Some(DriverEvent::CommitHold { trip_id, .. }) = self.deferred.remove(i) {
                        return self.commit_hold(now, offer_id, token, trip_id);
                    }
                }
                self.waiting = Some(Waiting::SettleHold {
                    owner,
                    offer_id,
                    token,
                    why,
                    retry_at: Some(now + SETTLE_HOLD_RETRY),
                })
            }
        }
    }

    /// The group of the held offer was booked (the rider's node said so,
    /// or a settle found the trip): the driver goes on trip `trip_id`,
    /// whose lock it keeps renewed like any trip's.
    pub(super) fn commit_hold(
        &mut self,
        now: Instant,
        offer_id: OfferId,
        token: FencingToken,
        trip_id: TripId,
    ) {
        let record = self
            .lock
            .held_offer()
            .filter(|o| o.offer_id == offer_id && o.fencing_token == token)
            .map(|offer| {
                let node = self.node.clone().expect("cluster mode");
                TripRecord {
                    owner: self.owner_of(&offer.holder, offer_id),
                    trip_id,
                    offer_id,
                    fencing_token: token,
                    rider_id: offer.holder.rider_id.clone(),
                    request_id: offer.holder.request_id.clone(),
                    pickup: offer.holder.pickup,
                    rider_node: offer.holder.node.clone().unwrap_or(node),
                    rider_is_remote: offer.holder.node.is_some(),
                    rider_incarnation: offer.holder.incarnation,
                }
            });
        let Some(record) = record else {
            // Said again by the rider's node (its first word may be lost),
            // or found by a settle already: nothing more to do.
            if self.trip_id() != Some(trip_id) {
                tracing::debug!(driver = %self.id, offer = offer_id, "a group commit found no hold");
            }
            return;
        };
        let Some(ended) = self.lock.commit(offer_id, token, trip_id) else {
            return;
        };
        self.renew_during_trip(now, record);
        self.report(now, ended);
        if self.session.is_none() {
            self.effects.push(DriverEffect::LeftOnTrip);
        }
    }

    /// Cluster mode: the hold's deadline passed with no word of its group.
    pub(super) fn hold_ran_out(&mut self, now: Instant) -> bool {
        let due = self
            .lock
            .held_offer()
            .filter(|offer| offer.deadline <= now)
            .map(|offer| (offer.offer_id, offer.fencing_token));
        match due {
            Some((offer_id, token)) if self.node.is_some() => {
                self.settle_hold(offer_id, token, Ending::Expired);
                true
            }
            _ => false,
        }
    }

    /// Whether the driver is held for a group in cluster mode (whose end
    /// goes through Redis, see [`Booking::settle_hold`]).
    pub(super) fn held_in_cluster(&self) -> bool {
        self.node.is_some() && matches!(self.lock.state(), LockState::Held(_))
    }
}
