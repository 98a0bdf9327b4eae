//! Driver actors: one per driver, the only place a driver's lock changes.
//!
//! A [`DriverActor`] wraps the pure [`DriverLock`] with what the state machine
//! leaves out: the driver's connection, the offer timer, and telling the
//! matcher what changed. Sessions and the matcher never touch the lock; they
//! send messages and the actor answers, so a lock is granted or refused
//! atomically, one message at a time.
//!
//! Actors live in a [`DriverRegistry`] keyed by driver id and are spread over
//! several actix arbiters (threads): one driver's messages are handled in
//! order on one thread, different drivers in parallel.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix::ArbiterHandle;

use crate::cluster::store::{Settled, TripRecord, TRIP_HOLD};
use crate::cluster::wire::{NodeId, Wire};
use crate::cluster::{self, Cluster};
use crate::ids::Ids;
use crate::location::LatLon;
use crate::lock::{
    AnswerError, Availability, DriverLock, Ended, Ending, FencingToken, LockRefused, LockState,
    Offer, OfferId, Trip, TripId,
};
use crate::matcher::{DriverAvailable, DriverUnavailable, LockAnswered, Matcher, OfferEnded};
use crate::metrics as m;
use crate::protocol::{
    DriverCommand, DriverId, ErrorCode, RequestId, RevokeReason, RiderId, ServerMessage,
};
use crate::session::Outbox;

/// How long a disconnected, free driver's actor stays around for a reconnect
/// before it is retired (its memory freed). A driver on a trip is kept until
/// the trip completes.
const RETIRE_AFTER: Duration = Duration::from_secs(60);

/// Cluster mode: how often an accept's confirm is asked when Redis can't
/// tell, and how long apart.
const CONFIRM_ATTEMPTS: u32 = 3;
const CONFIRM_RETRY: Duration = Duration::from_millis(100);

/// Cluster mode: how often, and how far apart, a driver's current trip is
/// looked up again when Redis could not tell.
const TRIP_LOOKUP_ATTEMPTS: u32 = 5;
const TRIP_LOOKUP_RETRY: Duration = Duration::from_millis(500);

/// Cluster mode: room left between an offer's deadline and the end of its
/// lock's validity, for the accept's confirm to reach Redis.
const CONFIRM_ROOM: Duration = Duration::from_millis(500);

/// Moves shorter than this don't move the driver in the matcher's index: GPS
/// jitter and parked drivers re-sending their spot would otherwise cost an
/// index update and a matcher message each. The actor keeps the exact
/// position for distances in offers and matches; ranking is off by at most
/// this much.
pub const MIN_INDEX_MOVE_M: f64 = 5.0;

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
    /// driver's actor records request→offer as it sends that offer.
    pub first_offer_since: Option<Instant>,
    /// Cluster mode: the node the rider is on, when it is not this one.
    /// Answers and outcomes go there instead of to this node's matcher.
    pub node: Option<NodeId>,
}

/// The lock was granted: the offer is on its way to the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Granted {
    /// The lock's fencing token.
    pub fencing_token: FencingToken,
}

/// The matcher asks for the driver's lock; the answer goes back through
/// `reply`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct TryLock {
    /// Id of the offer to make.
    pub offer_id: OfferId,
    /// Who asks.
    pub holder: OfferHolder,
    /// How long the driver has to answer.
    pub timeout: Duration,
    /// The search's deadline: a lock request that arrives later is refused,
    /// so no offer goes out for a search that has stopped looking.
    pub not_after: Instant,
    /// Where the answer goes.
    pub reply: LockReply,
}

/// The way back to the requesting matcher for a lock answer. It hears
/// exactly once per request: the driver's answer, or, if the request is
/// dropped unanswered (the actor stopped with it still in its mailbox, or the
/// driver is not on this node), a refusal. So no search waits for an answer
/// that will not come (a message lost between nodes is the one exception,
/// covered by the requesting matcher's own timeout).
pub struct LockReply {
    to: ReplyTo,
    answer: Option<LockAnswered>,
}

enum ReplyTo {
    Matcher(Addr<Matcher>),
    Node(Arc<Cluster>, NodeId),
}

impl LockReply {
    /// A reply to this node's matcher for the lock request `offer_id` of
    /// `holder` to `driver_id`.
    pub fn new(
        matcher: Addr<Matcher>,
        driver_id: DriverId,
        offer_id: OfferId,
        holder: &OfferHolder,
    ) -> Self {
        Self::with(ReplyTo::Matcher(matcher), driver_id, offer_id, holder)
    }

    /// A reply to another node's matcher.
    pub fn to_node(
        cluster: Arc<Cluster>,
        node: NodeId,
        driver_id: DriverId,
        offer_id: OfferId,
        holder: &OfferHolder,
    ) -> Self {
        Self::with(ReplyTo::Node(cluster, node), driver_id, offer_id, holder)
    }

