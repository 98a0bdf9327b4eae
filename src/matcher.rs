//! The matcher: turns ride requests into locked drivers.
//!
//! One actor owns the spatial index of available drivers and every search in
//! flight. A search never blocks the matcher: asking a driver for its lock is
//! a message whose answer comes back later, so thousands of searches proceed
//! at once and a slow driver holds up only the rider it was offered to.
//!
//! A search's life: `searching` → (lock a candidate → offer → outcome)* →
//! exactly one of `matched`, `no_driver`, `cancelled`. With no free driver in
//! reach it parks, indexed by pickup, and is woken (first come, first served)
//! by the next driver who becomes available nearby, so nothing polls.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::cluster::store::Settled;
use crate::cluster::wire::{NodeId, Wire};
use crate::cluster::{self, Cluster};
use crate::config::Config;
use crate::driver::{CancelOffer, DriverActor, Granted, LockReply, OfferHolder, TryLock};
use crate::ids::Ids;
use crate::location::LatLon;
use crate::lock::{Ended, Ending, FencingToken, LockRefused, OfferId, TripId};
use crate::metrics as m;
use crate::protocol::{DriverId, ErrorCode, NoDriverReason, RequestId, RiderId, ServerMessage};
use crate::session::Outbox;
use crate::spatial::SpatialIndex;

/// How often search deadlines are checked. One timer for all searches: actix
/// polls every future an actor has spawned each time it wakes, so a timer per
/// search would make every message cost as much as the searches in flight.
const DEADLINE_TICK: Duration = Duration::from_millis(10);

/// Parked searches looked at oldest-first before falling back to a spatial
/// query when a driver frees up (see `wake_parked`).
const OLDEST_PARKED_SCAN: usize = 64;

/// Cluster mode: how long a remote lock's answer may take before the lock is
/// settled in Redis instead (see `settle_due`); also the slack on a remote
/// offer's outcome beyond its deadline.
const REMOTE_ANSWER_WAIT: Duration = Duration::from_secs(2);
/// Cluster mode: how often, and how many times, a settle that Redis could
/// not decide is tried again before the rider is told `no_driver`.
const SETTLE_RETRY: Duration = Duration::from_millis(500);
const SETTLE_ATTEMPTS: u32 = 60;
/// Cluster mode: lock attempts in a row Redis may fail to decide before a
/// request ends `no_driver` (`locks_unavailable`), and the wait between them.
const STORE_FAILURES: u32 = 3;
const STORE_RETRY: Duration = Duration::from_millis(200);

/// How often the matcher's gauges (searches, waiting riders, index size) are
/// refreshed.
const GAUGE_REFRESH: Duration = Duration::from_secs(1);

/// Admission control for ride requests: how many are queued for the matcher
/// and not yet handled. Past the limit, sessions refuse new requests with
/// `overloaded` instead of letting the queue (and every rider's wait) grow
/// without bound when demand outruns the matcher.
#[derive(Debug)]
pub struct Admission {
    queued: AtomicUsize,
    limit: usize,
}

impl Admission {
    /// Room for `limit` queued requests.
    pub fn new(limit: usize) -> Self {
        Admission {
            queued: AtomicUsize::new(0),
            limit,
        }
    }

