//! Live measurements shared by every virtual client.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::checker::{Final, RequestLedger};
use crate::events::{unix_ns, Event, EventSink};

/// Violation examples kept (and printed); the count goes on past it.
const EXAMPLES_KEPT: usize = 20;

/// A counter many tasks bump.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// Raises the value to `n` if it is lower.
    pub fn raise_to(&self, n: u64) {
        self.0.fetch_max(n, Ordering::Relaxed);
    }
}

/// A latency histogram in microseconds, 1 µs to 10 min, 3 significant digits.
pub struct Latency(Mutex<Histogram<u64>>);

impl Default for Latency {
    fn default() -> Self {
        Latency(Mutex::new(Latency::empty()))
    }
}

impl Latency {
    /// An empty histogram with the bounds every latency has.
    pub fn empty() -> Histogram<u64> {
        Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
    }

    /// Records one sample.
    pub fn record(&self, elapsed: Duration) {
        let micros = (elapsed.as_micros() as u64).clamp(1, 600_000_000);
        let mut h = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let _ = h.record(micros);
    }

    /// A copy of the samples so far.
    pub fn snapshot(&self) -> Histogram<u64> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A histogram of distances in whole metres, 1 m to 1,000 km.
pub struct Distance(Mutex<Histogram<u64>>);

impl Default for Distance {
    fn default() -> Self {
        Distance(Mutex::new(Distance::empty()))
    }
}

impl Distance {
    /// An empty histogram with the bounds every distance has.
    pub fn empty() -> Histogram<u64> {
        Histogram::new_with_bounds(1, 1_000_000_000, 3).expect("valid histogram bounds")
    }

    /// Records one distance.
    pub fn record(&self, metres: f64) {
        let whole = (metres.round() as u64).clamp(1, 1_000_000_000);
        let mut h = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let _ = h.record(whole);
    }

    /// A copy of the samples so far.
    pub fn snapshot(&self) -> Histogram<u64> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Everything measured during a run.
#[derive(Default)]
pub struct Stats {
    pub requests: Counter,
    /// Requests for more than one vehicle, and those matched.
    pub group_requests: Counter,
    pub group_matches: Counter,
    pub acknowledged: Counter,
    pub matches: Counter,
    pub no_driver: Counter,
    pub cancelled: Counter,
    pub rider_errors: Counter,
    /// Requests the engine refused (`overloaded`, `too_many_requests`).
    pub rejected: Counter,
    pub driver_errors: Counter,
    pub offers_received: Counter,
    pub offers_accepted: Counter,
    pub offers_declined: Counter,
    pub offers_expired: Counter,
    pub locations_sent: Counter,
    pub connect_errors: Counter,
    pub dropped_arrivals: Counter,
    /// Frames sent by flooding connections.
    pub flood_frames: Counter,
    /// Flooding connections the engine closed.
    pub flood_closes: Counter,
    /// Ops feed messages and bytes received by the watchers.
    pub ops_messages: Counter,
    pub ops_bytes: Counter,
    /// The largest snapshot a watcher received.
    pub ops_snapshot_bytes: Counter,
    connected: AtomicU64,
    connected_peak: AtomicU64,
    pub request_to_offer: Latency,
    pub request_to_matched: Latency,
    /// The same for group requests (more than one vehicle).
    pub group_request_to_matched: Latency,
    /// How far each matched driver was from the pickup (`matched`'s
    /// `distance_m`).
    pub pickup_distance: Distance,
    /// When each request was sent, until its first offer is seen.
    awaiting_offer: Mutex<HashMap<String, Instant>>,
    ledger: Mutex<RequestLedger>,
    /// A worker's way to its coordinator (`--workers`).
    events: OnceLock<EventSink>,
    violations: AtomicU64,
    examples: Mutex<Vec<String>>,
    first_connect_error: Mutex<Option<String>>,
}

impl Stats {
    /// Stats of a worker process: what ties its clients to other workers'
    /// goes to `sink` (see [`crate::events`]).
    pub fn for_worker(sink: EventSink) -> Stats {
        let stats = Stats::default();
        let _ = stats.events.set(sink);
        stats
    }

