//! One driver's bookings: its lock rules ([`DriverLock`]) and, in cluster
//! mode, its lock in Redis, as one deterministic machine.
//!
//! [`Booking`] takes [`DriverEvent`]s with the time and records
//! [`DriverEffect`]s. The driver's actor feeds it the app's commands, lock
//! requests and Redis replies, and carries the effects out; the fault
//! simulation feeds it the same events in virtual time.
//!
//! One Redis operation at a time blocks the driver ([`RedisOp::blocks`]):
//! while it is out, every other event waits in order, so the driver's state
//! can't change under an acquire, a confirm or a release (the actor used to
//! get this from `ctx.wait`; here it is explicit and tested). Trip renewals
//! and the finish of a trip completed elsewhere are the exceptions: they run
//! beside everything else.

mod app;
mod cluster;
mod group;
use app::{offer_message, trip_assigned, waiting_for_group};
mod events;
mod steps;
mod waiting;
use waiting::Waiting;

pub use events::{
    DriverEffect, DriverEvent, GroupMember, LockRequest, RedisOp, RedisReply, ReplyTo, TripRecord,
};

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::lock::{
    Availability, DriverLock, Ending, LockRefused, LockState, OfferId, Trip, TripId,
};
use super::OfferHolder;
use crate::areas::ServiceAreas;
use crate::cluster::wire::NodeId;
use crate::ids::Ids;
use crate::location::LatLon;
use crate::metrics as m;
use crate::protocol::{DriverCommand, DriverId};

/// How long a disconnected, free driver's actor stays around for a reconnect
/// before it is retired (its memory freed). A driver on a trip is kept until
/// the trip completes.
pub const RETIRE_AFTER: Duration = Duration::from_secs(60);

/// Moves shorter than this don't move the driver in the matcher's index: GPS
/// jitter and parked drivers re-sending their spot would otherwise cost an
/// index update and a matcher message each. The exact position is kept for
/// distances in offers and matches; ranking is off by at most this much.
pub const MIN_INDEX_MOVE_M: f64 = 5.0;

/// Cluster mode: other nodes' copies of a driver move only past this. Every
/// node reads every announcement of every other node's drivers, so their
/// number is what a node pays for the rest of the city (BENCHMARKS.md,
/// "What a node pays for other nodes' drivers"); a driver cruising at
/// street speed with a location every 4 s moves about 33 m between them,
/// so this halves them. Other nodes rank a driver by a position up to this
/// far off; its own node keeps it to [`MIN_INDEX_MOVE_M`], and offers and
/// matches carry the exact distance. A change of offerability, or a move
/// into or out of the service areas, is announced at once whatever the
/// distance.
pub const MIN_ANNOUNCE_MOVE_M: f64 = 50.0;

/// The longest a trip lasts: one not completed by then ends by itself
/// (its lock freed), so that a driver whose app vanished mid-trip is not
/// held, and its lock renewed, forever.
pub const TRIP_MAX_AGE: Duration = Duration::from_secs(12 * 3600);

/// Lock requests a driver remembers having been asked (see
/// `Booking::asked`).
const REMEMBERED_REQUESTS: usize = 16;

/// Trips a driver remembers having completed (see `Booking::completed`).
const REMEMBERED_TRIPS: usize = 8;

/// Cluster mode: how much longer a driver's lock lives in Redis than the
/// offer it backs: room for the accept's confirm to reach Redis before the
/// key lapses.
pub const LOCK_MARGIN: Duration = Duration::from_secs(1);

/// Cluster mode: how long a confirmed lock (a driver on a trip) is held
/// between renewals: long enough to ride out a slow Redis, short enough that
/// a node that died mid-trip frees its driver soon.
pub const TRIP_HOLD: Duration = Duration::from_secs(30);

/// Cluster mode: the trip lock being renewed.
#[derive(Clone, Debug)]
struct Renewal {
    record: TripRecord,
    /// When next.
    at: Instant,
    /// Whether the last word from Redis was that a majority holds it (the
    /// confirm or take-over, or the last renewal): then a renewal also takes
    /// the lock back on a server that lost it.
    kept: bool,
}