    /// Takes a place in the queue; `false` when it is full.
    pub fn try_enter(&self) -> bool {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.limit {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// A queued request reached the matcher.
    fn leave(&self) {
        self.queued.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A rider connection, as the matcher sees it.
#[derive(Clone)]
pub struct RiderLink {
    /// The rider.
    pub rider_id: RiderId,
    /// The connection's id.
    pub session: u64,
    /// Where messages for the rider go.
    pub outbox: Outbox,
}

/// A rider asks for a ride.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RequestRide {
    /// Who asks, on which connection.
    pub rider: RiderLink,
    /// The rider's id for the request.
    pub request_id: RequestId,
    /// Where to be picked up (validated).
    pub pickup: LatLon,
    /// When the session read the request: latencies count from here, so
    /// they include any wait in the matcher's queue.
    pub received_at: Instant,
}

/// A rider withdraws a request.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CancelRide {
    /// Who asks, on which connection.
    pub rider: RiderLink,
    /// The request.
    pub request_id: RequestId,
}

/// A rider's connection closed: its searches are cancelled.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RiderGone {
    /// The rider.
    pub rider_id: RiderId,
    /// The connection that closed.
    pub session: u64,
}

/// A driver became offerable, or moved while offerable.
#[derive(Message)]
#[rtype(result = "()")]
pub struct DriverAvailable {
    /// The driver.
    pub driver_id: DriverId,
    /// The driver's actor, when it just became offerable; `None` for a move
    /// (the matcher has the address already, and cloning and dropping one per
    /// location update is measurable).
    pub driver: Option<Addr<DriverActor>>,
    /// Where the driver is.
    pub location: LatLon,
}

/// A driver stopped being offerable.
#[derive(Message)]
#[rtype(result = "()")]
pub struct DriverUnavailable {
    /// The driver.
    pub driver_id: DriverId,
}

/// A driver's offer ended (every granted offer produces exactly one).
#[derive(Message)]
#[rtype(result = "()")]
pub struct OfferEnded {
    /// The driver.
    pub driver_id: DriverId,
    /// The driver's location as the offer ended.
    pub driver_location: Option<LatLon>,
    /// The offer and how it ended.
    pub ended: Ended<OfferHolder>,
}

/// A driver's answer to a lock request (see [`LockReply`]).
#[derive(Message)]
#[rtype(result = "()")]
pub struct LockAnswered {
    /// The driver asked.
    pub driver_id: DriverId,
    /// The offer the lock was for.
    pub offer_id: OfferId,
    /// The search that asked (its matcher sequence number).
    pub search: u64,
    /// The search's rider.
    pub rider_id: RiderId,
    /// The search's request id.
    pub request_id: RequestId,
    /// Granted, or why not.
    pub result: Result<Granted, LockRefused>,
}

/// Counts of the matcher's state, for tests and operators.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, MessageResponse)]
pub struct MatcherStats {
    /// Drivers in the index (offerable).
    pub available_drivers: usize,
    /// Searches in flight.
    pub searches: usize,
    /// Searches parked waiting for a driver.
    pub waiting: usize,
}

/// Asks the matcher for [`MatcherStats`].
#[derive(Message)]
#[rtype(result = "MatcherStats")]
pub struct GetStats;

type SearchKey = (RiderId, RequestId);

/// When news of a remote lock is due: (when, search seq, offer, settle
/// attempts so far, search).
type RemoteDue = (Instant, u64, OfferId, u32, SearchKey);

/// Where a driver's actor is: on this node, or (cluster mode) on another.
#[derive(Clone, Debug)]
enum Target {
    Local(Addr<DriverActor>),
    Remote { node: NodeId, driver: DriverId },
}

#[derive(Clone, Debug)]
enum Phase {
    /// No driver asked yet, or the last one is done with: looking or parked.
    Looking,
    /// A lock was asked of `driver`; its answer is on the way.
    Locking { driver: Target, offer_id: OfferId },
    /// `driver` holds the offer.
    Offered {
        driver: Target,
        offer_id: OfferId,
        fencing_token: FencingToken,
    },
}

struct Search {
    seq: u64,
    rider: RiderLink,
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
}

impl Search {
    fn current_offer(&self) -> Option<OfferId> {
        match &self.phase {
            Phase::Looking => None,
            Phase::Locking { offer_id, .. } | Phase::Offered { offer_id, .. } => Some(*offer_id),
        }
    }
}

/// The matcher actor.
pub struct Matcher {
    config: Arc<Config>,
    ids: Arc<Ids>,
    admission: Arc<Admission>,
    drivers: SpatialIndex<DriverId>,
    driver_addrs: HashMap<DriverId, Addr<DriverActor>>,
    /// Drivers with a lock request on the way: other searches skip them.
    locking: HashSet<DriverId>,
    searches: HashMap<SearchKey, Search>,
    /// Requests in flight per rider connection (to cancel them when it
    /// closes).
    by_session: HashMap<u64, HashSet<RequestId>>,
    /// Requests in flight per rider, over all of that rider's connections
    /// (for `--max-requests-per-rider`).
    by_rider: HashMap<RiderId, usize>,
    /// Parked searches, oldest first, and where they wait.
    waiting: BTreeMap<u64, SearchKey>,
    waiting_at: SpatialIndex<u64>,
    /// Search deadlines, soonest first (entries of ended searches are
    /// skipped when they come up).
    deadlines: BinaryHeap<Reverse<(Instant, u64, SearchKey)>>,
    next_seq: u64,
    /// Cluster mode: the lock store and the other nodes.
    cluster: Option<Arc<Cluster>>,
    /// Indexed drivers connected to other nodes, and which node.
    remote: HashMap<DriverId, NodeId>,
    /// Another node's word that a driver indexed here as local is offerable
    /// there (it moved nodes and this node has not yet seen it go): used
    /// when the local actor says the driver is unavailable here.
    shadowed: HashMap<DriverId, (NodeId, LatLon)>,
    /// When news of a remote lock is overdue (see `settle`), soonest first:
    /// (when, search seq, offer, attempts so far, search).
    remote_due: BinaryHeap<Reverse<RemoteDue>>,
}

impl Actor for Matcher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Searches come and go in bursts; a deep mailbox is cheaper than
        // making sessions wait.
        ctx.set_mailbox_capacity(1 << 16);
        // Gauges are read by scrapes every few seconds; refreshing them once a
        // second keeps that work off the per-message path.
        ctx.run_interval(GAUGE_REFRESH, |act, _| act.publish_gauges());
        ctx.run_interval(DEADLINE_TICK, |act, ctx| act.expire_searches(ctx));
    }
}