    fn with(to: ReplyTo, driver_id: DriverId, offer_id: OfferId, holder: &OfferHolder) -> Self {
        LockReply {
            to,
            answer: Some(LockAnswered {
                driver_id,
                offer_id,
                search: holder.search,
                rider_id: holder.rider_id.clone(),
                request_id: holder.request_id.clone(),
                result: Err(LockRefused::Offline),
            }),
        }
    }

    /// Sends the answer.
    pub fn send(mut self, result: Result<Granted, LockRefused>) {
        if let Some(mut answer) = self.answer.take() {
            answer.result = result;
            self.deliver(answer);
        }
    }

    fn deliver(&self, answer: LockAnswered) {
        match &self.to {
            ReplyTo::Matcher(matcher) => matcher.do_send(answer),
            ReplyTo::Node(cluster, node) => cluster.send(
                node,
                Wire::Answer {
                    driver: answer.driver_id,
                    offer_id: answer.offer_id,
                    search: answer.search,
                    rider_id: answer.rider_id,
                    request_id: answer.request_id,
                    result: answer.result.map(|granted| granted.fencing_token),
                },
            ),
        }
    }
}

impl Drop for LockReply {
    fn drop(&mut self) {
        if let Some(answer) = self.answer.take() {
            self.deliver(answer);
        }
    }
}

/// The matcher withdraws an offer (the rider cancelled). Acts only while that
/// exact lock (id and fencing token) is still held.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CancelOffer {
    /// The offer.
    pub offer_id: OfferId,
    /// Its fencing token.
    pub fencing_token: FencingToken,
}

/// A connection for this driver opened; it replaces any earlier one.
#[derive(Message)]
#[rtype(result = "Result<(), Retired>")]
pub struct Attach {
    /// The connection's id.
    pub session: u64,
    /// Where messages for the driver go.
    pub outbox: Outbox,
}

/// The actor was retired; the registry makes a new one.
#[derive(Debug)]
pub struct Retired;

/// A connection closed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Detach {
    /// The connection's id; stale ones (already replaced) are ignored.
    pub session: u64,
}

/// A parsed, validated message from the driver's app.
#[derive(Message)]
#[rtype(result = "()")]
pub struct FromDriver {
    /// The connection it came on; stale connections are ignored.
    pub session: u64,
    /// What the driver said.
    pub command: DriverCommand,
}

struct Session {
    id: u64,
    outbox: Outbox,
}

/// One driver: its lock, its connection, its offer timer.
pub struct DriverActor {
    id: DriverId,
    lock: DriverLock<OfferHolder>,
    session: Option<Session>,
    matcher: Addr<Matcher>,
    registry: Arc<DriverRegistry>,
    ids: Arc<Ids>,
    /// Cluster mode: the lock store and the other nodes.
    cluster: Option<Arc<Cluster>>,
    expiry_timer: Option<SpawnHandle>,
    /// When the held offer was granted (for the lock-hold histogram).
    granted_at: Option<Instant>,
    retire_timer: Option<SpawnHandle>,
    /// Cluster mode: renews the trip's lock in Redis while the trip lasts.
    trip_renewal: Option<SpawnHandle>,
    /// Where the matcher's index has this driver (`None`: not indexed). Kept
    /// so that the matcher hears of every change exactly once.
    indexed_at: Option<LatLon>,
    /// The state last counted in the gauges.
    counted_as: Option<Availability>,
    retired: bool,
}

impl Actor for DriverActor {
    type Context = Context<Self>;

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        if let Some(state) = self.counted_as.take() {
            m::driver_state_left(state);
        }
    }
}

impl DriverActor {
    fn new(id: DriverId, registry: Arc<DriverRegistry>) -> Self {
        DriverActor {
            id,
            lock: DriverLock::new(),
            session: None,
            matcher: registry.matcher.clone(),
            ids: registry.ids.clone(),
            cluster: registry.cluster.clone(),
            registry,
            expiry_timer: None,
            granted_at: None,
            retire_timer: None,
            trip_renewal: None,
            indexed_at: None,
            counted_as: None,
            retired: false,
        }
    }

    /// Sends to the driver's app. A full outbox means the app stopped reading:
    /// the connection is dropped (the session closes the socket) rather than
    /// letting messages pile up or silently vanish.
    fn tell(&mut self, message: ServerMessage) {
        if let Some(session) = &self.session {
            if !session.outbox.send(message) {
                tracing::warn!(driver = %self.id, "driver not reading its messages; dropping the connection");
                self.session = None;
            }
        }
    }

    fn error(&mut self, code: ErrorCode, message: String) {
        m::protocol_error(code);
        self.tell(ServerMessage::error(code, message));
    }

