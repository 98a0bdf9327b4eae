//! What goes in and out of [`Searches`](super::Searches): its settings,
//! the effects it records, and the news it is given.

use std::time::{Duration, Instant};

use crate::cluster::wire::NodeId;
use crate::core::booking::GroupMember;
use crate::core::lock::{Ending, FencingToken, LockRefused, OfferId, TripId};
use crate::core::{Granted, OfferHolder};
use crate::location::LatLon;
use crate::protocol::{DriverId, RequestId, RiderId, ServerMessage};

/// The limits and timings a [`Searches`] works with.
#[derive(Clone, Debug)]
pub struct SearchSettings {
    /// How far from the pickup a driver may be at first, in metres.
    pub radius_m: f64,
    /// How much farther every `radius_step` a search waits, in metres.
    pub radius_step_m: f64,
    /// How often a waiting search's radius grows.
    pub radius_step: Duration,
    /// How far the radius grows at most, in metres (`radius_m` or more).
    pub max_radius_m: f64,
    /// Drivers offered per request before `no_driver`.
    pub max_candidates: u32,
    /// How long a request searches before `no_driver`.
    pub search_timeout: Duration,
    /// How long a driver has to answer an offer.
    pub offer_timeout: Duration,
    /// Requests in flight per rider, over all of its connections.
    pub max_requests_per_rider: usize,
    /// Searches held in total, parked ones included.
    pub max_searches: usize,
    /// Cluster mode: how much longer a lock lives in Redis than its offer.
    pub lock_margin: Duration,
    /// How new requests are given their first driver.
    pub dispatch: Dispatch,
}

/// How new requests are given their first driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dispatch {
    /// Each request asks its nearest free driver as it arrives.
    Greedy,
    /// Requests that arrive within `window` are assigned together (see
    /// `batch.rs`); a decline or expiry then moves on to the request's next
    /// nearest free driver, as greedy does.
    Batch {
        /// How long a request waits for others to be assigned with.
        window: Duration,
        /// A request whose best driver is farther than this (metres) waits
        /// for the next window instead; 0: never.
        wait_m: u32,
        /// How long a request may wait so, in windows from its arrival.
        max_waits: u32,
    },
}

impl SearchSettings {
    /// How far from its pickup a search `age` old looks: `radius_m`, one
    /// `radius_step_m` farther for every whole `radius_step` waited, up to
    /// `max_radius_m`.
    pub fn radius_at(&self, age: Duration) -> f64 {
        let steps = age.as_nanos() / self.radius_step.as_nanos().max(1);
        (self.radius_m + self.radius_step_m * steps as f64)
            .min(self.max_radius_m.max(self.radius_m))
    }

    /// When a search started at `started` next looks farther, if it will.
    pub fn next_widening(&self, started: Instant, now: Instant) -> Option<Instant> {
        let age = now.saturating_duration_since(started);
        if self.radius_step_m <= 0.0 || self.radius_at(age) >= self.max_radius_m {
            return None;
        }
        let step = self.radius_step.as_nanos().max(1);
        let steps = age.as_nanos() / step + 1;
        let offset = u64::try_from(steps * step).ok()?;
        Some(started + Duration::from_nanos(offset))
    }
}

/// A rider's request, as a search knows it.
pub type SearchKey = (RiderId, RequestId);

