//! `--workers N`: the load runs from N worker processes (each `simulator`
//! again, with its share of the drivers and of the request rate, its own
//! open-file budget, and ids no other worker uses), and this process
//! coordinates them: one progress line, one invariant checker over every
//! worker's events, the engine measured once, and one report whose
//! histograms are the workers' merged.
//!
//! What a worker can judge alone (one driver's offers and trips) it judges
//! itself; what ties two clients together (a request and its first offer,
//! a `matched` and the accepts it names) comes here as events, since the
//! rider and the driver may be in different workers (see [`crate::events`]).

use std::collections::HashMap;
use std::io::BufRead;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::args::{Plan, RiderMode};
use crate::checker::RequestLedger;
use crate::events::{instant_at, Event};
use crate::net::{self, Target};
use crate::report::{EngineFigures, Report};
use crate::run::{
    check_engine, engine_locations, engine_request_to_offer, engine_request_to_offer_ms, over_pids,
    ProgressLine,
};
use crate::stats::Latency;
use crate::totals::{buckets, Totals};

/// Flags of the user's command line that the coordinator keeps to itself:
/// the workers write no JSON, measure no engine process and draw no
/// progress line.
const COORDINATOR_ONLY: [&str; 3] = ["--json", "--engine-pid", "--workers"];

/// The flags worker `i` of `n` runs with: the user's, then its share.
fn worker_args(user_args: &[String], plan: &Plan, i: usize) -> Vec<String> {
    let n = plan.workers;
    let mut args = Vec::new();
    let mut skip_value = false;
    for arg in user_args {
        if skip_value {
            skip_value = false;
            continue;
        }
        if let Some(flag) = COORDINATOR_ONLY.iter().find(|f| arg.starts_with(**f)) {
            // `--flag value` takes the next argument with it; `--flag=value`
            // does not.
            skip_value = arg.len() == flag.len();
            continue;
        }
        args.push(arg.clone());
    }
    let share = |total: usize| total * (i + 1) / n - total * i / n;
    let first_driver = plan.drivers * i / n;
    let only_first = |count: usize| if i == 0 { count } else { 0 };
    args.extend(
        [
            "--emit-events".to_string(),
            "--quiet".into(),
            format!("--worker-index={i}"),
            format!("--worker-count={n}"),
            format!("--id-prefix=w{i}-"),
            format!("--drivers={}", share(plan.drivers)),
            format!("--driver-offset={first_driver}"),
            format!("--riders-per-s={}", plan.riders_per_s / n as f64),
            format!("--flood={}", only_first(plan.flood)),
            format!("--ops-watchers={}", only_first(plan.ops_watchers)),
        ]
        .into_iter()
        .chain((plan.riders == RiderMode::Pooled).then(|| {
            format!(
                "--rider-connections={}",
                share(plan.rider_connections).max(1)
            )
        })),
    );
    args
}

/// The first offer of each request and when it was sent, matched up in
/// whichever order the two workers' events arrive.
#[derive(Default)]
struct OfferClock {
    sent: HashMap<String, Instant>,
    /// Offers seen before their request's `Sent` arrived.
    early: HashMap<String, Instant>,
    latency: Option<hdrhistogram::Histogram<u64>>,
}

impl OfferClock {
    fn record(&mut self, sent: Instant, offered: Instant) {
        let micros = (offered.saturating_duration_since(sent).as_micros() as u64).max(1);
        let h = self.latency.get_or_insert_with(Latency::empty);
        let _ = h.record(micros.min(600_000_000));
    }

    fn sent(&mut self, id: String, at: Instant) {
        match self.early.remove(&id) {
            Some(offered) => self.record(at, offered),
            None => {
                self.sent.insert(id, at);
            }
        }
    }

    fn offered(&mut self, id: String, at: Instant) {
        match self.sent.remove(&id) {
            Some(sent) => self.record(sent, at),
            // A later offer of a request already timed lands here too;
            // `forget_before` drops it.
            None => {
                self.early.entry(id).or_insert(at);
            }
        }
    }

    /// Drops requests and offers that found no partner (requests that
    /// ended without an offer, later offers of requests already timed) once
    /// they are old. A request's end does not drop it at once: its first
    /// offer, from another worker, may arrive after its end does.
    fn forget_before(&mut self, cutoff: Instant) {
        self.sent.retain(|_, at| *at >= cutoff);
        self.early.retain(|_, at| *at >= cutoff);
    }
}

