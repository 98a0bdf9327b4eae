//! The matcher's decisions: turning ride requests into locked drivers.
//!
//! [`Searches`] holds the index of offerable drivers and every search in
//! flight. A search never blocks on a driver: asking for a lock is an effect
//! whose answer comes back later as another event, so thousands of searches
//! proceed at once and a slow driver holds up only the rider it was offered
//! to.
//!
//! A search's life: `searching` → (lock a candidate → offer → outcome)* →
//! exactly one of `matched`, `no_driver`, `cancelled`. With no free driver in
//! reach it parks, indexed by pickup, and is woken (first come, first served)
//! by the next driver who becomes available nearby, so nothing polls.
//!
//! `R` is whatever the caller needs to reach a rider's connection (an outbox
//! in the engine, a number in tests); the machine only hands it back in
//! [`SearchEffect::Tell`].

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::lock::{Ending, FencingToken, OfferId};
use crate::cluster::wire::NodeId;
use crate::ids::Ids;
use crate::location::LatLon;
use crate::metrics as m;
use crate::protocol::{DriverId, ErrorCode, RequestId, RiderId, ServerMessage};
use crate::spatial::SpatialIndex;

mod batch;
mod commit;
mod events;
mod group;
mod news;
mod remote;
mod steps;
mod view;
mod wound;

pub use batch::{MAX_BATCH, MAX_HELD};
pub use events::{
    Dispatch, LockAnswer, OfferOutcome, SearchCounts, SearchEffect, SearchKey, SearchSettings,
    SettleTicket,
};
pub use view::{OpenRequest, Stage};

/// Cluster mode: how long a remote lock's answer may take before the lock is
/// settled in Redis instead (see `settle_due`); also the slack on a remote
/// offer's outcome beyond its deadline.
pub const REMOTE_ANSWER_WAIT: Duration = Duration::from_secs(2);
/// How much longer a driver is held for a group than its search lasts: the
/// group commits only before its deadline, and the commit must reach the
/// driver before its hold lapses.
pub const HOLD_MARGIN: Duration = Duration::from_secs(2);
/// Cluster mode: how often, and how many times, a settle that Redis could
/// not decide is tried again before the rider is told `no_driver`.
pub(super) const SETTLE_RETRY: Duration = Duration::from_millis(500);
pub(super) const SETTLE_ATTEMPTS: u32 = 60;
/// Cluster mode: lock attempts in a row Redis may fail to decide before a
/// request ends `no_driver` (`locks_unavailable`), and the wait between them.
const STORE_FAILURES: u32 = 3;
const STORE_RETRY: Duration = Duration::from_millis(200);

#[derive(Clone, Debug)]
enum Phase {
    /// No driver asked yet, or the last one is done with: looking or parked.
    Looking,
    /// A lock was asked of `driver`; its answer is on the way.
    Locking {
        driver: DriverId,
        node: Option<NodeId>,
        offer_id: OfferId,
    },
    /// `driver` holds the offer.
    Offered {
        driver: DriverId,
        node: Option<NodeId>,
        offer_id: OfferId,
        fencing_token: FencingToken,
    },
}

struct Search<R> {
    seq: u64,
    rider: R,
    session: u64,
    pickup: LatLon,
    started: Instant,
    phase: Phase,
    /// Drivers who declined this request or let it expire: never asked again.
    excluded: Vec<DriverId>,
    cancel_requested: bool,
    deadline_passed: bool,
    /// Drivers this request has been offered to (locks granted).
    candidates_tried: u32,
    /// Cluster mode: lock attempts in a row that Redis could not decide.
    store_failures: u32,
    /// Cluster mode: the offer whose settle is in flight, if any.
    settling: Option<OfferId>,
    /// Cluster mode: where the remote driver of the current offer was when
    /// it was granted (the index forgets it then), for a settled `matched`.
    offered_at: Option<LatLon>,
    /// While parked: when its radius next grows (it then looks again).
    widen_at: Option<Instant>,
    /// Where the driver asked was, by the index (it leaves the index once
    /// granted): for an older group weighing whether to take it.
    driver_at: Option<LatLon>,
    /// A member of a group request: the group's key (see `group.rs`).
    group: Option<SearchKey>,
    /// Why a withdrawal (`cancel_requested`) ends the offer: the rider
    /// cancelled, or the group failed.
    withdraw_why: Ending,
    /// A group member's offer an older group is taking back: the cancel is
    /// on its way, and the offer no longer counts for the group.
    revoking: Option<OfferId>,
    /// A group member waiting for a driver it took from a younger group.
    preempting: bool,
    /// Cluster mode: when this group member last asked other nodes to take
    /// a driver from a younger group for it (see `wound.rs`).
    wounded_at: Option<Instant>,
}

