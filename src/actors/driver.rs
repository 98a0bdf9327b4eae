//! Driver actors: one per driver, the only place a driver's lock changes.
//!
//! A [`DriverActor`] wraps the pure [`Booking`] with what the state machine
//! leaves out: the driver's connection, a timer for whatever is due next,
//! Redis calls, and telling the matcher (or another node) what changed.
//! Sessions and the matcher never touch the lock; they send messages and the
//! actor hands each to the machine, so a lock is granted or refused
//! atomically, one event at a time.
//!
//! Actors live in a [`DriverRegistry`] (`registry.rs`) keyed by driver id
//! and are spread over several actix arbiters (threads): one driver's
//! messages are handled in order on one thread, different drivers in
//! parallel.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;

use super::messages::{
    answer_wire, CancelOffer, GroupNews, LockAnswered, MatcherLink, OfferEnded, OfferHeld, TryLock,
};
pub use super::registry::DriverRegistry;
use crate::cluster::redlock::Renewal;
use crate::cluster::wire::{NodeId, Wire};
use crate::cluster::Cluster;
use crate::core::booking::{Booking, DriverEffect, DriverEvent, RedisOp, RedisReply, ReplyTo};
use crate::core::lock::{DriverLock, LockState};
use crate::core::{Incarnation, OfferHolder};
use crate::metrics as m;
use crate::ops::{DriverDot, DriverShow};
use crate::protocol::{DriverCommand, DriverId};
use crate::session::Outbox;

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

/// Cluster mode: the driver's app connected to another node. This node's
/// connection of it, if any, is closed: a driver is reachable through one
/// node at a time.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ConnectedElsewhere {
    /// The node it connected to.
    pub node: NodeId,
}

/// Cluster mode: a process of `node` died or left (see
/// [`DriverEvent::HolderNodeGone`]).
#[derive(Message)]
#[rtype(result = "()")]
pub struct HolderNodeGone {
    /// The node.
    pub node: NodeId,
    /// The process.
    pub incarnation: Incarnation,
}

/// Cluster mode: another node booked this driver after its app had moved
/// here (see [`DriverEvent::LookUpTrip`]).
#[derive(Message)]
#[rtype(result = "()")]
pub struct LookUpTrip;

impl Handler<LookUpTrip> for DriverActor {
    type Result = ();

    fn handle(&mut self, _msg: LookUpTrip, ctx: &mut Context<Self>) {
        self.feed(DriverEvent::LookUpTrip, ctx);
    }
}

/// Cluster mode: Redis's answer to one of this driver's questions.
#[derive(Message)]
#[rtype(result = "()")]
struct RedisAnswered(RedisReply);

/// One driver: its booking machine, its connections, its timer.
pub struct DriverActor {
    booking: Booking,
    /// Connections by id: the current one, and any whose attach the machine
    /// has not handled yet (it may be waiting for Redis).
    outboxes: HashMap<u64, Outbox>,
    current: Option<u64>,
    link: MatcherLink,
    registry: Arc<DriverRegistry>,
    cluster: Option<Arc<Cluster>>,
    /// The armed timer and the instant it fires at.
    timer: Option<(Instant, SpawnHandle)>,
    retired: bool,
    /// What the ops map was last told of this driver.
    shown: Option<DriverDot>,
}

impl Actor for DriverActor {
    type Context = Context<Self>;

    fn stopped(&mut self, ctx: &mut Self::Context) {
        self.booking.stop(Instant::now());
        // Answers, an offer's ending and its release still go out; the app's
        // connection is gone with the actor.
        for effect in self.booking.take_effects() {
            match effect {
                DriverEffect::Answer { .. }
                | DriverEffect::Ended { .. }
                | DriverEffect::Redis(_) => {
                    self.carry_out(effect, ctx);
                }
                _ => {}
            }
        }
    }
}