impl Matcher {
    /// A matcher with an empty index; `admission` counts the ride requests
    /// sessions have queued for it.
    ///
    /// With `cluster`, drivers on other nodes are indexed and offered too.
    pub fn new(
        config: Arc<Config>,
        ids: Arc<Ids>,
        admission: Arc<Admission>,
        cluster: Option<Arc<Cluster>>,
    ) -> Self {
        Matcher {
            config,
            ids,
            admission,
            drivers: SpatialIndex::new(),
            driver_addrs: HashMap::new(),
            locking: HashSet::new(),
            searches: HashMap::new(),
            by_session: HashMap::new(),
            by_rider: HashMap::new(),
            waiting: BTreeMap::new(),
            waiting_at: SpatialIndex::new(),
            deadlines: BinaryHeap::new(),
            next_seq: 0,
            cluster,
            remote: HashMap::new(),
            shadowed: HashMap::new(),
            remote_due: BinaryHeap::new(),
        }
    }

    fn publish_gauges(&self) {
        m::matcher_gauges(self.searches.len(), self.waiting.len(), self.drivers.len());
    }

    /// Moves a search that is `Looking` forward: ends it if it was cancelled
    /// or ran out of time, asks the nearest untried driver, or parks it.
    fn advance(&mut self, key: SearchKey, ctx: &mut Context<Self>) {
        let Some(search) = self.searches.get(&key) else {
            return;
        };
        debug_assert!(matches!(search.phase, Phase::Looking));
        if search.cancel_requested {
            let request_id = key.1.clone();
            return self.finish(&key, ServerMessage::Cancelled { request_id });
        }
        let out_of_time = search.deadline_passed
            || Instant::now() >= search.started + self.config.search_timeout();
        if out_of_time || search.candidates_tried >= self.config.max_candidates {
            let request_id = key.1.clone();
            return self.finish(
                &key,
                ServerMessage::NoDriver {
                    request_id,
                    reason: None,
                },
            );
        }
        let started = Instant::now();
        // Drivers being locked for other searches and drivers who turned this
        // one down are skipped, however many: the walk ends at the first free
        // driver or the radius, so a search parks only when nobody in reach is
        // free for it, and then the next driver to free up wakes it.
        let candidate = self
            .drivers
            .nearest_within(search.pickup, self.config.radius_m)
            .find(|(id, _)| !search.excluded.contains(id) && !self.locking.contains(id));
        m::index_query(started.elapsed());
        match candidate {
            Some((driver_id, _)) => self.ask_for_lock(key, driver_id, ctx),
            None => self.park(&key),
        }
    }

    fn park(&mut self, key: &SearchKey) {
        if let Some(search) = self.searches.get(key) {
            if self.waiting.insert(search.seq, key.clone()).is_none() {
                self.waiting_at.upsert(search.seq, search.pickup);
            }
        }
    }

    fn unpark(&mut self, seq: u64) {
        if self.waiting.remove(&seq).is_some() {
            self.waiting_at.remove(&seq);
        }
    }

    fn ask_for_lock(&mut self, key: SearchKey, driver_id: DriverId, ctx: &mut Context<Self>) {
        let target = match (
            self.driver_addrs.get(&driver_id),
            self.remote.get(&driver_id),
        ) {
            (Some(addr), _) => Target::Local(addr.clone()),
            (None, Some(node)) => Target::Remote {
                node: node.clone(),
                driver: driver_id.clone(),
            },
            (None, None) => return self.park(&key),
        };
        let Some(search) = self.searches.get_mut(&key) else {
            return;
        };
        let offer_id = self.ids.next_offer();
        let seq = search.seq;
        let search_deadline = search.started + self.config.search_timeout();
        search.phase = Phase::Locking {
            driver: target.clone(),
            offer_id,
        };
        let holder = OfferHolder {
            search: seq,
            rider_id: key.0.clone(),
            request_id: key.1.clone(),
            pickup: search.pickup,
            first_offer_since: (search.candidates_tried == 0).then_some(search.started),
            node: None,
        };
        self.unpark(seq);
        self.locking.insert(driver_id.clone());
        match target {
            Target::Local(driver) => {
                // The answer comes back as a `LockAnswered` message; a request
                // that never reaches the driver answers itself (refused) when
                // dropped.
                let reply = LockReply::new(ctx.address(), driver_id, offer_id, &holder);
                driver.do_send(TryLock {
                    offer_id,
                    holder,
                    timeout: self.config.offer_timeout(),
                    not_after: search_deadline,
                    reply,
                });
            }
            Target::Remote { node, driver } => {
                let cluster = self
                    .cluster
                    .as_ref()
                    .expect("remote drivers only in cluster mode");
                let now = Instant::now();
                cluster.send(
                    &node,
                    Wire::Lock {
                        from: cluster.node().clone(),
                        driver,
                        offer_id,
                        search: seq,
                        rider_id: holder.rider_id,
                        request_id: holder.request_id,
                        pickup: holder.pickup,
                        timeout_ms: self.config.offer_timeout_ms,
                        search_left_ms: search_deadline.saturating_duration_since(now).as_millis()
                            as u64,
                    },
                );
                self.remote_due
                    .push(Reverse((now + REMOTE_ANSWER_WAIT, seq, offer_id, 0, key)));
            }
        }
    }

