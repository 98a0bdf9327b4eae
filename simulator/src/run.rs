//! One simulation run: ramp the drivers up, send riders at the planned rate
//! for the steady phase, drain, and report.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::rngs::SmallRng;
use rand::Rng;
use rand::SeedableRng;
use ridelock::auth::Role;
use ridelock::location::LatLon;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;

use crate::args::{Plan, RiderMode};
use crate::arrivals::Poisson;
use crate::city::City;
use crate::driver;
use crate::events::{Event, EventSink};
use crate::flood;
use crate::net::{self, Target};
use crate::ops_watch;
use crate::report::{EngineFigures, Report};
use crate::rider::{self, Order, Phase};
use crate::stats::Stats;
use crate::totals::{SteadyRates, Totals};

/// The engine's counter of location updates it took in.
const ENGINE_LOCATION_COUNTER: &str = "ridelock_location_updates_total";
/// The engine's own request→offer histogram.
const ENGINE_REQUEST_TO_OFFER: &str = "ridelock_request_to_offer_seconds";
/// Orders a rider connection may have queued before arrivals are dropped.
const ORDER_QUEUE: usize = 1024;

/// Most riders connected at once with `--riders person`: each is a file
/// descriptor here and in the engine; arrivals past it are dropped (and
/// counted) rather than failing to connect.
const MAX_PERSONS: usize = 10_000;

/// What every virtual client shares.
pub struct Shared {
    pub plan: Plan,
    /// The engine's nodes (one unless it is a cluster).
    pub targets: Vec<Target>,
    pub city: City,
    pub stats: Stats,
    /// Driver plus rider connections (or person slots), for spreading source
    /// addresses.
    pub total_connections: usize,
    /// The secret tokens are minted with; `None` for an engine in open mode.
    pub secret: Option<Vec<u8>>,
    /// `--riders person`: places for riders connected at once.
    pub person_slots: Arc<Semaphore>,
    /// How many such places there are.
    pub person_slots_total: usize,
}

/// Counters at one instant, for rates over a window.
#[derive(Clone)]
struct Snapshot {
    at: Instant,
    requests: u64,
    matches: u64,
    locations: u64,
    engine_locations: Option<f64>,
    engine_request_to_offer: Option<Vec<(f64, f64)>>,
    engine_cpu_s: Option<f64>,
    ops_bytes: u64,
}

impl Shared {
    /// The node client `n` (drivers first, then riders) connects to.
    pub fn target_for(&self, n: usize) -> &Target {
        &self.targets[n % self.targets.len()]
    }

    /// The path to connect to as `id` in `role`, and the token to send: the
    /// id in the URL for an engine in open mode, else a token for it.
    pub fn credentials(&self, role: Role, id: &str) -> (String, Option<String>) {
        let endpoint = match role {
            Role::Driver => "/ws/driver",
            Role::Ops => "/ws/ops",
            Role::Rider => "/ws/rider",
        };
        match &self.secret {
            Some(secret) => (
                endpoint.to_string(),
                Some(ridelock::auth::mint(secret, role, id, self.token_ttl())),
            ),
            None => (format!("{endpoint}?id={id}"), None),
        }
    }

    /// The source address of this process's connection number `local`:
    /// numbered after the workers before this one, so that the workers'
    /// connections spread over the loopback addresses together as one
    /// process's would (each node takes at most so many from one address).
    pub fn source_for(&self, target: &Target, local: usize) -> Option<std::net::IpAddr> {
        let base = self.plan.worker_index * self.total_connections;
        let total = self.total_connections * self.plan.worker_count.max(1);
        target.source_for(base + local, total)
    }

    /// Tokens outlive the whole run.
    fn token_ttl(&self) -> Duration {
        self.plan.ramp + self.plan.duration + self.plan.drain + Duration::from_secs(600)
    }
}

/// The buckets of the engine's request→offer histogram, summed over its
/// nodes (`None` if a node's `/metrics` can't be read).
pub(crate) async fn engine_request_to_offer(targets: &[Target]) -> Option<Vec<(f64, f64)>> {
    let mut scrapes = String::new();
    for target in targets {
        scrapes += &target.http_get("/metrics").await.ok()?;
    }
    Some(net::histogram_buckets(&scrapes, ENGINE_REQUEST_TO_OFFER))
}