impl DriverActor {
    pub(super) fn new(id: DriverId, registry: Arc<DriverRegistry>) -> Self {
        let node = registry.cluster.as_ref().map(|c| c.node().clone());
        DriverActor {
            booking: {
                let mut booking =
                    Booking::new(id, registry.ids.clone(), node, registry.location_max_age);
                if let Some(areas) = &registry.areas {
                    booking.serve_only(areas.clone());
                }
                booking
            },
            outboxes: HashMap::new(),
            current: None,
            link: registry.link.clone(),
            cluster: registry.cluster.clone(),
            registry,
            timer: None,
            retired: false,
            shown: None,
        }
    }

    /// Tells the ops map what this driver now looks like, if that changed.
    fn show(&mut self) {
        if self.retired {
            return;
        }
        let dot = dot_of(self.booking.lock());
        if self.shown != Some(dot) {
            self.shown = Some(dot);
            self.registry.ops.driver_changed(self.booking.id(), dot);
        }
    }

    /// Hands `event` to the machine and carries out what it decided.
    fn feed(&mut self, event: DriverEvent, ctx: &mut Context<Self>) {
        let now = Instant::now();
        self.booking.handle(now, event);
        // Carrying out can itself produce events (a connection found full);
        // they go back in until nothing more happens.
        loop {
            let effects = self.booking.take_effects();
            if effects.is_empty() {
                break;
            }
            let mut lost = None;
            for effect in effects {
                if let Some(session) = self.carry_out(effect, ctx) {
                    lost = Some(session);
                }
            }
            if let Some(session) = lost {
                self.booking
                    .handle(now, DriverEvent::SessionLost { session });
            }
        }
        self.arm_timer(now, ctx);
        self.show();
    }

    /// Carries out one effect; the connection that turned out full (its app
    /// stopped reading), if any.
    fn carry_out(&mut self, effect: DriverEffect, ctx: &mut Context<Self>) -> Option<u64> {
        let id = self.booking.id().clone();
        match effect {
            DriverEffect::UseSession(session) => {
                // Dropping the old outbox is what closes the old connection.
                if let Some(old) = self.current.replace(session) {
                    if old != session {
                        self.outboxes.remove(&old);
                    }
                }
            }
            DriverEffect::DropSession(session) => {
                self.outboxes.remove(&session);
                if self.current == Some(session) {
                    self.current = None;
                }
            }
            DriverEffect::Tell(message) => {
                let current = self.current;
                let outbox = current.and_then(|s| self.outboxes.get(&s));
                if outbox.is_some_and(|outbox| !outbox.send(message)) {
                    tracing::warn!(driver = %id, "driver not reading its messages; dropping the connection");
                    return current;
                }
            }
            DriverEffect::Answer { to, answer } => self.answer(to, answer),
            DriverEffect::Ended {
                to,
                outcome,
                fencing_token,
                pickup,
            } => match (to, &self.cluster) {
                (Some(node), Some(cluster)) => cluster.send(
                    &node,
                    Wire::Ended {
                        driver: id,
                        at: outcome.driver_location,
                        offer_id: outcome.offer_id,
                        fencing_token,
                        search: outcome.search,
                        rider_id: outcome.rider_id,
                        request_id: outcome.request_id,
                        pickup,
                        ending: outcome.ending,
                        trip_id: outcome.trip_id,
                    },
                ),
                _ => self.link.ended.do_send(OfferEnded(outcome)),
            },
            DriverEffect::Held(outcome, fencing_token, to) => match (to, &self.cluster) {
                (Some(node), Some(cluster)) => cluster.send(
                    &node,
                    Wire::Held {
                        driver: id,
                        at: outcome.driver_location,
                        offer_id: outcome.offer_id,
                        fencing_token,
                        search: outcome.search,
                        rider_id: outcome.rider_id,
                        request_id: outcome.request_id,
                    },
                ),
                _ => self.link.held.do_send(OfferHeld(outcome, fencing_token)),
            },
            DriverEffect::Indexed { at, announce } => {
                if let (Some(cluster), true) = (&self.cluster, announce) {
                    cluster.announce(&id, at);
                }
                self.link.driver_changed(id, at);
            }
            DriverEffect::Attached => {
                if let Some(cluster) = &self.cluster {
                    cluster.broadcast(Wire::Attached {
                        node: cluster.node().clone(),
                        driver: id,
                    });
                }
            }
            DriverEffect::LeftOnTrip => {
                if let Some(cluster) = &self.cluster {
                    cluster.broadcast(Wire::TripBooked {
                        node: cluster.node().clone(),
                        driver: id,
                    });
                }
            }
            DriverEffect::Redis(op) => self.ask_redis(id, op, ctx),
            DriverEffect::Retire => {
                self.retired = true;
                // Off the map before the registry forgets it: a new actor
                // for the same driver shows itself only after that.
                self.registry.ops.driver_gone(&id);
                self.registry.forget(&id, &ctx.address());
                ctx.stop();
            }
        }
        None
    }