    fn offer_message(offer: &Offer<OfferHolder>, at: LatLon, now: Instant) -> ServerMessage {
        ServerMessage::Offer {
            offer_id: offer.offer_id,
            request_id: offer.holder.request_id.clone(),
            rider_id: offer.holder.rider_id.clone(),
            pickup: offer.holder.pickup,
            distance_m: at.distance_m(offer.holder.pickup),
            expires_in_ms: offer.deadline.saturating_duration_since(now).as_millis() as u64,
            fencing_token: offer.fencing_token,
        }
    }

    /// An offer ended: tell the driver (when it wasn't their own doing) and the
    /// matcher (always, exactly once per offer).
    fn report(&mut self, ended: Ended<OfferHolder>, ctx: &mut Context<Self>) {
        if let Some(timer) = self.expiry_timer.take() {
            ctx.cancel_future(timer);
        }
        let offer = &ended.offer;
        if let Some(reason) = RevokeReason::for_ending(ended.ending) {
            self.tell(ServerMessage::OfferRevoked {
                offer_id: offer.offer_id,
                reason,
            });
        }
        if let (Ending::Accepted, Some(trip_id)) = (ended.ending, ended.trip_id) {
            self.tell(ServerMessage::TripAssigned {
                trip_id,
                offer_id: offer.offer_id,
                rider_id: offer.holder.rider_id.clone(),
                pickup: offer.holder.pickup,
            });
        }
        let held_for = self
            .granted_at
            .take()
            .map_or(Duration::ZERO, |at| at.elapsed());
        m::offer_ended(ended.ending, held_for);
        let Some(cluster) = &self.cluster else {
            self.matcher.do_send(OfferEnded {
                driver_id: self.id.clone(),
                driver_location: self.lock.location(),
                ended,
            });
            return;
        };
        let cluster = cluster.clone();
        if ended.ending != Ending::Accepted {
            // Frees the lock for the next offer; if this is lost, the key's
            // expiry frees it a little later.
            self.free_in_redis(Freeing::Offer, self.owner(offer), ctx);
        }
        match offer.holder.node.clone() {
            Some(node) => cluster.send(
                &node,
                Wire::Ended {
                    driver: self.id.clone(),
                    at: self.lock.location(),
                    offer_id: offer.offer_id,
                    fencing_token: offer.fencing_token,
                    search: offer.holder.search,
                    rider_id: offer.holder.rider_id.clone(),
                    request_id: offer.holder.request_id.clone(),
                    pickup: offer.holder.pickup,
                    ending: ended.ending,
                    trip_id: ended.trip_id,
                },
            ),
            None => self.matcher.do_send(OfferEnded {
                driver_id: self.id.clone(),
                driver_location: self.lock.location(),
                ended,
            }),
        }
    }

    /// The owner value of `offer`'s lock in the lock store.
    fn owner(&self, offer: &Offer<OfferHolder>) -> String {
        self.owner_of(&offer.holder, offer.offer_id)
    }

    /// The owner value of the lock behind `offer_id` held for `holder`: the
    /// requesting node (this one for its own riders) and the offer id.
    fn owner_of(&self, holder: &OfferHolder, offer_id: OfferId) -> String {
        let cluster = self
            .cluster
            .as_ref()
            .expect("only cluster locks have owners");
        cluster::owner(holder.node.as_ref().unwrap_or(cluster.node()), offer_id)
    }

    /// The message that tells the app it is on `trip`.
    fn trip_assigned(trip: &Trip<OfferHolder>) -> ServerMessage {
        ServerMessage::TripAssigned {
            trip_id: trip.trip_id,
            offer_id: trip.offer_id,
            rider_id: trip.holder.rider_id.clone(),
            pickup: trip.holder.pickup,
        }
    }

    /// Brings everything outside the lock in line with it: a dropped
    /// connection becomes a disconnect, the matcher's index and the gauges
    /// follow the driver's availability. Called after every event.
    fn sync(&mut self, ctx: &mut Context<Self>) {
        if self.session.is_none() && self.lock.is_connected() {
            if let Some(ended) = self.lock.disconnect() {
                self.report(ended, ctx);
            }
        }
        let availability = self.lock.availability();
        if self.counted_as != Some(availability) {
            if let Some(old) = self.counted_as.replace(availability) {
                m::driver_state_left(old);
            }
            m::driver_state_entered(availability);
        }
        let location = self
            .lock
            .location()
            .filter(|_| availability == Availability::Available);
        let moved = match (location, self.indexed_at) {
            (Some(now), Some(indexed)) => now.distance_m(indexed) >= MIN_INDEX_MOVE_M,
            (now, indexed) => now.is_some() != indexed.is_some(),
        };
        if moved {
            if let Some(cluster) = &self.cluster {
                cluster.announce(&self.id, location);
            }
            match location {
                Some(location) => self.matcher.do_send(DriverAvailable {
                    driver_id: self.id.clone(),
                    driver: self.indexed_at.is_none().then(|| ctx.address()),
                    location,
                }),
                None => self.matcher.do_send(DriverUnavailable {
                    driver_id: self.id.clone(),
                }),
            }
            self.indexed_at = location;
        }
        if self.session.is_none() && !matches!(self.lock.state(), LockState::OnTrip(_)) {
            if self.retire_timer.is_none() {
                self.retire_timer = Some(ctx.run_later(RETIRE_AFTER, |act, ctx| act.retire(ctx)));
            }
        } else if let Some(timer) = self.retire_timer.take() {
            ctx.cancel_future(timer);
        }
    }