    /// Cluster mode: news of a remote lock is overdue (the answer or the
    /// outcome was lost between nodes, or the driver's node died). Settling
    /// it in Redis tells for certain whether the driver accepted, and stops
    /// any later acceptance; until Redis can tell, it is asked again.
    fn settle_due(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        while let Some(Reverse((due, ..))) = self.remote_due.peek() {
            if *due > now {
                break;
            }
            let Some(Reverse((_, seq, offer_id, attempts, key))) = self.remote_due.pop() else {
                break;
            };
            let Some(search) = self.searches.get_mut(&key).filter(|s| {
                s.seq == seq && s.current_offer() == Some(offer_id) && s.settling != Some(offer_id)
            }) else {
                continue;
            };
            let (Phase::Locking { driver, .. } | Phase::Offered { driver, .. }) = &search.phase
            else {
                continue;
            };
            let Target::Remote { driver, .. } = driver.clone() else {
                continue;
            };
            search.settling = Some(offer_id);
            let cluster = self
                .cluster
                .clone()
                .expect("remote offers only in cluster mode");
            let owner = cluster::owner(cluster.node(), offer_id);
            let matcher = ctx.address();
            cluster.clone().spawn(async move {
                let started = Instant::now();
                let outcome = cluster.locks().settle(&driver, &owner).await;
                m::redis_op("settle", started.elapsed(), outcome.is_some());
                matcher.do_send(SettleOutcome {
                    key,
                    seq,
                    offer_id,
                    attempts: attempts + 1,
                    driver_id: driver,
                    outcome,
                });
            });
        }
    }

    /// Ends the searching part of searches whose deadline has passed.
    fn expire_searches(&mut self, ctx: &mut Context<Self>) {
        if !self.remote_due.is_empty() {
            self.settle_due(ctx);
        }
        let now = Instant::now();
        while let Some(Reverse((deadline, _, _))) = self.deadlines.peek() {
            if *deadline > now {
                break;
            }
            let Some(Reverse((_, seq, key))) = self.deadlines.pop() else {
                break;
            };
            let Some(search) = self.searches.get_mut(&key).filter(|s| s.seq == seq) else {
                continue;
            };
            search.deadline_passed = true;
            // A search with a driver deciding lets that offer play out.
            if matches!(search.phase, Phase::Looking) {
                self.advance(key, ctx);
            }
        }
    }

    /// Offers a newly available driver to the oldest parked search in reach
    /// that hasn't had this driver before.
    ///
    /// Oldest-first over the first few parked searches finds it at once in
    /// the usual case (the oldest waiting rider is in reach); only when none
    /// of those is does it ask the spatial index for every parked search in
    /// reach. Either way the answer is the oldest eligible one.
    fn wake_parked(&mut self, driver_id: &DriverId, at: LatLon, ctx: &mut Context<Self>) {
        if self.waiting.is_empty() || self.locking.contains(driver_id) {
            return;
        }
        let radius = self.config.radius_m;
        let eligible = |search: &Search| !search.excluded.contains(driver_id);
        let mut oldest = None;
        for (seq, key) in self.waiting.iter().take(OLDEST_PARKED_SCAN) {
            let Some(search) = self.searches.get(key) else {
                continue;
            };
            if eligible(search) && search.pickup.distance_m(at) <= radius {
                oldest = Some(*seq);
                break;
            }
        }
        if oldest.is_none() && self.waiting.len() > OLDEST_PARKED_SCAN {
            oldest = self
                .waiting_at
                .nearest_within(at, radius)
                .filter_map(|(seq, _)| {
                    let search = self.searches.get(self.waiting.get(&seq)?)?;
                    eligible(search).then_some(seq)
                })
                .min();
        }
        if let Some(seq) = oldest {
            let key = self.waiting[&seq].clone();
            self.ask_for_lock(key, driver_id.clone(), ctx);
        }
    }

    /// Ends a search with its final message.
    fn finish(&mut self, key: &SearchKey, message: ServerMessage) {
        let Some(search) = self.searches.remove(key) else {
            return;
        };
        self.unpark(search.seq);
        if let Some(requests) = self.by_session.get_mut(&search.rider.session) {
            requests.remove(&key.1);
            if requests.is_empty() {
                self.by_session.remove(&search.rider.session);
            }
        }
        if let Some(count) = self.by_rider.get_mut(&key.0) {
            *count -= 1;
            if *count == 0 {
                self.by_rider.remove(&key.0);
            }
        }
        m::search_finished(&message, search.started.elapsed(), search.candidates_tried);
        search.rider.outbox.send(message);
    }

