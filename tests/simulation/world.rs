//! The simulated city: nodes running the booking core, a network between
//! them, lock servers, and the apps, all driven by one seeded random source
//! in virtual time.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ridelock::cluster::redlock::{
    current_trip_verdict, judge, majority_did, renewal_verdict, settle_verdict, AttemptFailed,
};
use ridelock::cluster::wire::NodeId;
use ridelock::core::booking::{
    Booking, DriverEffect, DriverEvent, GroupMember, LockRequest, RedisOp, RedisReply, ReplyTo,
    LOCK_MARGIN,
};
use ridelock::core::lock::{Ending, LockRefused};
use ridelock::core::search::{
    Dispatch, LockAnswer, OfferOutcome, SearchEffect, SearchKey, SearchSettings, Searches,
    SettleTicket,
};
use ridelock::core::Settled;
use ridelock::ids::Ids;
use ridelock::location::LatLon;
use ridelock::protocol::{DriverId, RequestId, RiderId, ServerMessage};

use super::apps::{DriverApp, RiderApp};
use super::check::Ledger;
use super::redis::{Server, ServerOp, ServerReply};
use ridelock::areas::ServiceAreas;
use ridelock::cluster::redlock::Renewal;

/// The per-server timeout of the Redis client (`--redis-timeout-ms`).
pub const REDIS_TIMEOUT: Duration = Duration::from_millis(250);
/// Liveness keys: refreshed every second, lapse after five.
/// The west of the simulated city (which spans 13.37–13.44 east).
const SIM_AREA: &str = r#"{"type":"FeatureCollection","features":[{"type":"Feature","properties":{"name":"west"},"geometry":{"type":"Polygon","coordinates":[[[13.36,52.48],[13.426,52.48],[13.426,52.55],[13.36,52.55],[13.36,52.48]]]}}]}"#;

/// Short, so that drivers who sit still for a while go stale and come back.
const LOCATION_MAX_AGE: Duration = Duration::from_secs(8);
const ALIVE_REFRESH: Duration = Duration::from_secs(1);
const ALIVE_TTL: Duration = Duration::from_secs(5);

/// What one run looks like.
#[derive(Clone, Debug)]
pub struct Shape {
    pub nodes: usize,
    pub servers: usize,
    pub drivers: usize,
    pub riders: usize,
    /// How long apps act and faults happen.
    pub active: Duration,
    /// How long everything is left to settle afterwards.
    pub quiet: Duration,
    pub faults: bool,
}

/// A rider connection as a search knows it: (rider, session).
pub type RiderConn = (usize, u64);

/// What a node's matcher is told.
#[derive(Clone, Debug)]
pub enum MatcherIn {
    Request {
        rider: usize,
        session: u64,
        request_id: RequestId,
        pickup: LatLon,
        vehicles: u8,
    },
    Cancel {
        rider: usize,
        session: u64,
        request_id: RequestId,
    },
    RiderGone {
        rider: usize,
        session: u64,
    },
    DriverChanged {
        driver: DriverId,
        at: Option<LatLon>,
    },
    Answer(LockAnswer),
    Ended(OfferOutcome),
    Held(OfferOutcome, u64),
    Settled(SettleTicket, Option<Settled>),
    /// Redis's verdict on booking a group (its key, the try).
    GroupConfirmed(SearchKey, u32, Option<bool>),
    /// An older group on node `from` asks for a younger group's driver.
    Wounded {
        from: usize,
        started_unix_ms: u64,
        pickup: LatLon,
        radius_m: f64,
    },
    /// A batch of another node's announcements, in order (what the
    /// publisher sends: see `Node::announcements`).
    RemoteDrivers {
        from: usize,
        changes: Vec<(DriverId, Option<LatLon>)>,
    },
    NodeGone(usize),
    Undeliverable {
        driver: DriverId,
        offer_id: u64,
    },
    NodeBack(usize),
    Tick,
}

/// Who asked Redis.
#[derive(Clone, Debug)]
pub enum Asker {
    /// A driver actor; `actor` tells it from a later actor of the same
    /// driver on the node (a reply to a crashed actor goes nowhere).
    Driver {
        node: usize,
        inc: u32,
        driver: usize,
        actor: u64,
    },
    Matcher {
        node: usize,
        inc: u32,
        ticket: SettleTicket,
    },
    /// A matcher booking a group: which group, which try.
    Group {
        node: usize,
        inc: u32,
        group: SearchKey,
        attempt: u32,
    },
}

/// A Redlock call in flight: one question to every server.
pub struct Call {
    pub asker: Asker,
    /// What is asked (a group's booking asks `group` instead, and this is
    /// unused: the engine has no driver op for it).
    pub op: RedisOp,
    pub group: Option<(Vec<GroupMember>, Duration)>,
    pub answers: Vec<Option<ServerReply>>,
    pub started: Instant,
    /// Acquire: the first attempt's unanswered servers, and which attempt.
    pub attempt: u32,
    pub unanswered_before: Vec<usize>,
    pub done: bool,
    pub driver: String,
}

#[derive(Clone, Debug)]
pub enum Fault {
    Pause(usize),
    Resume(usize),
    Kill(usize),
    Restart(usize),
    ServerDown(usize),
    ServerUp(usize),
    ServerWipe(usize),
    CrashDriverActor(usize, usize),
}

#[derive(Clone, Debug)]
pub enum Ev {
    ToMatcher {
        node: usize,
        inc: u32,
        input: MatcherIn,
    },
    ToDriver {
        node: usize,
        inc: u32,
        driver: usize,
        event: DriverEvent,
    },
    ServerOp {
        server: usize,
        call: u64,
        op: ServerOp,
        reply: ReplyFate,
    },
    ServerReply {
        call: u64,
        server: usize,
        reply: ServerReply,
    },
    CallTimeout {
        call: u64,
        attempt: u32,
    },
    SplitRetry {
        call: u64,
    },
    RedisToDriver {
        node: usize,
        inc: u32,
        driver: usize,
        actor: u64,
        reply: RedisReply,
    },
    DriverApp {
        driver: usize,
        input: AppIn,
    },
    RiderApp {
        rider: usize,
        input: AppIn,
    },
    Liveness {
        node: usize,
        inc: u32,
    },
    /// The node's publisher sends the announcements waiting.
    Announce {
        node: usize,
        inc: u32,
    },
    Fault(Fault),
}

/// What becomes of a server's reply.
#[derive(Clone, Copy, Debug)]
pub enum ReplyFate {
    OnTime,
    Lost,
    Late,
}

#[derive(Clone, Debug)]
pub enum AppIn {
    Message {
        node: usize,
        session: u64,
        message: ServerMessage,
    },
    Closed {
        node: usize,
        session: u64,
    },
    Act,
}