    fn retire(&mut self, ctx: &mut Context<Self>) {
        self.retire_timer = None;
        if self.session.is_some() || matches!(self.lock.state(), LockState::OnTrip(_)) {
            return;
        }
        self.retired = true;
        self.registry.forget(&self.id, &ctx.address());
        ctx.stop();
    }

    /// Arms the timer that expires the offer at its deadline. Re-arms if the
    /// timer fired a hair early by the clock the lock compares against.
    fn arm_expiry(&mut self, deadline: Instant, ctx: &mut Context<Self>) {
        let wait = deadline.saturating_duration_since(Instant::now());
        self.expiry_timer = Some(ctx.run_later(wait, move |act, ctx| {
            act.expiry_timer = None;
            match act.lock.expire(Instant::now()) {
                Some(ended) => act.report(ended, ctx),
                None => {
                    if let Some(deadline) = act.lock.current_offer().map(|o| o.deadline) {
                        act.arm_expiry(deadline, ctx);
                    }
                }
            }
            act.sync(ctx);
        }));
    }

    fn answer_failed(&mut self, error: AnswerError<OfferHolder>, ctx: &mut Context<Self>) {
        match error {
            AnswerError::UnknownOffer(offer_id) => self.error(
                ErrorCode::UnknownOffer,
                format!("offer {offer_id} was never made to you"),
            ),
            AnswerError::OfferEnded { offer_id, ending } => self.error(
                ErrorCode::OfferExpired,
                format!("offer {offer_id} has already ended ({})", ending.as_str()),
            ),
            AnswerError::ExpiredNow(ended) => {
                let offer_id = ended.offer.offer_id;
                self.report(*ended, ctx);
                self.error(
                    ErrorCode::OfferExpired,
                    format!("offer {offer_id} expired before your answer"),
                );
            }
        }
    }
}

impl Handler<Attach> for DriverActor {
    type Result = Result<(), Retired>;

    fn handle(&mut self, msg: Attach, ctx: &mut Context<Self>) -> Self::Result {
        if self.retired {
            return Err(Retired);
        }
        // Dropping the old outbox is what closes the old connection: its
        // session sees its channel end and says goodbye. It gets nothing more.
        self.session = Some(Session {
            id: msg.session,
            outbox: msg.outbox,
        });
        self.lock.connect();
        let now = Instant::now();
        // A reconnecting app learns what it is in the middle of.
        let resend = match (self.lock.state(), self.lock.location()) {
            (LockState::Offered(offer), Some(at)) => Some(Self::offer_message(offer, at, now)),
            (LockState::OnTrip(trip), _) => Some(Self::trip_assigned(trip)),
            _ => None,
        };
        if let Some(message) = resend {
            self.tell(message);
        }
        if let Some(cluster) = &self.cluster {
            cluster.broadcast(Wire::Attached {
                node: cluster.node().clone(),
                driver: self.id.clone(),
            });
            self.adopt_trip_from_redis(1, ctx);
        }
        self.sync(ctx);
        Ok(())
    }
}

impl Handler<Detach> for DriverActor {
    type Result = ();

    fn handle(&mut self, msg: Detach, ctx: &mut Context<Self>) {
        if self.session.as_ref().is_some_and(|s| s.id == msg.session) {
            self.session = None;
            self.sync(ctx);
        }
    }
}

impl Handler<FromDriver> for DriverActor {
    type Result = ();

    fn handle(&mut self, msg: FromDriver, ctx: &mut Context<Self>) {
        if self.session.as_ref().is_none_or(|s| s.id != msg.session) {
            return; // a replaced connection's last words
        }
        let now = Instant::now();
        match msg.command {
            DriverCommand::Location { lat, lon } => {
                m::location_update();
                // The session validated the range; a failure here would be a bug
                // upstream, and the update is then ignored rather than trusted.
                if let Ok(at) = LatLon::new(lat, lon) {
                    self.lock.set_location(at);
                }
            }
            DriverCommand::Available => {
                self.lock.set_wants_work(true);
            }
            DriverCommand::Unavailable => {
                if let Some(ended) = self.lock.set_wants_work(false) {
                    self.report(ended, ctx);
                }
            }
            DriverCommand::Accept { offer_id } => {
                let trip_id = self.ids.next_trip();
                match &self.cluster {
                    None => match self.lock.accept(offer_id, trip_id, now) {
                        Ok(ended) => self.report(ended, ctx),
                        Err(e) => self.answer_failed(e, ctx),
                    },
                    Some(_) => self.accept_in_cluster(offer_id, trip_id, now, ctx),
                }
            }
            DriverCommand::Decline { offer_id } => match self.lock.decline(offer_id, now) {
                Ok(ended) => self.report(ended, ctx),
                Err(e) => self.answer_failed(e, ctx),
            },
            DriverCommand::TripCompleted { trip_id } => match self.lock.complete_trip(trip_id) {
                Ok(trip) => self.trip_ended(&trip, ctx),
                Err(e) => self.error(ErrorCode::UnknownTrip, e.to_string()),
            },
        }
        self.sync(ctx);
    }
}

