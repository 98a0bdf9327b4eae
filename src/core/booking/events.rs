//! What goes in and out of a [`Booking`](super::Booking): events, effects,
//! and the questions for Redis with their answers.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cluster::redlock::Renewal;
use crate::cluster::wire::NodeId;
use crate::core::lock::{Ending, FencingToken, LockRefused, OfferId, TripId};
use crate::core::search::{LockAnswer, OfferOutcome};
use crate::core::{Incarnation, OfferHolder, Settled};
use crate::location::LatLon;
use crate::protocol::{DriverCommand, DriverId, RequestId, RiderId, ServerMessage};

/// A driver's trip as kept in Redis while it lasts, so that the driver's
/// actor on whichever node the app reconnects to can take it over.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TripRecord {
    /// The owner value of the trip's lock.
    pub owner: String,
    /// The trip.
    pub trip_id: TripId,
    /// The offer it came from.
    pub offer_id: OfferId,
    /// That offer's fencing token.
    pub fencing_token: FencingToken,
    /// The rider.
    pub rider_id: RiderId,
    /// The rider's request.
    pub request_id: RequestId,
    /// Where the rider waits.
    pub pickup: LatLon,
    /// The rider's node.
    pub rider_node: NodeId,
    /// Whether that is another node than the driver's (at the accept).
    pub rider_is_remote: bool,
    /// Which process of the rider's node made the search (a confirm passes
    /// only while that process is alive).
    #[serde(default)]
    pub rider_incarnation: Incarnation,
}

/// One member of a group whose trips are booked together (see
/// `store::CONFIRM_GROUP`): the driver, and its trip under its lock.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupMember {
    /// The driver.
    pub driver: DriverId,
    /// Its trip, under the owner value of its held lock.
    pub trip: TripRecord,
}

/// Where a lock request's answer goes.
#[derive(Clone, Debug, PartialEq)]
pub enum ReplyTo {
    /// This node's matcher.
    Matcher,
    /// Another node's matcher.
    Node(NodeId),
}

/// A matcher asks for the driver's lock.
#[derive(Clone, Debug, PartialEq)]
pub struct LockRequest {
    /// Id of the offer to make.
    pub offer_id: OfferId,
    /// Who asks.
    pub holder: OfferHolder,
    /// How long the driver has to answer.
    pub timeout: Duration,
    /// The search's deadline: a request handled later is refused, so no
    /// offer goes out for a search that has stopped looking.
    pub not_after: Instant,
    /// Where the answer goes.
    pub reply: ReplyTo,
}

/// What happens to a driver.
#[derive(Clone, Debug, PartialEq)]
pub enum DriverEvent {
    /// A connection for this driver opened; it replaces any earlier one.
    Attach {
        /// The connection's id.
        session: u64,
    },
    /// A connection closed (stale ones are ignored).
    Detach {
        /// The connection's id.
        session: u64,
    },
    /// The app stopped reading its messages on connection `session`: the
    /// connection is dropped (a later connection is left alone).
    SessionLost {
        /// The connection.
        session: u64,
    },
    /// Cluster mode: the app connected to another node.
    ConnectedElsewhere,
    /// A command from the app on connection `session`.
    Command {
        /// The connection it came on; stale connections are ignored.
        session: u64,
        /// The command (validated).
        command: DriverCommand,
    },
    /// A matcher asks for the lock.
    TryLock(LockRequest),
    /// A matcher withdraws an offer (or a group hold). Acts only while
    /// that exact lock (id and fencing token) is still held.
    CancelOffer {
        /// The offer.
        offer_id: OfferId,
        /// Its fencing token.
        fencing_token: FencingToken,
        /// Why: the rider cancelled, the group failed, or an older group
        /// took the driver.
        why: Ending,
    },
    /// The matcher: the group of the held offer `offer_id` is complete; the
    /// driver goes on trip `trip_id`.
    CommitHold {
        /// The offer held.
        offer_id: OfferId,
        /// Its fencing token.
        fencing_token: FencingToken,
        /// The trip.
        trip_id: TripId,
    },
    /// The matcher: `accepted` members of the held offer's group have
    /// accepted so far (told to the app as `waiting_for_group`).
    GroupProgress {
        /// The offer held.
        offer_id: OfferId,
        /// Members accepted so far.
        accepted: u8,
    },
    /// Cluster mode: a node died or left; an offer held for one of its
    /// riders can no longer reach that rider and is withdrawn.
    HolderNodeGone {
        /// The node.
        node: NodeId,
        /// Its process that is gone.
        incarnation: Incarnation,
    },
    /// Cluster mode: the driver was booked on another node after its app
    /// had moved here: look its trip up in Redis and take it over.
    LookUpTrip,
    /// Time passed (see [`Booking::next_timeout`]).
    Tick,
    /// Cluster mode: Redis answered (or could not).
    Redis(RedisReply),
}

impl DriverEvent {
    /// The matcher's news of the group the driver is held for by `offer_id`:
    /// its commit (with the driver's trip) or how many have accepted.
    pub fn group_news(
        offer_id: OfferId,
        fencing_token: FencingToken,
        accepted: u8,
        trip_id: Option<TripId>,
    ) -> Self {
        match trip_id {
            Some(trip_id) => DriverEvent::CommitHold {
                offer_id,
                fencing_token,
                trip_id,
            },
            None => DriverEvent::GroupProgress { offer_id, accepted },
        }
    }
}

