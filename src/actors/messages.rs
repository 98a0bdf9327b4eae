//! What the matcher and the driver actors say to each other, and how each
//! reaches the other without knowing its type: the matcher sees drivers as a
//! [`DriverDirectory`], a driver sees the matcher as a [`MatcherLink`]. So
//! neither module imports the other, and the cluster's listener can hand
//! both their messages from other nodes.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use actix::prelude::*;

use crate::cluster::wire::{NodeId, Wire};
use crate::cluster::Cluster;
use crate::core::booking::LockRequest;
use crate::core::lock::{Ending, FencingToken, LockRefused, OfferId, TripId};
use crate::core::search::{LockAnswer, OfferOutcome};
use crate::location::LatLon;
use crate::protocol::DriverId;

/// A driver's answer to a lock request, for the matcher.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LockAnswered(pub LockAnswer);

/// A driver's offer ended, for the matcher.
#[derive(Message)]
#[rtype(result = "()")]
pub struct OfferEnded(pub OfferOutcome);

/// A driver accepted an offer of a group and is held for it, for the
/// matcher.
#[derive(Message)]
#[rtype(result = "()")]
pub struct OfferHeld(pub OfferOutcome, pub FencingToken);

/// Drivers' availability changed: the matcher takes the changes from
/// [`DriverChanges`]. At most one is queued at a time however many drivers
/// move, so location updates never pile up in front of bookings.
#[derive(Message)]
#[rtype(result = "()")]
pub struct DriversChanged;

/// Changes not yet taken, oldest driver first (a driver that changes again
/// keeps its place: it is taken with its newest state, and no driver waits
/// behind others that keep moving).
#[derive(Default)]
struct Pending {
    newest: HashMap<DriverId, Option<LatLon>>,
    order: VecDeque<DriverId>,
}

/// Availability changes of this node's drivers not yet taken by the
/// matcher, coalesced per driver: only the newest matters (offerable at a
/// place, or not offerable).
#[derive(Default)]
pub struct DriverChanges {
    pending: Mutex<Pending>,
    /// Whether a [`DriversChanged`] is on its way to the matcher.
    woken: AtomicBool,
}

impl DriverChanges {
    /// Records `driver`'s newest state; `true` when the matcher must be
    /// woken (no [`DriversChanged`] is on its way).
    pub fn push(&self, driver: DriverId, at: Option<LatLon>) -> bool {
        {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if pending.newest.insert(driver.clone(), at).is_none() {
                pending.order.push_back(driver);
            }
        }
        !self.woken.swap(true, Ordering::AcqRel)
    }

    /// The matcher took the wake-up: changes recorded from here on wake it
    /// again. Call before [`DriverChanges::take`], so none is missed.
    pub fn woken_up(&self) {
        self.woken.store(false, Ordering::Release);
    }

    /// Up to `max` changes, and whether more are left (then the caller
    /// should wake itself again with [`DriverChanges::rewake`]).
    pub fn take(&self, max: usize) -> (Vec<(DriverId, Option<LatLon>)>, bool) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let count = max.min(pending.order.len());
        let keys: Vec<DriverId> = pending.order.drain(..count).collect();
        let taken = keys
            .into_iter()
            .filter_map(|k| pending.newest.remove_entry(&k))
            .collect();
        (taken, !pending.order.is_empty())
    }

    /// Whether the caller must send itself another [`DriversChanged`].
    pub fn rewake(&self) -> bool {
        !self.woken.swap(true, Ordering::AcqRel)
    }
}

/// How a driver actor reaches the matcher.
#[derive(Clone)]
pub struct MatcherLink {
    /// Lock answers.
    pub answers: Recipient<LockAnswered>,
    /// Offer outcomes.
    pub ended: Recipient<OfferEnded>,
    /// Group offers accepted and held.
    pub held: Recipient<OfferHeld>,
    /// The matcher's wake-up for availability changes.
    pub wake: Recipient<DriversChanged>,
    /// Availability changes.
    pub changes: Arc<DriverChanges>,
}

