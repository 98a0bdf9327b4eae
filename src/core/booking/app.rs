//! What the driver's app says (its commands) and what it is told of its
//! offer, its group and its trip.

use std::time::Instant;

use super::{Booking, DriverEffect};
use crate::core::lock::{Ending, FencingToken, Offer, OfferId, Trip};
use crate::core::OfferHolder;
use crate::location::LatLon;
use crate::metrics as m;
use crate::protocol::{DriverCommand, ErrorCode, ServerMessage};

impl Booking {
    pub(super) fn command(&mut self, now: Instant, command: DriverCommand) {
        match command {
            DriverCommand::Location { lat, lon } => {
                m::location_update();
                // The session validated the range; a failure here would be a
                // bug upstream, and the update is then ignored, not trusted.
                if let Ok(at) = LatLon::new(lat, lon) {
                    self.lock.set_location(at);
                    self.located_at = Some(now);
                    self.stale_check.get_or_insert(now + self.location_max_age);
                }
            }
            DriverCommand::Available => {
                self.lock.set_wants_work(true);
            }
            DriverCommand::Unavailable => {
                if let Some(ended) = self.lock.set_wants_work(false) {
                    self.report(now, ended);
                }
            }
            DriverCommand::Accept {
                offer_id,
                fencing_token,
            } => {
                if let Some(stale) = self.stale_token(offer_id, fencing_token) {
                    return self.error(ErrorCode::OfferExpired, stale);
                }
                let group = self
                    .lock
                    .current_offer()
                    .filter(|o| o.offer_id == offer_id)
                    .and_then(|o| o.holder.group.clone());
                if let Some(group) = group {
                    if self.node.is_some() {
                        return self.hold_in_cluster(now, offer_id, group.hold_until);
                    }
                    return match self.lock.hold(offer_id, group.hold_until, now) {
                        Ok(offer) => {
                            let offer = offer.clone();
                            let token = offer.fencing_token;
                            let outcome = self.outcome_of(&offer, Ending::Accepted, None);
                            self.group_accepted = 0;
                            self.effects.push(DriverEffect::Held(outcome, token, None));
                        }
                        Err(e) => self.answer_failed(now, e),
                    };
                }
                let trip_id = self.ids.next_trip();
                match &self.node {
                    None => match self.lock.accept(offer_id, trip_id, now) {
                        Ok(ended) => self.report(now, ended),
                        Err(e) => self.answer_failed(now, e),
                    },
                    Some(_) => self.accept_in_cluster(now, offer_id, trip_id),
                }
            }
            DriverCommand::Decline { offer_id } => match self.lock.decline(offer_id, now) {
                Ok(ended) => self.report(now, ended),
                Err(e) => self.answer_failed(now, e),
            },
            DriverCommand::TripCompleted { trip_id } => match self.lock.complete_trip(trip_id) {
                Ok(trip) => self.trip_ended(now, &trip),
                Err(e) => {
                    // Cluster mode: the trip may be one this node has not
                    // taken over yet (Redis has not answered the look-up);
                    // if it turns up, it is finished rather than taken.
                    if self.node.is_some() {
                        self.remember_completed(trip_id);
                        self.finish_trip(trip_id, 1);
                    }
                    self.error(ErrorCode::UnknownTrip, e.to_string())
                }
            },
        }
    }

    /// Why an accept of `offer_id` carrying `token` is refused as stale:
    /// the token is not the one of the offer held (an older lock's, or made
    /// up). Without a token, or for an offer not held, the usual answers
    /// apply.
    fn stale_token(&self, offer_id: OfferId, token: Option<FencingToken>) -> Option<String> {
        let offer = self.lock.current_offer()?;
        let token = token?;
        (offer.offer_id == offer_id && offer.fencing_token != token).then(|| {
            format!(
                "offer {offer_id}: fencing token {token} is not the offer's ({}); the accept is refused",
                offer.fencing_token
            )
        })
    }
}

/// The offer message for the driver at `at`, sent at `now`.
pub(super) fn offer_message(offer: &Offer<OfferHolder>, at: LatLon, now: Instant) -> ServerMessage {
    let expires_in_ms = offer.deadline.saturating_duration_since(now).as_millis() as u64;
    ServerMessage::Offer {
        offer_id: offer.offer_id,
        request_id: offer.holder.public_request_id().clone(),
        rider_id: offer.holder.rider_id.clone(),
        pickup: offer.holder.pickup,
        distance_m: at.distance_m(offer.holder.pickup),
        expires_in_ms,
        fencing_token: offer.fencing_token,
        group_size: offer.holder.group_size(),
    }
}

/// The message that tells the app it is held for the group of `offer`, of
/// which `accepted` members have accepted.
pub(super) fn waiting_for_group(offer: &Offer<OfferHolder>, accepted: u8) -> ServerMessage {
    ServerMessage::WaitingForGroup {
        offer_id: offer.offer_id,
        request_id: offer.holder.public_request_id().clone(),
        accepted,
        group_size: offer.holder.group_size(),
    }
}

/// The message that tells the app it is on `trip`.
pub(super) fn trip_assigned(trip: &Trip<OfferHolder>) -> ServerMessage {
    ServerMessage::TripAssigned {
        trip_id: trip.trip_id,
        offer_id: trip.offer_id,
        rider_id: trip.holder.rider_id.clone(),
        pickup: trip.holder.pickup,
        group_size: trip.holder.group_size(),
    }
}
