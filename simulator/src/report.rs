//! The run's report: a table for people, JSON for scripts.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::args::Plan;
use crate::totals::{add_buckets, Buckets, Totals};

/// Latency percentiles in milliseconds.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    /// From a histogram of microseconds.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |micros: u64| micros as f64 / 1_000.0;
        Percentiles {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// Pickup distances of the matches, in metres.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Distances {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
}

impl Distances {
    /// From a histogram of whole metres.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Distances::default();
        }
        Distances {
            count: h.len(),
            mean: h.mean(),
            p50: h.value_at_quantile(0.50) as f64,
            p90: h.value_at_quantile(0.90) as f64,
        }
    }
}

/// Offers by how they ended, as the drivers saw them.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Offers {
    pub received: u64,
    pub accepted: u64,
    pub declined: u64,
    pub expired: u64,
}

/// The latencies measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latencies {
    pub request_to_offer: Percentiles,
    /// Single-vehicle requests.
    pub request_to_matched: Percentiles,
    /// Group requests (`--group-prob`): request to the one `matched`.
    pub group_request_to_matched: Percentiles,
}

/// Group requests (`--group-prob`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Groups {
    /// Requests for more than one vehicle.
    pub requests: u64,
    /// Those matched (every vehicle).
    pub matched: u64,
}

/// Everything a run found.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub plan: Plan,
    pub elapsed_s: f64,
    pub requests: u64,
    /// Requests the engine answered with `searching`.
    pub acknowledged: u64,
    /// Requests the engine refused at the door (`overloaded`, `too_many_requests`).
    pub rejected: u64,
    pub matches: u64,
    pub no_driver: u64,
    pub cancelled: u64,
    pub groups: Groups,
    pub offers: Offers,
    /// Over the steady phase.
    pub requests_per_s: f64,
    pub matches_per_s: f64,
    /// Sent by the simulator over the steady phase.
    pub location_updates_per_s: f64,
    /// Taken in by the engine over the steady phase (its own counter).
    pub engine_location_updates_per_s: Option<f64>,
    /// Location updates sent but not counted by the engine at the end: a
    /// growing backlog would show here.
    pub location_backlog: Option<i64>,
    pub no_driver_rate: f64,
    pub latency_ms: Latencies,
    /// How far matched drivers were from the pickup (`matched`'s
    /// `distance_m`), over the whole run.
    pub pickup_distance_m: Distances,
    pub violations: u64,
    pub violation_examples: Vec<String>,
    pub connected_drivers_peak: u64,
    pub connect_errors: u64,
    pub first_connect_error: Option<String>,
    /// CPU the engine used over the steady phase, in cores (1.0 = one core
    /// busy all the time), given `--engine-pid`.
    pub engine_cpu_cores: Option<f64>,
    /// The engine's own request→offer (its histogram: request read by the
    /// rider's connection → offer handed to the driver's) over the steady
    /// phase, from `/metrics` scraped as it begins and ends.
    pub engine_request_to_offer_ms: Option<EngineLatency>,
    pub engine_rss_kib_peak: Option<u64>,
    pub engine_rss_kib_per_driver: Option<f64>,
    pub driver_errors: u64,
    pub rider_errors: u64,
    pub dropped_arrivals: u64,
    /// Frames the flooding connections handed to their sockets (`--flood`);
    /// the engine reads them at each connection's allowance, and the
    /// kernel's buffers hold the rest.
    pub flood_frames: u64,
    /// The same over the steady phase, per second.
    pub flood_frames_per_s: f64,
    /// Flooding connections the engine closed (a close frame, a reset, or a
    /// write that failed).
    pub flood_closes: u64,
    /// What the ops watchers received (`--ops-watchers`).
    pub ops_feed: Option<OpsFeed>,
}

/// What the ops watchers received, over all of them.
#[derive(Clone, Debug, serde::Serialize)]
pub struct OpsFeed {
    pub messages: u64,
    pub bytes: u64,
    pub snapshot_bytes_max: u64,
    /// Over the steady phase.
    pub bytes_per_s: f64,
}

/// Percentiles read off the engine's own histogram, in ms.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct EngineLatency {
    pub p50: f64,
    pub p99: f64,
}

/// What was measured of the engine itself (with `--engine-pid` and its
/// `/metrics`).
#[derive(Clone, Copy, Debug, Default)]
pub struct EngineFigures {
    pub cpu_cores: Option<f64>,
    pub location_updates_per_s: Option<f64>,
    pub location_backlog: Option<i64>,
    pub rss_kib_peak: Option<u64>,
    /// p50 and p99 of the engine's own request→offer histogram over the
    /// steady phase, in ms.
    pub request_to_offer_ms: Option<(f64, f64)>,
}