pub struct Node {
    pub id: NodeId,
    pub inc: u32,
    pub up: bool,
    pub paused: bool,
    pub held: Vec<Ev>,
    pub searches: Searches<RiderConn>,
    pub drivers: HashMap<usize, Booking>,
    /// The session each driver actor uses (for telling apps).
    pub driver_sessions: HashMap<usize, u64>,
    /// Which actor of each driver is alive here.
    pub actors: HashMap<usize, u64>,
    /// The process of each other node this node believes alive.
    pub live: Vec<Option<u64>>,
    pub ids: Arc<Ids>,
    pub tick_at: Option<Instant>,
    pub driver_tick_at: HashMap<usize, Instant>,
    /// Its drivers' availability changes waiting to be published together
    /// (newest per driver), as the engine's publisher batches them; sent
    /// after `ANNOUNCE_BATCH`, or at once ahead of any other message from
    /// this node.
    pub announcements: Vec<(DriverId, Option<LatLon>)>,
}

/// How long announcements wait to go out together (the publisher's window).
const ANNOUNCE_BATCH: Duration = Duration::from_millis(50);

pub struct World {
    pub rng: StdRng,
    pub shape: Shape,
    pub settings: SearchSettings,
    /// Served areas, on seeds that have them (every third).
    pub areas: Option<Arc<ServiceAreas>>,
    pub base: Instant,
    pub now: Instant,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    events: HashMap<u64, Ev>,
    seq: u64,
    pub nodes: Vec<Node>,
    pub servers: Vec<Server>,
    pub calls: HashMap<u64, Call>,
    next_call: u64,
    pub drivers: Vec<DriverApp>,
    pub riders: Vec<RiderApp>,
    pub ledger: Ledger,
    pub events_run: u64,
    pub faults_injected: u64,
    /// Drivers taken from a younger group by an older one.
    pub preemptions: u64,
    pub next_session: u64,
    next_actor: u64,
    /// Last delivery time per (sender, receiver) lane, for FIFO lanes.
    lanes: HashMap<(u64, u64), Instant>,
    pub quiet: bool,
    /// Lock servers fail one at a time: no server fault starts before this
    /// (a server back from a restart without its data has been repaired by
    /// trip renewals by then).
    pub servers_calm_at: Instant,
    pub trace: Vec<String>,
    pub tracing: bool,
}

pub fn driver_name(d: usize) -> DriverId {
    format!("d{d}").into()
}

pub fn rider_name(r: usize) -> RiderId {
    format!("r{r}").into()
}

pub fn driver_index(id: &str) -> usize {
    id[1..].parse().expect("sim driver ids are d<n>")
}

impl World {
    pub fn new(seed: u64, shape: Shape, tracing: bool) -> World {
        let mut rng = StdRng::seed_from_u64(seed);
        let base = Instant::now();
        let settings = SearchSettings {
            // Small at first, so that searches park and look farther as
            // they wait (the city is about 5 km across).
            radius_m: 1_500.0,
            radius_step_m: 750.0,
            radius_step: Duration::from_secs(2),
            max_radius_m: 4_000.0,
            max_candidates: 6,
            search_timeout: Duration::from_secs(10),
            offer_timeout: Duration::from_secs(4),
            max_requests_per_rider: 2,
            max_searches: 10_000,
            lock_margin: LOCK_MARGIN,
            // Every other seed assigns new requests in batches, one in
            // two of those waiting up to two windows for a nearer driver.
            dispatch: match seed % 4 {
                0 | 2 => Dispatch::Greedy,
                1 => Dispatch::Batch {
                    window: Duration::from_millis(300),
                    wait_m: 0,
                    max_waits: 0,
                },
                _ => Dispatch::Batch {
                    window: Duration::from_millis(300),
                    wait_m: 300,
                    max_waits: 2,
                },
            },
        };
        let cluster = shape.nodes > 1;
        // Every third seed serves only the west of the city: the east fifth
        // is outside, for pickups and drivers alike.
        let areas = (seed % 3 == 2).then(|| {
            Arc::new(ServiceAreas::from_geojson(SIM_AREA).expect("the simulation's area parses"))
        });
        let nodes = (0..shape.nodes)
            .map(|n| new_node(n, 0, &settings, areas.as_ref(), cluster, shape.nodes))
            .collect();
        let servers = (0..shape.servers).map(|_| Server::new(base)).collect();
        let drivers = (0..shape.drivers)
            .map(|_| DriverApp::new(&mut rng))
            .collect();
        let riders = (0..shape.riders).map(|_| RiderApp::new(&mut rng)).collect();
        let mut world = World {
            rng,
            shape,
            settings,
            areas,
            base,
            now: base,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            seq: 0,
            nodes,
            servers,
            calls: HashMap::new(),
            next_call: 0,
            drivers,
            riders,
            ledger: Ledger::default(),
            events_run: 0,
            faults_injected: 0,
            preemptions: 0,
            next_session: 0,
            next_actor: 0,
            lanes: HashMap::new(),
            quiet: false,
            servers_calm_at: base,
            trace: Vec::new(),
            tracing,
        };
        for d in 0..world.drivers.len() {
            let at = world.rng.random_range(0..500);
            world.at(
                Duration::from_millis(at),
                Ev::DriverApp {
                    driver: d,
                    input: AppIn::Act,
                },
            );
        }
        for r in 0..world.riders.len() {
            let at = world.rng.random_range(0..1500);
            world.at(
                Duration::from_millis(at),
                Ev::RiderApp {
                    rider: r,
                    input: AppIn::Act,
                },
            );
        }
        if world.is_cluster() {
            for n in 0..world.nodes.len() {
                world.at(Duration::ZERO, Ev::Liveness { node: n, inc: 0 });
            }
        }
        world
    }

    pub fn is_cluster(&self) -> bool {
        self.nodes.len() > 1
    }