/// What the caller must carry out.
#[derive(Clone, Debug, PartialEq)]
pub enum SearchEffect<R> {
    /// Send `message` to the rider's connection `to`.
    Tell {
        /// The connection.
        to: R,
        /// The message.
        message: ServerMessage,
    },
    /// Ask `driver` for its lock: on this node (`node: None`) or on `node`.
    /// Exactly one [`LockAnswer`] must come back (a refusal if the request
    /// cannot be delivered on this node).
    Lock {
        /// The driver.
        driver: DriverId,
        /// The driver's node, when it is another one.
        node: Option<NodeId>,
        /// The offer's id.
        offer_id: OfferId,
        /// Who asks.
        holder: OfferHolder,
        /// How long the driver has to answer.
        timeout: Duration,
        /// The search's deadline: the driver refuses a request that reaches
        /// it later.
        not_after: Instant,
    },
    /// Withdraw the offer `offer_id` (or the group hold it became).
    Cancel {
        /// The driver.
        driver: DriverId,
        /// The driver's node, when it is another one.
        node: Option<NodeId>,
        /// The offer.
        offer_id: OfferId,
        /// Its lock's fencing token.
        fencing_token: FencingToken,
        /// Why: the rider cancelled (also an offer withdrawn for want of
        /// news), the group failed, or an older group took the driver.
        why: Ending,
    },
    /// Tell `driver` (on this node), held for a group by `offer_id`: the
    /// group is complete and it goes on trip `trip_id`, or (`None`)
    /// `accepted` members have accepted so far.
    GroupNews {
        /// The driver.
        driver: DriverId,
        /// The driver's node, when it is another one.
        node: Option<NodeId>,
        /// The held offer.
        offer_id: OfferId,
        /// Its lock's fencing token.
        fencing_token: FencingToken,
        /// Members accepted so far.
        accepted: u8,
        /// The driver's trip, once the group is complete.
        trip_id: Option<TripId>,
    },
    /// Cluster mode: a member of a group that started `started_ago` ago
    /// finds no free driver within `radius_m` of `pickup`: every other
    /// node takes one driver in that reach from a younger group of its own
    /// (see `wound.rs`), by [`Searches::wounded`](super::Searches::wounded).
    Wound {
        /// How long ago the group's request came (its age; the caller
        /// turns it into wall-clock time, which nodes compare).
        started_ago: Duration,
        /// Where its rider waits.
        pickup: LatLon,
        /// How far it looks.
        radius_m: f64,
    },
    /// Cluster mode: `driver` was booked for a group here: wherever its app
    /// is connected (on any node, this one too), its actor looks its trip
    /// up in Redis and takes it over. Its app may have left the node that
    /// holds it, whose actor may have died with the hold.
    TripBooked {
        /// The driver.
        driver: DriverId,
    },
    /// Cluster mode: book every member of group `group` in Redis at once
    /// (see `commit.rs`) and hand the verdict to
    /// [`Searches::group_confirmed`](super::Searches::group_confirmed) with
    /// `group` and `attempt`.
    ConfirmGroup {
        /// The group (the rider's key).
        group: SearchKey,
        /// Which try this is.
        attempt: u32,
        /// Each member's driver and trip.
        members: Vec<GroupMember>,
        /// How long the booked locks are kept.
        keep: Duration,
    },
    /// Cluster mode: settle `owner`'s lock of `driver` in Redis and hand the
    /// outcome to [`Searches::settled`] with `ticket`.
    Settle {
        /// The driver.
        driver: DriverId,
        /// The lock's owner value.
        owner: String,
        /// What to hand back.
        ticket: SettleTicket,
    },
}

/// Identifies a settle in flight (see [`SearchEffect::Settle`]).
#[derive(Clone, Debug, PartialEq)]
pub struct SettleTicket {
    pub(super) key: SearchKey,
    pub(super) seq: u64,
    pub(super) offer_id: OfferId,
    pub(super) attempts: u32,
    pub(super) driver: DriverId,
}

/// A driver's answer to a lock request.
#[derive(Clone, Debug, PartialEq)]
pub struct LockAnswer {
    /// The driver asked.
    pub driver_id: DriverId,
    /// The offer the lock was for.
    pub offer_id: OfferId,
    /// The search that asked (its sequence number).
    pub search: u64,
    /// The search's rider.
    pub rider_id: RiderId,
    /// The search's request id.
    pub request_id: RequestId,
    /// Granted, or why not.
    pub result: Result<Granted, LockRefused>,
    /// The driver's node, when it is another one and known.
    pub node: Option<NodeId>,
}

impl LockAnswer {
    /// A refusal of the request `offer_id` of `holder` to `driver_id`.
    pub fn refused(
        driver_id: DriverId,
        offer_id: OfferId,
        holder: &OfferHolder,
        why: LockRefused,
    ) -> Self {
        LockAnswer {
            driver_id,
            offer_id,
            search: holder.search,
            rider_id: holder.rider_id.clone(),
            request_id: holder.request_id.clone(),
            result: Err(why),
            node: None,
        }
    }
}

/// How a granted offer ended (every granted offer produces exactly one).
#[derive(Clone, Debug, PartialEq)]
pub struct OfferOutcome {
    /// The driver.
    pub driver_id: DriverId,
    /// The driver's location as the offer ended.
    pub driver_location: Option<LatLon>,
    /// The offer.
    pub offer_id: OfferId,
    /// The search it was made for.
    pub search: u64,
    /// The search's rider.
    pub rider_id: RiderId,
    /// The search's request id.
    pub request_id: RequestId,
    /// How it ended.
    pub ending: Ending,
    /// The trip, when accepted.
    pub trip_id: Option<TripId>,
}

/// Counts of a [`Searches`], for tests and operators.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SearchCounts {
    /// Drivers in the index (offerable).
    pub available_drivers: usize,
    /// Searches in flight.
    pub searches: usize,
    /// Searches parked waiting for a driver.
    pub waiting: usize,
}