impl Report {
    /// The report of a run that counted `t` (one process's, or every
    /// worker's added up).
    pub fn from_totals(plan: Plan, elapsed_s: f64, t: Totals, engine: EngineFigures) -> Report {
        let latency = |b: &Buckets| {
            let mut h = crate::stats::Latency::empty();
            add_buckets(&mut h, b);
            Percentiles::of(&h)
        };
        let mut distances = crate::stats::Distance::empty();
        add_buckets(&mut distances, &t.pickup_distance);
        let finals = t.matches + t.no_driver + t.cancelled;
        let peak = t.connected_peak;
        Report {
            elapsed_s,
            requests: t.requests,
            acknowledged: t.acknowledged,
            rejected: t.rejected,
            matches: t.matches,
            no_driver: t.no_driver,
            cancelled: t.cancelled,
            groups: Groups {
                requests: t.group_requests,
                matched: t.group_matches,
            },
            offers: Offers {
                received: t.offers_received,
                accepted: t.offers_accepted,
                declined: t.offers_declined,
                expired: t.offers_expired,
            },
            requests_per_s: t.requests_per_s,
            matches_per_s: t.matches_per_s,
            location_updates_per_s: t.location_updates_per_s,
            engine_location_updates_per_s: engine.location_updates_per_s,
            engine_cpu_cores: engine.cpu_cores,
            engine_request_to_offer_ms: engine
                .request_to_offer_ms
                .map(|(p50, p99)| EngineLatency { p50, p99 }),
            location_backlog: engine.location_backlog,
            no_driver_rate: if finals == 0 {
                0.0
            } else {
                t.no_driver as f64 / finals as f64
            },
            latency_ms: Latencies {
                request_to_offer: latency(&t.request_to_offer),
                request_to_matched: latency(&t.request_to_matched),
                group_request_to_matched: latency(&t.group_request_to_matched),
            },
            pickup_distance_m: Distances::of(&distances),
            violations: t.violations,
            violation_examples: t.violation_examples,
            connected_drivers_peak: peak,
            connect_errors: t.connect_errors,
            first_connect_error: t.first_connect_error,
            engine_rss_kib_peak: engine.rss_kib_peak,
            engine_rss_kib_per_driver: engine
                .rss_kib_peak
                .filter(|_| peak > 0)
                .map(|r| r as f64 / peak as f64),
            driver_errors: t.driver_errors,
            rider_errors: t.rider_errors,
            dropped_arrivals: t.dropped_arrivals,
            flood_frames: t.flood_frames,
            flood_frames_per_s: t.flood_frames_per_s,
            flood_closes: t.flood_closes,
            ops_feed: (plan.ops_watchers > 0).then_some(OpsFeed {
                messages: t.ops_messages,
                bytes: t.ops_bytes,
                snapshot_bytes_max: t.ops_snapshot_bytes_max,
                bytes_per_s: t.ops_bytes_per_s,
            }),
            plan,
        }
    }

