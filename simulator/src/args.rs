//! Command-line flags and the scenario presets they override.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// How ride requests reach the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RiderMode {
    /// Each request is a rider of its own, as in a city: connect, request,
    /// wait for the final message, close. The engine's production limits
    /// (requests per rider, messages per second) hold as they are.
    Person,
    /// Requests spread over `--rider-connections` long-lived connections of a
    /// few riders: cheaper for the simulator, but the engine's per-rider and
    /// rate limits must be lifted for it.
    Pooled,
}

/// What a flooding connection sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FloodKind {
    /// Valid `cancel` messages (parsed and answered by the engine).
    Text,
    /// Binary frames.
    Binary,
    /// WebSocket pings.
    Ping,
}

/// A preset load shape; every value can be overridden by its flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// A few seconds, small: for CI and a quick look.
    Smoke,
    /// A mid-sized city at a steady pace, drivers thinking before answering.
    City,
    /// Rush hour: many drivers, many requests.
    Rush,
    /// As much as one machine takes: 100k drivers, instant accepts.
    Stress,
}

/// Flags of the `simulator` binary.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "simulator",
    version,
    about = "Drives a ridelock engine like a city does",
    // A flag given twice takes its last value: the coordinator of
    // `--workers` appends each worker's share to the user's flags.
    args_override_self = true
)]
pub struct Args {
    /// The engine, as ws://HOST:PORT; for a cluster, its nodes
    /// comma-separated (client `n` connects to node `n % nodes`).
    #[arg(long, env = "SIM_URL", default_value = "ws://127.0.0.1:8080")]
    pub url: String,
    /// The preset load shape.
    #[arg(long, value_enum, default_value_t = Scenario::Smoke)]
    pub scenario: Scenario,
    /// Virtual drivers, one WebSocket each.
    #[arg(long)]
    pub drivers: Option<usize>,
    /// Ride requests per second (Poisson arrivals) in the steady phase.
    #[arg(long)]
    pub riders_per_s: Option<f64>,
    /// How riders connect (default: person).
    #[arg(long, value_enum)]
    pub riders: Option<RiderMode>,
    /// With `--riders pooled`: the rider connections requests are spread over.
    #[arg(long)]
    pub rider_connections: Option<usize>,
    /// The secret the engine verifies tokens with: every client then connects
    /// with a token minted from it (`Authorization: Bearer`), as real apps
    /// do, and `/metrics` is scraped with an `ops` token. Without it, clients
    /// put their id in the URL (an engine in open mode).
    #[arg(long, env = "RIDELOCK_AUTH_SECRET_FILE")]
    pub auth_secret_file: Option<PathBuf>,
    /// Flooding connections beside the load, during the steady phase: each
    /// sends frames as fast as it can and reconnects when the engine closes
    /// it, to measure what a flood costs everybody else.
    #[arg(long, default_value_t = 0)]
    pub flood: usize,
    /// What the flooding connections send.
    #[arg(long, value_enum, default_value_t = FloodKind::Text)]
    pub flood_kind: FloodKind,
    /// Connections watching the ops feed (`/ws/ops`) from the end of the
    /// ramp, as the ops map does: to measure what the feed costs the engine.
    #[arg(long, default_value_t = 0)]
    pub ops_watchers: usize,
    /// Length of the steady phase that the rates are measured over (`20s`, `5m`).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Time over which drivers connect, before the steady phase.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ramp: Option<Duration>,
    /// Longest time after the steady phase for open requests to end (riders
    /// cancel what is still open when it starts; the run moves on as soon as
    /// nothing is open). A request still open after it is a violation.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub drain: Option<Duration>,
    /// Interval between a driver's location updates (jittered ±10%).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub update_interval: Option<Duration>,
    /// Probability that a driver accepts an offer.
    #[arg(long)]
    pub accept_prob: Option<f64>,
    /// Probability that a driver never answers (the offer expires).
    #[arg(long)]
    pub no_answer_prob: Option<f64>,
    /// Probability that a rider cancels a request.
    #[arg(long)]
    pub cancel_prob: Option<f64>,
    /// Share of requests asking for more than one vehicle (2 to
    /// --max-vehicles, uniformly): all of them come or none does.
    #[arg(long, default_value_t = 0.0)]
    pub group_prob: f64,
    /// Most vehicles a group request asks for (2 to 4).
    #[arg(long, default_value_t = 4)]
    pub max_vehicles: u8,
    /// Longest time a driver takes to answer (uniform from zero).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub answer_delay: Option<Duration>,
    /// Mean trip time (already scaled: a 20-minute trip simulated as `20s`).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub trip_time: Option<Duration>,
    /// Probability that a driver takes a break after a trip (`unavailable`
    /// for a few seconds).
    #[arg(long)]
    pub break_prob: Option<f64>,
    /// City centre latitude (default: Berlin).
    #[arg(long, default_value_t = 52.5200)]
    pub centre_lat: f64,
    /// City centre longitude.
    #[arg(long, default_value_t = 13.4050)]
    pub centre_lon: f64,
    /// City radius in kilometres.
    #[arg(long, default_value_t = 10.0)]
    pub radius_km: f64,
    /// Driving speed in metres per second (street speed: ~30 km/h).
    #[arg(long, default_value_t = 8.3)]
    pub speed_mps: f64,
    /// The engine's process id, to sample its RSS and CPU from /proc; for a
    /// cluster, every node's, comma-separated (the report sums them).
    #[arg(long, value_delimiter = ',')]
    pub engine_pid: Vec<u32>,
    /// Write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// No live progress line.
    #[arg(long)]
    pub quiet: bool,
    /// Worker processes the load runs from, each with its own open-file
    /// budget and its own slice of the driver and rider ids; this process
    /// coordinates them (one progress line, one report, one invariant
    /// checker over every worker's events). Default: as many as
    /// `--drivers` needs given the open-file limit (18,000 drivers each
    /// under a 20,000 limit), at least one.
    #[arg(long)]
    pub workers: Option<usize>,
    /// (Set by the coordinator for each worker.) This worker's number.
    #[arg(long, hide = true, default_value_t = 0)]
    pub worker_index: usize,
    /// (Set by the coordinator.) How many workers there are.
    #[arg(long, hide = true, default_value_t = 1)]
    pub worker_count: usize,
    /// (Set by the coordinator.) The first driver number of this worker.
    #[arg(long, hide = true, default_value_t = 0)]
    pub driver_offset: usize,
    /// (Set by the coordinator.) Prefix of this worker's rider and request
    /// ids, so that no two workers use one.
    #[arg(long, hide = true, default_value = "")]
    pub id_prefix: String,
    /// (Set by the coordinator.) Run as a worker: events and the totals
    /// go to stdout as JSON lines, for the coordinator.
    #[arg(long, hide = true)]
    pub emit_events: bool,
}