/// One driver.
pub struct Booking {
    id: DriverId,
    ids: Arc<Ids>,
    /// Cluster mode: this node.
    node: Option<NodeId>,
    lock: DriverLock<OfferHolder>,
    session: Option<u64>,
    /// When the held offer was granted (for the lock-hold histogram).
    granted_at: Option<Instant>,
    /// Held for a group: how many of its members had accepted at the last
    /// word from the matcher (told again on a reconnect).
    group_accepted: u8,
    /// Cluster mode: the app reconnected while an offer is held here; it is
    /// sent again once the trip look-up has answered.
    resend_offer: bool,
    /// Where the matcher's index has this driver (`None`: not indexed), so
    /// that it hears of every change exactly once.
    indexed_at: Option<LatLon>,
    /// Where other nodes were last told this driver is offerable (`None`:
    /// not offerable), moved only past [`MIN_ANNOUNCE_MOVE_M`].
    announced_at: Option<LatLon>,
    /// The areas served, if not everywhere: a move across their border is
    /// announced whatever its distance.
    areas: Option<Arc<ServiceAreas>>,
    /// The state last counted in the gauges.
    counted_as: Option<Availability>,
    retire_at: Option<Instant>,
    waiting: Option<Waiting>,
    /// Events that arrived while the driver waited for Redis, in order.
    deferred: VecDeque<DriverEvent>,
    /// When each deferred lock request arrived: how late its answer is
    /// counts from then (see `cluster::ANSWER_TRUSTED`).
    lock_arrivals: VecDeque<(OfferId, Instant)>,
    /// Cluster mode: the trip lock being renewed, and when next.
    renewal: Option<Renewal>,
    /// Cluster mode: when to look the current trip up again, and which try.
    lookup_retry: Option<(Instant, u32)>,
    /// Cluster mode: a finish Redis could not confirm: when to ask again.
    finish_retry: Option<(String, TripId, Instant, u32)>,
    /// Cluster mode: a trip completed elsewhere whose finish Redis could not
    /// tell: when to ask again, and which try.
    finish_trip_retry: Option<(TripId, Instant, u32)>,
    /// Trips this driver completed lately: never taken over again from a
    /// record that outlived them.
    completed: VecDeque<TripId>,
    /// Since when the driver is on its trip (here), for [`TRIP_MAX_AGE`].
    trip_since: Option<Instant>,
    /// The offers lately asked for, so that a request delivered twice is
    /// handled once.
    asked: VecDeque<OfferId>,
    /// How old a location may grow before the driver is not offered by it.
    location_max_age: Duration,
    /// When the last location came.
    located_at: Option<Instant>,
    /// When to look whether the location has gone stale: set once per
    /// `location_max_age`, not per update, so that a driver sending its
    /// position every few seconds does not re-arm a timer each time.
    stale_check: Option<Instant>,
    effects: Vec<DriverEffect>,
}

impl Booking {
    /// A driver nobody has heard from; `node` is this node in cluster mode.
    /// It is offered only while its last location is at most
    /// `location_max_age` old.
    pub fn new(
        id: DriverId,
        ids: Arc<Ids>,
        node: Option<NodeId>,
        location_max_age: Duration,
    ) -> Self {
        Booking {
            id,
            ids,
            node,
            lock: DriverLock::new(),
            session: None,
            granted_at: None,
            group_accepted: 0,
            resend_offer: false,
            indexed_at: None,
            announced_at: None,
            areas: None,
            counted_as: None,
            retire_at: None,
            waiting: None,
            deferred: VecDeque::new(),
            lock_arrivals: VecDeque::new(),
            renewal: None,
            lookup_retry: None,
            finish_retry: None,
            finish_trip_retry: None,
            completed: VecDeque::new(),
            trip_since: None,
            asked: VecDeque::new(),
            location_max_age,
            located_at: None,
            stale_check: None,
            effects: Vec::new(),
        }
    }

    /// The driver's lock.
    pub fn lock(&self) -> &DriverLock<OfferHolder> {
        &self.lock
    }

    /// The driver's id.
    pub fn id(&self) -> &DriverId {
        &self.id
    }

    /// Where the matcher's index has this driver (`None`: not offerable).
    pub fn indexed_at(&self) -> Option<LatLon> {
        self.indexed_at
    }