/// One worker process and whether its totals came in.
struct Worker {
    child: Child,
    /// Closed (dropped) once every worker has drained: the signal to end.
    stdin: Option<ChildStdin>,
    drained: bool,
    /// Its stdout closed: it has ended, or died.
    gone: bool,
    totals: Option<Totals>,
    progress: Option<Event>,
}

impl Drop for Worker {
    /// A run that fails part way leaves no worker behind.
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs the plan from `plan.workers` worker processes of this binary and
/// reports for all of them.
pub async fn run(
    plan: Plan,
    secret: Option<Vec<u8>>,
    user_args: &[String],
    engine_pids: &[u32],
    show_progress: bool,
) -> anyhow::Result<Report> {
    let mut targets = Vec::new();
    for url in plan.url.split(',') {
        let mut target = Target::resolve(url).await?;
        // `/metrics` is read with an ops token when the engine checks them.
        target.ops_token = secret.as_ref().map(|s| {
            ridelock::auth::mint(
                s,
                ridelock::auth::Role::Ops,
                "simulator",
                Duration::from_secs(3600 * 24),
            )
        });
        check_engine(&target).await?;
        targets.push(target);
    }
    let first = engine_locations(&targets).await;
    let exe = std::env::current_exe().context("finding the simulator binary")?;
    // `None`: that worker's stdout closed.
    let (events_tx, mut events) = mpsc::unbounded_channel::<(usize, Option<Event>)>();
    let mut workers = Vec::new();
    let t0 = Instant::now();
    for i in 0..plan.workers {
        let mut child = Command::new(&exe)
            .args(worker_args(user_args, &plan, i))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting worker {i}"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("a worker's stdout")?;
        let tx = events_tx.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<Event>(&line) {
                    Ok(event) => {
                        if tx.send((i, Some(event))).is_err() {
                            break;
                        }
                    }
                    Err(e) => eprintln!("worker {i}: unreadable line ({e}): {line}"),
                }
            }
            let _ = tx.send((i, None));
        });
        workers.push(Worker {
            child,
            stdin,
            drained: false,
            gone: false,
            totals: None,
            progress: None,
        });
    }
    drop(events_tx);

    let steady_start_at = t0 + plan.ramp;
    let steady_end_at = steady_start_at + plan.duration;
    let mut steady_start = None;
    let mut steady_end = None;
    let cpu = || over_pids(engine_pids, net::cpu_seconds);
    let rss_peak = AtomicU64::new(0);
    let mut ledger = RequestLedger::across_processes();
    let mut violations: Vec<String> = Vec::new();
    let mut clock = OfferClock::default();
    let mut line = ProgressLine::new(show_progress);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let far = Instant::now() + Duration::from_secs(3600 * 24 * 365);
    loop {
        tokio::select! {
            event = events.recv() => {
                let Some((i, event)) = event else { break };
                let Some(event) = event else {
                    workers[i].gone = true;
                    if workers[i].totals.is_none() {
                        // A worker died: the run is over (its share of the
                        // city is gone, and its riders' requests with it).
                        let status = workers[i].child.wait().context("waiting for a worker")?;
                        anyhow::bail!("worker {i} ended ({status}) without its totals");
                    }
                    if workers.iter().all(|w| w.gone) {
                        break;
                    }
                    continue;
                };
                match event {
                    Event::Sent { id, vehicles, t } => {
                        ledger.requested(&id, vehicles);
                        clock.sent(id, instant_at(t));
                    }
                    Event::Acknowledged { id } => ledger.acknowledged(&id),
                    Event::Offer { id, t } => clock.offered(id, instant_at(t)),
                    Event::Accept { id, driver } => ledger.accept_sent(&id, &driver),
                    Event::Final { id, how } => {
                        if let Some(v) = ledger.final_message(&id, how) {
                            violations.push(v);
                        }
                    }
                    Event::Drained => {
                        workers[i].drained = true;
                        if workers.iter().all(|w| w.drained) {
                            for worker in &mut workers {
                                worker.stdin = None;
                            }
                        }
                    }
                    progress @ Event::Progress { .. } => workers[i].progress = Some(progress),
                    Event::Done(totals) => workers[i].totals = Some(*totals),
                }
            }
            _ = tick.tick() => {
                let rss = over_pids(engine_pids, |pid| net::rss_kib(pid).map(|kib| kib as f64))
                    .map(|kib| kib as u64);
                if let Some(rss) = rss {
                    rss_peak.fetch_max(rss, Ordering::Relaxed);
                }
                line.show(&sum_progress(&workers), rss);
                clock.forget_before(Instant::now() - Duration::from_secs(60));
            }
            _ = tokio::time::sleep_until(steady_start_at), if steady_start.is_none() => {
                steady_start = Some((
                    Instant::now(),
                    cpu(),
                    engine_locations(&targets).await,
                    engine_request_to_offer(&targets).await,
                ));
            }
            _ = tokio::time::sleep_until(if steady_start.is_some() { steady_end_at } else { far }),
                if steady_end.is_none() => {
                steady_end = Some((
                    Instant::now(),
                    cpu(),
                    engine_locations(&targets).await,
                    engine_request_to_offer(&targets).await,
                ));
            }
        }
    }
    let mut totals = Totals::default();
    for (i, worker) in workers.iter_mut().enumerate() {
        let status = worker.child.wait().context("waiting for a worker")?;
        let Some(worker_totals) = &worker.totals else {
            anyhow::bail!("worker {i} ended ({status}) without its totals");
        };
        totals.add(worker_totals);
    }
    // Updates sent just before the end may still be on their way in.
    let mut last = engine_locations(&targets).await;
    for _ in 0..20 {
        match (first, last) {
            (Some(a), Some(b)) if b - a < totals.locations_sent as f64 => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                last = engine_locations(&targets).await;
            }
            _ => break,
        }
    }

    // What only the coordinator could judge: request→offer over workers,
    // and the ledger of every request.
    totals.request_to_offer = clock.latency.as_ref().map(buckets).unwrap_or_default();
    violations.extend(ledger.finish());
    for v in &violations {
        eprintln!("VIOLATION: {v}");
    }
    totals.violations += violations.len() as u64;
    totals
        .violation_examples
        .extend(violations.into_iter().take(20));

    let mut engine = EngineFigures {
        location_backlog: match (first, last) {
            (Some(a), Some(b)) => Some(totals.locations_sent as i64 - (b - a) as i64),
            _ => None,
        },
        rss_kib_peak: Some(rss_peak.load(Ordering::Relaxed)).filter(|&r| r > 0),
        ..EngineFigures::default()
    };
    if let (Some((a_at, a_cpu, a_loc, a_offer)), Some((b_at, b_cpu, b_loc, b_offer))) =
        (steady_start, steady_end)
    {
        let window = b_at.duration_since(a_at).as_secs_f64().max(1e-9);
        engine.cpu_cores = a_cpu.zip(b_cpu).map(|(a, b)| (b - a) / window);
        engine.location_updates_per_s = a_loc.zip(b_loc).map(|(a, b)| (b - a) / window);
        engine.request_to_offer_ms =
            engine_request_to_offer_ms(a_offer.as_deref(), b_offer.as_deref());
    }
    Ok(Report::from_totals(
        plan,
        t0.elapsed().as_secs_f64(),
        totals,
        engine,
    ))
}