    /// The rider wants out: immediate when no driver is involved, otherwise
    /// through the driver, whose answer decides (an accept that got there
    /// first still wins).
    fn cancel(&mut self, key: &SearchKey, ctx: &mut Context<Self>) {
        let Some(search) = self.searches.get_mut(key) else {
            return;
        };
        search.cancel_requested = true;
        match &search.phase {
            Phase::Looking => self.advance(key.clone(), ctx),
            Phase::Locking { .. } => {} // decided when the lock answer arrives
            Phase::Offered {
                driver,
                offer_id,
                fencing_token,
            } => match driver {
                Target::Local(driver) => driver.do_send(CancelOffer {
                    offer_id: *offer_id,
                    fencing_token: *fencing_token,
                }),
                Target::Remote { node, driver } => {
                    let cluster = self.cluster.as_ref().expect("cluster mode");
                    cluster.send(
                        node,
                        Wire::Cancel {
                            driver: driver.clone(),
                            offer_id: *offer_id,
                            fencing_token: *fencing_token,
                        },
                    );
                }
            },
        }
    }

    /// Ends a search with `matched`: trip `trip_id` with `driver_id`, who is
    /// at `driver_location`.
    fn finish_matched(
        &mut self,
        key: &SearchKey,
        trip_id: TripId,
        driver_id: DriverId,
        driver_location: LatLon,
    ) {
        let Some(search) = self.searches.get(key) else {
            return;
        };
        let message = ServerMessage::Matched {
            request_id: key.1.clone(),
            trip_id,
            driver_id,
            driver_location,
            distance_m: driver_location.distance_m(search.pickup),
        };
        self.finish(key, message);
    }

    /// Ends a search that can't lock drivers (Redis is down): `cancelled` if
    /// the rider asked for that, else `no_driver` saying why.
    fn finish_without_locks(&mut self, key: &SearchKey) {
        let Some(search) = self.searches.get(key) else {
            return;
        };
        let request_id = key.1.clone();
        let message = if search.cancel_requested {
            ServerMessage::Cancelled { request_id }
        } else {
            ServerMessage::NoDriver {
                request_id,
                reason: Some(NoDriverReason::LocksUnavailable),
            }
        };
        self.finish(key, message);
    }

    /// Takes a remote driver out of the index.
    fn forget_remote(&mut self, driver_id: &DriverId) {
        if self.remote.remove(driver_id).is_some() {
            self.drivers.remove(driver_id);
        }
    }
}

impl Handler<RequestRide> for Matcher {
    type Result = ();

    fn handle(&mut self, msg: RequestRide, ctx: &mut Context<Self>) {
        let RequestRide {
            rider,
            request_id,
            pickup,
            received_at,
        } = msg;
        self.admission.leave();
        m::request_received();
        let key = (rider.rider_id.clone(), request_id.clone());
        if self.searches.contains_key(&key) {
            m::protocol_error(ErrorCode::RequestInFlight);
            rider.outbox.send(ServerMessage::request_error(
                ErrorCode::RequestInFlight,
                request_id.clone(),
                format!("request {request_id} is already in flight"),
            ));
            return;
        }
        let in_flight = self.by_rider.get(&rider.rider_id).copied().unwrap_or(0);
        if in_flight >= self.config.max_requests_per_rider {
            m::protocol_error(ErrorCode::TooManyRequests);
            rider.outbox.send(ServerMessage::request_error(
                ErrorCode::TooManyRequests,
                request_id,
                format!(
                    "at most {} requests may be in flight per rider, over all of its connections",
                    self.config.max_requests_per_rider
                ),
            ));
            return;
        }
        // Parked searches hold memory and wake-up work for as long as their
        // deadline: the total is bounded like the queue in front of it.
        if self.searches.len() >= self.config.max_searches {
            m::protocol_error(ErrorCode::Overloaded);
            rider.outbox.send(ServerMessage::request_error(
                ErrorCode::Overloaded,
                request_id,
                "the engine holds as many searches as it may; retry in a moment",
            ));
            return;
        }
        *self.by_rider.entry(rider.rider_id.clone()).or_insert(0) += 1;
        self.next_seq += 1;
        let seq = self.next_seq;
        self.by_session
            .entry(rider.session)
            .or_default()
            .insert(request_id.clone());
        rider.outbox.send(ServerMessage::Searching {
            request_id: request_id.clone(),
        });
        self.searches.insert(
            key.clone(),
            Search {
                seq,
                rider,
                pickup,
                started: received_at,
                phase: Phase::Looking,
                excluded: Vec::new(),
                cancel_requested: false,
                deadline_passed: false,
                candidates_tried: 0,
                settling: None,
                offered_at: None,
                store_failures: 0,
            },
        );
        self.deadlines.push(Reverse((
            Instant::now() + self.config.search_timeout(),
            seq,
            key.clone(),
        )));
        self.advance(key, ctx);
    }
}