impl Handler<TryLock> for DriverActor {
    type Result = ();

    fn handle(&mut self, msg: TryLock, ctx: &mut Context<Self>) {
        if Instant::now() >= msg.not_after {
            m::lock_attempt(false);
            return msg.reply.send(Err(LockRefused::SearchEnded));
        }
        if self.cluster.is_some() {
            return self.try_lock_in_cluster(msg, ctx);
        }
        let token = self.ids.next_token();
        let result = self.try_lock(msg.offer_id, msg.holder, msg.timeout, token, ctx);
        m::lock_attempt(result.is_ok());
        msg.reply.send(result);
    }
}

impl DriverActor {
    fn try_lock(
        &mut self,
        offer_id: OfferId,
        holder: OfferHolder,
        timeout: Duration,
        fencing_token: FencingToken,
        ctx: &mut Context<Self>,
    ) -> Result<Granted, LockRefused> {
        let now = Instant::now();
        let offer = Offer {
            offer_id,
            fencing_token,
            deadline: now + timeout,
            holder,
        };
        let at = self.lock.location();
        let first_offer_since = offer.holder.first_offer_since;
        let offer = self.lock.try_lock(offer, now)?;
        if let Some(since) = first_offer_since {
            m::request_to_offer(now.saturating_duration_since(since));
        }
        let (deadline, fencing_token) = (offer.deadline, offer.fencing_token);
        let at = at.expect("an offerable driver has a location");
        let message = Self::offer_message(offer, at, now);
        self.granted_at = Some(now);
        self.tell(message);
        self.arm_expiry(deadline, ctx);
        self.sync(ctx);
        Ok(Granted { fencing_token })
    }

    /// Cluster mode: the lock is taken in Redis first (with its fencing
    /// token), then here. The actor handles nothing else meanwhile
    /// (`ctx.wait`), so the driver's state can't change under the attempt;
    /// the wait is one Redis round trip, bounded by the per-server timeout.
    fn try_lock_in_cluster(&mut self, msg: TryLock, ctx: &mut Context<Self>) {
        // Asking Redis for a driver who can't take the offer anyway would
        // only hold the key for nothing.
        if let Some(refused) = self.lock.refusal() {
            m::lock_attempt(false);
            return msg.reply.send(Err(refused));
        }
        let cluster = self.cluster.clone().expect("cluster mode");
        let TryLock {
            offer_id,
            holder,
            timeout,
            reply,
            ..
        } = msg;
        let owner = self.owner_of(&holder, offer_id);
        let (driver, floor) = (self.id.clone(), self.lock.newest_token());
        let started = Instant::now();
        let acquire = async move {
            let ttl = timeout + cluster::LOCK_MARGIN;
            let result = cluster.locks().acquire(&driver, &owner, ttl, floor).await;
            (result, owner)
        };
        ctx.wait(
            acquire
                .into_actor(self)
                .map(move |(result, owner), act, ctx| {
                    m::redis_op("acquire", started.elapsed(), result.is_ok());
                    let result = match result {
                        Ok(grant) => {
                            // The offer lasts no longer than the lock can be relied
                            // on, less room for the accept's confirm to get there.
                            let timeout = timeout.min(grant.validity.saturating_sub(CONFIRM_ROOM));
                            let granted = if timeout.is_zero() {
                                Err(LockRefused::StoreUnavailable)
                            } else {
                                act.try_lock(offer_id, holder, timeout, grant.fencing_token, ctx)
                            };
                            if granted.is_err() {
                                act.free_in_redis(Freeing::Offer, owner, ctx);
                            }
                            granted
                        }
                        Err(error) => {
                            m::redis_lock_refused(&error);
                            let refusal = error.as_refusal();
                            if refusal == LockRefused::HeldElsewhere {
                                // Free here, yet locked in Redis: perhaps a trip of
                                // this driver that its actor on another node still
                                // holds (the app reconnected here as it accepted).
                                act.adopt_trip_from_redis(1, ctx);
                            }
                            Err(refusal)
                        }
                    };
                    m::lock_attempt(result.is_ok());
                    reply.send(result);
                }),
        );
    }

