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
//! are the exception: they run beside everything else.

mod cluster;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::lock::{
    AnswerError, Availability, DriverLock, Ended, Ending, FencingToken, LockRefused, LockState,
    Offer, OfferId, Trip, TripId,
};
use super::search::{LockAnswer, OfferOutcome};
use super::{Granted, OfferHolder, Settled};
use crate::cluster::wire::NodeId;
use crate::ids::Ids;
use crate::location::LatLon;
use crate::metrics as m;
use crate::protocol::{
    DriverCommand, DriverId, ErrorCode, RequestId, RevokeReason, RiderId, ServerMessage,
};

/// How long a disconnected, free driver's actor stays around for a reconnect
/// before it is retired (its memory freed). A driver on a trip is kept until
/// the trip completes.
pub const RETIRE_AFTER: Duration = Duration::from_secs(60);

/// Moves shorter than this don't move the driver in the matcher's index: GPS
/// jitter and parked drivers re-sending their spot would otherwise cost an
/// index update and a matcher message each. The exact position is kept for
/// distances in offers and matches; ranking is off by at most this much.
pub const MIN_INDEX_MOVE_M: f64 = 5.0;

/// The longest a trip lasts: one not completed by then ends by itself
/// (its lock freed), so that a driver whose app vanished mid-trip is not
/// held, and its lock renewed, forever.
pub const TRIP_MAX_AGE: Duration = Duration::from_secs(12 * 3600);

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
    pub rider_incarnation: super::Incarnation,
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
    /// The app stopped reading its messages: the connection is dropped.
    SessionLost,
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
    /// A matcher withdraws an offer (its rider cancelled). Acts only while
    /// that exact lock (id and fencing token) is still held.
    CancelOffer {
        /// The offer.
        offer_id: OfferId,
        /// Its fencing token.
        fencing_token: FencingToken,
    },
    /// Cluster mode: a node died or left; an offer held for one of its
    /// riders can no longer reach that rider and is withdrawn.
    HolderNodeGone {
        /// The node.
        node: NodeId,
        /// Its process that is gone.
        incarnation: super::Incarnation,
    },
    /// Cluster mode: the driver was booked on another node after its app
    /// had moved here: look its trip up in Redis and take it over.
    LookUpTrip,
    /// Time passed (see [`Booking::next_timeout`]).
    Tick,
    /// Cluster mode: Redis answered (or could not).
    Redis(RedisReply),
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
    /// Give up on `owner`'s lock and say whether it had booked.
    Settle {
        /// The owner value.
        owner: String,
    },
    /// Keep a trip's lock for another [`TRIP_HOLD`].
    Renew {
        /// The trip (its owner value is the lock's).
        record: TripRecord,
        /// Whether to take the lock back where a server lost it: only while
        /// the app is connected here (its trip is certainly going on), never
        /// for an actor the app has left, which may hold a trip the app
        /// completed elsewhere.
        repair: bool,
    },
    /// Free a trip's lock and the driver's current-trip record.
    Finish {
        /// The owner value.
        owner: String,
    },
    /// Read the driver's current trip.
    CurrentTrip,
    /// The app completed trip `trip_id`, which this node does not hold: if
    /// it is the driver's current trip in Redis, finish it there under its
    /// owner (its holder elsewhere learns at its next renewal).
    FinishTrip {
        /// The trip.
        trip_id: TripId,
    },
}