    /// Schedules `ev` after `delay`.
    pub fn at(&mut self, delay: Duration, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((self.now + delay, self.seq)));
        self.events.insert(self.seq, ev);
    }

    /// Schedules `ev` on a FIFO lane (messages between two actors arrive in
    /// the order sent), after a random delay up to `max_us`.
    pub fn lane(&mut self, from: u64, to: u64, max_us: u64, ev: Ev) {
        let delay = Duration::from_micros(self.rng.random_range(1..=max_us));
        let mut when = self.now + delay;
        let last = self.lanes.entry((from, to)).or_insert(when);
        if *last > when {
            when = *last;
        }
        *last = when;
        let wait = when - self.now;
        self.at(wait, ev);
    }

    pub fn note(&mut self, what: impl FnOnce() -> String) {
        if self.tracing {
            let t = (self.now - self.base).as_secs_f64();
            self.trace.push(format!("{t:10.4} {}", what()));
        }
    }

    /// Runs until the queue is empty or `until`.
    pub fn run_until(&mut self, until: Instant) -> Result<(), String> {
        while let Some(Reverse((when, seq))) = self.queue.peek().copied() {
            if when > until {
                break;
            }
            self.queue.pop();
            let ev = self.events.remove(&seq).expect("scheduled");
            self.now = when;
            self.events_run += 1;
            self.step(ev)?;
        }
        self.now = until;
        Ok(())
    }

    fn step(&mut self, ev: Ev) -> Result<(), String> {
        match ev {
            Ev::ToMatcher { node, inc, input } => {
                if !self.node_takes(node, inc, || Ev::ToMatcher {
                    node,
                    inc,
                    input: input.clone(),
                }) {
                    return Ok(());
                }
                self.matcher_in(node, input)?;
            }
            Ev::ToDriver {
                node,
                inc,
                driver,
                event,
            } => {
                if !self.node_takes(node, inc, || Ev::ToDriver {
                    node,
                    inc,
                    driver,
                    event: event.clone(),
                }) {
                    return Ok(());
                }
                self.driver_in(node, driver, event)?;
            }
            Ev::RedisToDriver {
                node,
                inc,
                driver,
                actor,
                reply,
            } => {
                if !self.node_takes(node, inc, || Ev::RedisToDriver {
                    node,
                    inc,
                    driver,
                    actor,
                    reply: reply.clone(),
                }) {
                    return Ok(());
                }
                if self.nodes[node].actors.get(&driver) == Some(&actor)
                    && self.nodes[node].drivers.contains_key(&driver)
                {
                    self.driver_in(node, driver, DriverEvent::Redis(reply))?;
                }
            }
            Ev::ServerOp {
                server,
                call,
                op,
                reply,
            } => self.server_op(server, call, op, reply)?,
            Ev::ServerReply {
                call,
                server,
                reply,
            } => self.server_reply(call, server, reply)?,
            Ev::CallTimeout { call, attempt } => self.call_timeout(call, attempt)?,
            Ev::SplitRetry { call } => self.split_retry(call),
            Ev::DriverApp { driver, input } => self.driver_app(driver, input)?,
            Ev::RiderApp { rider, input } => self.rider_app(rider, input)?,
            Ev::Liveness { node, inc } => self.liveness(node, inc),
            Ev::Announce { node, inc } => {
                if self.node_takes(node, inc, || Ev::Announce { node, inc }) {
                    self.announce(node);
                }
            }
            Ev::Fault(fault) => self.fault(fault),
        }
        Ok(())
    }

    /// Whether `node` (incarnation `inc`) handles an event now: a dead
    /// incarnation's events are lost, a paused node's wait.
    fn node_takes(&mut self, node: usize, inc: u32, ev: impl FnOnce() -> Ev) -> bool {
        let n = &mut self.nodes[node];
        if !n.up || n.inc != inc {
            return false;
        }
        if n.paused {
            n.held.push(ev());
            return false;
        }
        true
    }

    // ----- matchers -----

    pub fn matcher_in(&mut self, node: usize, input: MatcherIn) -> Result<(), String> {
        if !matches!(
            input,
            MatcherIn::Tick | MatcherIn::DriverChanged { .. } | MatcherIn::RemoteDrivers { .. }
        ) {
            self.note(|| format!("n{node} <- {input:?}"));
        }
        let now = self.now;
        let unix_now_ms = self.unix_ms(now);
        let wounder = match &input {
            MatcherIn::Wounded { from, .. } => Some(self.nodes[*from].id.clone()),
            _ => None,
        };
        let n = &mut self.nodes[node];
        let s = &mut n.searches;
        match input {
            MatcherIn::Request {
                rider,
                session,
                request_id,
                pickup,
                vehicles,
            } => s.request_vehicles(
                now,
                (rider, session),
                (rider_name(rider), session, request_id, pickup, now),
                vehicles,
            ),
            MatcherIn::Cancel {
                rider,
                session,
                request_id,
            } => s.cancel(now, (rider, session), rider_name(rider), request_id),
            MatcherIn::RiderGone { rider, session } => {
                s.rider_gone(now, rider_name(rider), session)
            }
            MatcherIn::DriverChanged { driver, at } => s.driver_changed(now, driver, at),
            MatcherIn::Answer(answer) => s.lock_answered(now, answer),
            MatcherIn::Ended(outcome) => s.offer_ended(now, outcome),
            MatcherIn::Held(outcome, token) => s.offer_held(now, outcome, token),
            MatcherIn::Settled(ticket, outcome) => s.settled(now, ticket, outcome),
            MatcherIn::GroupConfirmed(group, attempt, verdict) => {
                s.group_confirmed(now, group, attempt, verdict)
            }
            MatcherIn::Wounded {
                started_unix_ms,
                pickup,
                radius_m,
                ..
            } => {
                let from = wounder.expect("a wound names its node");
                s.wounded(now, unix_now_ms, &from, started_unix_ms, pickup, radius_m)
            }
            MatcherIn::RemoteDrivers { from, changes } => {
                let id = self.nodes[from].id.clone();
                for (driver, at) in changes {
                    self.nodes[node]
                        .searches
                        .remote_driver(now, id.clone(), driver, at)
                }
            }
            MatcherIn::NodeGone(gone) => {
                let id = self.nodes[gone].id.clone();
                self.nodes[node].searches.node_gone(now, id)
            }
            MatcherIn::NodeBack(back) => {
                let id = self.nodes[back].id.clone();
                let mut drivers: Vec<(DriverId, LatLon)> = self.nodes[back]
                    .drivers
                    .iter()
                    .filter_map(|(d, b)| b.announced_at().map(|at| (driver_name(*d), at)))
                    .collect();
                drivers.sort_by(|a, b| a.0.cmp(&b.0));
                self.nodes[node].searches.remote_snapshot(now, id, drivers)
            }
            MatcherIn::Tick => s.tick(now),
            MatcherIn::Undeliverable { driver, offer_id } => {
                s.offer_undeliverable(now, &driver, offer_id)
            }
        }
        let effects = self.nodes[node].searches.take_effects();
        for effect in effects {
            self.search_effect(node, effect)?;
        }
        let next = self.nodes[node].searches.next_timeout();
        if let Some(next) = next {
            let n = &mut self.nodes[node];
            if n.tick_at.is_none_or(|at| at <= now || next < at) {
                n.tick_at = Some(next);
                let inc = n.inc;
                self.at(
                    next.saturating_duration_since(now),
                    Ev::ToMatcher {
                        node,
                        inc,
                        input: MatcherIn::Tick,
                    },
                );
            }
        }
        Ok(())
    }

    fn search_effect(
        &mut self,
        node: usize,
        effect: SearchEffect<RiderConn>,
    ) -> Result<(), String> {
        let inc = self.nodes[node].inc;
        if !matches!(effect, SearchEffect::Tell { .. }) {
            self.note(|| format!("n{node} => {effect:?}"));
        }
        match effect {
            SearchEffect::Tell {
                to: (rider, session),
                message,
            } => {
                self.note(|| format!("n{node} -> r{rider}: {message:?}"));
                self.ledger
                    .rider_told(self.now, node, inc, rider, &message)?;
                self.lane(
                    lane_matcher(node),
                    lane_rider(rider),
                    300,
                    Ev::RiderApp {
                        rider,
                        input: AppIn::Message {
                            node,
                            session,
                            message,
                        },
                    },
                );
            }
            SearchEffect::Lock {
                driver,
                node: None,
                offer_id,
                holder,
                timeout,
                not_after,
            } => {
                let d = driver_index(&driver);
                let request = LockRequest {
                    offer_id,
                    holder,
                    timeout,
                    not_after,
                    reply: ReplyTo::Matcher,
                };
                self.matcher_to_driver(node, inc, d, DriverEvent::TryLock(request));
            }
            SearchEffect::Lock {
                driver,
                node: Some(to),
                offer_id,
                mut holder,
                timeout,
                not_after,
            } => {
                let to = self.node_index(&to);
                let d = driver_index(&driver);
                let left = not_after.saturating_duration_since(self.now);
                holder.node = Some(self.nodes[node].id.clone());
                holder.incarnation = u64::from(self.nodes[node].inc) + 1;
                holder.first_offer_since = None;
                let request = LockRequest {
                    offer_id,
                    holder,
                    timeout,
                    not_after: self.now + left,
                    reply: ReplyTo::Node(self.nodes[node].id.clone()),
                };
                // The deadline is carried as time left, counted again from
                // the receipt (as `search_left_ms` is).
                self.wire(node, to, Wire::Lock(d, request, left));
            }
            SearchEffect::Cancel {
                driver,
                node: None,
                offer_id,
                fencing_token,
                why,
            } => {
                self.preemptions += u64::from(why == Ending::Preempted);
                let d = driver_index(&driver);
                self.matcher_to_driver(
                    node,
                    inc,
                    d,
                    DriverEvent::CancelOffer {
                        offer_id,
                        fencing_token,
                        why,
                    },
                );
            }
            SearchEffect::GroupNews {
                driver,
                node: Some(to),
                offer_id,
                fencing_token,
                accepted,
                trip_id,
            } => {
                let to = self.node_index(&to);
                let d = driver_index(&driver);
                let event = DriverEvent::group_news(offer_id, fencing_token, accepted, trip_id);
                self.wire(node, to, Wire::Driver(d, event));
            }
            SearchEffect::Wound {
                started_ago,
                pickup,
                radius_m,
            } => {
                // On the drivers channel: every other node hears it (all
                // nodes' clocks agree here).
                let started_unix_ms = self.unix_ms(self.now) - started_ago.as_millis() as u64;
                for to in 0..self.nodes.len() {
                    if to != node {
                        let input = MatcherIn::Wounded {
                            from: node,
                            started_unix_ms,
                            pickup,
                            radius_m,
                        };
                        self.wire(node, to, Wire::Matcher(input));
                    }
                }
            }
            SearchEffect::TripBooked { driver } => {
                // Every node's actor of the driver, this one's too.
                let d = driver_index(&driver);
                for to in 0..self.nodes.len() {
                    if to == node {
                        self.matcher_to_driver(node, inc, d, DriverEvent::LookUpTrip);
                    } else {
                        self.wire(node, to, Wire::Driver(d, DriverEvent::LookUpTrip));
                    }
                }
            }
            SearchEffect::ConfirmGroup {
                group,
                attempt,
                members,
                keep,
            } => {
                let asker = Asker::Group {
                    node,
                    inc,
                    group,
                    attempt,
                };
                self.call_group(asker, members, keep);
            }
            SearchEffect::GroupNews {
                driver,
                node: None,
                offer_id,
                fencing_token,
                accepted,
                trip_id,
            } => {
                let d = driver_index(&driver);
                let event = DriverEvent::group_news(offer_id, fencing_token, accepted, trip_id);
                self.matcher_to_driver(node, inc, d, event);
            }
            SearchEffect::Cancel {
                driver,
                node: Some(to),
                offer_id,
                fencing_token,
                why,
            } => {
                let to = self.node_index(&to);
                let d = driver_index(&driver);
                self.wire(
                    node,
                    to,
                    Wire::Driver(
                        d,
                        DriverEvent::CancelOffer {
                            offer_id,
                            fencing_token,
                            why,
                        },
                    ),
                );
            }
            SearchEffect::Settle {
                driver,
                owner,
                ticket,
            } => {
                self.call(
                    Asker::Matcher { node, inc, ticket },
                    driver.to_string(),
                    RedisOp::Settle { owner },
                );
            }
        }
        Ok(())
    }

    /// Hands `event` from node `node`'s matcher (process `inc`) to its own
    /// actor of driver `d`, in order on that channel.
    fn matcher_to_driver(&mut self, node: usize, inc: u32, d: usize, event: DriverEvent) {
        self.lane(
            lane_matcher(node),
            lane_driver(node, d),
            200,
            Ev::ToDriver {
                node,
                inc,
                driver: d,
                event,
            },
        );
    }

    /// The wall clock at `now`, in ms since the Unix epoch (every node's
    /// is the same here).
    pub fn unix_ms(&self, now: Instant) -> u64 {
        1_800_000_000_000 + (now - self.base).as_millis() as u64
    }

    pub fn node_index(&self, id: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| &*n.id == id)
            .expect("a known node")
    }

    // ----- driver actors -----

    pub fn driver_in(
        &mut self,
        node: usize,
        driver: usize,
        event: DriverEvent,
    ) -> Result<(), String> {
        let now = self.now;
        let inc = self.nodes[node].inc;
        let cluster = self.is_cluster();
        let id = self.nodes[node].id.clone();
        let booking = match self.nodes[node].drivers.get_mut(&driver) {
            Some(b) => b,
            None => match &event {
                // A lock request for a driver with no actor here is refused
                // as it drops; anything else has no one to go to, except an
                // attach, which makes the actor.
                DriverEvent::TryLock(request) => {
                    let answer = LockAnswer::refused(
                        driver_name(driver),
                        request.offer_id,
                        &request.holder,
                        LockRefused::Offline,
                    );
                    return self.answer(node, request.reply.clone(), answer);
                }
                // A cancel that reaches no actor tells the matcher so.
                DriverEvent::CancelOffer { offer_id, .. } => {
                    let input = MatcherIn::Undeliverable {
                        driver: driver_name(driver),
                        offer_id: *offer_id,
                    };
                    let inc = self.nodes[node].inc;
                    self.at(
                        Duration::from_micros(50),
                        Ev::ToMatcher { node, inc, input },
                    );
                    return Ok(());
                }
                DriverEvent::Attach { .. } => {
                    let ids = self.nodes[node].ids.clone();
                    let mut b = Booking::new(
                        driver_name(driver),
                        ids,
                        cluster.then(|| id.clone()),
                        LOCATION_MAX_AGE,
                    );
                    if let Some(areas) = &self.areas {
                        b.serve_only(areas.clone());
                    }
                    self.next_actor += 1;
                    self.nodes[node].actors.insert(driver, self.next_actor);
                    self.nodes[node].drivers.entry(driver).or_insert(b)
                }
                _ => return Ok(()),
            },
        };
        booking.handle(now, event.clone());
        self.note(|| format!("n{node}/d{driver} <- {event:?}"));
        // Carrying out an effect never feeds the actor here (no outbox
        // fills up), so one round drains it.
        while let Some(effects) = self.nodes[node]
            .drivers
            .get_mut(&driver)
            .map(|b| b.take_effects())
            .filter(|effects| !effects.is_empty())
        {
            for effect in effects {
                self.driver_effect(node, inc, driver, effect)?;
            }
        }
        if let Some(next) = self.nodes[node]
            .drivers
            .get(&driver)
            .and_then(|b| b.next_timeout())
        {
            let scheduled = self.nodes[node].driver_tick_at.get(&driver).copied();
            if scheduled.is_none_or(|at| at <= now || next < at) {
                self.nodes[node].driver_tick_at.insert(driver, next);
                self.at(
                    next.saturating_duration_since(now),
                    Ev::ToDriver {
                        node,
                        inc,
                        driver,
                        event: DriverEvent::Tick,
                    },
                );
            }
        }
        self.ledger.check_driver(self, driver)?;
        Ok(())
    }

    pub fn answer(
        &mut self,
        node: usize,
        to: ReplyTo,
        mut answer: LockAnswer,
    ) -> Result<(), String> {
        let d = driver_index(&answer.driver_id);
        match to {
            ReplyTo::Matcher => {
                let inc = self.nodes[node].inc;
                self.lane(
                    lane_driver(node, d),
                    lane_matcher(node),
                    200,
                    Ev::ToMatcher {
                        node,
                        inc,
                        input: MatcherIn::Answer(answer),
                    },
                );
            }
            ReplyTo::Node(to) => {
                let to = self.node_index(&to);
                self.wire(
                    node,
                    to,
                    Wire::Matcher(MatcherIn::Answer({
                        answer.node = Some(self.nodes[node].id.clone());
                        answer
                    })),
                );
            }
        }
        Ok(())
    }

    /// Carries out one effect of a driver actor; whether the app's
    /// connection turned out full (never, here).
    pub fn driver_effect(
        &mut self,
        node: usize,
        inc: u32,
        driver: usize,
        effect: DriverEffect,
    ) -> Result<bool, String> {
        self.note(|| format!("n{node}/d{driver} -> {effect:?}"));
        match effect {
            DriverEffect::UseSession(session) => {
                if let Some(old) = self.nodes[node].driver_sessions.insert(driver, session) {
                    if old != session {
                        self.close_driver_conn(node, driver, old);
                    }
                }
            }
            DriverEffect::DropSession(session) => {
                if self.nodes[node].driver_sessions.get(&driver) == Some(&session) {
                    self.nodes[node].driver_sessions.remove(&driver);
                }
                self.close_driver_conn(node, driver, session);
            }
            DriverEffect::Tell(message) => {
                if let Some(&session) = self.nodes[node].driver_sessions.get(&driver) {
                    self.ledger
                        .driver_told(self.now, driver, &message, &self.settings)?;
                    self.lane(
                        lane_driver(node, driver),
                        lane_driver_app(driver),
                        300,
                        Ev::DriverApp {
                            driver,
                            input: AppIn::Message {
                                node,
                                session,
                                message,
                            },
                        },
                    );
                }
            }
            DriverEffect::Answer { to, answer } => self.answer(node, to, answer)?,
            DriverEffect::Ended { to, outcome, .. } => {
                let mut ledger = std::mem::take(&mut self.ledger);
                let booked = ledger.offer_ended(self, node, driver, &outcome);
                self.ledger = ledger;
                booked?;
                match to {
                    None => self.lane(
                        lane_driver(node, driver),
                        lane_matcher(node),
                        200,
                        Ev::ToMatcher {
                            node,
                            inc,
                            input: MatcherIn::Ended(outcome),
                        },
                    ),
                    Some(to) => {
                        let to = self.node_index(&to);
                        self.wire(node, to, Wire::Matcher(MatcherIn::Ended(outcome)));
                    }
                }
            }
            DriverEffect::Held(outcome, token, None) => {
                self.lane(
                    lane_driver(node, driver),
                    lane_matcher(node),
                    200,
                    Ev::ToMatcher {
                        node,
                        inc,
                        input: MatcherIn::Held(outcome, token),
                    },
                );
            }
            DriverEffect::Held(outcome, token, Some(to)) => {
                let to = self.node_index(&to);
                self.wire(node, to, Wire::Matcher(MatcherIn::Held(outcome, token)));
            }
            DriverEffect::Indexed { at, announce } => {
                self.lane(
                    lane_driver(node, driver),
                    lane_matcher(node),
                    200,
                    Ev::ToMatcher {
                        node,
                        inc,
                        input: MatcherIn::DriverChanged {
                            driver: driver_name(driver),
                            at,
                        },
                    },
                );
                if self.nodes.len() > 1 && announce {
                    let name = driver_name(driver);
                    let waiting = &mut self.nodes[node].announcements;
                    if waiting.is_empty() {
                        let inc = self.nodes[node].inc;
                        self.at(ANNOUNCE_BATCH, Ev::Announce { node, inc });
                    }
                    let waiting = &mut self.nodes[node].announcements;
                    waiting.retain(|(d, _)| *d != name);
                    waiting.push((name, at));
                }
            }
            DriverEffect::LeftOnTrip => {
                for to in 0..self.nodes.len() {
                    if to != node {
                        self.wire(node, to, Wire::Driver(driver, DriverEvent::LookUpTrip));
                    }
                }
            }
            DriverEffect::Attached => {
                for to in 0..self.nodes.len() {
                    if to != node {
                        self.wire(
                            node,
                            to,
                            Wire::Driver(driver, DriverEvent::ConnectedElsewhere),
                        );
                    }
                }
            }
            DriverEffect::Redis(op) => {
                let actor = self.nodes[node].actors.get(&driver).copied().unwrap_or(0);
                self.call(
                    Asker::Driver {
                        node,
                        inc,
                        driver,
                        actor,
                    },
                    driver_name(driver).to_string(),
                    op,
                );
            }
            DriverEffect::Retire => {
                self.nodes[node].drivers.remove(&driver);
                self.nodes[node].driver_tick_at.remove(&driver);
            }
        }
        Ok(false)
    }

    fn close_driver_conn(&mut self, node: usize, driver: usize, session: u64) {
        self.lane(
            lane_driver(node, driver),
            lane_driver_app(driver),
            300,
            Ev::DriverApp {
                driver,
                input: AppIn::Closed { node, session },
            },
        );
    }

    // ----- the network between nodes -----

    /// `node`'s publisher sends its waiting announcements to every other
    /// node, as one message each.
    fn announce(&mut self, node: usize) {
        let changes = std::mem::take(&mut self.nodes[node].announcements);
        if changes.is_empty() {
            return;
        }
        for to in 0..self.nodes.len() {
            if to != node {
                let input = MatcherIn::RemoteDrivers {
                    from: node,
                    changes: changes.clone(),
                };
                self.wire(node, to, Wire::Matcher(input));
            }
        }
    }

    /// A message between nodes over pub/sub: at most once, and with faults
    /// lost, late or twice.
    pub fn wire(&mut self, from: usize, to: usize, message: Wire) {
        // Announcements waiting go first, as the publisher sends them ahead
        // of any other message.
        if !matches!(message, Wire::Matcher(MatcherIn::RemoteDrivers { .. })) {
            self.announce(from);
        }
        let inc = self.nodes[to].inc;
        let ev = |message: Wire| match message {
            Wire::Matcher(input) => Ev::ToMatcher {
                node: to,
                inc,
                input,
            },
            Wire::Driver(driver, event) => Ev::ToDriver {
                node: to,
                inc,
                driver,
                event,
            },
            // The deadline is set below, counted from the receipt.
            Wire::Lock(driver, request, _) => Ev::ToDriver {
                node: to,
                inc,
                driver,
                event: DriverEvent::TryLock(request),
            },
        };
        let faulty = self.shape.faults && !self.quiet;
        let copies = if faulty && self.rng.random_bool(0.02) {
            self.faults_injected += 1;
            0
        } else if faulty && self.rng.random_bool(0.01) {
            self.faults_injected += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let mut delay = Duration::from_micros(self.rng.random_range(300..5_000));
            if faulty && self.rng.random_bool(0.02) {
                self.faults_injected += 1;
                delay += Duration::from_millis(self.rng.random_range(100..3_000));
            }
            let mut event = ev(message.clone());
            // The time left is counted from the receipt.
            if let (
                Ev::ToDriver {
                    event: DriverEvent::TryLock(request),
                    ..
                },
                Wire::Lock(_, sent, left),
            ) = (&mut event, &message)
            {
                // Counted from the receipt, and cut to the deadline by the
                // wall clock (all nodes' clocks agree here).
                request.not_after = (self.now + delay + *left).min(sent.not_after);
            }
            self.at(delay, event);
        }
    }

    // ----- Redis -----

    /// Asks every server `op` for `asker`.
    pub fn call(&mut self, asker: Asker, driver: String, op: RedisOp) {
        if let RedisOp::FinishTrip { trip_id, attempt } = op {
            // Read the record where it is, then finish under its owner on
            // every server (the read is modelled as instant, and the answer
            // as the majority's: found and a majority up, not found by a
            // majority, or can't tell).
            let up = self.servers.iter().filter(|s| s.up).count();
            let majority = up >= ridelock::cluster::redlock::quorum(self.servers.len());
            let owner = self
                .servers
                .iter()
                .filter(|s| s.up)
                .filter_map(|s| s.recorded_trip(&driver, self.now))
                .find(|record| record.trip_id == trip_id)
                .map(|record| record.owner);
            let done = match &owner {
                Some(_) if majority => Some(true),
                None if majority => Some(false),
                _ => None,
            };
            if let Some(owner) = owner {
                for server in 0..self.servers.len() {
                    let op = ServerOp::Finish {
                        driver: driver.clone(),
                        owner: owner.clone(),
                        trip_id,
                    };
                    self.send_server_op(server, 0, op);
                }
            }
            if let Asker::Driver {
                node,
                inc,
                driver: d,
                actor,
            } = asker
            {
                let reply = RedisReply::TripFinished {
                    trip_id,
                    attempt,
                    done,
                };
                self.at(
                    Duration::from_millis(1),
                    Ev::RedisToDriver {
                        node,
                        inc,
                        driver: d,
                        actor,
                        reply,
                    },
                );
            }
            return;
        }
        self.next_call += 1;
        let id = self.next_call;
        let servers = self.servers.len();
        self.calls.insert(
            id,
            Call {
                asker,
                op,
                answers: vec![None; servers],
                started: self.now,
                attempt: 1,
                unanswered_before: Vec::new(),
                done: false,
                driver,
                group: None,
            },
        );
        self.send_round(id);
    }

    /// Asks every server to book group `members` for `asker`.
    pub fn call_group(&mut self, asker: Asker, members: Vec<GroupMember>, keep: Duration) {
        self.next_call += 1;
        let id = self.next_call;
        let servers = self.servers.len();
        self.calls.insert(
            id,
            Call {
                asker,
                op: RedisOp::CurrentTrip,
                answers: vec![None; servers],
                started: self.now,
                attempt: 1,
                unanswered_before: Vec::new(),
                done: false,
                driver: String::new(),
                group: Some((members, keep)),
            },
        );
        self.send_round(id);
    }

    fn send_round(&mut self, id: u64) {
        let call = &self.calls[&id];
        let ops: Vec<ServerOp> = match &call.group {
            Some((members, keep)) => vec![
                ServerOp::ConfirmGroup {
                    members: members.clone(),
                    keep: *keep,
                };
                self.servers.len()
            ],
            None => server_ops(&call.op, &call.driver, self.servers.len()),
        };
        let attempt = call.attempt;
        for (server, op) in ops.into_iter().enumerate() {
            self.send_server_op(server, id << 8 | u64::from(attempt), op);
        }
        self.at(REDIS_TIMEOUT, Ev::CallTimeout { call: id, attempt });
    }

    pub fn send_server_op(&mut self, server: usize, call: u64, op: ServerOp) {
        let faulty = self.shape.faults && !self.quiet;
        let (lost_request, reply) = if faulty && self.rng.random_bool(0.01) {
            self.faults_injected += 1;
            (true, ReplyFate::Lost)
        } else if faulty && self.rng.random_bool(0.01) {
            self.faults_injected += 1;
            (false, ReplyFate::Lost)
        } else if faulty && self.rng.random_bool(0.01) {
            self.faults_injected += 1;
            (false, ReplyFate::Late)
        } else {
            (false, ReplyFate::OnTime)
        };
        if lost_request || !self.servers[server].up {
            return;
        }
        let delay = Duration::from_micros(self.rng.random_range(100..2_000));
        self.at(
            delay,
            Ev::ServerOp {
                server,
                call,
                op,
                reply,
            },
        );
    }

    fn server_op(
        &mut self,
        server: usize,
        call: u64,
        op: ServerOp,
        fate: ReplyFate,
    ) -> Result<(), String> {
        if !self.servers[server].up {
            return Ok(());
        }
        let answer = self.servers[server].apply(&op, self.now);
        self.note(|| format!("server {server} (call {}): {op:?} -> {answer:?}", call >> 8));
        if let (ServerOp::Confirm { driver, record }, ServerReply::Done(true)) = (&op, &answer) {
            // Booked once a majority of servers recorded it.
            let quorum = ridelock::cluster::redlock::quorum(self.servers.len());
            let d = driver_index(driver);
            let mut ledger = std::mem::take(&mut self.ledger);
            let booked = ledger.confirmed(self, server, quorum, d, record);
            self.ledger = ledger;
            booked?;
        }
        if let (ServerOp::ConfirmGroup { members, .. }, ServerReply::Done(true)) = (&op, &answer) {
            // Every member booked at once, on this server.
            let quorum = ridelock::cluster::redlock::quorum(self.servers.len());
            let mut ledger = std::mem::take(&mut self.ledger);
            let booked = members.iter().try_for_each(|m| {
                ledger.confirmed(self, server, quorum, driver_index(&m.driver), &m.trip)
            });
            self.ledger = ledger;
            booked?;
        }
        let delay = match fate {
            ReplyFate::OnTime => Duration::from_micros(self.rng.random_range(100..2_000)),
            ReplyFate::Late => REDIS_TIMEOUT + Duration::from_millis(self.rng.random_range(1..500)),
            ReplyFate::Lost => return Ok(()),
        };
        self.at(
            delay,
            Ev::ServerReply {
                call,
                server,
                reply: answer,
            },
        );
        Ok(())
    }

    fn server_reply(&mut self, tag: u64, server: usize, reply: ServerReply) -> Result<(), String> {
        let (id, attempt) = (tag >> 8, (tag & 0xFF) as u32);
        let Some(call) = self.calls.get_mut(&id) else {
            return Ok(());
        };
        if call.done || call.attempt != attempt || self.now > call.started + REDIS_TIMEOUT {
            return Ok(()); // past the per-server timeout: as if lost
        }
        call.answers[server] = Some(reply);
        if call.answers.iter().all(Option::is_some) {
            self.conclude(id)?;
        }
        Ok(())
    }

    fn call_timeout(&mut self, id: u64, attempt: u32) -> Result<(), String> {
        match self.calls.get(&id) {
            Some(call) if !call.done && call.attempt == attempt => self.conclude(id),
            _ => Ok(()),
        }
    }

    fn split_retry(&mut self, id: u64) {
        if let Some(call) = self.calls.get_mut(&id) {
            call.attempt += 1;
            call.done = false;
            call.started = self.now;
            call.answers = vec![None; call.answers.len()];
            self.send_round(id);
        }
    }

    /// Every server answered or the timeout passed: the Redlock verdict.
    fn conclude(&mut self, id: u64) -> Result<(), String> {
        let servers = self.servers.len();
        let call = self.calls.get_mut(&id).expect("a call");
        let unanswered: Vec<usize> = (0..servers)
            .filter(|s| call.answers[*s].is_none())
            .collect();
        if call.group.is_some() {
            let verdict = majority_did(&bools(&call.answers));
            let call = self.calls.remove(&id).expect("a call");
            let Asker::Group {
                node,
                inc,
                group,
                attempt,
            } = call.asker
            else {
                unreachable!("groups are booked by matchers")
            };
            self.lane(
                lane_redis(id),
                lane_matcher(node),
                100,
                Ev::ToMatcher {
                    node,
                    inc,
                    input: MatcherIn::GroupConfirmed(group, attempt, verdict),
                },
            );
            return Ok(());
        }
        let reply = match &call.op {
            RedisOp::Acquire { ttl, owner, .. } => {
                let tokens: Vec<u64> = call
                    .answers
                    .iter()
                    .filter_map(|a| match a {
                        Some(ServerReply::Token(Some(t))) => Some(*t),
                        _ => None,
                    })
                    .collect();
                // Elapsed counts from this attempt's start.
                let attempt_started = call.started;
                let elapsed = self.now - attempt_started;
                match judge(tokens.len(), servers, *ttl, elapsed) {
                    Ok(validity) => RedisReply::Acquired(Ok((
                        tokens.iter().copied().max().unwrap_or(0),
                        validity,
                    ))),
                    Err(reason) => {
                        let owner = owner.clone();
                        let driver = call.driver.clone();
                        let first = call.attempt == 1;
                        let split = matches!(reason, AttemptFailed::NoQuorum { granted, .. } if granted > 0);
                        let mut all_unanswered = call.unanswered_before.clone();
                        all_unanswered.extend(unanswered.iter().copied());
                        // Released everywhere; a split vote is tried once more.
                        for s in 0..servers {
                            self.send_server_op(
                                s,
                                0,
                                ServerOp::Release {
                                    driver: driver.clone(),
                                    owner: owner.clone(),
                                },
                            );
                        }
                        let call = self.calls.get_mut(&id).expect("a call");
                        if first && split {
                            call.unanswered_before = unanswered;
                            // Waiting for the retry: nothing of this attempt
                            // counts any more.
                            call.done = true;
                            let delay = Duration::from_millis(self.rng.random_range(0..50));
                            self.at(delay, Ev::SplitRetry { call: id });
                            return Ok(());
                        }
                        // Given up for good: settle the owner where the
                        // attempt may still land.
                        for s in all_unanswered {
                            self.send_server_op(
                                s,
                                0,
                                ServerOp::Settle {
                                    driver: driver.clone(),
                                    owner: owner.clone(),
                                },
                            );
                        }
                        let unreachable = unanswered.len();
                        let refusal = match reason {
                            AttemptFailed::NoQuorum {
                                granted, servers, ..
                            } if granted + unreachable < servers => LockRefused::HeldElsewhere,
                            _ => LockRefused::StoreUnavailable,
                        };
                        RedisReply::Acquired(Err(refusal))
                    }
                }
            }
            RedisOp::Release { .. } => RedisReply::Freed,
            RedisOp::Finish { .. } => {
                let answered = call.answers.iter().filter(|a| a.is_some()).count();
                RedisReply::Finished(answered >= ridelock::cluster::redlock::quorum(servers))
            }
            RedisOp::Confirm { .. } => RedisReply::Confirmed(majority_did(&bools(&call.answers))),
            RedisOp::Hold { .. } => RedisReply::HoldKept(majority_did(&bools(&call.answers))),
            RedisOp::Renew { record, .. } => RedisReply::Renewed {
                owner: record.owner.clone(),
                verdict: renewal_verdict(&renewals(&call.answers)),
            },
            RedisOp::Settle { .. } => {
                let trips: Vec<Option<Option<u64>>> = call
                    .answers
                    .iter()
                    .map(|a| match a {
                        Some(ServerReply::Trip(t)) => Some(*t),
                        _ => None,
                    })
                    .collect();
                RedisReply::Settled(settle_verdict(&trips))
            }
            RedisOp::FinishTrip { .. } => unreachable!("done in `call`"),
            RedisOp::CurrentTrip => {
                let records = call
                    .answers
                    .iter()
                    .map(|a| match a {
                        Some(ServerReply::Record(r)) => Some(r.clone()),
                        _ => None,
                    })
                    .collect();
                RedisReply::CurrentTrip(current_trip_verdict(records, |a, b| {
                    a.trip_id == b.trip_id && a.owner == b.owner
                }))
            }
        };
        let call = self.calls.remove(&id).expect("a call");
        match call.asker {
            Asker::Driver {
                node,
                inc,
                driver,
                actor,
            } => {
                self.lane(
                    lane_redis(id),
                    lane_driver(node, driver),
                    100,
                    Ev::RedisToDriver {
                        node,
                        inc,
                        driver,
                        actor,
                        reply,
                    },
                );
            }
            Asker::Group { .. } => unreachable!("answered above"),
            Asker::Matcher { node, inc, ticket } => {
                let RedisReply::Settled(outcome) = reply else {
                    unreachable!("matchers only settle")
                };
                self.lane(
                    lane_redis(id),
                    lane_matcher(node),
                    100,
                    Ev::ToMatcher {
                        node,
                        inc,
                        input: MatcherIn::Settled(ticket, outcome),
                    },
                );
            }
        }
        Ok(())
    }

    // ----- liveness -----

    fn liveness(&mut self, node: usize, inc: u32) {
        let n = &self.nodes[node];
        if !n.up || n.inc != inc {
            return;
        }
        if !n.paused {
            let id = n.id.clone();
            for s in 0..self.servers.len() {
                let op = ServerOp::Alive {
                    node: id.to_string(),
                    ttl: ALIVE_TTL,
                    incarnation: u64::from(inc) + 1,
                };
                self.send_server_op(s, 0, op);
            }
            // Which processes are alive, as the first server that is up
            // sees it: one that lapsed or changed is gone, a new one loaded.
            if let Some(server) = self.servers.iter().position(|s| s.up) {
                for other in 0..self.nodes.len() {
                    if other == node {
                        continue;
                    }
                    let other_id = self.nodes[other].id.clone();
                    let op = ServerOp::IsAlive {
                        node: other_id.to_string(),
                    };
                    let ServerReply::Incarnation(now_alive) =
                        self.servers[server].apply(&op, self.now)
                    else {
                        unreachable!("IsAlive says an incarnation")
                    };
                    let believed = self.nodes[node].live[other];
                    if believed == now_alive {
                        continue;
                    }
                    self.nodes[node].live[other] = now_alive;
                    if let Some(old) = believed {
                        self.at(
                            Duration::from_micros(50),
                            Ev::ToMatcher {
                                node,
                                inc,
                                input: MatcherIn::NodeGone(other),
                            },
                        );
                        let mut drivers: Vec<usize> =
                            self.nodes[node].drivers.keys().copied().collect();
                        drivers.sort_unstable();
                        for d in drivers {
                            let event = DriverEvent::HolderNodeGone {
                                node: other_id.clone(),
                                incarnation: old,
                            };
                            self.at(
                                Duration::from_micros(60),
                                Ev::ToDriver {
                                    node,
                                    inc,
                                    driver: d,
                                    event,
                                },
                            );
                        }
                    }
                    if now_alive.is_some() {
                        self.at(
                            Duration::from_micros(70),
                            Ev::ToMatcher {
                                node,
                                inc,
                                input: MatcherIn::NodeBack(other),
                            },
                        );
                    }
                }
            }
        }
        self.at(ALIVE_REFRESH, Ev::Liveness { node, inc });
    }
}

