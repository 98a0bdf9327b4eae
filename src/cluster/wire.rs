//! What engine nodes tell each other through Redis pub/sub, as JSON.
//!
//! Two kinds of channel: [`DRIVERS_CHANNEL`], where every node announces its
//! drivers becoming offerable, moving, or leaving the pool; and one channel
//! per node ([`node_channel`]) for the offers its riders make to drivers on
//! other nodes and the answers and outcomes that come back. Pub/sub delivers
//! at most once: every message here is either repeated by a later one (a
//! driver's next change) or covered by a timeout on the requesting node (see
//! the matcher's `settle`), so a lost one costs time, never a stuck lock.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::core::Incarnation;
use crate::location::LatLon;
use crate::lock::{Ending, FencingToken, LockRefused, OfferId, TripId};
use crate::protocol::{DriverId, RequestId, RiderId};

/// An engine node's id (`--node-id`).
pub type NodeId = Arc<str>;

/// Where nodes announce their drivers' availability.
pub const DRIVERS_CHANNEL: &str = "ridelock:drivers";

/// The channel a node listens on for messages addressed to it.
pub fn node_channel(node: &str) -> String {
    format!("ridelock:node:{node}")
}

/// One message between nodes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Wire {
    /// On [`DRIVERS_CHANNEL`]: `driver`, connected to `node`, is offerable at
    /// `at`, or (`at` absent) no longer offerable.
    Driver {
        /// The driver's node.
        node: NodeId,
        /// The driver.
        driver: DriverId,
        /// Where, while offerable.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at: Option<LatLon>,
    },
    /// On [`DRIVERS_CHANNEL`]: several of `node`'s drivers changed, in
    /// order: each offerable at its place, or (`null`) no longer. What a
    /// node publishes: one message per batch of changes, not per driver, so
    /// that every other node pays one message's overhead for many.
    Drivers {
        /// The drivers' node.
        node: NodeId,
        /// Each driver and where it is offerable (`null`: not any more).
        changes: Vec<(DriverId, Option<LatLon>)>,
    },
    /// On [`DRIVERS_CHANNEL`]: `driver`'s app connected to `node`. Any other
    /// node with a connection of that driver closes it, so a driver is
    /// connected (and offered) through one node at a time.
    Attached {
        /// The node it connected to.
        node: NodeId,
        /// The driver.
        driver: DriverId,
    },
    /// On the drivers channel: `driver` is on a trip on `node` and its app
    /// left that node (perhaps already connected elsewhere before the trip
    /// was booked); the node the app is on takes the trip over from Redis.
    TripBooked {
        /// The node where it was booked.
        node: NodeId,
        /// The driver.
        driver: DriverId,
    },
    /// To a driver's node: lock `driver` for this request and offer it.
    Lock {
        /// The requesting node (where the rider is).
        from: NodeId,
        /// Its process (see [`Incarnation`]).
        #[serde(default)]
        incarnation: Incarnation,
        /// The driver.
        driver: DriverId,
        /// The offer's id (the requesting node's).
        offer_id: OfferId,
        /// The requesting node's search number.
        search: u64,
        /// The rider.
        rider_id: RiderId,
        /// The rider's request.
        request_id: RequestId,
        /// Where the rider waits.
        pickup: LatLon,
        /// How long the driver has to answer, ms.
        timeout_ms: u64,
        /// How long the search goes on looking, ms from sending: a lock asked
        /// for later is refused.
        search_left_ms: u64,
        /// The same deadline by the wall clock (ms since the Unix epoch), so
        /// that a message late on its way does not stretch it; the earlier
        /// of the two counts.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        search_deadline_unix_ms: Option<u64>,
        /// For a member of a group request: the group.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group: Option<WireGroup>,
    },
    /// To the requesting node: the driver's node granted or refused a lock.
    Answer {
        /// The driver.
        driver: DriverId,
        /// The offer.
        offer_id: OfferId,
        /// The search.
        search: u64,
        /// The rider.
        rider_id: RiderId,
        /// The request.
        request_id: RequestId,
        /// The fencing token when granted, or why not.
        result: Result<FencingToken, LockRefused>,
        /// The driver's node (so that a grant that comes too late can be
        /// withdrawn there).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<NodeId>,
    },
    /// To the requesting node: an offer it was granted ended.
    Ended {
        /// The driver.
        driver: DriverId,
        /// The driver's location as it ended.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at: Option<LatLon>,
        /// The offer.
        offer_id: OfferId,
        /// Its fencing token.
        fencing_token: FencingToken,
        /// The search.
        search: u64,
        /// The rider.
        rider_id: RiderId,
        /// The request.
        request_id: RequestId,
        /// Where the rider waits.
        pickup: LatLon,
        /// How it ended.
        ending: Ending,
        /// The trip, when accepted.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trip_id: Option<TripId>,
    },
    /// To a driver's node: the rider withdrew this offer.
    Cancel {
        /// The driver.
        driver: DriverId,
        /// The offer.
        offer_id: OfferId,
        /// Its fencing token.
        fencing_token: FencingToken,
        /// Why (absent: the rider cancelled).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        why: Option<Ending>,
    },
    /// To the requesting node: the driver accepted a group's offer and is
    /// held for the group (its lock kept in Redis for the group's hold).
    Held {
        /// The driver.
        driver: DriverId,
        /// The driver's location as it accepted.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at: Option<LatLon>,
        /// The offer.
        offer_id: OfferId,
        /// Its fencing token.
        fencing_token: FencingToken,
        /// The search (the group's member).
        search: u64,
        /// The rider.
        rider_id: RiderId,
        /// The member's request key.
        request_id: RequestId,
    },
    /// To a driver's node, held for a group by `offer_id`: how many members
    /// have accepted, or (with `trip_id`) the group is booked in Redis and
    /// the driver goes on that trip.
    GroupNews {
        /// The driver.
        driver: DriverId,
        /// The held offer.
        offer_id: OfferId,
        /// Its fencing token.
        fencing_token: FencingToken,
        /// Members accepted so far.
        accepted: u8,
        /// The driver's trip, once the group is booked.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trip_id: Option<TripId>,
    },
    /// On [`DRIVERS_CHANNEL`]: an older group asks for a younger group's
    /// driver (see [`Wound`]).
    Wound(Wound),
}