impl Handler<CancelRide> for Matcher {
    type Result = ();

    fn handle(&mut self, msg: CancelRide, ctx: &mut Context<Self>) {
        let key = (msg.rider.rider_id.clone(), msg.request_id);
        if !self.searches.contains_key(&key) {
            m::protocol_error(ErrorCode::UnknownRequest);
            msg.rider.outbox.send(ServerMessage::request_error(
                ErrorCode::UnknownRequest,
                key.1.clone(),
                format!("request {} is not in flight", key.1),
            ));
            return;
        }
        self.cancel(&key, ctx);
    }
}

impl Handler<RiderGone> for Matcher {
    type Result = ();

    fn handle(&mut self, msg: RiderGone, ctx: &mut Context<Self>) {
        let Some(requests) = self.by_session.get(&msg.session) else {
            return;
        };
        let keys: Vec<SearchKey> = requests
            .iter()
            .map(|request_id| (msg.rider_id.clone(), request_id.clone()))
            .collect();
        for key in keys {
            self.cancel(&key, ctx);
        }
    }
}

impl Handler<DriverAvailable> for Matcher {
    type Result = ();

    fn handle(&mut self, msg: DriverAvailable, ctx: &mut Context<Self>) {
        match msg.driver {
            Some(driver) => {
                self.driver_addrs.insert(msg.driver_id.clone(), driver);
                // Connected here now, whatever another node said before.
                self.remote.remove(&msg.driver_id);
            }
            // A move of a driver the matcher already took out of the index
            // (it was just locked): the driver says unavailable next.
            None if !self.driver_addrs.contains_key(&msg.driver_id) => return,
            None => {}
        }
        self.drivers.upsert(msg.driver_id.clone(), msg.location);
        self.wake_parked(&msg.driver_id, msg.location, ctx);
    }
}

impl Handler<DriverUnavailable> for Matcher {
    type Result = ();

    fn handle(&mut self, msg: DriverUnavailable, ctx: &mut Context<Self>) {
        if self.driver_addrs.remove(&msg.driver_id).is_some() {
            self.drivers.remove(&msg.driver_id);
        }
        // Another node said it has this driver: believe it now.
        if let Some((node, at)) = self.shadowed.remove(&msg.driver_id) {
            self.handle(
                RemoteDriver {
                    node,
                    driver: msg.driver_id,
                    at: Some(at),
                },
                ctx,
            );
        }
    }
}

impl Handler<OfferEnded> for Matcher {
    type Result = ();

    fn handle(&mut self, msg: OfferEnded, ctx: &mut Context<Self>) {
        let OfferEnded {
            driver_id,
            driver_location,
            ended,
        } = msg;
        let holder = &ended.offer.holder;
        let key = (holder.rider_id.clone(), holder.request_id.clone());
        let Some(search) = self
            .searches
            .get_mut(&key)
            .filter(|s| s.seq == holder.search && s.current_offer() == Some(ended.offer.offer_id))
        else {
            return;
        };
        if matches!(search.phase, Phase::Locking { .. }) {
            // The ending overtook the lock's answer; the answer will be stale.
            // The lock was granted all the same: the offer counts as made.
            self.locking.remove(&driver_id);
            search.candidates_tried += 1;
        }
        match (ended.ending, ended.trip_id) {
            (Ending::Accepted, Some(trip_id)) => {
                let at = driver_location.unwrap_or(search.pickup);
                self.finish_matched(&key, trip_id, driver_id, at);
            }
            (ending, _) => {
                if matches!(ending, Ending::Declined | Ending::Expired) {
                    search.excluded.push(driver_id);
                }
                search.phase = Phase::Looking;
                self.advance(key, ctx);
            }
        }
    }
}

impl Handler<LockAnswered> for Matcher {
    type Result = ();