/// A message between nodes.
#[derive(Clone, Debug)]
pub enum Wire {
    Matcher(MatcherIn),
    Driver(usize, DriverEvent),
    Lock(usize, LockRequest, Duration),
}

fn renewals(answers: &[Option<ServerReply>]) -> Vec<Option<Renewal>> {
    answers
        .iter()
        .map(|a| match a {
            Some(ServerReply::Renewal(r)) => Some(*r),
            _ => None,
        })
        .collect()
}

fn bools(answers: &[Option<ServerReply>]) -> Vec<Option<bool>> {
    answers
        .iter()
        .map(|a| match a {
            Some(ServerReply::Done(done)) => Some(*done),
            _ => None,
        })
        .collect()
}

fn server_ops(op: &RedisOp, driver: &str, servers: usize) -> Vec<ServerOp> {
    let driver = driver.to_string();
    let one = match op {
        RedisOp::Acquire { owner, ttl, floor } => ServerOp::Acquire {
            driver,
            owner: owner.clone(),
            ttl: *ttl,
            floor: *floor,
        },
        RedisOp::Release { owner } => ServerOp::Release {
            driver,
            owner: owner.clone(),
        },
        RedisOp::Confirm { record } => ServerOp::Confirm {
            driver,
            record: record.clone(),
        },
        RedisOp::Settle { owner } => ServerOp::Settle {
            driver,
            owner: owner.clone(),
        },
        RedisOp::Renew { record, repair } => ServerOp::Renew {
            driver,
            record: record.clone(),
            repair: *repair,
        },
        RedisOp::Finish { owner, trip_id } => ServerOp::Finish {
            trip_id: *trip_id,
            driver,
            owner: owner.clone(),
        },
        RedisOp::CurrentTrip => ServerOp::CurrentTrip { driver },
        RedisOp::Hold { owner, ttl, token } => ServerOp::Hold {
            driver,
            owner: owner.clone(),
            ttl: *ttl,
            token: *token,
        },
        RedisOp::FinishTrip { .. } => unreachable!("done by the caller"),
    };
    vec![one; servers]
}