/// The run's settings with the preset applied.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Plan {
    pub url: String,
    pub scenario: String,
    pub drivers: usize,
    pub riders_per_s: f64,
    pub riders: RiderMode,
    pub rider_connections: usize,
    /// Whether clients connect with tokens.
    pub authenticated: bool,
    pub flood: usize,
    pub flood_kind: FloodKind,
    pub ops_watchers: usize,
    /// Worker processes (1: this process runs the load itself).
    pub workers: usize,
    #[serde(skip)]
    pub worker_index: usize,
    #[serde(skip)]
    pub worker_count: usize,
    #[serde(skip)]
    pub driver_offset: usize,
    #[serde(skip)]
    pub id_prefix: String,
    #[serde(skip)]
    pub emit_events: bool,
    #[serde(with = "humantime_serde_secs")]
    pub duration: Duration,
    #[serde(with = "humantime_serde_secs")]
    pub ramp: Duration,
    #[serde(with = "humantime_serde_secs")]
    pub drain: Duration,
    #[serde(with = "humantime_serde_secs")]
    pub update_interval: Duration,
    pub accept_prob: f64,
    pub no_answer_prob: f64,
    pub cancel_prob: f64,
    pub group_prob: f64,
    pub max_vehicles: u8,
    #[serde(with = "humantime_serde_secs")]
    pub answer_delay: Duration,
    #[serde(with = "humantime_serde_secs")]
    pub trip_time: Duration,
    pub break_prob: f64,
    pub centre: (f64, f64),
    pub radius_m: f64,
    pub speed_mps: f64,
    pub seed: u64,
}