    fn answer(&self, to: ReplyTo, answer: crate::core::search::LockAnswer) {
        match (to, &self.cluster) {
            (ReplyTo::Node(node), Some(cluster)) => {
                cluster.send(&node, answer_wire(answer, cluster.node()))
            }
            _ => self.link.answers.do_send(LockAnswered(answer)),
        }
    }

    /// Runs `op` on the Redis runtime; the reply comes back as a message.
    fn ask_redis(&self, driver: DriverId, op: RedisOp, ctx: &mut Context<Self>) {
        let cluster = self.cluster.clone().expect("Redis only in cluster mode");
        let me = ctx.address();
        cluster.clone().spawn(async move {
            let reply = run_op(&cluster, &driver, op).await;
            me.do_send(RedisAnswered(reply));
        });
    }

    /// Keeps one timer armed for whatever the machine has due next.
    fn arm_timer(&mut self, now: Instant, ctx: &mut Context<Self>) {
        if self.retired {
            return;
        }
        let next = self.booking.next_timeout();
        if self.timer.as_ref().map(|(at, _)| *at) == next {
            return;
        }
        if let Some((_, handle)) = self.timer.take() {
            ctx.cancel_future(handle);
        }
        if let Some(at) = next {
            let handle = ctx.run_later(at.saturating_duration_since(now), |act, ctx| {
                act.timer = None;
                act.feed(DriverEvent::Tick, ctx);
            });
            self.timer = Some((at, handle));
        }
    }
}

/// How the ops map shows a driver whose lock is `lock`.
fn dot_of(lock: &DriverLock<OfferHolder>) -> DriverDot {
    let (show, pickup) = match lock.state() {
        _ if !lock.is_connected() => (DriverShow::Offline, None),
        LockState::Free if lock.is_offerable() => (DriverShow::Available, None),
        LockState::Free => (DriverShow::Unavailable, None),
        LockState::Offered(offer) | LockState::Held(offer) => {
            (DriverShow::Offered, Some(offer.holder.pickup))
        }
        LockState::OnTrip(trip) => (DriverShow::OnTrip, Some(trip.holder.pickup)),
    };
    DriverDot {
        at: lock.location(),
        show,
        pickup,
    }
}

/// One Redis operation, timed for the metrics.
async fn run_op(cluster: &Cluster, driver: &str, op: RedisOp) -> RedisReply {
    let locks = cluster.locks();
    let started = Instant::now();
    let (name, ok, reply) = match op {
        RedisOp::Acquire { owner, ttl, floor } => {
            let result = locks.acquire(driver, &owner, ttl, floor).await;
            if let Err(error) = &result {
                m::redis_lock_refused(error);
            }
            let result = result
                .map(|grant| (grant.fencing_token, grant.validity))
                .map_err(|error| error.as_refusal());
            ("acquire", result.is_ok(), RedisReply::Acquired(result))
        }
        RedisOp::Release { owner } => {
            let freed = locks.release(driver, &owner).await;
            ("release", freed > 0, RedisReply::Freed)
        }
        RedisOp::Finish { owner, trip_id } => {
            let answered = locks.finish(driver, &owner, trip_id).await;
            ("finish", answered, RedisReply::Finished(answered))
        }
        RedisOp::Confirm { record } => {
            let kept = locks.confirm(driver, &record).await;
            ("confirm", kept == Some(true), RedisReply::Confirmed(kept))
        }
        RedisOp::Hold { owner, ttl, token } => {
            let kept = locks.hold(driver, &owner, ttl, token).await;
            ("hold", kept == Some(true), RedisReply::HoldKept(kept))
        }
        RedisOp::Settle { owner } => {
            let settled = locks.settle(driver, &owner).await;
            ("settle", settled.is_some(), RedisReply::Settled(settled))
        }
        RedisOp::Renew { record, repair } => {
            let verdict = locks.renew(driver, &record, repair).await;
            let reply = RedisReply::Renewed {
                owner: record.owner,
                verdict,
            };
            ("renew", verdict != Some(Renewal::Lost), reply)
        }
        RedisOp::FinishTrip { trip_id, attempt } => {
            let done = locks.finish_trip(driver, trip_id).await;
            let reply = RedisReply::TripFinished {
                trip_id,
                attempt,
                done,
            };
            ("finish_trip", done.is_some(), reply)
        }
        RedisOp::CurrentTrip => {
            let found = locks.current_trip(driver).await;
            (
                "current_trip",
                found.is_ok(),
                RedisReply::CurrentTrip(found),
            )
        }
    };
    m::redis_op(name, started.elapsed(), ok);
    reply
}