impl<R> Search<R> {
    fn new(seq: u64, rider: R, session: u64, pickup: LatLon, started: Instant) -> Self {
        Search {
            seq,
            rider,
            session,
            pickup,
            started,
            phase: Phase::Looking,
            excluded: Vec::new(),
            cancel_requested: false,
            deadline_passed: false,
            candidates_tried: 0,
            store_failures: 0,
            settling: None,
            offered_at: None,
            widen_at: None,
            driver_at: None,
            group: None,
            withdraw_why: Ending::RiderCancelled,
            revoking: None,
            preempting: false,
            wounded_at: None,
        }
    }

    fn current_offer(&self) -> Option<OfferId> {
        match &self.phase {
            Phase::Looking => None,
            Phase::Locking { offer_id, .. } | Phase::Offered { offer_id, .. } => Some(*offer_id),
        }
    }

    /// The driver (on this node) an older group may take from this search,
    /// and its offer: offered, and not being taken already.
    fn takeable(&self) -> Option<(&DriverId, OfferId)> {
        match &self.phase {
            Phase::Offered {
                driver,
                node: None,
                offer_id,
                ..
            } if self.revoking.is_none() => Some((driver, *offer_id)),
            _ => None,
        }
    }

    fn offered_driver(&self) -> Option<DriverId> {
        match &self.phase {
            Phase::Locking { driver, .. } | Phase::Offered { driver, .. } => Some(driver.clone()),
            Phase::Looking => None,
        }
    }
}

/// When news of an offer is due: (when, search seq, offer, settle attempts
/// so far, which news, search).
type RemoteDue = (Instant, u64, OfferId, u32, Awaited, SearchKey);

/// Which news of an offer a due date is for: it counts only while the
/// search still waits for that news (a lock answer that came in time must
/// not let its due date settle the granted offer it became).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Awaited {
    /// The answer to a lock request (the search is locking).
    Answer,
    /// How a granted offer ended (the search has it offered).
    Outcome,
    /// Either: a settle asked again, or the driver's node is gone.
    Any,
}

