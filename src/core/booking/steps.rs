//! A driver's common steps: granting and refusing locks, telling the app,
//! reporting an offer's end, and keeping the index, gauges and timers in
//! line with the lock after every event.

use std::time::{Duration, Instant};

use super::{
    offer_message, Booking, DriverEffect, LockRequest, RedisOp, Waiting, MIN_ANNOUNCE_MOVE_M,
    MIN_INDEX_MOVE_M, RETIRE_AFTER, TRIP_MAX_AGE,
};
use crate::core::lock::{
    AnswerError, Availability, Ended, Ending, FencingToken, LockRefused, LockState, Offer, TripId,
};
use crate::core::search::{LockAnswer, OfferOutcome};
use crate::core::{Granted, OfferHolder};
use crate::location::LatLon;
use crate::metrics as m;
use crate::protocol::{ErrorCode, RevokeReason, ServerMessage};

impl Booking {
    /// Grants the lock here (with `fencing_token`, from Redis in cluster
    /// mode) and answers; whether it was granted.
    pub(super) fn grant(
        &mut self,
        now: Instant,
        request: LockRequest,
        fencing_token: FencingToken,
    ) -> bool {
        let LockRequest {
            offer_id,
            holder,
            timeout,
            reply,
            ..
        } = request;
        let driver_id = self.id.clone();
        let answer = |result| LockAnswer {
            driver_id,
            offer_id,
            search: holder.search,
            rider_id: holder.rider_id.clone(),
            request_id: holder.request_id.clone(),
            result,
            node: None,
        };
        let offer = Offer {
            offer_id,
            fencing_token,
            deadline: now + timeout,
            holder: holder.clone(),
        };
        let at = self.lock.location();
        let result = match self.lock.try_lock(offer, now) {
            Ok(offer) => {
                if let Some(since) = offer.holder.first_offer_since {
                    m::request_to_offer(now.saturating_duration_since(since));
                }
                let at = at.expect("an offerable driver has a location");
                let message = offer_message(offer, at, now);
                self.granted_at = Some(now);
                self.tell(message);
                Ok(Granted { fencing_token })
            }
            Err(refused) => Err(refused),
        };
        let granted = result.is_ok();
        m::lock_attempt(granted);
        let answer = answer(result);
        self.effects
            .push(DriverEffect::Answer { to: reply, answer });
        granted
    }

    pub(super) fn refuse(&mut self, request: LockRequest, why: LockRefused) {
        m::lock_attempt(false);
        let answer = LockAnswer::refused(self.id.clone(), request.offer_id, &request.holder, why);
        self.effects.push(DriverEffect::Answer {
            to: request.reply,
            answer,
        });
    }

    pub(super) fn tell(&mut self, message: ServerMessage) {
        if self.session.is_some() {
            self.effects.push(DriverEffect::Tell(message));
        }
    }

    pub(super) fn error(&mut self, code: ErrorCode, message: String) {
        m::protocol_error(code);
        self.tell(ServerMessage::error(code, message));
    }

    pub(super) fn answer_failed(&mut self, now: Instant, error: AnswerError<OfferHolder>) {
        match error {
            AnswerError::UnknownOffer(offer_id) => self.error(
                ErrorCode::UnknownOffer,
                format!("offer {offer_id} was never made to you"),
            ),
            AnswerError::OfferEnded { offer_id, ending } => self.error(
                ErrorCode::OfferExpired,
                format!("offer {offer_id} has already ended ({})", ending.as_str()),
            ),
            AnswerError::AlreadyAccepted(offer_id) => self.error(
                ErrorCode::AlreadyAccepted,
                format!("offer {offer_id} is accepted already: you are held for its group until it is complete or fails"),
            ),
            AnswerError::ExpiredNow(ended) => {
                let offer_id = ended.offer.offer_id;
                self.report(now, *ended);
                self.error(
                    ErrorCode::OfferExpired,
                    format!("offer {offer_id} expired before your answer"),
                );
            }
        }
    }

    /// An offer ended: tell the driver (when it wasn't their own doing) and
    /// the search (always, exactly once per offer).
    pub(super) fn report(&mut self, now: Instant, ended: Ended<OfferHolder>) {
        let offer = &ended.offer;
        if let Some(reason) = RevokeReason::for_ending(ended.ending) {
            self.tell(ServerMessage::OfferRevoked {
                offer_id: offer.offer_id,
                reason,
            });
        }
        if let (Ending::Accepted, Some(trip_id)) = (ended.ending, ended.trip_id) {
            self.tell(ServerMessage::TripAssigned {
                trip_id,
                offer_id: offer.offer_id,
                rider_id: offer.holder.rider_id.clone(),
                pickup: offer.holder.pickup,
                group_size: offer.holder.group_size(),
            });
        }
        let held_for = self
            .granted_at
            .take()
            .map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
        m::offer_ended(ended.ending, held_for);
        if self.node.is_some() && ended.ending != Ending::Accepted {
            // Frees the lock for the next offer; if this is lost, the key's
            // expiry frees it a little later.
            let owner = self.owner_of(&offer.holder, offer.offer_id);
            self.redis(RedisOp::Release { owner }, Some(Waiting::Free));
        }
        let outcome = self.outcome_of(offer, ended.ending, ended.trip_id);
        self.effects.push(DriverEffect::Ended {
            to: offer.holder.node.clone(),
            outcome,
            fencing_token: offer.fencing_token,
            pickup: offer.holder.pickup,
        });
    }