impl MatcherLink {
    /// The driver is offerable at `at`, or (`None`) no longer.
    pub fn driver_changed(&self, driver: DriverId, at: Option<LatLon>) {
        if self.changes.push(driver, at) {
            self.wake.do_send(DriversChanged);
        }
    }
}

/// Where a lock request's refusal goes if it is dropped undelivered.
#[derive(Clone)]
pub enum ReplyRoute {
    /// This node's matcher.
    Matcher(Recipient<LockAnswered>),
    /// Another node's matcher.
    Node(Arc<Cluster>, NodeId),
}

impl ReplyRoute {
    /// Delivers `answer`.
    pub fn deliver(&self, answer: LockAnswer) {
        match self {
            ReplyRoute::Matcher(matcher) => matcher.do_send(LockAnswered(answer)),
            ReplyRoute::Node(cluster, node) => {
                cluster.send(node, answer_wire(answer, cluster.node()))
            }
        }
    }
}

/// The wire form of a lock answer.
pub fn answer_wire(answer: LockAnswer, from: &NodeId) -> Wire {
    Wire::Answer {
        from: Some(from.clone()),
        driver: answer.driver_id,
        offer_id: answer.offer_id,
        search: answer.search,
        rider_id: answer.rider_id,
        request_id: answer.request_id,
        result: answer.result.map(|granted| granted.fencing_token),
    }
}

/// A matcher asks a driver for its lock. It hears exactly once per request:
/// the driver's answer, or, if the request is dropped unanswered (the actor
/// stopped with it in its mailbox, or the driver is not on this node), a
/// refusal. So no search waits for an answer that will not come (a message
/// lost between nodes is the one exception, covered by the requesting
/// matcher's own timeout).
#[derive(Message)]
#[rtype(result = "()")]
pub struct TryLock {
    request: Option<LockRequest>,
    driver: DriverId,
    route: ReplyRoute,
}

impl TryLock {
    /// A request for `driver`'s lock, refused through `route` if dropped.
    pub fn new(driver: DriverId, request: LockRequest, route: ReplyRoute) -> Self {
        TryLock {
            request: Some(request),
            driver,
            route,
        }
    }

    /// The request, for the driver to answer (it owes the answer now).
    pub fn take(mut self) -> LockRequest {
        self.request.take().expect("taken once")
    }
}

impl Drop for TryLock {
    fn drop(&mut self) {
        if let Some(request) = self.request.take() {
            let answer = LockAnswer::refused(
                self.driver.clone(),
                request.offer_id,
                &request.holder,
                LockRefused::Offline,
            );
            self.route.deliver(answer);
        }
    }
}

/// The matcher withdraws an offer or a group hold.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CancelOffer {
    /// The offer.
    pub offer_id: OfferId,
    /// Its fencing token.
    pub fencing_token: FencingToken,
    /// Why (told to the app as the revoke's reason).
    pub why: Ending,
}

/// The matcher, to a driver held for a group: the group is complete
/// (`trip_id` set: the driver goes on that trip), or `accepted` members
/// have accepted so far.
#[derive(Message)]
#[rtype(result = "()")]
pub struct GroupNews {
    /// The held offer.
    pub offer_id: OfferId,
    /// Its fencing token.
    pub fencing_token: FencingToken,
    /// Members accepted so far.
    pub accepted: u8,
    /// The trip, once the group is complete.
    pub trip_id: Option<TripId>,
}

/// What the matcher sends a driver.
pub enum ToDriver {
    /// Ask for the lock.
    Lock(TryLock),
    /// Withdraw an offer.
    Cancel(CancelOffer),
    /// News of the group it is held for.
    Group(GroupNews),
    /// Cluster mode: look its current trip up in Redis (booked elsewhere).
    LookUpTrip,
}

/// The driver actors of this node, as the matcher sees them.
pub trait DriverDirectory: Send + Sync {
    /// Delivers `message` to `driver`'s actor; a lock request for a driver
    /// with no actor here is refused (by dropping it). Whether it reached a
    /// live actor.
    fn send(&self, driver: &DriverId, message: ToDriver) -> bool;
}