/// Wound-wait across nodes, on [`DRIVERS_CHANNEL`]: a member of a group on
/// `from`, whose request came at `started_unix_ms`, finds no free driver
/// within `radius_m` of `pickup`; each other node takes one such driver
/// from a younger group of its own (see `core::search::wound`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Wound {
    /// The older group's node.
    pub from: NodeId,
    /// When its request came, ms since the Unix epoch.
    pub started_unix_ms: u64,
    /// Where its rider waits.
    pub pickup: LatLon,
    /// How far it looks, in metres.
    pub radius_m: f64,
}

/// A group request, as a lock request for one of its members carries it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireGroup {
    /// The request id the rider chose.
    pub request_id: RequestId,
    /// How many vehicles.
    pub size: u8,
    /// How long a driver who accepts is held for the group, ms from
    /// sending.
    pub hold_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_as_tagged_json() {
        let answer = Wire::Answer {
            driver: "d1".into(),
            offer_id: 7,
            search: 3,
            rider_id: "r1".into(),
            request_id: "q1".into(),
            result: Err(LockRefused::StaleToken {
                offered: 4,
                newest: 9,
            }),
            from: Some("b".into()),
        };
        let json = serde_json::to_string(&answer).unwrap();
        assert!(json.starts_with(r#"{"t":"answer""#), "{json}");
        assert_eq!(serde_json::from_str::<Wire>(&json).unwrap(), answer);

        let batch = Wire::Drivers {
            node: "a".into(),
            changes: vec![
                ("d1".into(), Some(LatLon::new(52.5, 13.4).unwrap())),
                ("d2".into(), None),
            ],
        };
        let json = serde_json::to_string(&batch).unwrap();
        assert_eq!(
            json,
            r#"{"t":"drivers","node":"a","changes":[["d1",{"lat":52.5,"lon":13.4}],["d2",null]]}"#
        );
        assert_eq!(serde_json::from_str::<Wire>(&json).unwrap(), batch);

        let gone = Wire::Driver {
            node: "a".into(),
            driver: "d1".into(),
            at: None,
        };
        let json = serde_json::to_string(&gone).unwrap();
        assert_eq!(json, r#"{"t":"driver","node":"a","driver":"d1"}"#);
        assert_eq!(serde_json::from_str::<Wire>(&json).unwrap(), gone);
    }
}