/// Every worker's latest progress, added up.
fn sum_progress(workers: &[Worker]) -> Event {
    let mut sum = [0u64; 5];
    for worker in workers {
        if let Some(Event::Progress {
            connected,
            requests,
            matches,
            locations,
            violations,
        }) = worker.progress
        {
            for (total, n) in sum
                .iter_mut()
                .zip([connected, requests, matches, locations, violations])
            {
                *total += n;
            }
        }
    }
    let [connected, requests, matches, locations, violations] = sum;
    Event::Progress {
        connected,
        requests,
        matches,
        locations,
        violations,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn each_worker_gets_its_share_and_the_coordinator_keeps_its_flags() {
        let args = crate::args::Args::try_parse_from([
            "simulator",
            "--drivers",
            "90000",
            "--riders-per-s",
            "30",
            "--workers",
            "3",
            "--json",
            "out.json",
            "--engine-pid=42",
            "--ops-watchers",
            "1",
        ])
        .unwrap();
        let plan = args.plan().unwrap();
        let user: Vec<String> = [
            "--drivers",
            "90000",
            "--riders-per-s",
            "30",
            "--workers",
            "3",
            "--json",
            "out.json",
            "--engine-pid=42",
            "--ops-watchers",
            "1",
        ]
        .map(String::from)
        .to_vec();
        let mut drivers = 0;
        let mut seeds = std::collections::HashSet::new();
        for i in 0..3 {
            let worker_args = worker_args(&user, &plan, i);
            assert!(!worker_args.iter().any(|a| a.starts_with("--json")
                || a.starts_with("--engine-pid")
                || a.starts_with("--workers")
                || a == "out.json"));
            let mut argv = vec!["simulator".to_string()];
            argv.extend(worker_args);
            let worker = crate::args::Args::try_parse_from(argv)
                .unwrap()
                .plan()
                .unwrap();
            // 30,000 drivers are more than one process holds here, so a
            // plain run would split them; a worker never does.
            assert_eq!(worker.workers, 1, "a worker runs its share itself");
            assert_eq!(worker.seed, plan.seed);
            seeds.insert(worker.rider_seed());
            assert_eq!(worker.worker_count, 3);
            assert!(worker.emit_events);
            assert_eq!(worker.driver_offset, drivers, "worker {i} follows the last");
            drivers += worker.drivers;
            assert_eq!(worker.riders_per_s, 10.0);
            assert_eq!(worker.id_prefix, format!("w{i}-"));
            assert_eq!(worker.ops_watchers, usize::from(i == 0));
        }
        assert_eq!(drivers, 90000, "every driver in exactly one worker");
        assert_eq!(seeds.len(), 3, "each worker's riders go their own ways");
    }

    fn percentile(h: &Option<hdrhistogram::Histogram<u64>>, q: f64) -> u64 {
        h.as_ref().expect("something recorded").value_at_quantile(q)
    }

    #[test]
    fn a_first_offer_is_timed_whichever_of_the_two_events_comes_first() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut clock = OfferClock::default();
        // In order.
        clock.sent("a".into(), ms(0));
        clock.offered("a".into(), ms(5));
        // The offer's worker wrote first.
        clock.offered("b".into(), ms(27));
        clock.sent("b".into(), ms(7));
        // A second offer of a request already timed is not a first offer.
        clock.offered("a".into(), ms(900));
        let h = &clock.latency;
        assert_eq!(h.as_ref().unwrap().len(), 2);
        assert_eq!(percentile(h, 0.0), 5_000 / 1_000 * 1_000);
        assert!((19_900..=20_100).contains(&percentile(h, 1.0)));
        // A request that ended before its offer came in is still timed
        // when the offer does, within the memory's minute.
        clock.sent("c".into(), ms(1_000));
        clock.forget_before(ms(500));
        clock.offered("c".into(), ms(1_040));
        assert_eq!(clock.latency.as_ref().unwrap().len(), 3);
        // And forgotten after it.
        clock.sent("d".into(), ms(1_000));
        clock.forget_before(ms(2_000));
        clock.offered("d".into(), ms(2_100));
        assert_eq!(clock.latency.as_ref().unwrap().len(), 3);
    }

    #[test]
    fn merged_totals_give_the_percentiles_of_all_the_values() {
        let mut one = Latency::empty();
        let mut two = Latency::empty();
        let mut all = Latency::empty();
        for v in 1..=1_000u64 {
            let value = v * v % 9_973 + 1;
            let h = if v % 3 == 0 { &mut one } else { &mut two };
            h.record(value).unwrap();
            all.record(value).unwrap();
        }
        let mut sum = Totals {
            requests: 2,
            request_to_offer: buckets(&one),
            ..Totals::default()
        };
        sum.add(&Totals {
            requests: 3,
            request_to_offer: buckets(&two),
            ..Totals::default()
        });
        assert_eq!(sum.requests, 5);
        let mut merged = Latency::empty();
        crate::totals::add_buckets(&mut merged, &sum.request_to_offer);
        for q in [0.5, 0.9, 0.99, 1.0] {
            assert_eq!(
                merged.value_at_quantile(q),
                all.value_at_quantile(q),
                "q {q}"
            );
        }
        // Averaging the two percentiles would not give this.
        assert_eq!(merged.len(), 1_000);
    }
}
