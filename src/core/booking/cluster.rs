//! Cluster mode: the driver's lock in Redis.
//!
//! The lock is taken in Redis first (with its fencing token), then here; an
//! accept books only if the offer's lock still holds in Redis (`confirm`),
//! which is what makes a node that stalled past the lock's expiry, or whose
//! requester gave up on the offer, unable to book. A driver on a trip keeps
//! its lock renewed, so no node can lock it meanwhile; an app that
//! reconnects to another node takes its trip over from Redis.

use std::time::{Duration, Instant};

use super::{
    offer_message, trip_assigned, Booking, LockRequest, RedisOp, RedisReply, TripRecord, Waiting,
    LOCK_MARGIN, TRIP_HOLD,
};
use crate::cluster::redlock::Renewal;
use crate::core::lock::{FencingToken, LockRefused, LockState, OfferId, Trip, TripId};
use crate::core::{OfferHolder, Settled};
use crate::protocol::ErrorCode;

/// How often an accept's confirm is asked when Redis can't tell, and how
/// long apart.
const CONFIRM_ATTEMPTS: u32 = 3;
const CONFIRM_RETRY: Duration = Duration::from_millis(100);

/// How often, and how far apart, a driver's current trip is looked up again
/// when Redis could not tell: five times 500 ms apart, then every 5 s for a
/// minute more. A trip that a lock server lost with its data may be on too
/// few servers to take over until that server is back (it stays away about
/// a trip lock's life) and the trip's renewals have written it back there.
pub(super) const TRIP_LOOKUP_ATTEMPTS: u32 = 17;
const TRIP_LOOKUP_QUICK: u32 = 5;
const TRIP_LOOKUP_RETRY: Duration = Duration::from_millis(500);
const TRIP_LOOKUP_SLOW_RETRY: Duration = Duration::from_secs(5);

/// How long apart an accept's settle is asked again while Redis can't tell.
const SETTLE_ACCEPT_RETRY: Duration = Duration::from_millis(500);

/// How often, and how far apart, a trip's finish is asked again when too
/// few servers answered (until then its lock and record stay in Redis).
pub(super) const FINISH_ATTEMPTS: u32 = 20;
const FINISH_RETRY: Duration = Duration::from_millis(500);

/// How soon after a trip is booked or taken over its lock is first renewed
/// (see `renew_during_trip`).
const FIRST_RENEWAL: Duration = Duration::from_secs(1);

/// How often a trip completed elsewhere is asked to finish while Redis
/// can't tell (500 ms apart: half a minute).
const FINISH_TRIP_ATTEMPTS: u32 = 60;

/// Room left between an offer's deadline and the end of its lock's
/// validity, for the accept's confirm to reach Redis.
const CONFIRM_ROOM: Duration = Duration::from_millis(500);

/// How late after a remote lock request reached this driver its answer may
/// be handled and still grant the offer. The requester, hearing nothing
/// for `REMOTE_ANSWER_WAIT` after it sent the request, settles the lock, and
/// another node may then lock the driver with a newer token and tell the
/// app: an answer that waited longer than half of that (this node paused,
/// its actors far behind, or Redis slow) is not trusted, though the lock's
/// own validity may not have run out yet. The other half is for the
/// request's and the answer's ways between the nodes.
const ANSWER_TRUSTED: Duration =
    Duration::from_millis(crate::core::search::REMOTE_ANSWER_WAIT.as_millis() as u64 / 2);

impl Booking {
    /// Takes the lock in Redis for `request`; the driver waits for the
    /// answer, so its state can't change under the attempt.
    pub(super) fn acquire(&mut self, now: Instant, arrived: Instant, request: LockRequest) {
        // Asking Redis for a driver who can't take the offer anyway would
        // only hold the key for nothing.
        if let Some(refused) = self.lock.refusal() {
            return self.refuse(request, refused);
        }
        let op = RedisOp::Acquire {
            owner: self.owner_of(&request.holder, request.offer_id),
            ttl: request.timeout + LOCK_MARGIN,
            floor: self.lock.newest_token(),
        };
        self.redis(op, Some(Waiting::Acquire(request, now, arrived)));
    }

