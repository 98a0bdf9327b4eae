//! The matcher actor: carries out what [`Searches`] decides.
//!
//! One actor owns the searches of this node and the index of offerable
//! drivers. Every message becomes one call into the core with the time, and
//! the effects that call records are carried out here: messages to riders,
//! lock requests and cancels to driver actors (or, in cluster mode, to other
//! nodes), settles in Redis. Nothing here decides anything.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::messages::{
    CancelOffer, DriverChanges, DriverDirectory, DriversChanged, GroupNews, LockAnswered,
    OfferEnded, OfferHeld, ReplyRoute, ToDriver, TryLock,
};
use super::remote::GroupConfirmed;
use crate::areas::ServiceAreas;
use crate::cluster::wire::{Wire, WireGroup, Wound};
use crate::cluster::Cluster;
use crate::config::Config;
use crate::core::booking::{LockRequest, ReplyTo, LOCK_MARGIN};
use crate::core::lock::OfferId;
use crate::core::search::{OpenRequest, SearchEffect, SearchSettings, Searches, SettleTicket};
use crate::core::Settled;
use crate::ids::Ids;
use crate::location::LatLon;
use crate::metrics as m;
use crate::protocol::{DriverId, RequestId, RiderId};
use crate::session::Outbox;

pub use super::remote::{LiveNodes, NodeGone, RemoteDriver, RemoteDrivers, RemoteSnapshot};

/// How often search deadlines are checked. One timer for all searches: actix
/// polls every future an actor has spawned each time it wakes, so a timer per
/// search would make every message cost as much as the searches in flight.
const DEADLINE_TICK: Duration = Duration::from_millis(10);

/// How often the matcher's gauges (searches, waiting riders, index size) are
/// refreshed.
const GAUGE_REFRESH: Duration = Duration::from_secs(1);

/// Availability changes taken per [`DriversChanged`]: a burst of location
/// updates is applied in slices, with bookings handled in between.
const CHANGES_PER_TURN: usize = 512;

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
    /// How many vehicles (validated: 1 to 4).
    pub vehicles: u8,
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

/// Asks the matcher for its open requests (for the ops map).
#[derive(Message)]
#[rtype(result = "Vec<OpenRequest>")]
pub struct OpenRequests;

/// Cluster mode: what settling an overdue remote lock found out.
#[derive(Message)]
#[rtype(result = "()")]
struct SettleOutcome {
    ticket: SettleTicket,
    outcome: Option<Settled>,
}

/// The matcher actor.
pub struct Matcher {
    searches: Searches<Outbox>,
    admission: Arc<Admission>,
    drivers: Arc<dyn DriverDirectory>,
    changes: Arc<DriverChanges>,
    cluster: Option<Arc<Cluster>>,
    offer_timeout_ms: u64,
}

impl Actor for Matcher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Searches come and go in bursts; a deep mailbox is cheaper than
        // making sessions wait.
        ctx.set_mailbox_capacity(1 << 16);
        // Gauges are read by scrapes every few seconds; refreshing them once a
        // second keeps that work off the per-message path.
        ctx.run_interval(GAUGE_REFRESH, |act, _| {
            let counts = act.searches.counts();
            m::matcher_gauges(counts.searches, counts.waiting, counts.available_drivers);
        });
        ctx.run_interval(DEADLINE_TICK, |act, ctx| {
            act.decide(ctx, |searches, now| searches.tick(now))
        });
    }
}