    /// Cluster mode: a driver on a trip keeps its lock in Redis, so that no
    /// node can lock it meanwhile (not even through another connection of
    /// the same driver to another node). The lock lives [`TRIP_HOLD`] at a
    /// time and is renewed well within that.
    fn renew_during_trip(&mut self, owner: String, ctx: &mut Context<Self>) {
        let cluster = self.cluster.clone().expect("cluster mode");
        let driver = self.id.clone();
        self.trip_renewal = Some(ctx.run_interval(TRIP_HOLD / 3, move |_, ctx| {
            let (cluster, driver, owner) = (cluster.clone(), driver.clone(), owner.clone());
            let me = ctx.address();
            actix::spawn(async move {
                let started = Instant::now();
                let renewed = cluster.locks().renew(&driver, &owner).await;
                m::redis_op("renew", started.elapsed(), renewed != Some(false));
                if renewed == Some(false) {
                    me.do_send(TripLockLost { owner });
                }
            });
        }));
    }

    /// The driver's trip ended: in cluster mode its lock and its record in
    /// Redis are freed.
    fn trip_ended(&mut self, trip: &Trip<OfferHolder>, ctx: &mut Context<Self>) {
        if let Some(timer) = self.trip_renewal.take() {
            ctx.cancel_future(timer);
        }
        if self.cluster.is_some() {
            let owner = self.owner_of(&trip.holder, trip.offer_id);
            self.free_in_redis(Freeing::Trip, owner, ctx);
        }
    }

    /// Frees `owner`'s lock in Redis before the actor handles anything else:
    /// the next lock request for this driver, which may follow at once, must
    /// not find the old lock still there (it would be refused as held
    /// elsewhere, and the asking search would pass this driver by).
    fn free_in_redis(&mut self, freeing: Freeing, owner: String, ctx: &mut Context<Self>) {
        let cluster = self.cluster.clone().expect("cluster mode");
        let driver = self.id.clone();
        let started = Instant::now();
        let free = async move {
            match freeing {
                Freeing::Offer => cluster.locks().release(&driver, &owner).await,
                Freeing::Trip => cluster.locks().finish(&driver, &owner).await,
            }
        };
        ctx.wait(free.into_actor(self).map(move |freed, _, _| {
            let op = match freeing {
                Freeing::Offer => "release",
                Freeing::Trip => "finish",
            };
            m::redis_op(op, started.elapsed(), freed > 0);
        }));
    }

    /// Cluster mode: the accept books only if the offer's lock still holds in
    /// Redis (`confirm`), which is what makes a node that stalled past the
    /// lock's expiry, or whose requester gave up on the offer, unable to
    /// book. The actor handles nothing else until Redis answers. A confirm
    /// that can't be told (servers not answering) is asked again: it is
    /// idempotent while the lock is held.
    fn accept_in_cluster(
        &mut self,
        offer_id: OfferId,
        trip_id: TripId,
        now: Instant,
        ctx: &mut Context<Self>,
    ) {
        if let Err(e) = self.lock.check_answerable(offer_id, now) {
            return self.answer_failed(e, ctx);
        }
        let cluster = self.cluster.clone().expect("cluster mode");
        let offer = self
            .lock
            .current_offer()
            .expect("an answerable offer is held");
        let record = TripRecord {
            owner: self.owner(offer),
            trip_id,
            offer_id,
            fencing_token: offer.fencing_token,
            rider_id: offer.holder.rider_id.clone(),
            request_id: offer.holder.request_id.clone(),
            pickup: offer.holder.pickup,
            rider_node: offer
                .holder
                .node
                .clone()
                .unwrap_or_else(|| cluster.node().clone()),
            rider_is_remote: offer.holder.node.is_some(),
        };
        let driver = self.id.clone();
        let started = Instant::now();
        let confirm = async move {
            for attempt in 1..=CONFIRM_ATTEMPTS {
                if let Some(kept) = cluster.locks().confirm(&driver, &record).await {
                    return (kept, record.owner);
                }
                if attempt < CONFIRM_ATTEMPTS {
                    tokio::time::sleep(CONFIRM_RETRY).await;
                }
            }
            // Still can't tell whether a confirm landed: settle it from this
            // side, which stops any later confirm and says whether one had
            // landed (then the trip is booked after all). If even that can't
            // tell, the offer is treated as lost; a trip record a confirm may
            // have left is never adopted by this actor (it remembers the
            // offer as ended) and lapses with its lock.
            let landed = matches!(
                cluster.locks().settle(&driver, &record.owner).await,
                Some(Settled::Trip(_))
            );
            (landed, record.owner)
        };
        ctx.wait(
            confirm
                .into_actor(self)
                .map(move |(confirmed, owner), act, ctx| {
                    m::redis_op("confirm", started.elapsed(), confirmed);
                    if confirmed {
                        // Nothing ran in between: the offer is as it was at `now`.
                        match act.lock.accept(offer_id, trip_id, now) {
                            Ok(ended) => {
                                act.renew_during_trip(owner, ctx);
                                act.report(ended, ctx);
                            }
                            Err(e) => act.answer_failed(e, ctx),
                        }
                    } else {
                        if let Some(ended) = act.lock.lose(offer_id) {
                            act.report(ended, ctx);
                        }
                        act.error(
                            ErrorCode::OfferExpired,
                            format!(
                                "offer {offer_id} lost its lock before your accept could be confirmed"
                            ),
                        );
                    }
                    act.sync(ctx);
                }),
        );
    }