/// The engine's own request→offer p50 and p99 (ms) over a window, from its
/// histogram's buckets at the window's start and end: the ramp's
/// connection storm before it is left out, as the simulator's own figures
/// leave it out.
pub(crate) fn engine_request_to_offer_ms(
    start: Option<&[(f64, f64)]>,
    end: Option<&[(f64, f64)]>,
) -> Option<(f64, f64)> {
    let (start, end) = (start?, end?);
    Some((
        net::quantile_between(start, end, 0.5)?,
        net::quantile_between(start, end, 0.99)?,
    ))
}

/// Sums `f` over the engine's processes; `None` if any is unknown.
pub(crate) fn over_pids(pids: &[u32], f: impl Fn(u32) -> Option<f64>) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&pid| f(pid)).sum()
}

/// The engine's location counter summed over its nodes.
pub(crate) async fn engine_locations(targets: &[Target]) -> Option<f64> {
    let mut total = 0.0;
    for target in targets {
        let body = target.http_get("/metrics").await.ok()?;
        total += net::metric_value(&body, ENGINE_LOCATION_COUNTER)?;
    }
    Some(total)
}

async fn snapshot(shared: &Shared, engine_pids: &[u32]) -> Snapshot {
    let engine_locations = engine_locations(&shared.targets).await;
    Snapshot {
        at: Instant::now(),
        requests: shared.stats.requests.get(),
        matches: shared.stats.matches.get(),
        locations: shared.stats.locations_sent.get(),
        engine_locations,
        engine_request_to_offer: engine_request_to_offer(&shared.targets).await,
        engine_cpu_s: over_pids(engine_pids, net::cpu_seconds),
        ops_bytes: shared.stats.ops_bytes.get(),
    }
}

