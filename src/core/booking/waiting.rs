//! What a driver waits for from Redis while nothing else is handled for it
//! (see [`Booking`](super::Booking)).

use std::time::Instant;

use super::{LockRequest, TripRecord};
use crate::core::lock::{Ending, FencingToken, OfferId, TripId};

/// What the driver waits for from Redis.
#[derive(Clone, Debug)]
pub(super) enum Waiting {
    /// A lock: the request, when its acquire went out, and when the
    /// request reached this driver (earlier if it waited behind Redis).
    Acquire(LockRequest, Instant, Instant),
    /// A release.
    Free,
    /// A trip's finish (`attempt` of `cluster::FINISH_ATTEMPTS`).
    Finish {
        owner: String,
        trip_id: TripId,
        attempt: u32,
    },
    /// An accept's confirm: the offer, the trip, the accept's time, the
    /// attempt, and when the next attempt is due (while between attempts).
    Confirm {
        record: TripRecord,
        accepted_at: Instant,
        attempt: u32,
        retry_at: Option<Instant>,
    },
    /// An accept whose confirm could not be told: its settle, asked until
    /// Redis can tell (and when next, while between attempts).
    SettleAccept {
        record: TripRecord,
        accepted_at: Instant,
        retry_at: Option<Instant>,
    },
    /// The driver's current trip (`attempt` of `cluster::TRIP_LOOKUP_ATTEMPTS`).
    Lookup { attempt: u32 },
    /// A group offer's accept: its lock kept for the group (see
    /// `group.rs`), until when, the accept's time, the attempt, and when
    /// the next attempt is due.
    Hold {
        offer_id: OfferId,
        until: Instant,
        accepted_at: Instant,
        attempt: u32,
        retry_at: Option<Instant>,
    },
    /// A held offer ending for `why`: its settle, asked until Redis can
    /// tell whether the group was booked (and when next).
    SettleHold {
        owner: String,
        offer_id: OfferId,
        token: FencingToken,
        why: Ending,
        retry_at: Option<Instant>,
    },
}