/// A question for Redis (cluster mode).
#[derive(Clone, Debug, PartialEq)]
pub enum RedisOp {
    /// Take the lock for `owner` with a fencing token above `floor`.
    Acquire {
        /// The owner value.
        owner: String,
        /// The key's time to live.
        ttl: Duration,
        /// The newest token this driver has seen.
        floor: FencingToken,
    },
    /// Free `owner`'s lock (an offer ended without a trip).
    Release {
        /// The owner value.
        owner: String,
    },
    /// Book `record`'s trip if its lock still holds.
    Confirm {
        /// The trip.
        record: TripRecord,
    },
    /// Keep `owner`'s lock (fencing token `token`) for `ttl`: the driver
    /// accepted a group's offer and is held for the group.
    Hold {
        /// The owner value.
        owner: String,
        /// How long the lock is to live from now.
        ttl: Duration,
        /// The lock's fencing token.
        token: FencingToken,
    },
    /// Give up on `owner`'s lock and say whether it had booked.
    Settle {
        /// The owner value.
        owner: String,
    },
    /// Keep a trip's lock for another [`TRIP_HOLD`].
    Renew {
        /// The trip (its owner value is the lock's).
        record: TripRecord,
        /// Whether to take the lock back where a server lost it: while the
        /// app is connected here, or while the last word from Redis was
        /// that a majority held it (the trip is certainly going on); never
        /// for an actor the app has left whose lock went quiet, which may
        /// hold a trip the app completed elsewhere.
        repair: bool,
    },
    /// Free a trip's lock and the driver's current-trip record (and write
    /// the owner's trip record where it is missing, so that a settle finds
    /// the trip on every server the finish reached).
    Finish {
        /// The owner value.
        owner: String,
        /// The trip.
        trip_id: TripId,
    },
    /// Read the driver's current trip.
    CurrentTrip,
    /// The app completed trip `trip_id`, which this node does not hold: if
    /// it is the driver's current trip in Redis, finish it there under its
    /// owner (its holder elsewhere learns at its next renewal).
    FinishTrip {
        /// The trip.
        trip_id: TripId,
        /// Which try this is.
        attempt: u32,
    },
}

impl RedisOp {
    /// Whether the driver waits for the answer before handling anything
    /// else (all but renewals and `FinishTrip`).
    pub fn blocks(&self) -> bool {
        !matches!(self, RedisOp::Renew { .. } | RedisOp::FinishTrip { .. })
    }
}

/// Redis's answer to a [`RedisOp`]; `None` and `Err` mean it could not tell.
#[derive(Clone, Debug, PartialEq)]
pub enum RedisReply {
    /// To `Acquire`: the token and how long the lock can be relied on.
    Acquired(Result<(FencingToken, Duration), LockRefused>),
    /// To `Release`.
    Freed,
    /// To `Finish`: whether a majority answered (if not, ask again).
    Finished(bool),
    /// To `Confirm`.
    Confirmed(Option<bool>),
    /// To `Settle`.
    Settled(Option<Settled>),
    /// To `Hold`: whether a majority kept the lock (`None`: can't tell).
    HoldKept(Option<bool>),
    /// To `Renew` of `owner`.
    Renewed {
        /// The owner value renewed.
        owner: String,
        /// Kept, lost or finished (`None`: Redis could not tell).
        verdict: Option<Renewal>,
    },
    /// To `CurrentTrip`.
    CurrentTrip(Result<Option<TripRecord>, ()>),
    /// To `FinishTrip` of `trip_id` (nothing waits for it): `None` when
    /// Redis could not tell (ask again).
    TripFinished {
        /// The trip.
        trip_id: TripId,
        /// Which try it answers.
        attempt: u32,
        /// Whether it was found and finished.
        done: Option<bool>,
    },
}

/// What the driver's actor must carry out.
#[derive(Clone, Debug, PartialEq)]
pub enum DriverEffect {
    /// From now on the app is on connection `session` (an earlier one is
    /// dropped, which closes it).
    UseSession(u64),
    /// Drop connection `session` (it closes).
    DropSession(u64),
    /// Send to the app on the current connection.
    Tell(ServerMessage),
    /// Answer a lock request.
    Answer {
        /// Where.
        to: ReplyTo,
        /// The answer.
        answer: LockAnswer,
    },
    /// An offer ended: tell its search (on this node, or on `to`).
    Ended {
        /// The rider's node, when it is another one.
        to: Option<NodeId>,
        /// The outcome.
        outcome: OfferOutcome,
        /// The offer's fencing token.
        fencing_token: FencingToken,
        /// The offer's pickup.
        pickup: LatLon,
    },
    /// The app accepted an offer of a group: the driver is held for it
    /// (`outcome.ending` is `Accepted`, with no trip yet); tell its search
    /// (on this node, or on the rider's node when it is another one).
    Held(OfferOutcome, FencingToken, Option<NodeId>),
    /// The driver is offerable at this place, or (`None`) no longer: for
    /// the matcher's index, and, in cluster mode and with `announce`, the
    /// other nodes' (see [`MIN_ANNOUNCE_MOVE_M`](super::MIN_ANNOUNCE_MOVE_M)).
    Indexed {
        /// Where, or `None`: not offerable.
        at: Option<LatLon>,
        /// Whether other nodes are to hear of it.
        announce: bool,
    },
    /// Cluster mode: tell the other nodes the app connected here.
    Attached,
    /// Cluster mode: the driver is on a trip here and its app has left,
    /// perhaps to another node it connected to before the trip was booked
    /// (it accepted, then moved): the node it is on takes the trip over.
    LeftOnTrip,
    /// Cluster mode: ask Redis.
    Redis(RedisOp),
    /// Nothing is left to keep: the actor may stop.
    Retire,
}