impl Matcher {
    /// A matcher with no searches; `drivers` reaches this node's driver
    /// actors, `changes` is where they leave their availability, and
    /// `admission` counts the ride requests sessions have queued for it.
    /// With `cluster`, drivers on other nodes are indexed and offered too;
    /// with `areas`, only those areas are served.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &Config,
        ids: Arc<Ids>,
        admission: Arc<Admission>,
        cluster: Option<Arc<Cluster>>,
        drivers: Arc<dyn DriverDirectory>,
        changes: Arc<DriverChanges>,
        areas: Option<Arc<ServiceAreas>>,
    ) -> Self {
        let settings = SearchSettings {
            radius_m: config.radius_m,
            radius_step_m: config.radius_step_m,
            radius_step: config.radius_step(),
            max_radius_m: config.max_radius_m(),
            max_candidates: config.max_candidates,
            search_timeout: config.search_timeout(),
            offer_timeout: config.offer_timeout(),
            max_requests_per_rider: config.max_requests_per_rider,
            max_searches: config.max_searches,
            lock_margin: LOCK_MARGIN,
            dispatch: config.dispatch(),
        };
        let node = cluster.as_ref().map(|c| c.node().clone());
        let mut searches = Searches::new(settings, ids, node);
        if let Some(areas) = areas {
            searches.serve_only(areas);
        }
        Matcher {
            searches,
            admission,
            drivers,
            changes,
            cluster,
            offer_timeout_ms: config.offer_timeout_ms,
        }
    }

    /// Runs one decision of the core at the current time and carries out
    /// what it decided.
    pub(super) fn decide(
        &mut self,
        ctx: &mut Context<Self>,
        decision: impl FnOnce(&mut Searches<Outbox>, Instant),
    ) {
        let now = Instant::now();
        decision(&mut self.searches, now);
        let queries = self.searches.take_index_queries();
        let batched = self.searches.take_batched();
        if batched > 0 {
            // The decision was the batch's: its queries and its solving.
            m::batch_assigned(batched, now.elapsed());
        } else if queries > 0 {
            m::index_query(now.elapsed() / queries);
        }
        // Carrying out can itself be news (a cancel that reached no actor):
        // handed back until nothing more happens.
        loop {
            let effects = self.searches.take_effects();
            if effects.is_empty() {
                break;
            }
            for effect in effects {
                if let Some((driver, offer_id)) = self.carry_out(effect, now, ctx) {
                    self.searches.offer_undeliverable(now, &driver, offer_id);
                }
            }
        }
    }

    /// Carries out one effect; a cancel that reached no actor, if any.
    fn carry_out(
        &mut self,
        effect: SearchEffect<Outbox>,
        now: Instant,
        ctx: &mut Context<Self>,
    ) -> Option<(DriverId, OfferId)> {
        match effect {
            SearchEffect::Tell { to, message } => {
                to.send(message);
            }
            SearchEffect::Lock {
                driver,
                node: None,
                offer_id,
                holder,
                timeout,
                not_after,
            } => {
                let request = LockRequest {
                    offer_id,
                    holder,
                    timeout,
                    not_after,
                    reply: ReplyTo::Matcher,
                };
                let route = ReplyRoute::Matcher(ctx.address().recipient());
                let message = TryLock::new(driver.clone(), request, route);
                self.drivers.send(&driver, ToDriver::Lock(message));
            }
            SearchEffect::Lock {
                driver,
                node: Some(node),
                offer_id,
                holder,
                not_after,
                ..
            } => {
                let cluster = self
                    .cluster
                    .as_ref()
                    .expect("remote drivers in cluster mode");
                let search_left = not_after.saturating_duration_since(now);
                let group = holder.group.as_ref().map(|g| WireGroup {
                    request_id: g.request_id.clone(),
                    size: g.size,
                    hold_ms: g.hold_until.saturating_duration_since(now).as_millis() as u64,
                });
                cluster.send(
                    &node,
                    Wire::Lock {
                        group,
                        from: cluster.node().clone(),
                        incarnation: cluster.incarnation(),
                        driver,
                        offer_id,
                        search: holder.search,
                        rider_id: holder.rider_id,
                        request_id: holder.request_id,
                        pickup: holder.pickup,
                        timeout_ms: self.offer_timeout_ms,
                        search_left_ms: search_left.as_millis() as u64,
                        search_deadline_unix_ms: crate::limits::unix_ms()
                            .map(|now_ms| now_ms + search_left.as_millis() as u64),
                    },
                );
            }
            SearchEffect::Cancel {
                driver,
                node,
                offer_id,
                fencing_token,
                why,
            } => match node {
                None => {
                    let cancel = ToDriver::Cancel(CancelOffer {
                        offer_id,
                        fencing_token,
                        why,
                    });
                    if !self.drivers.send(&driver, cancel) {
                        return Some((driver, offer_id));
                    }
                }
                Some(node) => {
                    let cluster = self.cluster.as_ref().expect("cluster mode");
                    cluster.send(
                        &node,
                        Wire::Cancel {
                            driver,
                            offer_id,
                            fencing_token,
                            why: Some(why),
                        },
                    );
                }
            },
            SearchEffect::GroupNews {
                driver,
                node: Some(node),
                offer_id,
                fencing_token,
                accepted,
                trip_id,
            } => {
                let cluster = self.cluster.as_ref().expect("cluster mode");
                cluster.send(
                    &node,
                    Wire::GroupNews {
                        driver,
                        offer_id,
                        fencing_token,
                        accepted,
                        trip_id,
                    },
                );
            }
            SearchEffect::GroupNews {
                driver,
                node: None,
                offer_id,
                fencing_token,
                accepted,
                trip_id,
            } => {
                let news = GroupNews {
                    offer_id,
                    fencing_token,
                    accepted,
                    trip_id,
                };
                if !self.drivers.send(&driver, ToDriver::Group(news)) && trip_id.is_some() {
                    // Only a crashed actor is gone while held (a hold keeps
                    // it): its trip is lost with it, as any trip is.
                    tracing::error!(driver = %driver, offer_id, "a group's driver is gone at its commit");
                }
            }
            SearchEffect::Wound {
                started_ago,
                pickup,
                radius_m,
            } => {
                let cluster = self.cluster.as_ref().expect("wounds in cluster mode");
                // Ages compare by the wall clock: without one, no wound
                // (and nothing to report back).
                let now_ms = crate::limits::unix_ms()?;
                cluster.broadcast(Wire::Wound(Wound {
                    from: cluster.node().clone(),
                    started_unix_ms: now_ms.saturating_sub(started_ago.as_millis() as u64),
                    pickup,
                    radius_m,
                }));
            }
            SearchEffect::TripBooked { driver } => {
                let cluster = self.cluster.as_ref().expect("cluster mode");
                cluster.broadcast(Wire::TripBooked {
                    node: cluster.node().clone(),
                    driver: driver.clone(),
                });
                self.drivers.send(&driver, ToDriver::LookUpTrip);
            }
            SearchEffect::ConfirmGroup {
                group,
                attempt,
                members,
                keep,
            } => {
                let cluster = self
                    .cluster
                    .clone()
                    .expect("group bookings in cluster mode");
                let matcher = ctx.address();
                cluster.clone().spawn(async move {
                    let started = Instant::now();
                    let verdict = cluster.locks().confirm_group(&members, keep).await;
                    m::redis_op("confirm_group", started.elapsed(), verdict.is_some());
                    matcher.do_send(GroupConfirmed {
                        group,
                        attempt,
                        verdict,
                    });
                });
            }
            SearchEffect::Settle {
                driver,
                owner,
                ticket,
            } => {
                let cluster = self.cluster.clone().expect("settles in cluster mode");
                let matcher = ctx.address();
                cluster.clone().spawn(async move {
                    let started = Instant::now();
                    let outcome = cluster.locks().settle(&driver, &owner).await;
                    m::redis_op("settle", started.elapsed(), outcome.is_some());
                    matcher.do_send(SettleOutcome { ticket, outcome });
                });
            }
        }
        None
    }
}