    pub(super) fn redis_replied(&mut self, now: Instant, reply: RedisReply) {
        if let RedisReply::Renewed { owner, verdict } = reply {
            return self.renewed(now, owner, verdict);
        }
        let Some(waiting) = self.waiting.take() else {
            debug_assert!(false, "a Redis reply nobody waits for: {reply:?}");
            return;
        };
        match (waiting, reply) {
            (Waiting::Acquire(request, sent_at, arrived), RedisReply::Acquired(result)) => {
                self.acquired(now, (sent_at, arrived), request, result)
            }
            (Waiting::Free, RedisReply::Freed) => {}
            (
                Waiting::Finish {
                    owner,
                    trip_id,
                    attempt,
                },
                RedisReply::Finished(answered),
            ) => {
                if !answered && attempt < FINISH_ATTEMPTS {
                    self.finish_retry = Some((owner, trip_id, now + FINISH_RETRY, attempt + 1));
                }
            }
            (
                Waiting::Confirm {
                    record,
                    accepted_at,
                    attempt,
                    ..
                },
                RedisReply::Confirmed(kept),
            ) => match kept {
                Some(kept) => self.confirmed(now, record, accepted_at, kept),
                None if attempt < CONFIRM_ATTEMPTS => {
                    self.waiting = Some(Waiting::Confirm {
                        record,
                        accepted_at,
                        attempt,
                        retry_at: Some(now + CONFIRM_RETRY),
                    })
                }
                None => {
                    // Still can't tell whether a confirm landed: settle it
                    // from this side, which stops any later confirm and says
                    // whether one had landed (then the trip is booked after
                    // all).
                    let owner = record.owner.clone();
                    let wait = Waiting::SettleAccept {
                        record,
                        accepted_at,
                        retry_at: None,
                    };
                    self.redis(RedisOp::Settle { owner }, Some(wait));
                }
            },
            (
                Waiting::SettleAccept {
                    record,
                    accepted_at,
                    ..
                },
                RedisReply::Settled(settled),
            ) => match settled {
                Some(settled) => {
                    let landed = matches!(settled, Settled::Trip(_));
                    self.confirmed(now, record, accepted_at, landed);
                }
                // Redis can't tell whether the accept booked: the driver
                // stays held until it can (freeing it now could hand it to
                // another rider while a trip record stands for this one).
                None => {
                    self.waiting = Some(Waiting::SettleAccept {
                        record,
                        accepted_at,
                        retry_at: Some(now + SETTLE_ACCEPT_RETRY),
                    })
                }
            },
            (Waiting::Lookup { attempt }, RedisReply::CurrentTrip(found)) => {
                self.found_trip(now, attempt, found)
            }
            (
                Waiting::Hold {
                    offer_id,
                    until,
                    accepted_at,
                    attempt,
                    ..
                },
                RedisReply::HoldKept(kept),
            ) => self.hold_answered(now, offer_id, until, accepted_at, attempt, kept),
            (
                Waiting::SettleHold {
                    owner,
                    offer_id,
                    token,
                    why,
                    ..
                },
                RedisReply::Settled(settled),
            ) => self.hold_settled(now, owner, offer_id, token, why, settled),
            (waiting, reply) => {
                debug_assert!(false, "{reply:?} does not answer {waiting:?}");
            }
        }
        if self.waiting.is_none() {
            self.sync(now);
        }
    }