    /// Cluster mode: a driver app that connects here while its trip is held
    /// by its actor on another node (it reconnected elsewhere mid-trip) takes
    /// the trip over from its record in Redis, with its lock, so that the
    /// trip can be completed here.
    fn adopt_trip_from_redis(&mut self, attempt: u32, ctx: &mut Context<Self>) {
        if !matches!(self.lock.state(), LockState::Free) || self.session.is_none() {
            return;
        }
        let cluster = self.cluster.clone().expect("cluster mode");
        let driver = self.id.clone();
        let lookup = async move { cluster.locks().current_trip(&driver).await };
        ctx.wait(lookup.into_actor(self).map(move |record, act, ctx| {
            let record = match record {
                Ok(Some(record)) => record,
                Ok(None) => return,
                Err(()) => {
                    // Redis could not tell: ask again a little later.
                    if attempt < TRIP_LOOKUP_ATTEMPTS {
                        ctx.run_later(TRIP_LOOKUP_RETRY, move |act, ctx| {
                            act.adopt_trip_from_redis(attempt + 1, ctx)
                        });
                    }
                    return;
                }
            };
            if act.lock.ending_of(record.offer_id).is_some() {
                // This actor ended that offer itself (its accept could not be
                // confirmed): not a trip to take over.
                return;
            }
            let cluster = act.cluster.clone().expect("cluster mode");
            let rider_node = (record.rider_node != *cluster.node()).then_some(record.rider_node);
            let trip = Trip {
                trip_id: record.trip_id,
                offer_id: record.offer_id,
                fencing_token: record.fencing_token,
                holder: OfferHolder {
                    search: 0,
                    rider_id: record.rider_id,
                    request_id: record.request_id,
                    pickup: record.pickup,
                    first_offer_since: None,
                    node: rider_node,
                },
            };
            let message = Self::trip_assigned(&trip);
            if act.lock.adopt_trip(trip) {
                tracing::info!(driver = %act.id, trip = record.trip_id, "took over a trip from another node");
                act.renew_during_trip(record.owner, ctx);
                act.tell(message);
                act.sync(ctx);
            }
        }));
    }
}

/// What [`DriverActor::free_in_redis`] frees.
#[derive(Clone, Copy)]
enum Freeing {
    /// An offer's lock (it ended without a trip).
    Offer,
    /// A trip's lock and the driver's current-trip record.
    Trip,
}

/// Cluster mode: the trip's lock is no longer this actor's (the trip ended
/// on the node the driver moved to, or Redis lost it).
#[derive(Message)]
#[rtype(result = "()")]
struct TripLockLost {
    owner: String,
}

impl Handler<TripLockLost> for DriverActor {
    type Result = ();

    fn handle(&mut self, msg: TripLockLost, ctx: &mut Context<Self>) {
        let LockState::OnTrip(trip) = self.lock.state() else {
            return;
        };
        if self.owner_of(&trip.holder, trip.offer_id) != msg.owner {
            return; // an older trip's renewal
        }
        if self.session.is_some() {
            // The driver is here: the trip is still this actor's, whatever
            // Redis forgot. It keeps renewing (and the driver can't be
            // connected elsewhere, see `ConnectedElsewhere`).
            tracing::warn!(driver = %self.id, "a trip's lock is gone from Redis; keeping the trip");
            return;
        }
        // The driver moved on and its trip ended (or is held) elsewhere.
        let trip_id = trip.trip_id;
        if let Some(timer) = self.trip_renewal.take() {
            ctx.cancel_future(timer);
        }
        let _ = self.lock.complete_trip(trip_id);
        self.sync(ctx);
    }
}

/// Cluster mode: the driver's app connected to another node. This node's
/// connection of it, if any, is closed: a driver is reachable through one
/// node at a time.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ConnectedElsewhere {
    /// The node it connected to.
    pub node: NodeId,
}

impl Handler<ConnectedElsewhere> for DriverActor {
    type Result = ();

    fn handle(&mut self, msg: ConnectedElsewhere, ctx: &mut Context<Self>) {
        if self.session.take().is_some() {
            tracing::info!(driver = %self.id, node = %msg.node, "driver connected to another node; closing its connection here");
            self.sync(ctx);
        }
    }
}

impl Handler<CancelOffer> for DriverActor {
    type Result = ();

    fn handle(&mut self, msg: CancelOffer, ctx: &mut Context<Self>) {
        if let Some(ended) = self.lock.cancel(msg.offer_id, msg.fencing_token) {
            self.report(ended, ctx);
            self.sync(ctx);
        }
    }
}