/// Every search of one node, and the index of drivers it may offer.
pub struct Searches<R> {
    settings: SearchSettings,
    ids: Arc<Ids>,
    /// Cluster mode: this node's id.
    node: Option<NodeId>,
    drivers: SpatialIndex<DriverId>,
    /// Indexed drivers connected to this node.
    local: HashSet<DriverId>,
    /// Drivers with a lock request on the way: other searches skip them.
    locking: HashSet<DriverId>,
    searches: HashMap<SearchKey, Search<R>>,
    /// Requests in flight per rider connection (to cancel them when it
    /// closes; ordered, so that they are cancelled in the same order every
    /// run).
    by_session: HashMap<u64, BTreeSet<RequestId>>,
    /// Requests in flight per rider, over all of that rider's connections.
    by_rider: HashMap<RiderId, usize>,
    /// Parked searches, oldest first, and where they wait.
    waiting: BTreeMap<u64, SearchKey>,
    waiting_at: SpatialIndex<u64>,
    /// Search deadlines, soonest first (entries of ended searches are
    /// skipped when they come up).
    deadlines: BinaryHeap<Reverse<(Instant, u64, SearchKey)>>,
    /// Searches waiting to try again after Redis could not decide a lock.
    retries: BinaryHeap<Reverse<(Instant, u64, SearchKey)>>,
    /// Parked searches whose radius grows, when it does (entries that no
    /// longer match the search's `widen_at` are skipped).
    widenings: BinaryHeap<Reverse<(Instant, u64, SearchKey)>>,
    next_seq: u64,
    /// Indexed drivers connected to other nodes, and which node.
    remote: HashMap<DriverId, NodeId>,
    /// Another node's word that a driver indexed here as local is offerable
    /// there (it moved nodes and this node has not yet seen it go): used
    /// when the local actor says the driver is unavailable here.
    shadowed: HashMap<DriverId, (NodeId, LatLon)>,
    /// When news of a remote lock is overdue (see `settle_due`).
    remote_due: BinaryHeap<Reverse<RemoteDue>>,
    /// Batch dispatch: new requests waiting for the window to close, and
    /// when it does.
    batch: Vec<(u64, SearchKey)>,
    /// Requests of earlier batches waiting for a nearer driver: in the next
    /// assignment, but not counted towards [`batch::MAX_BATCH`] (or a batch
    /// of waiting requests would close at every new one).
    batch_held: Vec<(u64, SearchKey)>,
    batch_due: Option<Instant>,
    /// Requests assigned by batches since the last `take_batched`.
    batched: usize,
    /// Where requests are taken and drivers offered (`None`: everywhere).
    areas: Option<Arc<crate::areas::ServiceAreas>>,
    /// Group requests in flight, by the rider's key; their members are
    /// searches of their own.
    groups: HashMap<SearchKey, group::Group<R>>,
    /// Offers an older group is taking back: the member of that group to
    /// hand each driver to once it is free (its key and sequence number, so
    /// that a later search under the same request id does not get it), and
    /// where the driver was.
    handovers: HashMap<OfferId, (SearchKey, u64, Option<LatLon>)>,
    /// Cluster mode: group bookings to ask Redis again, when, and which try.
    group_retries: BinaryHeap<Reverse<(Instant, u32, SearchKey)>>,
    /// Cluster mode: booked groups' news to drivers on other nodes, said
    /// again when due (a few per booked group, so a scan is cheap).
    resends: Vec<(Instant, SearchEffect<R>)>,
    effects: Vec<SearchEffect<R>>,
    index_queries: u32,
}

impl<R: Clone> Searches<R> {
    /// No searches and an empty index. `node` is this node's id in cluster
    /// mode (drivers of other nodes are indexed and offered too).
    pub fn new(settings: SearchSettings, ids: Arc<Ids>, node: Option<NodeId>) -> Self {
        Searches {
            settings,
            ids,
            node,
            drivers: SpatialIndex::new(),
            local: HashSet::new(),
            locking: HashSet::new(),
            searches: HashMap::new(),
            by_session: HashMap::new(),
            by_rider: HashMap::new(),
            waiting: BTreeMap::new(),
            waiting_at: SpatialIndex::new(),
            deadlines: BinaryHeap::new(),
            retries: BinaryHeap::new(),
            widenings: BinaryHeap::new(),
            next_seq: 0,
            remote: HashMap::new(),
            shadowed: HashMap::new(),
            remote_due: BinaryHeap::new(),
            batch: Vec::new(),
            batch_held: Vec::new(),
            batch_due: None,
            batched: 0,
            areas: None,
            groups: HashMap::new(),
            handovers: HashMap::new(),
            group_retries: BinaryHeap::new(),
            resends: Vec::new(),
            effects: Vec::new(),
            index_queries: 0,
        }
    }

    /// The effects recorded since the last call, oldest first.
    pub fn take_effects(&mut self) -> Vec<SearchEffect<R>> {
        std::mem::take(&mut self.effects)
    }

    /// Spatial queries run since the last call (for the index-query metric,
    /// which the caller times).
    pub fn take_index_queries(&mut self) -> u32 {
        std::mem::take(&mut self.index_queries)
    }

    /// The counts.
    pub fn counts(&self) -> SearchCounts {
        SearchCounts {
            available_drivers: self.drivers.len(),
            searches: self.searches.len(),
            waiting: self.waiting.len(),
        }
    }