    /// `sent_at`: when the acquire went out; `arrived`: when the request
    /// reached this driver.
    fn acquired(
        &mut self,
        now: Instant,
        (sent_at, arrived): (Instant, Instant),
        request: LockRequest,
        result: Result<(FencingToken, Duration), LockRefused>,
    ) {
        match result {
            Ok((fencing_token, validity)) => {
                let owner = self.owner_of(&request.holder, request.offer_id);
                // The lock can be relied on until `validity` after the
                // attempt ended, which was after it was sent: counting from
                // the send is safe however late the answer is handled (a
                // node paused meanwhile must not offer a lock that lapsed).
                // The offer lasts no longer than that, less room for the
                // accept's confirm to get there.
                let left = (sent_at + validity).saturating_duration_since(now);
                let timeout = request.timeout.min(left.saturating_sub(CONFIRM_ROOM));
                // A remote requester may have given up on the lock by now
                // (see `ANSWER_TRUSTED`); one on this node waits for its
                // answer, and the validity above is all it needs.
                let untrusted =
                    request.holder.node.is_some() && now.duration_since(arrived) > ANSWER_TRUSTED;
                let granted = if now >= request.not_after {
                    // Redis took so long that the search has stopped
                    // looking: no offer goes out for it.
                    self.refuse(request, LockRefused::SearchEnded);
                    false
                } else if timeout.is_zero() || untrusted {
                    self.refuse(request, LockRefused::StoreUnavailable);
                    false
                } else {
                    self.grant(now, LockRequest { timeout, ..request }, fencing_token)
                };
                if !granted {
                    self.redis(RedisOp::Release { owner }, Some(Waiting::Free));
                }
            }
            Err(refused) => {
                if refused == LockRefused::HeldElsewhere {
                    // Free here, yet locked in Redis: perhaps a trip of this
                    // driver that its actor on another node still holds (the
                    // app reconnected here as it accepted).
                    self.lookup_trip(now, 1);
                }
                self.refuse(request, refused);
            }
        }
    }

    /// The driver accepted `offer_id`: it books only once Redis confirms.
    pub(super) fn accept_in_cluster(&mut self, now: Instant, offer_id: OfferId, trip_id: TripId) {
        if let Err(e) = self.lock.check_answerable(offer_id, now) {
            return self.answer_failed(now, e);
        }
        let node = self.node.clone().expect("cluster mode");
        let offer = self
            .lock
            .current_offer()
            .expect("an answerable offer is held");
        let record = TripRecord {
            owner: self.owner_of(&offer.holder, offer_id),
            trip_id,
            offer_id,
            fencing_token: offer.fencing_token,
            rider_id: offer.holder.rider_id.clone(),
            request_id: offer.holder.request_id.clone(),
            pickup: offer.holder.pickup,
            rider_node: offer.holder.node.clone().unwrap_or(node),
            rider_is_remote: offer.holder.node.is_some(),
            rider_incarnation: offer.holder.incarnation,
        };
        let op = RedisOp::Confirm {
            record: record.clone(),
        };
        let wait = Waiting::Confirm {
            record,
            accepted_at: now,
            attempt: 1,
            retry_at: None,
        };
        self.redis(op, Some(wait));
    }

    /// While a confirm or an accept's settle waits to be asked again: asks
    /// when it is due.
    pub(super) fn confirm_retry_due(&mut self, now: Instant) {
        if self.hold_retry_due(now) {
            return;
        }
        let op = match &mut self.waiting {
            Some(Waiting::Confirm {
                record,
                attempt,
                retry_at,
                ..
            }) if retry_at.is_some_and(|at| at <= now) => {
                *retry_at = None;
                *attempt += 1;
                RedisOp::Confirm {
                    record: record.clone(),
                }
            }
            Some(Waiting::SettleAccept {
                record, retry_at, ..
            }) if retry_at.is_some_and(|at| at <= now) => {
                *retry_at = None;
                RedisOp::Settle {
                    owner: record.owner.clone(),
                }
            }
            _ => return,
        };
        self.effects.push(super::DriverEffect::Redis(op));
    }

    fn confirmed(&mut self, now: Instant, record: TripRecord, accepted_at: Instant, kept: bool) {
        let offer_id = record.offer_id;
        if kept {
            // Nothing ran in between: the offer is as it was at the accept.
            match self.lock.accept(offer_id, record.trip_id, accepted_at) {
                Ok(ended) => {
                    self.renew_during_trip(now, record);
                    self.report(now, ended);
                    if self.session.is_none() {
                        self.effects.push(super::DriverEffect::LeftOnTrip);
                    }
                }
                Err(e) => self.answer_failed(now, e),
            }
        } else {
            if let Some(ended) = self.lock.lose(offer_id) {
                self.report(now, ended);
            }
            self.error(
                ErrorCode::OfferExpired,
                format!("offer {offer_id} lost its lock before your accept could be confirmed"),
            );
        }
    }