impl Handler<RequestRide> for Matcher {
    type Result = ();

    fn handle(&mut self, msg: RequestRide, ctx: &mut Context<Self>) {
        self.admission.leave();
        let RequestRide {
            rider,
            request_id,
            pickup,
            vehicles,
            received_at,
        } = msg;
        self.decide(ctx, |searches, now| {
            let RiderLink {
                rider_id,
                session,
                outbox,
            } = rider;
            let request = (rider_id, session, request_id, pickup, received_at);
            searches.request_vehicles(now, outbox, request, vehicles)
        });
    }
}

impl Handler<CancelRide> for Matcher {
    type Result = ();

    fn handle(&mut self, msg: CancelRide, ctx: &mut Context<Self>) {
        let CancelRide { rider, request_id } = msg;
        self.decide(ctx, |searches, now| {
            searches.cancel(now, rider.outbox, rider.rider_id, request_id)
        });
    }
}

impl Handler<RiderGone> for Matcher {
    type Result = ();

    fn handle(&mut self, msg: RiderGone, ctx: &mut Context<Self>) {
        self.decide(ctx, |searches, now| {
            searches.rider_gone(now, msg.rider_id, msg.session)
        });
    }
}

impl Handler<DriversChanged> for Matcher {
    type Result = ();

    fn handle(&mut self, _msg: DriversChanged, ctx: &mut Context<Self>) {
        self.changes.woken_up();
        let (changes, more) = self.changes.take(CHANGES_PER_TURN);
        self.decide(ctx, |searches, now| {
            for (driver, at) in changes {
                searches.driver_changed(now, driver, at);
            }
        });
        // The rest waits behind whatever else is queued now.
        if more && self.changes.rewake() {
            ctx.address().do_send(DriversChanged);
        }
    }
}

impl Handler<OfferEnded> for Matcher {
    type Result = ();

    fn handle(&mut self, msg: OfferEnded, ctx: &mut Context<Self>) {
        self.decide(ctx, |searches, now| searches.offer_ended(now, msg.0));
    }
}

impl Handler<OfferHeld> for Matcher {
    type Result = ();

    fn handle(&mut self, msg: OfferHeld, ctx: &mut Context<Self>) {
        let OfferHeld(outcome, fencing_token) = msg;
        self.decide(ctx, |searches, now| {
            searches.offer_held(now, outcome, fencing_token)
        });
    }
}

impl Handler<LockAnswered> for Matcher {
    type Result = ();

    fn handle(&mut self, msg: LockAnswered, ctx: &mut Context<Self>) {
        self.decide(ctx, |searches, now| searches.lock_answered(now, msg.0));
    }
}

impl Handler<SettleOutcome> for Matcher {
    type Result = ();

    fn handle(&mut self, msg: SettleOutcome, ctx: &mut Context<Self>) {
        self.decide(ctx, |searches, now| {
            searches.settled(now, msg.ticket, msg.outcome)
        });
    }
}

impl Handler<GetStats> for Matcher {
    type Result = MatcherStats;

    fn handle(&mut self, _msg: GetStats, _ctx: &mut Context<Self>) -> MatcherStats {
        let counts = self.searches.counts();
        MatcherStats {
            available_drivers: counts.available_drivers,
            searches: counts.searches,
            waiting: counts.waiting,
        }
    }
}

impl Handler<OpenRequests> for Matcher {
    type Result = Vec<OpenRequest>;

    fn handle(&mut self, _msg: OpenRequests, _ctx: &mut Context<Self>) -> Vec<OpenRequest> {
        self.searches.open_requests()
    }
}
