//! The deterministic booking core: every decision that books a driver for a
//! rider, as plain state machines.
//!
//! Nothing in here owns a socket, a runtime, a timer or a clock: each method
//! takes the current time (`now`) where time matters and records what must
//! happen as effects, which the caller drains and carries out (send this to
//! that client, ask Redis this, tell that driver this). The actors in
//! [`crate::actors`] wrap these machines one to one and only move effects
//! and results; the fault simulation in `tests/simulation/` runs the same
//! machines for many nodes in virtual time. `docs/design.md` has the tables.
//!
//! - [`lock`]: one driver's lock rules (offered, on a trip, fencing tokens);
//! - [`search`]: the matcher's searches: candidates, parked requests, drivers
//!   being locked, deadlines, and the settling of remote offers;
//! - [`booking`]: one driver's bookings in cluster mode: its lock in Redis
//!   (acquire, confirm, settle, adopt, renew, finish, release) around the
//!   lock rules.
//!
//! Metrics are recorded here through the `metrics` facade: they observe
//! decisions and never feed one, and without a recorder (the simulation)
//! they cost nothing.

pub mod booking;
pub mod lock;
pub mod search;

use std::time::Instant;

use crate::cluster::wire::NodeId;
use crate::location::LatLon;
use crate::protocol::{RequestId, RiderId};
use lock::{FencingToken, TripId};

/// Who holds a driver's lock: one ride request.
#[derive(Clone, Debug, PartialEq)]
pub struct OfferHolder {
    /// The matcher's id for the search, so late answers to an older search
    /// with the same request id are recognised.
    pub search: u64,
    /// The rider.
    pub rider_id: RiderId,
    /// The rider's request id.
    pub request_id: RequestId,
    /// Where the rider waits.
    pub pickup: LatLon,
    /// When the request arrived, on the request's first offer only: the
    /// driver's side records request→offer as it sends that offer.
    pub first_offer_since: Option<Instant>,
    /// Cluster mode: the node the rider is on, when it is not this one.
    /// Answers and outcomes go there instead of to this node's matcher.
    pub node: Option<NodeId>,
    /// Cluster mode: which process of that node (0 when the rider is on
    /// this node): a search dies with its process, and a node restarted
    /// under the same id is another process.
    pub incarnation: Incarnation,
    /// For one member of a group request (several vehicles): the group.
    pub group: Option<GroupTag>,
}

/// The group an offer is part of (see `core::search` for how members are
/// found, held and committed).
#[derive(Clone, Debug, PartialEq)]
pub struct GroupTag {
    /// The request id the rider chose (the holder's `request_id` names the
    /// member, which only the matcher sees).
    pub request_id: RequestId,
    /// How many vehicles the request asks for.
    pub size: u8,
    /// How long a driver who accepts is held for the group at most: past
    /// the search's deadline, with room for the commit to arrive.
    pub hold_until: Instant,
}

impl OfferHolder {
    /// The request id as the rider and the driver know it.
    pub fn public_request_id(&self) -> &RequestId {
        self.group
            .as_ref()
            .map_or(&self.request_id, |g| &g.request_id)
    }

    /// How many vehicles the request asks for.
    pub fn group_size(&self) -> u8 {
        self.group.as_ref().map_or(1, |g| g.size)
    }
}

/// One process of a cluster node: a node restarted under the same
/// `--node-id` is a new incarnation, and what the old one held (searches,
/// riders) is gone with it.
pub type Incarnation = u64;

/// The lock was granted: the offer is on its way to the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Granted {
    /// The lock's fencing token.
    pub fencing_token: FencingToken,
}

/// What settling an offer's lock in Redis found out (see `store::SETTLE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settled {
    /// The driver had accepted: the trip stands.
    Trip(TripId),
    /// The offer is over without a trip (now certainly: no later confirm of
    /// it can succeed).
    Dead,
}

/// The owner value of the lock behind one offer: the requesting node and
/// its offer id, unique across the cluster.
pub fn owner(node: &str, offer_id: lock::OfferId) -> String {
    format!("{node}/{offer_id}")
}