    /// A driver on a trip keeps its lock in Redis, so that no node can lock
    /// it meanwhile (not even through another connection of the same driver
    /// to another node). The lock lives [`TRIP_HOLD`] at a time and is
    /// renewed well within that.
    pub(super) fn renew_during_trip(&mut self, now: Instant, record: TripRecord) {
        // The first renewal comes soon: it writes the trip to servers the
        // confirm missed, so that losing one that had it (a restart without
        // its data) does not leave the trip on a minority.
        self.renewal = Some(super::Renewal {
            record,
            at: now + FIRST_RENEWAL,
            kept: true,
        });
    }

    /// A renewal's answer. A trip lock that a majority says is no longer
    /// this driver's ends the trip here: it was completed on the node the
    /// driver moved to, or the lock was lost, and a trip without its lock
    /// would let another node lock the driver meanwhile.
    fn renewed(&mut self, now: Instant, owner: String, verdict: Option<Renewal>) {
        if let Some(renewal) = &mut self.renewal {
            if renewal.record.owner == owner {
                renewal.kept = verdict == Some(Renewal::Kept);
            }
        }
        if !matches!(verdict, Some(Renewal::Lost | Renewal::Finished)) {
            return;
        }
        let LockState::OnTrip(trip) = self.lock.state() else {
            return;
        };
        if self.owner_of(&trip.holder, trip.offer_id) != owner {
            return; // an older trip's renewal
        }
        let trip_id = trip.trip_id;
        if self.session.is_some() {
            tracing::warn!(driver = %self.id, trip = trip_id, "a trip's lock is no longer this driver's in Redis; the trip ends here");
        }
        self.renewal = None;
        if let Ok(trip) = self.lock.complete_trip(trip_id) {
            self.remember_completed(trip.trip_id);
        }
        if verdict == Some(Renewal::Finished) {
            // Finished where the finish reached: the trip under this owner
            // is over whoever holds it, so the lock goes everywhere now
            // rather than lingering where the finish did not reach.
            self.finish(owner, trip_id, 1);
        }
        // The app, if here, may have been booked elsewhere meanwhile.
        self.lookup_trip(now, 1);
        self.sync(now);
    }

    /// A driver app that connects here while its trip is held by its actor
    /// on another node (it reconnected elsewhere mid-trip) takes the trip
    /// over from its record in Redis, with its lock, so that the trip can be
    /// completed here.
    pub(super) fn lookup_trip(&mut self, now: Instant, attempt: u32) {
        // Free, or offered (a newer trip found means the offer's lock was
        // lost: see `found_trip`).
        let free_or_offered = matches!(self.lock.state(), LockState::Free | LockState::Offered(_));
        if !free_or_offered || self.session.is_none() {
            return self.resend_held_offer(now);
        }
        if self.waiting.is_some() {
            self.lookup_retry = Some((now, attempt));
            return;
        }
        self.redis(RedisOp::CurrentTrip, Some(Waiting::Lookup { attempt }));
    }

    fn found_trip(&mut self, now: Instant, attempt: u32, found: Result<Option<TripRecord>, ()>) {
        self.take_over(now, attempt, found);
        self.resend_held_offer(now);
    }

    /// The offer held here, to an app that reconnected, once Redis has had
    /// its say (see `attach`).
    fn resend_held_offer(&mut self, now: Instant) {
        if !std::mem::take(&mut self.resend_offer) {
            return;
        }
        if let (LockState::Offered(offer), Some(at)) = (self.lock.state(), self.lock.location()) {
            let message = offer_message(offer, at, now);
            self.tell(message);
        }
    }