    /// Where other nodes were last told this driver is (`None`: not
    /// offerable).
    pub fn announced_at(&self) -> Option<LatLon> {
        self.announced_at
    }

    /// Serves only `areas`: a move across their border is announced to
    /// other nodes at once (they don't offer drivers outside).
    pub fn serve_only(&mut self, areas: Arc<ServiceAreas>) {
        self.areas = Some(areas);
    }

    /// Whether a Redis answer is awaited before anything else is handled.
    pub fn is_waiting(&self) -> bool {
        self.waiting.is_some()
    }

    /// The effects recorded since the last call, oldest first.
    pub fn take_effects(&mut self) -> Vec<DriverEffect> {
        std::mem::take(&mut self.effects)
    }

    /// When a [`DriverEvent::Tick`] next has something to do.
    pub fn next_timeout(&self) -> Option<Instant> {
        let confirm_retry = match &self.waiting {
            Some(
                Waiting::Confirm { retry_at, .. }
                | Waiting::SettleAccept { retry_at, .. }
                | Waiting::Hold { retry_at, .. }
                | Waiting::SettleHold { retry_at, .. },
            ) => *retry_at,
            _ => None,
        };
        if self.waiting.is_some() {
            return confirm_retry;
        }
        [
            self.lock.current_offer().map(|offer| offer.deadline),
            self.retire_at,
            self.renewal.as_ref().map(|r| r.at),
            self.lookup_retry.map(|(at, _)| at),
            self.finish_retry.as_ref().map(|(_, _, at, _)| *at),
            self.finish_trip_retry.map(|(_, at, _)| at),
            self.trip_since.map(|since| since + TRIP_MAX_AGE),
            self.stale_check,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Handles one event at `now`.
    pub fn handle(&mut self, now: Instant, event: DriverEvent) {
        match event {
            // Renewals run beside everything else, but what they find waits
            // like any other event.
            DriverEvent::Redis(RedisReply::TripFinished {
                trip_id,
                attempt,
                done,
            }) => self.trip_finished(now, trip_id, done, attempt),
            DriverEvent::Redis(reply) if !matches!(reply, RedisReply::Renewed { .. }) => {
                self.redis_replied(now, reply)
            }
            DriverEvent::Tick if self.waiting.is_some() => self.confirm_retry_due(now),
            event if self.waiting.is_some() => self.defer(now, event),
            event => self.apply(now, event),
        }
        // Events that waited for Redis run now, in order, until the next
        // wait.
        while self.waiting.is_none() {
            let Some(event) = self.deferred.pop_front() else {
                break;
            };
            self.apply(now, event);
        }
        if self.waiting.is_none() {
            self.timers(now);
        }
    }

    /// Keeps `event` for when Redis has answered. Only the newest location
    /// is kept: a long wait (Redis can't tell whether an accept booked) must
    /// not pile up a moving driver's updates.
    fn defer(&mut self, now: Instant, event: DriverEvent) {
        if let DriverEvent::TryLock(request) = &event {
            self.lock_arrivals.push_back((request.offer_id, now));
        }
        if let DriverEvent::Command {
            command: DriverCommand::Location { .. },
            session,
        } = &event
        {
            let session = *session;
            self.deferred.retain(|e| {
                !matches!(e, DriverEvent::Command { command: DriverCommand::Location { .. }, session: s } if *s == session)
            });
        }
        self.deferred.push_back(event);
    }

    /// The driver's actor is stopping at `now`: an offer it holds ends as a
    /// disconnect and lock requests still waiting are refused, so no search
    /// waits for news that will not come.
    pub fn stop(&mut self, now: Instant) {
        if let Some(state) = self.counted_as.take() {
            m::driver_state_left(state);
        }
        let pending = self.waiting.take();
        // An accept whose confirm may have landed is not ended here: the
        // search settles it in Redis (which says whether it booked) when no
        // news comes.
        let deciding = matches!(
            pending,
            Some(
                Waiting::Confirm { .. } | Waiting::SettleAccept { .. } | Waiting::SettleHold { .. }
            )
        );
        let waiting = match pending {
            Some(Waiting::Acquire(request, ..)) => {
                // The acquire may land after all: freed rather than left to
                // lapse.
                let owner = self.owner_of(&request.holder, request.offer_id);
                self.effects
                    .push(DriverEffect::Redis(RedisOp::Release { owner }));
                Some(request)
            }
            _ => None,
        };
        self.session = None;
        if !deciding {
            if let Some(ended) = self.lock.disconnect() {
                self.report(now, ended);
            }
        }
        let deferred = std::mem::take(&mut self.deferred);
        self.lock_arrivals.clear();
        let requests = waiting
            .into_iter()
            .chain(deferred.into_iter().filter_map(|e| match e {
                DriverEvent::TryLock(request) => Some(request),
                _ => None,
            }));
        for request in requests {
            self.refuse(request, LockRefused::Offline);
        }
    }

    fn apply(&mut self, now: Instant, event: DriverEvent) {
        match event {
            DriverEvent::Attach { session } => self.attach(now, session),
            DriverEvent::Detach { session } => {
                if self.session == Some(session) {
                    self.session = None;
                    self.left_on_trip();
                }
                self.effects.push(DriverEffect::DropSession(session));
            }
            DriverEvent::SessionLost { session } if self.session != Some(session) => {}
            DriverEvent::SessionLost { .. } | DriverEvent::ConnectedElsewhere => {
                if let Some(session) = self.session.take() {
                    self.effects.push(DriverEffect::DropSession(session));
                    self.left_on_trip();
                }
            }
            DriverEvent::Command { session, command } => {
                if self.session != Some(session) {
                    return; // a replaced connection's last words
                }
                self.command(now, command);
            }
            DriverEvent::TryLock(request) => self.try_lock(now, request),
            DriverEvent::CancelOffer {
                offer_id,
                fencing_token,
                why,
            } => {
                if self.held_in_cluster() {
                    // A group's commit may have landed in Redis: settled
                    // first (see `group.rs`).
                    self.settle_hold(offer_id, fencing_token, why);
                } else if let Some(ended) = self.lock.cancel(offer_id, fencing_token, why) {
                    self.report(now, ended);
                }
            }
            DriverEvent::CommitHold {
                offer_id,
                fencing_token,
                trip_id,
            } if self.node.is_some() => self.commit_hold(now, offer_id, fencing_token, trip_id),
            DriverEvent::CommitHold {
                offer_id,
                fencing_token,
                trip_id,
            } => {
                // A hold that lapsed or was let go is not committed; the
                // matcher commits only before the hold's deadline, with
                // room to spare, so that is a lost message or a bug.
                match self.lock.commit(offer_id, fencing_token, trip_id) {
                    Some(ended) => self.report(now, ended),
                    None => {
                        tracing::warn!(driver = %self.id, offer = offer_id, "a group commit found no hold")
                    }
                }
            }
            DriverEvent::GroupProgress { offer_id, accepted } => {
                if let Some(offer) = self.lock.held_offer().filter(|o| o.offer_id == offer_id) {
                    self.group_accepted = accepted;
                    let message = waiting_for_group(offer, accepted);
                    self.tell(message);
                }
            }
            DriverEvent::HolderNodeGone { node, incarnation } => {
                let Some(offer) = self.lock.current_offer() else {
                    return;
                };
                if offer.holder.node.as_ref() == Some(&node)
                    && offer.holder.incarnation == incarnation
                {
                    let (offer_id, token) = (offer.offer_id, offer.fencing_token);
                    if self.held_in_cluster() {
                        self.settle_hold(offer_id, token, Ending::RiderCancelled);
                    } else if let Some(ended) =
                        self.lock.cancel(offer_id, token, Ending::RiderCancelled)
                    {
                        self.report(now, ended);
                    }
                }
            }
            DriverEvent::LookUpTrip => self.lookup_trip(now, 1),
            DriverEvent::Tick => {}
            DriverEvent::Redis(reply) => self.redis_replied(now, reply),
        }
        self.sync(now);
    }

    fn attach(&mut self, now: Instant, session: u64) {
        // Dropping the old connection is what closes it: its session sees
        // its channel end and says goodbye. It gets nothing more.
        self.session = Some(session);
        self.effects.push(DriverEffect::UseSession(session));
        self.lock.connect();
        // A reconnecting app learns what it is in the middle of. In cluster
        // mode an offer held here is sent again only once Redis has said
        // the driver's current trip is not newer (see `found_trip`): the
        // app may have moved to another node meanwhile and been booked
        // there under a newer lock, and must not see an older one after it.
        let resend = match (self.lock.state(), self.lock.location()) {
            (LockState::Offered(_), Some(_)) if self.node.is_some() => {
                self.resend_offer = true;
                None
            }
            (LockState::Offered(offer), Some(at)) => Some(offer_message(offer, at, now)),
            (LockState::Held(offer), _) => Some(waiting_for_group(offer, self.group_accepted)),
            (LockState::OnTrip(trip), _) => Some(trip_assigned(trip)),
            _ => None,
        };
        if let Some(message) = resend {
            self.tell(message);
        }
        if self.node.is_some() {
            self.effects.push(DriverEffect::Attached);
            self.lookup_trip(now, 1);
            // A trip held here may have been completed on another node the
            // app was on meanwhile: the next renewal, now, tells.
            if let Some(renewal) = &mut self.renewal {
                renewal.at = now;
            }
        }
    }

    fn try_lock(&mut self, now: Instant, request: LockRequest) {
        // When it reached this driver, if it waited behind Redis (taken out
        // first, so that no path below leaves it behind).
        let arrived = self
            .lock_arrivals
            .iter()
            .position(|(offer, _)| *offer == request.offer_id)
            .and_then(|i| self.lock_arrivals.remove(i))
            .map_or(now, |(_, at)| at);
        // The same request again (delivered twice between nodes): it was
        // answered already, and is not answered twice. A second grant could
        // not happen (the offer is held or has ended), and a refusal could
        // overtake the grant on its way and make the search drop an offer
        // the driver holds.
        if self.asked.contains(&request.offer_id) {
            return;
        }
        if self.asked.len() == REMEMBERED_REQUESTS {
            self.asked.pop_front();
        }
        self.asked.push_back(request.offer_id);
        if now >= request.not_after {
            return self.refuse(request, LockRefused::SearchEnded);
        }
        if self.node.is_some() {
            return self.acquire(now, arrived, request);
        }
        let token = self.ids.next_token();
        self.grant(now, request, token);
    }

    /// Asks Redis; with `wait`, nothing else is handled until it answers.
    fn redis(&mut self, op: RedisOp, wait: Option<Waiting>) {
        debug_assert_eq!(op.blocks(), wait.is_some());
        debug_assert!(wait.is_none() || self.waiting.is_none());
        self.waiting = wait;
        self.effects.push(DriverEffect::Redis(op));
    }

    /// The owner value of the lock behind `offer_id` held for `holder`: the
    /// requesting node (this one for its own riders) and the offer id.
    fn owner_of(&self, holder: &OfferHolder, offer_id: OfferId) -> String {
        let node = self.node.as_ref().expect("only cluster locks have owners");
        super::owner(holder.node.as_ref().unwrap_or(node), offer_id)
    }
}

/// `trip_ended` is shared by the app's completion and a lost trip lock.
impl Booking {
    fn trip_ended(&mut self, now: Instant, trip: &Trip<OfferHolder>) {
        self.renewal = None;
        self.remember_completed(trip.trip_id);
        if self.node.is_some() {
            let owner = self.owner_of(&trip.holder, trip.offer_id);
            self.finish(owner, trip.trip_id, 1);
            // The app may have been booked on another node meanwhile (a
            // connection there before this one): looked up once the finish
            // is through.
            self.lookup_trip(now, 1);
        }
    }

    fn left_on_trip(&mut self) {
        if self.node.is_some() && self.trip_id().is_some() {
            self.effects.push(DriverEffect::LeftOnTrip);
        }
    }

    fn remember_completed(&mut self, trip_id: TripId) {
        if self.completed.len() == REMEMBERED_TRIPS {
            self.completed.pop_front();
        }
        self.completed.push_back(trip_id);
    }

    /// The trip this driver is on, if any (for tests and the simulation).
    pub fn trip_id(&self) -> Option<TripId> {
        match self.lock.state() {
            LockState::OnTrip(trip) => Some(trip.trip_id),
            _ => None,
        }
    }
}