impl Plan {
    /// The seed of this process's riders and arrivals: the run's seed, made
    /// different per worker (each worker numbers its riders from 0, and the
    /// same seed would send every worker's riders to the same places at the
    /// same times). Worker 0, and a run without workers, use the seed as is.
    pub fn rider_seed(&self) -> u64 {
        self.seed ^ (self.worker_index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
}

/// Descriptors a worker keeps for its riders and everything else beside
/// its drivers.
const WORKER_SPARE_FILES: usize = 2_000;

/// Workers `drivers` need: each holds one descriptor per driver and keeps
/// [`WORKER_SPARE_FILES`] for riders, under the open-file limit this process
/// can raise itself to.
fn default_workers(drivers: usize) -> usize {
    let limit = crate::net::raise_open_file_limit() as usize;
    let per_worker = limit.saturating_sub(WORKER_SPARE_FILES).max(1_000);
    drivers.div_ceil(per_worker).max(1)
}

/// Durations in the report are written the way they are given (`20s`, `5m`).
mod humantime_serde_secs {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

struct Preset {
    drivers: usize,
    riders_per_s: f64,
    rider_connections: usize,
    duration: Duration,
    ramp: Duration,
    drain: Duration,
    update_interval: Duration,
    accept_prob: f64,
    no_answer_prob: f64,
    cancel_prob: f64,
    answer_delay: Duration,
    trip_time: Duration,
    break_prob: f64,
}

const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

const fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

impl Scenario {
    fn preset(self) -> Preset {
        match self {
            Scenario::Smoke => Preset {
                drivers: 60,
                riders_per_s: 20.0,
                rider_connections: 8,
                duration: secs(3),
                ramp: secs(1),
                drain: secs(5),
                update_interval: secs(1),
                accept_prob: 0.7,
                no_answer_prob: 0.1,
                cancel_prob: 0.05,
                answer_delay: millis(200),
                trip_time: secs(1),
                break_prob: 0.1,
            },
            Scenario::City => Preset {
                drivers: 5_000,
                riders_per_s: 200.0,
                rider_connections: 200,
                duration: secs(60),
                ramp: secs(10),
                drain: secs(10),
                update_interval: secs(4),
                accept_prob: 0.8,
                no_answer_prob: 0.05,
                cancel_prob: 0.05,
                answer_delay: secs(3),
                trip_time: secs(30),
                break_prob: 0.02,
            },
            Scenario::Rush => Preset {
                drivers: 20_000,
                riders_per_s: 2_000.0,
                rider_connections: 1_000,
                duration: secs(60),
                ramp: secs(20),
                drain: secs(10),
                update_interval: secs(4),
                accept_prob: 0.9,
                no_answer_prob: 0.02,
                cancel_prob: 0.03,
                answer_delay: secs(1),
                trip_time: secs(20),
                break_prob: 0.01,
            },
            Scenario::Stress => Preset {
                drivers: 100_000,
                riders_per_s: 10_000.0,
                rider_connections: 2_000,
                duration: secs(60),
                ramp: secs(60),
                drain: secs(10),
                update_interval: secs(1),
                accept_prob: 1.0,
                no_answer_prob: 0.0,
                cancel_prob: 0.0,
                answer_delay: Duration::ZERO,
                trip_time: secs(2),
                break_prob: 0.0,
            },
        }
    }
}

impl Args {
    /// The token secret, if `--auth-secret-file` was given (read the way the
    /// engine reads it).
    pub fn secret(&self) -> anyhow::Result<Option<Vec<u8>>> {
        self.auth_secret_file
            .as_deref()
            .map(ridelock::auth::read_secret)
            .transpose()
            .map_err(Into::into)
    }

    /// The preset with every given flag applied; checks the result makes sense.
    pub fn plan(&self) -> anyhow::Result<Plan> {
        let p = self.scenario.preset();
        let plan = Plan {
            url: self
                .url
                .split(',')
                .map(|url| url.trim_end_matches('/'))
                .collect::<Vec<_>>()
                .join(","),
            scenario: format!("{:?}", self.scenario).to_lowercase(),
            drivers: self.drivers.unwrap_or(p.drivers),
            riders_per_s: self.riders_per_s.unwrap_or(p.riders_per_s),
            riders: self.riders.unwrap_or(RiderMode::Person),
            rider_connections: match self.riders {
                Some(RiderMode::Pooled) => self.rider_connections.unwrap_or(p.rider_connections),
                _ => 0,
            },
            authenticated: self.auth_secret_file.is_some(),
            flood: self.flood,
            flood_kind: self.flood_kind,
            ops_watchers: self.ops_watchers,
            workers: match (self.emit_events, self.workers) {
                (true, _) => 1,
                (false, Some(n)) => n.max(1),
                (false, None) => default_workers(self.drivers.unwrap_or(p.drivers)),
            },
            worker_index: self.worker_index,
            worker_count: self.worker_count,
            driver_offset: self.driver_offset,
            id_prefix: self.id_prefix.clone(),
            emit_events: self.emit_events,
            duration: self.duration.unwrap_or(p.duration),
            ramp: self.ramp.unwrap_or(p.ramp),
            drain: self.drain.unwrap_or(p.drain),
            update_interval: self.update_interval.unwrap_or(p.update_interval),
            accept_prob: self.accept_prob.unwrap_or(p.accept_prob),
            no_answer_prob: self.no_answer_prob.unwrap_or(p.no_answer_prob),
            cancel_prob: self.cancel_prob.unwrap_or(p.cancel_prob),
            group_prob: self.group_prob,
            max_vehicles: self.max_vehicles,
            answer_delay: self.answer_delay.unwrap_or(p.answer_delay),
            trip_time: self.trip_time.unwrap_or(p.trip_time),
            break_prob: self.break_prob.unwrap_or(p.break_prob),
            centre: (self.centre_lat, self.centre_lon),
            radius_m: self.radius_km * 1_000.0,
            speed_mps: self.speed_mps,
            seed: self.seed,
        };
        for (name, p) in [
            ("accept-prob", plan.accept_prob),
            ("no-answer-prob", plan.no_answer_prob),
            ("cancel-prob", plan.cancel_prob),
            ("break-prob", plan.break_prob),
            ("group-prob", plan.group_prob),
        ] {
            anyhow::ensure!((0.0..=1.0).contains(&p), "--{name} must be within 0..=1");
        }
        anyhow::ensure!(
            plan.accept_prob + plan.no_answer_prob <= 1.0,
            "--accept-prob plus --no-answer-prob must not exceed 1"
        );
        anyhow::ensure!(
            (2..=ridelock::protocol::MAX_VEHICLES).contains(&plan.max_vehicles),
            "--max-vehicles must be 2 to {}",
            ridelock::protocol::MAX_VEHICLES
        );
        anyhow::ensure!(
            plan.riders == RiderMode::Person || plan.rider_connections > 0,
            "--rider-connections must be at least 1"
        );
        anyhow::ensure!(
            plan.riders == RiderMode::Pooled || self.rider_connections.is_none(),
            "--rider-connections is for --riders pooled"
        );
        anyhow::ensure!(
            plan.riders_per_s >= 0.0 && plan.riders_per_s.is_finite(),
            "--riders-per-s must be a non-negative number"
        );
        anyhow::ensure!(
            !plan.update_interval.is_zero(),
            "--update-interval must be positive"
        );
        anyhow::ensure!(
            ridelock::location::LatLon::new(self.centre_lat, self.centre_lon).is_ok(),
            "the city centre is not a valid position"
        );
        anyhow::ensure!(
            self.url.split(',').all(|url| url.starts_with("ws://")),
            "--url must look like ws://HOST:PORT (or several, comma-separated)"
        );
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_preset() {
        let args = Args::parse_from([
            "simulator",
            "--scenario",
            "city",
            "--drivers",
            "7",
            "--duration",
            "5m",
        ]);
        let plan = args.plan().unwrap();
        assert_eq!(plan.drivers, 7);
        assert_eq!(plan.duration, Duration::from_secs(300));
        assert_eq!(plan.update_interval, Duration::from_secs(4)); // the preset's
        let json = serde_json::to_value(&plan).unwrap();
        assert_eq!(json["duration"], "5m");
    }

    #[test]
    fn nonsense_is_refused() {
        let args = Args::parse_from([
            "simulator",
            "--accept-prob",
            "0.9",
            "--no-answer-prob",
            "0.5",
        ]);
        assert!(args.plan().is_err());
        let args = Args::parse_from(["simulator", "--url", "http://x"]);
        assert!(args.plan().is_err());
    }
}