impl RedisOp {
    /// Whether the driver waits for the answer before handling anything
    /// else (all but renewals).
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
    /// To `Renew` of `owner`.
    Renewed {
        /// The owner value renewed.
        owner: String,
        /// Whether a majority kept it.
        kept: Option<bool>,
    },
    /// To `CurrentTrip`.
    CurrentTrip(Result<Option<TripRecord>, ()>),
    /// To `FinishTrip` (nothing waits for it).
    TripFinished,
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
    /// The driver is offerable at this place, or (`None`) no longer: for
    /// the matcher's index (and, in cluster mode, the other nodes').
    Indexed(Option<LatLon>),
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

/// What the driver waits for from Redis.
#[derive(Clone, Debug)]
enum Waiting {
    /// A lock: the request, and when its acquire went out.
    Acquire(LockRequest, Instant),
    /// A release.
    Free,
    /// A trip's finish (`attempt` of [`cluster::FINISH_ATTEMPTS`]).
    Finish { owner: String, attempt: u32 },
    /// An accept's confirm: the offer, the trip, the accept's time, the
    /// attempt, and when the next attempt is due (while between attempts).
    Confirm {
        record: TripRecord,
        accepted_at: Instant,
        attempt: u32,
        retry_at: Option<Instant>,
    },
    /// An accept whose confirm could not be told: its settle, asked until
    /// Redis can tell (and when next, while between attempts).
    SettleAccept {
        record: TripRecord,
        accepted_at: Instant,
        retry_at: Option<Instant>,
    },
    /// The driver's current trip (`attempt` of [`cluster::TRIP_LOOKUP_ATTEMPTS`]).
    Lookup { attempt: u32 },
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
    /// Where the matcher's index has this driver (`None`: not indexed), so
    /// that it hears of every change exactly once.
    indexed_at: Option<LatLon>,
    /// The state last counted in the gauges.
    counted_as: Option<Availability>,
    retire_at: Option<Instant>,
    waiting: Option<Waiting>,
    /// Events that arrived while the driver waited for Redis, in order.
    deferred: VecDeque<DriverEvent>,
    /// Cluster mode: the trip lock being renewed, and when next.
    renewal: Option<Renewal>,
    /// Cluster mode: when to look the current trip up again, and which try.
    lookup_retry: Option<(Instant, u32)>,
    /// Cluster mode: a finish Redis could not confirm: when to ask again.
    finish_retry: Option<(String, Instant, u32)>,
    /// Trips this driver completed lately: never taken over again from a
    /// record that outlived them.
    completed: VecDeque<TripId>,
    /// Since when the driver is on its trip (here), for [`TRIP_MAX_AGE`].
    trip_since: Option<Instant>,
    effects: Vec<DriverEffect>,
}

impl Booking {
    /// A driver nobody has heard from; `node` is this node in cluster mode.
    pub fn new(id: DriverId, ids: Arc<Ids>, node: Option<NodeId>) -> Self {
        Booking {
            id,
            ids,
            node,
            lock: DriverLock::new(),
            session: None,
            granted_at: None,
            indexed_at: None,
            counted_as: None,
            retire_at: None,
            waiting: None,
            deferred: VecDeque::new(),
            renewal: None,
            lookup_retry: None,
            finish_retry: None,
            completed: VecDeque::new(),
            trip_since: None,
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
            Some(Waiting::Confirm { retry_at, .. } | Waiting::SettleAccept { retry_at, .. }) => {
                *retry_at
            }
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
            self.finish_retry.as_ref().map(|(_, at, _)| *at),
            self.trip_since.map(|since| since + TRIP_MAX_AGE),
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
            DriverEvent::Redis(RedisReply::TripFinished) => {}
            DriverEvent::Redis(reply) if !matches!(reply, RedisReply::Renewed { .. }) => {
                self.redis_replied(now, reply)
            }
            DriverEvent::Tick if self.waiting.is_some() => self.confirm_retry_due(now),
            event if self.waiting.is_some() => self.defer(event),
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
    fn defer(&mut self, event: DriverEvent) {
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
        let waiting = match self.waiting.take() {
            Some(Waiting::Acquire(request, _)) => Some(request),
            _ => None,
        };
        self.session = None;
        if let Some(ended) = self.lock.disconnect() {
            self.report(now, ended);
        }
        let deferred = std::mem::take(&mut self.deferred);
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
            DriverEvent::SessionLost | DriverEvent::ConnectedElsewhere => {
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
            } => {
                if let Some(ended) = self.lock.cancel(offer_id, fencing_token) {
                    self.report(now, ended);
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
                    if let Some(ended) = self.lock.cancel(offer_id, token) {
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
        // A reconnecting app learns what it is in the middle of.
        let resend = match (self.lock.state(), self.lock.location()) {
            (LockState::Offered(offer), Some(at)) => Some(offer_message(offer, at, now)),
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

    fn command(&mut self, now: Instant, command: DriverCommand) {
        match command {
            DriverCommand::Location { lat, lon } => {
                m::location_update();
                // The session validated the range; a failure here would be a
                // bug upstream, and the update is then ignored, not trusted.
                if let Ok(at) = LatLon::new(lat, lon) {
                    self.lock.set_location(at);
                }
            }
            DriverCommand::Available => {
                self.lock.set_wants_work(true);
            }
            DriverCommand::Unavailable => {
                if let Some(ended) = self.lock.set_wants_work(false) {
                    self.report(now, ended);
                }
            }
            DriverCommand::Accept {
                offer_id,
                fencing_token,
            } => {
                if let Some(stale) = self.stale_token(offer_id, fencing_token) {
                    return self.error(ErrorCode::OfferExpired, stale);
                }
                let trip_id = self.ids.next_trip();
                match &self.node {
                    None => match self.lock.accept(offer_id, trip_id, now) {
                        Ok(ended) => self.report(now, ended),
                        Err(e) => self.answer_failed(now, e),
                    },
                    Some(_) => self.accept_in_cluster(now, offer_id, trip_id),
                }
            }
            DriverCommand::Decline { offer_id } => match self.lock.decline(offer_id, now) {
                Ok(ended) => self.report(now, ended),
                Err(e) => self.answer_failed(now, e),
            },
            DriverCommand::TripCompleted { trip_id } => match self.lock.complete_trip(trip_id) {
                Ok(trip) => self.trip_ended(&trip),
                Err(e) => {
                    // Cluster mode: the trip may be one this node has not
                    // taken over yet (Redis has not answered the look-up);
                    // if it turns up, it is finished rather than taken.
                    if self.node.is_some() {
                        self.remember_completed(trip_id);
                        self.effects
                            .push(DriverEffect::Redis(RedisOp::FinishTrip { trip_id }));
                    }
                    self.error(ErrorCode::UnknownTrip, e.to_string())
                }
            },
        }
    }

    /// Why an accept of `offer_id` carrying `token` is refused as stale:
    /// the token is not the one of the offer held (an older lock's, or made
    /// up). Without a token, or for an offer not held, the usual answers
    /// apply.
    fn stale_token(&self, offer_id: OfferId, token: Option<FencingToken>) -> Option<String> {
        let offer = self.lock.current_offer()?;
        let token = token?;
        (offer.offer_id == offer_id && offer.fencing_token != token).then(|| {
            format!(
                "offer {offer_id}: fencing token {token} is not the offer's ({}); the accept is refused",
                offer.fencing_token
            )
        })
    }

    fn try_lock(&mut self, now: Instant, request: LockRequest) {
        if now >= request.not_after {
            return self.refuse(request, LockRefused::SearchEnded);
        }
        if self.node.is_some() {
            return self.acquire(now, request);
        }
        let token = self.ids.next_token();
        self.grant(now, request, token);
    }

    /// Grants the lock here (with `fencing_token`, from Redis in cluster
    /// mode) and answers; whether it was granted.
    fn grant(&mut self, now: Instant, request: LockRequest, fencing_token: FencingToken) -> bool {
        let LockRequest {
            offer_id,
            holder,
            timeout,
            reply,
            ..
        } = request;
        let driver_id = self.id.clone();
        let answer = |result| LockAnswer {
            driver_id,
            offer_id,
            search: holder.search,
            rider_id: holder.rider_id.clone(),
            request_id: holder.request_id.clone(),
            result,
            node: None,
        };
        let offer = Offer {
            offer_id,
            fencing_token,
            deadline: now + timeout,
            holder: holder.clone(),
        };
        let at = self.lock.location();
        let result = match self.lock.try_lock(offer, now) {
            Ok(offer) => {
                if let Some(since) = offer.holder.first_offer_since {
                    m::request_to_offer(now.saturating_duration_since(since));
                }
                let at = at.expect("an offerable driver has a location");
                let message = offer_message(offer, at, now);
                self.granted_at = Some(now);
                self.tell(message);
                Ok(Granted { fencing_token })
            }
            Err(refused) => Err(refused),
        };
        let granted = result.is_ok();
        m::lock_attempt(granted);
        let answer = answer(result);
        self.effects
            .push(DriverEffect::Answer { to: reply, answer });
        granted
    }

    fn refuse(&mut self, request: LockRequest, why: LockRefused) {
        m::lock_attempt(false);
        let answer = LockAnswer::refused(self.id.clone(), request.offer_id, &request.holder, why);
        self.effects.push(DriverEffect::Answer {
            to: request.reply,
            answer,
        });
    }

    fn tell(&mut self, message: ServerMessage) {
        if self.session.is_some() {
            self.effects.push(DriverEffect::Tell(message));
        }
    }

    fn error(&mut self, code: ErrorCode, message: String) {
        m::protocol_error(code);
        self.tell(ServerMessage::error(code, message));
    }

    fn answer_failed(&mut self, now: Instant, error: AnswerError<OfferHolder>) {
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
                self.report(now, *ended);
                self.error(
                    ErrorCode::OfferExpired,
                    format!("offer {offer_id} expired before your answer"),
                );
            }
        }
    }

    /// An offer ended: tell the driver (when it wasn't their own doing) and
    /// the search (always, exactly once per offer).
    fn report(&mut self, now: Instant, ended: Ended<OfferHolder>) {
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
            .map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
        m::offer_ended(ended.ending, held_for);
        if self.node.is_some() && ended.ending != Ending::Accepted {
            // Frees the lock for the next offer; if this is lost, the key's
            // expiry frees it a little later.
            let owner = self.owner_of(&offer.holder, offer.offer_id);
            self.redis(RedisOp::Release { owner }, Some(Waiting::Free));
        }
        let outcome = OfferOutcome {
            driver_id: self.id.clone(),
            driver_location: self.lock.location(),
            offer_id: offer.offer_id,
            search: offer.holder.search,
            rider_id: offer.holder.rider_id.clone(),
            request_id: offer.holder.request_id.clone(),
            ending: ended.ending,
            trip_id: ended.trip_id,
        };
        self.effects.push(DriverEffect::Ended {
            to: offer.holder.node.clone(),
            outcome,
            fencing_token: offer.fencing_token,
            pickup: offer.holder.pickup,
        });
    }

    /// Brings everything outside the lock in line with it: a dropped
    /// connection becomes a disconnect, the matcher's index and the gauges
    /// follow the driver's availability. Runs after every event.
    fn sync(&mut self, now: Instant) {
        if self.session.is_none() && self.lock.is_connected() {
            if let Some(ended) = self.lock.disconnect() {
                self.report(now, ended);
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
            self.effects.push(DriverEffect::Indexed(location));
            self.indexed_at = location;
        }
        let on_trip = matches!(self.lock.state(), LockState::OnTrip(_));
        match (on_trip, self.trip_since) {
            (true, None) => self.trip_since = Some(now),
            (false, Some(_)) => self.trip_since = None,
            _ => {}
        }
        let idle = self.session.is_none() && !on_trip;
        match (idle, self.retire_at) {
            (true, None) => self.retire_at = Some(now + RETIRE_AFTER),
            (false, Some(_)) => self.retire_at = None,
            _ => {}
        }
    }

    /// Whatever is due at `now` among the driver's own timers.
    fn timers(&mut self, now: Instant) {
        if self
            .lock
            .current_offer()
            .is_some_and(|offer| offer.deadline <= now)
        {
            if let Some(ended) = self.lock.expire(now) {
                self.report(now, ended);
            }
        }
        if self
            .trip_since
            .is_some_and(|since| since + TRIP_MAX_AGE <= now)
        {
            if let Some(trip_id) = self.trip_id() {
                tracing::warn!(driver = %self.id, trip = trip_id, "a trip outlived its maximum age; it ends");
                if let Ok(trip) = self.lock.complete_trip(trip_id) {
                    self.trip_ended(&trip);
                }
            }
            self.trip_since = None;
        }
        if self.retire_at.is_some_and(|at| at <= now) {
            self.retire_at = None;
            // Retiring forgets the lock's state; never with an offer held
            // or Redis still to hear from.
            let idle = self.session.is_none()
                && matches!(self.lock.state(), LockState::Free)
                && self.waiting.is_none();
            if idle {
                self.effects.push(DriverEffect::Retire);
            }
        }
        self.cluster_timers(now);
        if self.waiting.is_none() {
            self.sync(now);
        }
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

/// The offer message for the driver at `at`, sent at `now`.
fn offer_message(offer: &Offer<OfferHolder>, at: LatLon, now: Instant) -> ServerMessage {
    let expires_in_ms = offer.deadline.saturating_duration_since(now).as_millis() as u64;
    ServerMessage::Offer {
        offer_id: offer.offer_id,
        request_id: offer.holder.request_id.clone(),
        rider_id: offer.holder.rider_id.clone(),
        pickup: offer.holder.pickup,
        distance_m: at.distance_m(offer.holder.pickup),
        expires_in_ms,
        fencing_token: offer.fencing_token,
    }
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

/// `trip_ended` is shared by the app's completion and a lost trip lock.
impl Booking {
    fn trip_ended(&mut self, trip: &Trip<OfferHolder>) {
        self.renewal = None;
        self.remember_completed(trip.trip_id);
        if self.node.is_some() {
            let owner = self.owner_of(&trip.holder, trip.offer_id);
            self.finish(owner, 1);
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