impl Handler<Attach> for DriverActor {
    type Result = Result<(), Retired>;

    fn handle(&mut self, msg: Attach, ctx: &mut Context<Self>) -> Self::Result {
        if self.retired {
            return Err(Retired);
        }
        self.outboxes.insert(msg.session, msg.outbox);
        self.feed(
            DriverEvent::Attach {
                session: msg.session,
            },
            ctx,
        );
        Ok(())
    }
}

impl Handler<Detach> for DriverActor {
    type Result = ();

    fn handle(&mut self, msg: Detach, ctx: &mut Context<Self>) {
        self.feed(
            DriverEvent::Detach {
                session: msg.session,
            },
            ctx,
        );
    }
}

impl Handler<FromDriver> for DriverActor {
    type Result = ();

    fn handle(&mut self, msg: FromDriver, ctx: &mut Context<Self>) {
        let event = DriverEvent::Command {
            session: msg.session,
            command: msg.command,
        };
        self.feed(event, ctx);
    }
}

impl Handler<TryLock> for DriverActor {
    type Result = ();

    fn handle(&mut self, msg: TryLock, ctx: &mut Context<Self>) {
        self.feed(DriverEvent::TryLock(msg.take()), ctx);
    }
}

impl Handler<CancelOffer> for DriverActor {
    type Result = ();

    fn handle(&mut self, msg: CancelOffer, ctx: &mut Context<Self>) {
        let event = DriverEvent::CancelOffer {
            offer_id: msg.offer_id,
            fencing_token: msg.fencing_token,
            why: msg.why,
        };
        self.feed(event, ctx);
    }
}

impl Handler<GroupNews> for DriverActor {
    type Result = ();

    fn handle(&mut self, msg: GroupNews, ctx: &mut Context<Self>) {
        let event =
            DriverEvent::group_news(msg.offer_id, msg.fencing_token, msg.accepted, msg.trip_id);
        self.feed(event, ctx);
    }
}

impl Handler<ConnectedElsewhere> for DriverActor {
    type Result = ();

    fn handle(&mut self, msg: ConnectedElsewhere, ctx: &mut Context<Self>) {
        if self.current.is_some() {
            tracing::info!(driver = %self.booking.id(), node = %msg.node, "driver connected to another node; closing its connection here");
        }
        self.feed(DriverEvent::ConnectedElsewhere, ctx);
    }
}

impl Handler<HolderNodeGone> for DriverActor {
    type Result = ();

    fn handle(&mut self, msg: HolderNodeGone, ctx: &mut Context<Self>) {
        let event = DriverEvent::HolderNodeGone {
            node: msg.node,
            incarnation: msg.incarnation,
        };
        self.feed(event, ctx);
    }
}

impl Handler<RedisAnswered> for DriverActor {
    type Result = ();

    fn handle(&mut self, msg: RedisAnswered, ctx: &mut Context<Self>) {
        self.feed(DriverEvent::Redis(msg.0), ctx);
    }
}