/// Cluster mode: `node` died or left. An offer this driver holds for one of
/// its riders can no longer reach that rider: it is withdrawn, as a rider
/// who disconnected withdraws its offers.
#[derive(Message)]
#[rtype(result = "()")]
pub struct HolderNodeGone {
    /// The node.
    pub node: NodeId,
}

impl Handler<HolderNodeGone> for DriverActor {
    type Result = ();

    fn handle(&mut self, msg: HolderNodeGone, ctx: &mut Context<Self>) {
        let Some(offer) = self.lock.current_offer() else {
            return;
        };
        if offer.holder.node.as_ref() != Some(&msg.node) {
            return;
        }
        let (offer_id, token) = (offer.offer_id, offer.fencing_token);
        if let Some(ended) = self.lock.cancel(offer_id, token) {
            self.report(ended, ctx);
            self.sync(ctx);
        }
    }
}

/// Number of independently locked shards of the registry map, so that
/// connects on different threads rarely wait for one another.
const REGISTRY_SHARDS: usize = 16;

/// Finds or creates a driver's actor. The map only holds addresses; the
/// drivers' state lives in the actors.
pub struct DriverRegistry {
    shards: Vec<Mutex<HashMap<DriverId, Addr<DriverActor>>>>,
    hasher: RandomState,
    arbiters: Vec<ArbiterHandle>,
    matcher: Addr<Matcher>,
    ids: Arc<Ids>,
    cluster: Option<Arc<Cluster>>,
}

impl DriverRegistry {
    /// A registry that starts driver actors round the given arbiters; with
    /// `cluster`, their locks are taken in Redis.
    pub fn new(
        arbiters: Vec<ArbiterHandle>,
        matcher: Addr<Matcher>,
        ids: Arc<Ids>,
        cluster: Option<Arc<Cluster>>,
    ) -> Arc<Self> {
        assert!(
            !arbiters.is_empty(),
            "driver actors need at least one arbiter"
        );
        Arc::new(DriverRegistry {
            shards: (0..REGISTRY_SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            arbiters,
            matcher,
            ids,
            cluster,
        })
    }

    fn shard(&self, id: &DriverId) -> (usize, &Mutex<HashMap<DriverId, Addr<DriverActor>>>) {
        let hash = self.hasher.hash_one(id) as usize;
        (hash, &self.shards[hash % REGISTRY_SHARDS])
    }

    /// Attaches a new connection to the driver's actor, creating the actor if
    /// there is none. A driver keeps one actor however often it reconnects.
    pub async fn attach(
        self: &Arc<Self>,
        id: DriverId,
        session: u64,
        outbox: Outbox,
    ) -> Addr<DriverActor> {
        loop {
            let addr = {
                let (hash, shard) = self.shard(&id);
                // Poisoning would mean a panic while holding this short lock;
                // the map itself is still consistent, so carry on with it.
                let mut map = shard.lock().unwrap_or_else(|e| e.into_inner());
                map.entry(id.clone())
                    .or_insert_with(|| {
                        let arbiter = &self.arbiters[(hash >> 8) % self.arbiters.len()];
                        let (id, registry) = (id.clone(), self.clone());
                        DriverActor::start_in_arbiter(arbiter, move |_| {
                            DriverActor::new(id, registry)
                        })
                    })
                    .clone()
            };
            let attach = Attach {
                session,
                outbox: outbox.clone(),
            };
            match addr.send(attach).await {
                Ok(Ok(())) => return addr,
                // The actor retired between the look-up and the attach; it has
                // taken itself out of the map, so the next round makes a new one.
                Ok(Err(Retired)) | Err(_) => self.forget(&id, &addr),
            }
        }
    }

    /// The actor of a driver connected to this node (or lately connected),
    /// without creating one.
    pub fn get(&self, id: &DriverId) -> Option<Addr<DriverActor>> {
        let (_, shard) = self.shard(id);
        let map = shard.lock().unwrap_or_else(|e| e.into_inner());
        map.get(id).cloned()
    }

    /// Tells every driver actor that `node` is gone (see [`HolderNodeGone`]).
    /// O(drivers), for a rare event.
    pub fn holder_node_gone(&self, node: &NodeId) {
        for shard in &self.shards {
            let map = shard.lock().unwrap_or_else(|e| e.into_inner());
            for actor in map.values() {
                actor.do_send(HolderNodeGone { node: node.clone() });
            }
        }
    }

    /// Drops `id` from the map if it still points at `addr`.
    fn forget(&self, id: &DriverId, addr: &Addr<DriverActor>) {
        let (_, shard) = self.shard(id);
        let mut map = shard.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(id) == Some(addr) {
            map.remove(id);
        }
    }

    /// Number of driver actors alive.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    /// Whether no driver actor is alive.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