    /// The worker's event sink, if this is a worker.
    pub fn events(&self) -> Option<&EventSink> {
        self.events.get()
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, RequestLedger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The engine answered `searching` for `request_id`.
    pub fn acknowledged_request(&self, request_id: &str) {
        self.ledger().acknowledged(request_id);
        if let Some(events) = self.events() {
            events.send(Event::Acknowledged {
                id: request_id.into(),
            });
        }
    }

    /// `driver` is about to accept an offer of `request_id`.
    pub fn accept_sent(&self, request_id: &str, driver: &str) {
        self.ledger().accept_sent(request_id, driver);
        if let Some(events) = self.events() {
            events.send(Event::Accept {
                id: request_id.into(),
                driver: driver.into(),
            });
        }
    }

    /// A final message for `request_id`; the rule it breaks, if any. A
    /// worker leaves the judging to its coordinator (the accepts may be
    /// another worker's).
    pub fn final_message(&self, request_id: &str, how: Final) -> Option<String> {
        match self.events() {
            Some(events) => {
                self.ledger().final_message(request_id, how.clone());
                events.send(Event::Final {
                    id: request_id.into(),
                    how,
                });
                None
            }
            None => self.ledger().final_message(request_id, how),
        }
    }

    /// Requests the engine acknowledged that are still owed a final message.
    pub fn open_requests(&self) -> usize {
        self.ledger().open_count()
    }

    /// At the end of the run: the requests never ended and, across
    /// processes, `matched` naming a driver whose accept never came.
    pub fn unfinished(&self) -> Vec<String> {
        self.ledger().finish()
    }

    /// A driver connection opened.
    pub fn driver_connected(&self) {
        let now = self.connected.fetch_add(1, Ordering::Relaxed) + 1;
        self.connected_peak.fetch_max(now, Ordering::Relaxed);
    }

    /// A driver connection closed.
    pub fn driver_disconnected(&self) {
        self.connected.fetch_sub(1, Ordering::Relaxed);
    }

    /// Drivers connected now.
    pub fn connected(&self) -> u64 {
        self.connected.load(Ordering::Relaxed)
    }

    /// Most drivers connected at once.
    pub fn connected_peak(&self) -> u64 {
        self.connected_peak.load(Ordering::Relaxed)
    }

    /// A connection attempt failed.
    pub fn connect_failed(&self, error: &anyhow::Error) {
        self.connect_errors.inc();
        let mut first = self
            .first_connect_error
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        first.get_or_insert_with(|| format!("{error:#}"));
    }

    /// The first connection error, if any.
    pub fn first_connect_error(&self) -> Option<String> {
        self.first_connect_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A request for `vehicles` vehicles went out at `at`.
    pub fn request_sent(&self, request_id: &str, vehicles: u8, at: Instant) {
        self.requests.inc();
        if vehicles > 1 {
            self.group_requests.inc();
        }
        self.ledger().requested(request_id, vehicles);
        if let Some(events) = self.events() {
            return events.send(Event::Sent {
                id: request_id.into(),
                vehicles,
                t: unix_ns(at),
            });
        }
        self.awaiting_offer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(request_id.to_string(), at);
    }

    /// A driver received an offer for `request_id`: the first one closes the
    /// request→offer interval.
    pub fn offer_seen(&self, request_id: &str, at: Instant) {
        self.offers_received.inc();
        if let Some(events) = self.events() {
            return events.send(Event::Offer {
                id: request_id.into(),
                t: unix_ns(at),
            });
        }
        let sent = self
            .awaiting_offer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(request_id);
        if let Some(sent) = sent {
            self.request_to_offer
                .record(at.saturating_duration_since(sent));
        }
    }

    /// A request ended; its first-offer clock (if never offered) is dropped.
    pub fn request_ended(&self, request_id: &str) {
        // A worker's coordinator keeps the clock (and forgets requests
        // never offered by age: their first offer, from another worker, may
        // come in after their end).
        if self.events().is_some() {
            return;
        }
        self.awaiting_offer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(request_id);
    }

    /// Records a broken invariant (printed, counted, kept as an example).
    pub fn violation(&self, description: String) {
        let n = self.violations.fetch_add(1, Ordering::Relaxed) + 1;
        let mut examples = self.examples.lock().unwrap_or_else(|e| e.into_inner());
        if examples.len() < EXAMPLES_KEPT {
            eprintln!("VIOLATION: {description}");
            examples.push(description);
        } else if n == EXAMPLES_KEPT as u64 + 1 {
            eprintln!("(further violations are counted, not printed)");
        }
    }

    /// Violations so far.
    pub fn violations(&self) -> u64 {
        self.violations.load(Ordering::Relaxed)
    }

    /// The examples kept.
    pub fn violation_examples(&self) -> Vec<String> {
        self.examples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