/// Runs the plan against the engine and reports; `secret` mints the clients'
/// tokens (`None` for an engine in open mode).
pub async fn run(
    plan: Plan,
    secret: Option<Vec<u8>>,
    engine_pids: &[u32],
    show_progress: bool,
) -> anyhow::Result<Report> {
    let open_files = net::raise_open_file_limit();
    let person_slots = match plan.riders {
        RiderMode::Person => (open_files as usize)
            .saturating_sub(plan.drivers + plan.flood + 256)
            .clamp(1, MAX_PERSONS),
        RiderMode::Pooled => 0,
    };
    let needed = plan.drivers + plan.rider_connections + plan.flood + plan.ops_watchers + 64;
    if (open_files as usize) < needed {
        eprintln!(
            "warning: open-file limit {open_files} is below the {needed} sockets this run needs; raise it (ulimit -n)"
        );
    }
    let mut targets = Vec::new();
    for url in plan.url.split(',') {
        let mut target = Target::resolve(url).await?;
        target.ops_token = secret.as_ref().map(|s| {
            ridelock::auth::mint(s, Role::Ops, "simulator", Duration::from_secs(3600 * 24))
        });
        check_engine(&target).await?;
        targets.push(target);
    }
    let first = engine_locations(&targets).await;
    let centre = LatLon::new(plan.centre.0, plan.centre.1).context("city centre")?;
    let stats = if plan.emit_events {
        Stats::for_worker(EventSink::to_stdout())
    } else {
        Stats::default()
    };
    let shared = Arc::new(Shared {
        city: City::new(centre, plan.radius_m),
        total_connections: plan.drivers
            + plan.rider_connections.max(person_slots)
            + plan.flood
            + plan.ops_watchers,
        plan,
        targets,
        stats,
        secret,
        person_slots: Arc::new(Semaphore::new(person_slots)),
        person_slots_total: person_slots,
    });
    let plan = &shared.plan;
    let t0 = Instant::now();

    let (stop, stopped) = watch::channel(false);
    let mut drivers = Vec::with_capacity(plan.drivers);
    for n in 0..plan.drivers {
        let start_at = t0 + plan.ramp.mul_f64(n as f64 / plan.drivers.max(1) as f64);
        drivers.push(tokio::spawn(driver::run(
            n,
            shared.clone(),
            start_at,
            stopped.clone(),
        )));
    }
    let (phase, phase_rx) = watch::channel(Phase::Running);
    let mut order_queues = Vec::with_capacity(plan.rider_connections);
    let mut riders = Vec::with_capacity(plan.rider_connections);
    for n in 0..plan.rider_connections {
        let (tx, rx) = mpsc::channel(ORDER_QUEUE);
        order_queues.push(tx);
        riders.push(tokio::spawn(rider::run(
            n,
            shared.clone(),
            rx,
            phase_rx.clone(),
        )));
    }

    let watchers: Vec<_> = (0..plan.ops_watchers)
        .map(|n| {
            tokio::spawn(ops_watch::run(
                n,
                shared.clone(),
                t0 + plan.ramp,
                stopped.clone(),
            ))
        })
        .collect();
    let rss_peak = Arc::new(AtomicU64::new(0));
    let sampler = tokio::spawn(sample(
        shared.clone(),
        engine_pids.to_vec(),
        rss_peak.clone(),
        show_progress,
    ));

    tokio::time::sleep_until(t0 + plan.ramp).await;
    let steady_start = snapshot(&shared, engine_pids).await;
    let steady_end_at = steady_start.at + plan.duration;
    let floods: Vec<_> = (0..plan.flood)
        .map(|n| tokio::spawn(flood::run(n, shared.clone(), steady_end_at)))
        .collect();
    send_arrivals(&shared, &order_queues, &phase_rx, steady_end_at).await;
    let steady_end = snapshot(&shared, engine_pids).await;
    for flood in floods {
        let _ = tokio::time::timeout(Duration::from_secs(5), flood).await;
    }

    let _ = phase.send(Phase::Draining);
    drain(&shared, plan.drain).await;
    if let Some(events) = shared.stats.events() {
        // A worker's drivers may still be offered to other workers' riders:
        // they leave when every worker has drained, not when this one has.
        events.send(Event::Drained);
        crate::events::released_by_coordinator(plan.drain + Duration::from_secs(30)).await;
    }
    let _ = stop.send(true);
    let _ = phase.send(Phase::Stopped);
    for task in drivers.into_iter().chain(riders).chain(watchers) {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    sampler.abort();
    // Updates sent just before the end may still be on their way in: the
    // engine gets up to a second to count them, so that a backlog shown is
    // one that lasts, not one caught in flight.
    let sent = shared.stats.locations_sent.get() as f64;
    let mut last = engine_locations(&shared.targets).await;
    for _ in 0..20 {
        match (first, last) {
            (Some(a), Some(b)) if b - a < sent => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                last = engine_locations(&shared.targets).await;
            }
            _ => break,
        }
    }

    let stats = &shared.stats;
    // A worker's ledger is judged by its coordinator, which sees every
    // worker's.
    if stats.events().is_none() {
        for missing in stats.unfinished() {
            stats.violation(missing);
        }
    }
    let window = steady_end
        .at
        .duration_since(steady_start.at)
        .as_secs_f64()
        .max(1e-9);
    let rate = |end: u64, start: u64| (end.saturating_sub(start)) as f64 / window;
    let engine_rate = match (steady_start.engine_locations, steady_end.engine_locations) {
        (Some(a), Some(b)) => Some((b - a) / window),
        _ => None,
    };
    let backlog = match (first, last) {
        (Some(a), Some(b)) => Some(stats.locations_sent.get() as i64 - (b - a) as i64),
        _ => None,
    };
    let rss = rss_peak.load(Ordering::Relaxed);
    let rss = (!engine_pids.is_empty() && rss > 0).then_some(rss);
    let rates = SteadyRates {
        requests_per_s: rate(steady_end.requests, steady_start.requests),
        matches_per_s: rate(steady_end.matches, steady_start.matches),
        location_updates_per_s: rate(steady_end.locations, steady_start.locations),
        ops_bytes_per_s: rate(steady_end.ops_bytes, steady_start.ops_bytes),
        window_s: window,
    };
    let engine = EngineFigures {
        cpu_cores: match (steady_start.engine_cpu_s, steady_end.engine_cpu_s) {
            (Some(a), Some(b)) => Some((b - a) / window),
            _ => None,
        },
        location_updates_per_s: engine_rate,
        location_backlog: backlog,
        rss_kib_peak: rss,
        request_to_offer_ms: engine_request_to_offer_ms(
            steady_start.engine_request_to_offer.as_deref(),
            steady_end.engine_request_to_offer.as_deref(),
        ),
    };
    let totals = Totals::of(stats, rates);
    if let Some(events) = stats.events() {
        // The last line a worker writes: its coordinator adds it up.
        events.close(Event::Done(Box::new(totals.clone())));
    }
    Ok(Report::from_totals(
        shared.plan.clone(),
        t0.elapsed().as_secs_f64(),
        totals,
        engine,
    ))
}