    fn handle(&mut self, msg: LockAnswered, ctx: &mut Context<Self>) {
        let LockAnswered {
            driver_id,
            offer_id,
            search: seq,
            rider_id,
            request_id,
            result,
        } = msg;
        let key = (rider_id, request_id);
        let Some(search) = self
            .searches
            .get_mut(&key)
            .filter(|s| s.seq == seq && s.current_offer() == Some(offer_id))
        else {
            // The offer already ended (the driver reported it before this
            // answer arrived), or its settle gave up on it, or the search is
            // gone: whoever ended it took the driver out of `locking`.
            return;
        };
        self.locking.remove(&driver_id);
        match result {
            Ok(Granted { fencing_token }) => {
                let Phase::Locking { driver, .. } = &search.phase else {
                    return;
                };
                let driver = driver.clone();
                let first_offer = search.candidates_tried == 0;
                search.store_failures = 0;
                search.phase = Phase::Offered {
                    driver: driver.clone(),
                    offer_id,
                    fencing_token,
                };
                // The driver's actor recorded request→offer as it sent a
                // local offer; a remote one is recorded here, as granted.
                search.candidates_tried += 1;
                if let Target::Remote { .. } = driver {
                    search.offered_at = self.drivers.position(&driver_id);
                    if first_offer {
                        m::request_to_offer(search.started.elapsed());
                    }
                    // The outcome is due by the offer's deadline; past that
                    // (plus the lock's margin), it is settled in Redis.
                    let due = Instant::now()
                        + self.config.offer_timeout()
                        + cluster::LOCK_MARGIN
                        + REMOTE_ANSWER_WAIT;
                    self.remote_due
                        .push(Reverse((due, seq, offer_id, 0, key.clone())));
                }
                if search.cancel_requested {
                    self.cancel(&key, ctx);
                }
                // The driver will say it is unavailable too; taking it out now
                // spares other searches a refused attempt in between.
                self.drivers.remove(&driver_id);
                self.driver_addrs.remove(&driver_id);
                self.remote.remove(&driver_id);
            }
            Err(LockRefused::StoreUnavailable) => {
                // Redis could not decide. Once may be a slow reply: try again
                // shortly. Several times in a row, it is down: say so rather
                // than trying every driver in reach against it.
                search.store_failures += 1;
                if search.store_failures >= STORE_FAILURES {
                    return self.finish_without_locks(&key);
                }
                search.phase = Phase::Looking;
                ctx.run_later(STORE_RETRY, move |act, ctx| {
                    let looking = act
                        .searches
                        .get(&key)
                        .is_some_and(|s| s.seq == seq && matches!(s.phase, Phase::Looking));
                    if looking {
                        act.advance(key, ctx);
                    }
                });
            }
            Err(refused) => {
                let remote = matches!(
                    search.phase,
                    Phase::Locking {
                        driver: Target::Remote { .. },
                        ..
                    }
                );
                search.phase = Phase::Looking;
                if remote || refused == LockRefused::HeldElsewhere {
                    // The index was wrong about this driver (news between nodes
                    // is late): don't ask it again for this search, and drop
                    // a remote entry that names a driver gone from its node.
                    search.excluded.push(driver_id.clone());
                    if matches!(refused, LockRefused::Offline | LockRefused::NoLocation) {
                        self.forget_remote(&driver_id);
                    }
                }
                self.advance(key, ctx);
                // The refusing driver may still be offerable for someone parked.
                if let Some(at) = self.drivers.position(&driver_id) {
                    self.wake_parked(&driver_id, at, ctx);
                }
            }
        }
    }
}

/// Cluster mode: what settling an overdue remote lock found out.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SettleOutcome {
    key: SearchKey,
    seq: u64,
    offer_id: OfferId,
    attempts: u32,
    driver_id: DriverId,
    outcome: Option<Settled>,
}

impl Handler<SettleOutcome> for Matcher {
    type Result = ();

    fn handle(&mut self, msg: SettleOutcome, ctx: &mut Context<Self>) {
        let SettleOutcome {
            key,
            seq,
            offer_id,
            attempts,
            driver_id,
            outcome,
        } = msg;
        let Some(search) = self
            .searches
            .get_mut(&key)
            .filter(|s| s.seq == seq && s.current_offer() == Some(offer_id))
        else {
            return; // the news arrived after all
        };
        search.settling = None;
        // Leaving `Locking` (any outcome but "ask again") frees the driver
        // for other searches here.
        let leaves = outcome.is_some() || attempts >= SETTLE_ATTEMPTS;
        if leaves && matches!(search.phase, Phase::Locking { .. }) {
            self.locking.remove(&driver_id);
        }
        match outcome {
            Some(Settled::Trip(trip_id)) => {
                let at = search.offered_at.unwrap_or(search.pickup);
                self.finish_matched(&key, trip_id, driver_id, at);
            }
            Some(Settled::Dead) => {
                // Whatever happened to the offer (the driver's node died, or
                // news was lost), it is over without a trip. The driver is
                // not held against this rider: it may never have seen the
                // offer (a lost lock request: its node was resubscribing).
                // A node that stays deaf is dropped by the liveness checks.
                tracing::info!(driver = %driver_id, offer_id, "no news of a remote offer; it ended without a trip");
                search.phase = Phase::Looking;
                self.advance(key, ctx);
            }
            None if attempts < SETTLE_ATTEMPTS => {
                m::redis_settle_undecided();
                self.remote_due.push(Reverse((
                    Instant::now() + SETTLE_RETRY,
                    seq,
                    offer_id,
                    attempts,
                    key,
                )));
            }
            None => {
                // Redis has not been able to tell for a long while: the rider
                // is told, and the lock lapses in Redis by itself.
                m::redis_settle_undecided();
                self.finish_without_locks(&key);
            }
        }
    }
}