pub fn new_node(
    n: usize,
    inc: u32,
    settings: &SearchSettings,
    areas: Option<&Arc<ServiceAreas>>,
    cluster: bool,
    nodes: usize,
) -> Node {
    let id: NodeId = format!("n{n}").into();
    // Offer and trip ids unique across nodes and restarts, as the random
    // starting points of `Ids::for_cluster` make them.
    let base = (n as u64 * 64 + u64::from(inc)) << 32;
    let ids = Arc::new(Ids::starting_at(base, base));
    let mut searches = Searches::new(settings.clone(), ids.clone(), cluster.then(|| id.clone()));
    if let Some(areas) = areas {
        searches.serve_only(areas.clone());
    }
    Node {
        searches,
        id,
        inc,
        up: true,
        paused: false,
        held: Vec::new(),
        drivers: HashMap::new(),
        driver_sessions: HashMap::new(),
        actors: HashMap::new(),
        // Every node starts as its first process.
        live: vec![Some(1); nodes],
        ids,
        tick_at: None,
        announcements: Vec::new(),
        driver_tick_at: HashMap::new(),
    }
}

// FIFO lanes: an id per endpoint.
pub fn lane_matcher(node: usize) -> u64 {
    1 << 40 | node as u64
}
pub fn lane_driver(node: usize, driver: usize) -> u64 {
    2 << 40 | (node as u64) << 20 | driver as u64
}
pub fn lane_driver_app(driver: usize) -> u64 {
    3 << 40 | driver as u64
}
pub fn lane_rider(rider: usize) -> u64 {
    4 << 40 | rider as u64
}
pub fn lane_redis(call: u64) -> u64 {
    5 << 40 | (call & 0xFF_FFFF)
}