    /// The final table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let p = &self.plan;
        let _ = writeln!(
            out,
            "scenario {} against {}: {} drivers, riders {}, {:.0} requests/s offered, {:.1} s{}",
            p.scenario,
            p.url,
            p.drivers,
            match p.riders {
                crate::args::RiderMode::Person => "one connection each".to_string(),
                crate::args::RiderMode::Pooled =>
                    format!("pooled over {} connections", p.rider_connections),
            },
            p.riders_per_s,
            self.elapsed_s,
            if p.workers > 1 {
                format!(", from {} worker processes", p.workers)
            } else {
                String::new()
            }
        );
        let row = |out: &mut String, k: &str, v: String| {
            let _ = writeln!(out, "  {k:<38} {v}");
        };
        row(
            &mut out,
            "requests (acknowledged)",
            format!("{} ({})", self.requests, self.acknowledged),
        );
        row(
            &mut out,
            "matched / no_driver / cancelled",
            format!("{} / {} / {}", self.matches, self.no_driver, self.cancelled),
        );
        row(
            &mut out,
            "offers accepted / declined / expired",
            format!(
                "{} / {} / {}",
                self.offers.accepted, self.offers.declined, self.offers.expired
            ),
        );
        row(
            &mut out,
            "requests/s (steady)",
            format!("{:.1}", self.requests_per_s),
        );
        row(
            &mut out,
            "matches/s (steady)",
            format!("{:.1}", self.matches_per_s),
        );
        row(
            &mut out,
            "location updates/s sent",
            format!("{:.0}", self.location_updates_per_s),
        );
        if let Some(engine) = self.engine_location_updates_per_s {
            row(
                &mut out,
                "location updates/s taken by engine",
                format!("{engine:.0}"),
            );
        }
        if let Some(backlog) = self.location_backlog {
            row(&mut out, "location backlog at end", backlog.to_string());
        }
        row(
            &mut out,
            "no-driver rate",
            format!("{:.2}%", self.no_driver_rate * 100.0),
        );
        for (name, l) in [
            ("request→offer ms", &self.latency_ms.request_to_offer),
            ("request→matched ms", &self.latency_ms.request_to_matched),
        ] {
            row(
                &mut out,
                name,
                format!(
                    "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  (n={})",
                    l.p50, l.p90, l.p99, l.p999, l.max, l.count
                ),
            );
        }
        if p.group_prob > 0.0 {
            let l = &self.latency_ms.group_request_to_matched;
            row(
                &mut out,
                "group requests (matched)",
                format!("{} ({})", self.groups.requests, self.groups.matched),
            );
            row(
                &mut out,
                "group request→matched ms",
                format!(
                    "p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}  (n={})",
                    l.p50, l.p90, l.p99, l.max, l.count
                ),
            );
        }
        let d = &self.pickup_distance_m;
        row(
            &mut out,
            "pickup distance m",
            format!(
                "mean {:.0}  p50 {:.0}  p90 {:.0}  (n={})",
                d.mean, d.p50, d.p90, d.count
            ),
        );
        if p.flood > 0 {
            row(
                &mut out,
                &format!("flood ({} × {:?})", p.flood, p.flood_kind),
                format!(
                    "{} frames written, {} connections closed by the engine",
                    self.flood_frames, self.flood_closes
                ),
            );
        }
        if let Some(feed) = &self.ops_feed {
            row(
                &mut out,
                &format!("ops feed ({} watchers)", p.ops_watchers),
                format!(
                    "{} messages, {:.1} MB ({:.0} kB/s steady), largest snapshot {:.0} kB",
                    feed.messages,
                    feed.bytes as f64 / 1e6,
                    feed.bytes_per_s / 1e3,
                    feed.snapshot_bytes_max as f64 / 1e3
                ),
            );
        }
        row(
            &mut out,
            "connected drivers (peak)",
            self.connected_drivers_peak.to_string(),
        );
        if self.connect_errors > 0 {
            row(
                &mut out,
                "connect errors",
                format!(
                    "{} (first: {})",
                    self.connect_errors,
                    self.first_connect_error.as_deref().unwrap_or("?")
                ),
            );
        }
        if let Some(cores) = self.engine_cpu_cores {
            row(
                &mut out,
                "engine CPU (steady phase)",
                format!("{cores:.2} cores"),
            );
        }
        if let Some(EngineLatency { p50, p99 }) = self.engine_request_to_offer_ms {
            row(
                &mut out,
                "engine request→offer ms (steady)",
                format!("p50 {p50:.3}  p99 {p99:.3}  (its histogram)"),
            );
        }
        if let Some(rss) = self.engine_rss_kib_peak {
            row(
                &mut out,
                "engine RSS peak",
                format!("{:.1} MiB", rss as f64 / 1024.0),
            );
        }
        if let Some(per) = self.engine_rss_kib_per_driver {
            row(
                &mut out,
                "engine RSS per connected driver",
                format!("{per:.1} KiB"),
            );
        }
        row(
            &mut out,
            "errors (drivers / riders)",
            format!("{} / {}", self.driver_errors, self.rider_errors),
        );
        row(&mut out, "VIOLATIONS", self.violations.to_string());
        for example in &self.violation_examples {
            let _ = writeln!(out, "    {example}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_in_milliseconds() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap();
        for micros in 1..=1000u64 {
            h.record(micros * 10).unwrap();
        }
        let p = Percentiles::of(&h);
        assert_eq!(p.count, 1000);
        assert!((p.p50 - 5.0).abs() < 0.01, "{p:?}");
        assert!((p.p99 - 9.9).abs() < 0.02, "{p:?}");
        assert!((p.max - 10.0).abs() < 0.01, "{p:?}");
        assert_eq!(
            Percentiles::of(&Histogram::<u64>::new(3).unwrap()),
            Percentiles::default()
        );
    }

    #[test]
    fn distances_in_metres() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 1_000_000_000, 3).unwrap();
        for metres in 1..=100u64 {
            h.record(metres * 10).unwrap();
        }
        let d = Distances::of(&h);
        assert_eq!(d.count, 100);
        assert!((d.mean - 505.0).abs() < 1.0, "{d:?}");
        assert!((d.p50 - 500.0).abs() < 1.0, "{d:?}");
        assert!((d.p90 - 900.0).abs() < 1.0, "{d:?}");
        assert_eq!(
            Distances::of(&Histogram::<u64>::new(3).unwrap()),
            Distances::default()
        );
    }
}