/// Waits, up to `longest`, until every acknowledged request has its final
/// message (an engine working through a backlog gets the time it needs), then
/// a little longer so that a duplicate final would still be seen.
async fn drain(shared: &Shared, longest: Duration) {
    const GRACE: Duration = Duration::from_millis(250);
    let until = Instant::now() + longest;
    loop {
        let open = shared.stats.open_requests();
        let now = Instant::now();
        if open == 0 || now >= until {
            tokio::time::sleep_until((now + GRACE).min(until.max(now))).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Proves an engine node is there.
pub(crate) async fn check_engine(target: &Target) -> anyhow::Result<()> {
    target.http_get("/metrics").await.with_context(|| {
        format!(
            "the engine at {} does not answer GET /metrics",
            target.authority
        )
    })?;
    Ok(())
}

/// Poisson arrivals until `until`: each a rider of its own (`--riders
/// person`), or dealt round-robin to the pooled rider connections.
async fn send_arrivals(
    shared: &Arc<Shared>,
    queues: &[mpsc::Sender<Order>],
    phase: &watch::Receiver<Phase>,
    until: Instant,
) {
    let plan = &shared.plan;
    let process = Poisson::new(plan.riders_per_s);
    let mut rng = SmallRng::seed_from_u64(plan.rider_seed() ^ 0x5EED);
    let Some(first_gap) = process.next_gap(&mut rng) else {
        tokio::time::sleep_until(until).await;
        return;
    };
    let mut next_at = Instant::now() + first_gap;
    let mut n: u64 = 0;
    loop {
        let now = Instant::now();
        if now >= until {
            return;
        }
        // Everything due since the last wake goes out now: a timer per
        // arrival would cap the rate at the timer's resolution.
        while next_at <= now {
            let vehicles = if plan.group_prob > 0.0 && rng.random_bool(plan.group_prob) {
                rng.random_range(2..=plan.max_vehicles)
            } else {
                1
            };
            let order = Order {
                request_id: format!("{}q{n}", plan.id_prefix),
                pickup: shared.city.random_point(&mut rng),
                vehicles,
            };
            match plan.riders {
                RiderMode::Person => match shared.person_slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        tokio::spawn(rider::person(n, order, shared.clone(), phase.clone(), slot));
                    }
                    Err(_) => shared.stats.dropped_arrivals.inc(),
                },
                RiderMode::Pooled => {
                    if queues[n as usize % queues.len()].try_send(order).is_err() {
                        shared.stats.dropped_arrivals.inc();
                    }
                }
            }
            n += 1;
            next_at += process.next_gap(&mut rng).unwrap_or(Duration::from_secs(1));
        }
        tokio::time::sleep_until(next_at.min(until)).await;
    }
}

/// Samples the engine's RSS and draws the progress line twice a second.
async fn sample(shared: Arc<Shared>, pids: Vec<u32>, rss_peak: Arc<AtomicU64>, show: bool) {
    let mut line = ProgressLine::new(show);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let rss =
            over_pids(&pids, |pid| net::rss_kib(pid).map(|kib| kib as f64)).map(|kib| kib as u64);
        if let Some(rss) = rss {
            rss_peak.fetch_max(rss, Ordering::Relaxed);
        }
        let stats = &shared.stats;
        let progress = Event::Progress {
            connected: stats.connected(),
            requests: stats.requests.get(),
            matches: stats.matches.get(),
            locations: stats.locations_sent.get(),
            violations: stats.violations(),
        };
        match stats.events() {
            Some(events) => events.send(progress),
            None => line.show(&progress, rss),
        }
    }
}

/// The live progress line (on stderr), from counts that only grow.
pub(crate) struct ProgressLine {
    bar: ProgressBar,
    last: (Instant, u64, u64),
}

impl ProgressLine {
    /// A line drawn if `show`, else nowhere.
    pub(crate) fn new(show: bool) -> Self {
        let bar = ProgressBar::new_spinner();
        if show {
            bar.set_draw_target(ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{spinner} {elapsed} {msg}").expect("valid template"),
            );
        } else {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        ProgressLine {
            bar,
            last: (Instant::now(), 0, 0),
        }
    }

    /// Redraws from `progress` (an [`Event::Progress`]).
    pub(crate) fn show(&mut self, progress: &Event, rss_kib: Option<u64>) {
        let Event::Progress {
            connected,
            requests,
            matches,
            locations,
            violations,
        } = *progress
        else {
            return;
        };
        let now = Instant::now();
        let dt = now.duration_since(self.last.0).as_secs_f64().max(1e-9);
        self.bar.set_message(format!(
            "drivers {connected} | matches/s {:.0} | locations/s {:.0} | requests {requests} | violations {violations}{}",
            matches.saturating_sub(self.last.1) as f64 / dt,
            locations.saturating_sub(self.last.2) as f64 / dt,
            rss_kib
                .map(|r| format!(" | engine RSS {} MiB", r / 1024))
                .unwrap_or_default(),
        ));
        self.bar.tick();
        self.last = (now, matches, locations);
    }
}
