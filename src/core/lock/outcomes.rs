//! How offers end, and why a lock or an answer is refused: the words the
//! lock rules, the matcher, the metrics and the protocol share.

use super::{FencingToken, Offer, OfferId, TripId};

/// The one way an offer ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    /// The driver accepted; the driver is now on the trip.
    Accepted,
    /// The driver declined (or went unavailable while offered).
    Declined,
    /// The deadline passed without an answer.
    Expired,
    /// The rider cancelled the request.
    RiderCancelled,
    /// The driver's connection went away.
    DriverDisconnected,
    /// The offer's group could not be completed in time.
    GroupIncomplete,
    /// An older group request took the driver.
    Preempted,
}

impl Ending {
    /// The snake_case name used in metrics labels and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Ending::Accepted => "accepted",
            Ending::Declined => "declined",
            Ending::Expired => "expired",
            Ending::RiderCancelled => "rider_cancelled",
            Ending::DriverDisconnected => "driver_disconnected",
            Ending::GroupIncomplete => "group_incomplete",
            Ending::Preempted => "preempted",
        }
    }
}

/// An offer that just ended, to be reported to its holder.
#[derive(Clone, Debug, PartialEq)]
pub struct Ended<H> {
    /// The offer as it was granted.
    pub offer: Offer<H>,
    /// How it ended.
    pub ending: Ending,
    /// The trip it became, when accepted.
    pub trip_id: Option<TripId>,
}

/// The driver's state as operators count it (one metrics gauge per value).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Availability {
    /// Not offerable: disconnected, not wanting work, or no location yet.
    Offline,
    /// Offerable: connected, wants work, located, free.
    Available,
    /// Holding an offer.
    Offered,
    /// On a trip.
    OnTrip,
}

impl Availability {
    /// The snake_case name used in metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Availability::Offline => "offline",
            Availability::Available => "available",
            Availability::Offered => "offered",
            Availability::OnTrip => "on_trip",
        }
    }
}

/// Why a lock was not granted.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum LockRefused {
    /// The driver is not connected or does not want work.
    #[error("driver is offline")]
    Offline,
    /// The driver's location is not known yet.
    #[error("driver has no known location")]
    NoLocation,
    /// The driver already holds an offer.
    #[error("driver already holds an offer")]
    AlreadyOffered,
    /// The driver is on a trip.
    #[error("driver is on a trip")]
    OnTrip,
    /// The fencing token is not newer than one already seen.
    #[error("fencing token {offered} is not newer than {newest}")]
    StaleToken {
        /// The token that came with the request.
        offered: FencingToken,
        /// The newest token this driver has seen.
        newest: FencingToken,
    },
    /// The offer's deadline is not in the future.
    #[error("offer deadline already passed")]
    DeadlinePassed,
    /// The search asking for the lock has passed its own deadline (checked by
    /// the driver's actor, which knows the time the request reaches it).
    #[error("the search asking for the lock has ended")]
    SearchEnded,
    /// Cluster mode: another node's offer holds the driver's lock in Redis
    /// (decided by the driver's actor, not by this state machine).
    #[error("the driver's lock is held by another offer")]
    HeldElsewhere,
    /// Cluster mode: the lock store (Redis) could not grant the lock: no
    /// majority of servers answered in time.
    #[error("the lock store is unavailable")]
    StoreUnavailable,
}

/// Why a driver's answer to an offer was refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum AnswerError<H> {
    /// The driver never had this offer (or it is long forgotten).
    #[error("unknown offer {0}")]
    UnknownOffer(OfferId),
    /// The offer already ended; the answer came too late.
    #[error("offer {offer_id} has ended ({})", ending.as_str())]
    OfferEnded {
        /// The offer answered.
        offer_id: OfferId,
        /// How it ended.
        ending: Ending,
    },
    /// The deadline passed before the answer and the offer expired just now.
    /// Carries the ending, which the caller must report like any other.
    #[error("offer {} has expired", .0.offer.offer_id)]
    ExpiredNow(Box<Ended<H>>),
    /// The driver accepted this group offer already and is held for the
    /// group: the answer is final.
    #[error("offer {0} is accepted already; you are held for its group")]
    AlreadyAccepted(OfferId),
}

/// Why `trip_completed` was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TripError {
    /// The driver is not on that trip.
    #[error("trip {0} is not this driver's current trip")]
    NotYourTrip(TripId),
}
