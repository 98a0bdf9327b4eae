//! What one run counted, in a form that adds up: a process's counters,
//! rates and histograms (as value/count pairs, so that merging them is
//! exact, not an average of percentiles). A single process turns its own
//! into the report; with `--workers`, each worker sends its totals to the
//! coordinator, which adds them up and reports once.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::stats::Stats;

/// A histogram's recorded values and how often each was recorded.
pub type Buckets = Vec<(u64, u64)>;

/// The recorded values of `h`.
pub fn buckets(h: &Histogram<u64>) -> Buckets {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

/// Adds `buckets` into `h`.
pub fn add_buckets(h: &mut Histogram<u64>, buckets: &Buckets) {
    for &(value, count) in buckets {
        // Values came from a histogram with the same bounds.
        let _ = h.record_n(value, count);
    }
}

/// One process's counts.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Totals {
    pub requests: u64,
    pub acknowledged: u64,
    pub rejected: u64,
    pub matches: u64,
    pub no_driver: u64,
    pub cancelled: u64,
    pub group_requests: u64,
    pub group_matches: u64,
    pub offers_received: u64,
    pub offers_accepted: u64,
    pub offers_declined: u64,
    pub offers_expired: u64,
    pub locations_sent: u64,
    /// Over the steady phase.
    pub requests_per_s: f64,
    pub matches_per_s: f64,
    pub location_updates_per_s: f64,
    pub violations: u64,
    pub violation_examples: Vec<String>,
    pub connected_peak: u64,
    pub connect_errors: u64,
    pub first_connect_error: Option<String>,
    pub driver_errors: u64,
    pub rider_errors: u64,
    pub dropped_arrivals: u64,
    pub flood_frames: u64,
    pub flood_frames_per_s: f64,
    pub flood_closes: u64,
    pub ops_messages: u64,
    pub ops_bytes: u64,
    pub ops_snapshot_bytes_max: u64,
    pub ops_bytes_per_s: f64,
    pub request_to_offer: Buckets,
    pub request_to_matched: Buckets,
    pub group_request_to_matched: Buckets,
    pub pickup_distance: Buckets,
}

/// Rates over the steady phase, from the counters at its start and end.
#[derive(Clone, Copy, Debug, Default)]
pub struct SteadyRates {
    pub requests_per_s: f64,
    pub matches_per_s: f64,
    pub location_updates_per_s: f64,
    pub ops_bytes_per_s: f64,
    pub window_s: f64,
}

impl Totals {
    /// What `stats` counted, with the steady phase's rates.
    pub fn of(stats: &Stats, rates: SteadyRates) -> Totals {
        Totals {
            requests: stats.requests.get(),
            acknowledged: stats.acknowledged.get(),
            rejected: stats.rejected.get(),
            matches: stats.matches.get(),
            no_driver: stats.no_driver.get(),
            cancelled: stats.cancelled.get(),
            group_requests: stats.group_requests.get(),
            group_matches: stats.group_matches.get(),
            offers_received: stats.offers_received.get(),
            offers_accepted: stats.offers_accepted.get(),
            offers_declined: stats.offers_declined.get(),
            offers_expired: stats.offers_expired.get(),
            locations_sent: stats.locations_sent.get(),
            requests_per_s: rates.requests_per_s,
            matches_per_s: rates.matches_per_s,
            location_updates_per_s: rates.location_updates_per_s,
            violations: stats.violations(),
            violation_examples: stats.violation_examples(),
            connected_peak: stats.connected_peak(),
            connect_errors: stats.connect_errors.get(),
            first_connect_error: stats.first_connect_error(),
            driver_errors: stats.driver_errors.get(),
            rider_errors: stats.rider_errors.get(),
            dropped_arrivals: stats.dropped_arrivals.get(),
            flood_frames: stats.flood_frames.get(),
            flood_frames_per_s: stats.flood_frames.get() as f64 / rates.window_s.max(1e-9),
            flood_closes: stats.flood_closes.get(),
            ops_messages: stats.ops_messages.get(),
            ops_bytes: stats.ops_bytes.get(),
            ops_snapshot_bytes_max: stats.ops_snapshot_bytes.get(),
            ops_bytes_per_s: rates.ops_bytes_per_s,
            request_to_offer: buckets(&stats.request_to_offer.snapshot()),
            request_to_matched: buckets(&stats.request_to_matched.snapshot()),
            group_request_to_matched: buckets(&stats.group_request_to_matched.snapshot()),
            pickup_distance: buckets(&stats.pickup_distance.snapshot()),
        }
    }

    /// Adds another process's counts (rates add up: the processes' steady
    /// phases are the same stretch of time).
    pub fn add(&mut self, other: &Totals) {
        self.requests += other.requests;
        self.acknowledged += other.acknowledged;
        self.rejected += other.rejected;
        self.matches += other.matches;
        self.no_driver += other.no_driver;
        self.cancelled += other.cancelled;
        self.group_requests += other.group_requests;
        self.group_matches += other.group_matches;
        self.offers_received += other.offers_received;
        self.offers_accepted += other.offers_accepted;
        self.offers_declined += other.offers_declined;
        self.offers_expired += other.offers_expired;
        self.locations_sent += other.locations_sent;
        self.requests_per_s += other.requests_per_s;
        self.matches_per_s += other.matches_per_s;
        self.location_updates_per_s += other.location_updates_per_s;
        self.violations += other.violations;
        self.violation_examples
            .extend(other.violation_examples.iter().cloned());
        self.connected_peak += other.connected_peak;
        self.connect_errors += other.connect_errors;
        if self.first_connect_error.is_none() {
            self.first_connect_error = other.first_connect_error.clone();
        }
        self.driver_errors += other.driver_errors;
        self.rider_errors += other.rider_errors;
        self.dropped_arrivals += other.dropped_arrivals;
        self.flood_frames += other.flood_frames;
        self.flood_frames_per_s += other.flood_frames_per_s;
        self.flood_closes += other.flood_closes;
        self.ops_messages += other.ops_messages;
        self.ops_bytes += other.ops_bytes;
        self.ops_snapshot_bytes_max = self
            .ops_snapshot_bytes_max
            .max(other.ops_snapshot_bytes_max);
        self.ops_bytes_per_s += other.ops_bytes_per_s;
        for (mine, theirs) in [
            (&mut self.request_to_offer, &other.request_to_offer),
            (&mut self.request_to_matched, &other.request_to_matched),
            (
                &mut self.group_request_to_matched,
                &other.group_request_to_matched,
            ),
            (&mut self.pickup_distance, &other.pickup_distance),
        ] {
            mine.extend(theirs.iter().copied());
        }
    }
}