    fn take_over(&mut self, now: Instant, attempt: u32, found: Result<Option<TripRecord>, ()>) {
        let record = match found {
            Ok(Some(record)) => record,
            Ok(None) => return,
            Err(()) => {
                // Redis could not tell: ask again a little later.
                if attempt < TRIP_LOOKUP_ATTEMPTS {
                    let wait = if attempt < TRIP_LOOKUP_QUICK {
                        TRIP_LOOKUP_RETRY
                    } else {
                        TRIP_LOOKUP_SLOW_RETRY
                    };
                    self.lookup_retry = Some((now + wait, attempt + 1));
                }
                return;
            }
        };
        if self.lock.ending_of(record.offer_id).is_some() {
            // This driver ended that offer itself (its accept could not be
            // confirmed): not a trip to take over.
            return;
        }
        if self.completed.contains(&record.trip_id) {
            // The app completed that trip already (before the look-up
            // answered, or its finish has not reached every server yet).
            return self.finish(record.owner, record.trip_id, 1);
        }
        // A trip under a newer lock than the offer held here: that offer's
        // lock is gone (the driver's lock took a newer token since), so the
        // offer is over; the trip is taken over as usual.
        let stale = self
            .lock
            .current_offer()
            .filter(|offer| offer.fencing_token < record.fencing_token)
            .map(|offer| offer.offer_id);
        if let Some(offer_id) = stale {
            if let Some(ended) = self.lock.lose(offer_id) {
                self.report(now, ended);
            }
        }
        let node = self.node.as_ref().expect("cluster mode");
        let kept = record.clone();
        let rider_node = (record.rider_node != *node).then_some(record.rider_node);
        let trip = Trip {
            trip_id: record.trip_id,
            offer_id: record.offer_id,
            fencing_token: record.fencing_token,
            holder: OfferHolder {
                search: 0,
                rider_id: record.rider_id,
                request_id: record.request_id,
                pickup: record.pickup,
                first_offer_since: None,
                node: rider_node,
                incarnation: record.rider_incarnation,
                group: None,
            },
        };
        let message = trip_assigned(&trip);
        if self.lock.adopt_trip(trip) {
            tracing::info!(driver = %self.id, trip = record.trip_id, "took over a trip from another node");
            self.renew_during_trip(now, kept);
            self.tell(message);
        }
    }

    /// Renewals and trip look-ups that are due.
    pub(super) fn cluster_timers(&mut self, now: Instant) {
        if let Some(renewal) = &mut self.renewal {
            if renewal.at <= now {
                renewal.at = now + TRIP_HOLD / 3;
                let record = renewal.record.clone();
                // A lock a server lost is taken back while the trip is
                // certainly going on: the app is here, or a majority held it
                // at the last word. An actor the app has left, whose lock
                // went quiet, may hold a trip completed elsewhere.
                let repair = self.session.is_some() || renewal.kept;
                self.effects
                    .push(super::DriverEffect::Redis(RedisOp::Renew {
                        record,
                        repair,
                    }));
            }
        }
        if let Some((_, _, at, _)) = &self.finish_retry {
            if *at <= now && self.waiting.is_none() {
                let (owner, trip_id, _, attempt) = self.finish_retry.take().expect("due");
                self.finish(owner, trip_id, attempt);
            }
        }
        if let Some((trip_id, at, attempt)) = self.finish_trip_retry {
            if at <= now {
                self.finish_trip_retry = None;
                self.finish_trip(trip_id, attempt);
            }
        }
        if let Some((at, attempt)) = self.lookup_retry {
            if at <= now {
                self.lookup_retry = None;
                self.lookup_trip(now, attempt);
            }
        }
    }

    /// Frees a trip's lock and record in Redis.
    pub(super) fn finish(&mut self, owner: String, trip_id: TripId, attempt: u32) {
        let wait = Waiting::Finish {
            owner: owner.clone(),
            trip_id,
            attempt,
        };
        self.redis(RedisOp::Finish { owner, trip_id }, Some(wait));
    }

    /// Finishes in Redis a trip the app completed on this node, which does
    /// not hold it (it runs beside everything else).
    pub(super) fn finish_trip(&mut self, trip_id: TripId, attempt: u32) {
        self.effects
            .push(super::DriverEffect::Redis(RedisOp::FinishTrip {
                trip_id,
                attempt,
            }));
    }

    /// What finishing a trip completed elsewhere found: asked again while
    /// Redis can't tell, so that its holder elsewhere is not left holding
    /// it (for up to [`FINISH_TRIP_ATTEMPTS`] tries, then the trip's
    /// maximum age frees it).
    pub(super) fn trip_finished(
        &mut self,
        now: Instant,
        trip_id: TripId,
        done: Option<bool>,
        attempt: u32,
    ) {
        if done.is_none() && attempt < FINISH_TRIP_ATTEMPTS {
            self.finish_trip_retry = Some((trip_id, now + FINISH_RETRY, attempt + 1));
        }
    }
}