/// Cluster mode: a driver on another node is offerable at `at`, or (`None`)
/// no longer.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RemoteDriver {
    /// The driver's node.
    pub node: NodeId,
    /// The driver.
    pub driver: DriverId,
    /// Where, while offerable.
    pub at: Option<LatLon>,
}

impl Handler<RemoteDriver> for Matcher {
    type Result = ();

    fn handle(&mut self, msg: RemoteDriver, ctx: &mut Context<Self>) {
        let RemoteDriver { node, driver, at } = msg;
        match at {
            // A driver connected here is this node's to announce, until its
            // actor here says otherwise.
            Some(at) if self.driver_addrs.contains_key(&driver) => {
                self.shadowed.insert(driver, (node, at));
            }
            Some(at) => {
                self.remote.insert(driver.clone(), node);
                self.drivers.upsert(driver.clone(), at);
                self.wake_parked(&driver, at, ctx);
            }
            None => {
                if self.remote.get(&driver) == Some(&node) {
                    self.forget_remote(&driver);
                }
                if self.shadowed.get(&driver).is_some_and(|(n, _)| *n == node) {
                    self.shadowed.remove(&driver);
                }
            }
        }
    }
}

/// Cluster mode: every offerable driver of another node, replacing what this
/// node had for it (sent when the subscription to Redis starts).
#[derive(Message)]
#[rtype(result = "()")]
pub struct RemoteSnapshot {
    /// The node.
    pub node: NodeId,
    /// Its offerable drivers.
    pub drivers: Vec<(DriverId, LatLon)>,
}

impl Handler<RemoteSnapshot> for Matcher {
    type Result = ();

    fn handle(&mut self, msg: RemoteSnapshot, ctx: &mut Context<Self>) {
        self.forget_node(&msg.node);
        for (driver, at) in msg.drivers {
            self.handle(
                RemoteDriver {
                    node: msg.node.clone(),
                    driver,
                    at: Some(at),
                },
                ctx,
            );
        }
    }
}

/// Cluster mode: a node left or died; its drivers are not offerable here
/// until they reconnect somewhere.
#[derive(Message)]
#[rtype(result = "()")]
pub struct NodeGone {
    /// The node.
    pub node: NodeId,
}

impl Handler<NodeGone> for Matcher {
    type Result = ();

    fn handle(&mut self, msg: NodeGone, ctx: &mut Context<Self>) {
        self.forget_node(&msg.node);
        // Offers out to the dead node's drivers will get no news: settle them
        // now rather than at their deadline, so their riders move on and the
        // locks are freed for the drivers' reconnections elsewhere.
        let now = Instant::now();
        for (key, search) in &self.searches {
            if let Phase::Locking { driver, offer_id }
            | Phase::Offered {
                driver, offer_id, ..
            } = &search.phase
            {
                if matches!(driver, Target::Remote { node, .. } if *node == msg.node) {
                    self.remote_due
                        .push(Reverse((now, search.seq, *offer_id, 0, key.clone())));
                }
            }
        }
        self.settle_due(ctx);
    }
}

/// Cluster mode: the nodes alive as a (re)subscription found them; remote
/// drivers of any other node are forgotten.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LiveNodes {
    /// The live nodes, this one aside.
    pub nodes: Vec<NodeId>,
}

impl Handler<LiveNodes> for Matcher {
    type Result = ();

    fn handle(&mut self, msg: LiveNodes, ctx: &mut Context<Self>) {
        let live: HashSet<&NodeId> = msg.nodes.iter().collect();
        let dead: HashSet<NodeId> = self
            .remote
            .values()
            .chain(self.shadowed.values().map(|(node, _)| node))
            .filter(|node| !live.contains(node))
            .cloned()
            .collect();
        for node in dead {
            self.handle(NodeGone { node }, ctx);
        }
    }
}

impl Matcher {
    fn forget_node(&mut self, node: &NodeId) {
        self.shadowed.retain(|_, (n, _)| n != node);
        let gone: Vec<DriverId> = self
            .remote
            .iter()
            .filter(|(_, n)| *n == node)
            .map(|(d, _)| d.clone())
            .collect();
        for driver in gone {
            self.forget_remote(&driver);
        }
    }
}

impl Handler<GetStats> for Matcher {
    type Result = MatcherStats;

    fn handle(&mut self, _msg: GetStats, _ctx: &mut Context<Self>) -> MatcherStats {
        MatcherStats {
            available_drivers: self.drivers.len(),
            searches: self.searches.len(),
            waiting: self.waiting.len(),
        }
    }
}