    /// When [`Searches::tick`] next has something to do.
    pub fn next_timeout(&self) -> Option<Instant> {
        [
            self.deadlines.peek().map(|Reverse((at, ..))| *at),
            self.retries.peek().map(|Reverse((at, ..))| *at),
            self.widenings.peek().map(|Reverse((at, ..))| *at),
            self.batch_due,
            self.remote_due.peek().map(|Reverse((at, ..))| *at),
            self.group_retries.peek().map(|Reverse((at, ..))| *at),
            self.resends.iter().map(|(at, _)| *at).min(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Where `driver` is indexed, if it is.
    pub fn position(&self, driver: &DriverId) -> Option<LatLon> {
        self.drivers.position(driver)
    }

    fn tell(&mut self, to: &R, message: ServerMessage) {
        self.effects.push(SearchEffect::Tell {
            to: to.clone(),
            message,
        });
    }

    // ----- commands from riders -----

    /// `rider` (connection `session` of `rider_id`) asks for a ride; the
    /// session read the request at `received_at` (latencies count from
    /// there, so they include any wait in front of the matcher).
    #[allow(clippy::too_many_arguments)]
    pub fn request(
        &mut self,
        now: Instant,
        rider: R,
        rider_id: RiderId,
        session: u64,
        request_id: RequestId,
        pickup: LatLon,
        received_at: Instant,
    ) {
        let request = (rider_id, session, request_id, pickup, received_at);
        self.request_vehicles(now, rider, request, 1);
    }

    /// As [`Searches::request`], for `vehicles` vehicles (1 to 4) that all
    /// come or none does: (rider id, session, request id, pickup, received
    /// at).
    pub fn request_vehicles(
        &mut self,
        now: Instant,
        rider: R,
        (rider_id, session, request_id, pickup, received_at): (
            RiderId,
            u64,
            RequestId,
            LatLon,
            Instant,
        ),
        vehicles: u8,
    ) {
        m::request_received();
        m::request_vehicles(vehicles);
        let key = (rider_id.clone(), request_id.clone());
        let area = self.areas.as_ref().map(|areas| areas.area_of(pickup));
        let refusal = if area == Some(None) {
            m::outside_service_area("request");
            Some((
                ErrorCode::OutsideServiceArea,
                format!(
                    "the pickup ({}, {}) is outside every area this engine serves",
                    pickup.lat, pickup.lon
                ),
            ))
        } else if self.searches.contains_key(&key) || self.groups.contains_key(&key) {
            Some((
                ErrorCode::RequestInFlight,
                format!("request {request_id} is already in flight"),
            ))
        } else if self.by_rider.get(&rider_id).copied().unwrap_or(0)
            >= self.settings.max_requests_per_rider
        {
            Some((
                ErrorCode::TooManyRequests,
                format!(
                    "at most {} requests may be in flight per rider, over all of its connections",
                    self.settings.max_requests_per_rider
                ),
            ))
        } else if self.searches.len() + usize::from(vehicles) > self.settings.max_searches {
            // Parked searches hold memory and wake-up work for as long as
            // their deadline: the total is bounded like the queue before it.
            Some((
                ErrorCode::Overloaded,
                "the engine holds as many searches as it may; retry in a moment".into(),
            ))
        } else {
            None
        };
        if let Some((code, why)) = refusal {
            m::protocol_error(code);
            return self.tell(&rider, ServerMessage::request_error(code, request_id, why));
        }
        if let Some(Some(area)) = area {
            m::area_request(area);
        }
        *self.by_rider.entry(rider_id).or_insert(0) += 1;
        self.next_seq += 1;
        let seq = self.next_seq;
        self.by_session
            .entry(session)
            .or_default()
            .insert(request_id.clone());
        self.tell(&rider, ServerMessage::Searching { request_id });
        if vehicles > 1 {
            let search = Search::new(seq, rider, session, pickup, received_at);
            return self.start_group(now, key, search, vehicles);
        }
        let search = Search::new(seq, rider, session, pickup, received_at);
        self.start(now, key, search);
    }

    /// Starts `search`: its deadline, and its first look (now, or with the
    /// batch).
    fn start(&mut self, now: Instant, key: SearchKey, search: Search<R>) {
        let seq = search.seq;
        self.searches.insert(key.clone(), search);
        self.dispatch(now, key, seq);
    }

    /// A new search `key` (sequence `seq`) gets its deadline and its first
    /// look: now, or with the batch.
    fn dispatch(&mut self, now: Instant, key: SearchKey, seq: u64) {
        let deadline = now + self.settings.search_timeout;
        self.deadlines.push(Reverse((deadline, seq, key.clone())));
        match self.settings.dispatch {
            Dispatch::Greedy => self.advance(now, key),
            Dispatch::Batch { window, .. } => {
                self.batch.push((seq, key));
                self.batch_due.get_or_insert(now + window);
                if self.batch.len() >= batch::MAX_BATCH {
                    self.assign_batch(now);
                }
            }
        }
    }

    /// The rider on connection `rider` withdraws a request: immediate when no
    /// driver is involved, otherwise through the driver, whose answer decides
    /// (an accept that got there first still wins).
    pub fn cancel(&mut self, now: Instant, rider: R, rider_id: RiderId, request_id: RequestId) {
        let key = (rider_id, request_id);
        if !self.searches.contains_key(&key) && !self.groups.contains_key(&key) {
            m::protocol_error(ErrorCode::UnknownRequest);
            let why = format!("request {} is not in flight", key.1);
            return self.tell(
                &rider,
                ServerMessage::request_error(ErrorCode::UnknownRequest, key.1, why),
            );
        }
        self.withdraw(now, &key);
    }

    /// A rider's connection closed: its searches are cancelled.
    pub fn rider_gone(&mut self, now: Instant, rider_id: RiderId, session: u64) {
        let Some(requests) = self.by_session.get(&session) else {
            return;
        };
        let keys: Vec<SearchKey> = requests
            .iter()
            .map(|request_id| (rider_id.clone(), request_id.clone()))
            .collect();
        for key in keys {
            self.withdraw(now, &key);
        }
    }

    fn withdraw(&mut self, now: Instant, key: &SearchKey) {
        if self.groups.contains_key(key) {
            return self.end_group(now, key, Ending::RiderCancelled);
        }
        let Some(search) = self.searches.get_mut(key) else {
            return;
        };
        search.cancel_requested = true;
        match &search.phase {
            Phase::Looking => self.advance(now, key.clone()),
            Phase::Locking { .. } => {} // decided when the lock answer arrives
            // Being taken back already: its ending brings the search here.
            Phase::Offered { offer_id, .. } if search.revoking == Some(*offer_id) => {}
            Phase::Offered {
                driver,
                node,
                offer_id,
                fencing_token,
            } => self.effects.push(SearchEffect::Cancel {
                driver: driver.clone(),
                node: node.clone(),
                offer_id: *offer_id,
                fencing_token: *fencing_token,
                why: search.withdraw_why,
            }),
        }
    }

    // ----- time -----

    /// Carries out what is due at `now`: search deadlines, retries after
    /// Redis could not decide, parked searches whose radius grew, and
    /// settles of overdue remote offers.
    pub fn tick(&mut self, now: Instant) {
        self.settle_due(now);
        self.group_retries_due(now);
        self.resends_due(now);
        self.widen_due(now);
        if self.batch_due.is_some_and(|due| due <= now) {
            self.assign_batch(now);
        }
        while let Some(Reverse((at, ..))) = self.retries.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, seq, key))) = self.retries.pop() else {
                break;
            };
            let looking = self
                .searches
                .get(&key)
                .is_some_and(|s| s.seq == seq && matches!(s.phase, Phase::Looking));
            if looking {
                self.advance(now, key);
            }
        }
        while let Some(Reverse((deadline, ..))) = self.deadlines.peek() {
            if *deadline > now {
                break;
            }
            let Some(Reverse((_, seq, key))) = self.deadlines.pop() else {
                break;
            };
            let committing = self.group_committing(&key);
            let Some(search) = self.searches.get_mut(&key).filter(|s| s.seq == seq) else {
                continue;
            };
            search.deadline_passed = true;
            if committing {
                // Redis decides the group's fate first (see `commit.rs`).
                if let Some(group) = search.group.clone() {
                    self.end_group(now, &group, Ending::GroupIncomplete);
                }
                continue;
            }
            // A search with a driver deciding lets that offer play out; a
            // group can't wait for its members' offers: it is not complete
            // (or it would be gone), so it fails.
            if matches!(search.phase, Phase::Looking) {
                self.advance(now, key);
            } else if let Some(group) = search.group.clone() {
                self.end_group(now, &group, Ending::GroupIncomplete);
            }
        }
    }
}