    /// What the search of `offer` is told of it.
    pub(super) fn outcome_of(
        &self,
        offer: &Offer<OfferHolder>,
        ending: Ending,
        trip_id: Option<TripId>,
    ) -> OfferOutcome {
        OfferOutcome {
            driver_id: self.id.clone(),
            driver_location: self.lock.location(),
            offer_id: offer.offer_id,
            search: offer.holder.search,
            rider_id: offer.holder.rider_id.clone(),
            request_id: offer.holder.request_id.clone(),
            ending,
            trip_id,
        }
    }

    /// Brings everything outside the lock in line with it: a dropped
    /// connection becomes a disconnect, the matcher's index and the gauges
    /// follow the driver's availability. Runs after every event.
    pub(super) fn sync(&mut self, now: Instant) {
        if self.session.is_none() && self.lock.is_connected() {
            if let Some(ended) = self.lock.disconnect() {
                self.report(now, ended);
            }
        }
        let availability = self.lock.availability();
        if self.counted_as != Some(availability) {
            if let Some(old) = self.counted_as.replace(availability) {
                m::driver_state_left(old);
            }
            m::driver_state_entered(availability);
        }
        let location = self
            .lock
            .location()
            .filter(|_| availability == Availability::Available);
        let moved = match (location, self.indexed_at) {
            (Some(now), Some(indexed)) => now.distance_m(indexed) >= MIN_INDEX_MOVE_M,
            (now, indexed) => now.is_some() != indexed.is_some(),
        };
        if moved {
            let announce = match (location, self.announced_at) {
                (Some(now), Some(before)) => {
                    now.distance_m(before) >= MIN_ANNOUNCE_MOVE_M
                        || self.served(now) != self.served(before)
                }
                (now, before) => now.is_some() != before.is_some(),
            };
            if announce {
                self.announced_at = location;
            }
            self.effects.push(DriverEffect::Indexed {
                at: location,
                announce,
            });
            self.indexed_at = location;
        }
        let on_trip = matches!(self.lock.state(), LockState::OnTrip(_));
        match (on_trip, self.trip_since) {
            (true, None) => self.trip_since = Some(now),
            (false, Some(_)) => self.trip_since = None,
            _ => {}
        }
        let idle = self.session.is_none() && !on_trip;
        match (idle, self.retire_at) {
            (true, None) => self.retire_at = Some(now + RETIRE_AFTER),
            (false, Some(_)) => self.retire_at = None,
            _ => {}
        }
    }

    /// Whether `at` is in a served area (everywhere is, without areas).
    fn served(&self, at: LatLon) -> bool {
        self.areas.as_ref().is_none_or(|a| a.area_of(at).is_some())
    }

    /// Whatever is due at `now` among the driver's own timers.
    pub(super) fn timers(&mut self, now: Instant) {
        if self.hold_ran_out(now) {
            // Settled in Redis first; the rest waits for its answer.
            return;
        }
        if self
            .lock
            .current_offer()
            .is_some_and(|offer| offer.deadline <= now)
        {
            if let Some(ended) = self.lock.expire(now) {
                self.report(now, ended);
            }
        }
        if self
            .trip_since
            .is_some_and(|since| since + TRIP_MAX_AGE <= now)
        {
            if let Some(trip_id) = self.trip_id() {
                tracing::warn!(driver = %self.id, trip = trip_id, "a trip outlived its maximum age; it ends");
                if let Ok(trip) = self.lock.complete_trip(trip_id) {
                    self.trip_ended(now, &trip);
                }
            }
            self.trip_since = None;
        }
        if self.stale_check.is_some_and(|at| at <= now) {
            self.stale_check = None;
            match self.located_at.map(|at| at + self.location_max_age) {
                Some(fresh_until) if fresh_until > now => self.stale_check = Some(fresh_until),
                Some(_) => {
                    if self.lock.is_offerable() {
                        m::driver_went_stale();
                    }
                    self.lock.location_went_stale();
                }
                None => {}
            }
        }
        if self.retire_at.is_some_and(|at| at <= now) {
            self.retire_at = None;
            // Retiring forgets the lock's state; never with an offer held
            // or Redis still to hear from.
            let idle = self.session.is_none()
                && matches!(self.lock.state(), LockState::Free)
                && self.waiting.is_none();
            if idle {
                self.effects.push(DriverEffect::Retire);
            }
        }
        self.cluster_timers(now);
        if self.waiting.is_none() {
            self.sync(now);
        }
    }
}
