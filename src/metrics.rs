//! Metrics: every name the engine exports, in one place.
//!
//! The engine records through the `metrics` facade; [`install`] sets up the
//! Prometheus exporter once per process and `GET /metrics` renders it. Names
//! follow Prometheus conventions (`_total` counters, `_seconds` in base
//! units); labels stay low-cardinality (never a driver, rider or request id).
//! Histograms get explicit buckets so they render as `_bucket` series that
//! Grafana's `histogram_quantile` can aggregate (the exporter's default would
//! be summaries).

use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use metrics::{counter, gauge, histogram, Counter};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::lock::{Availability, Ending};
use crate::protocol::{ErrorCode, ServerMessage};

/// Latency buckets, seconds: 25 µs to 60 s, roughly ×2.5 apart, fine enough
/// at the bottom for in-process steps and long enough for offer timeouts.
/// Between 1 and 2.5 ms they are 0.5 ms apart, so that a p99 against the
/// 2 ms request→offer target reads as under or over it, not as somewhere in
/// a bucket that straddles it.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.001_5, 0.002, 0.002_5, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0,
];

/// Buckets for candidates tried per request.
pub const CANDIDATE_BUCKETS: &[f64] = &[0.0, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 34.0];
/// Buckets for [`BATCH_REQUESTS`].
pub const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1_000.0, 2_000.0, 5_000.0,
];
/// Buckets for [`PICKUP_DISTANCE`], in metres (up to twice the default
/// widest radius).
pub const DISTANCE_BUCKETS: &[f64] = &[
    50.0, 100.0, 200.0, 300.0, 500.0, 750.0, 1_000.0, 1_500.0, 2_000.0, 3_000.0, 5_000.0, 7_500.0,
    10_000.0, 20_000.0,
];

/// Driver actors by state (`state` = offline, available, offered, on_trip).
pub const DRIVERS: &str = "ridelock_drivers";
/// Open WebSocket connections by `role` (driver, rider).
pub const CONNECTIONS: &str = "ridelock_connections";
/// Ride requests taken.
pub const RIDE_REQUESTS: &str = "ridelock_ride_requests_total";
/// Requests that ended `matched`.
pub const MATCHES: &str = "ridelock_matches_total";
/// Requests that ended `no_driver`.
pub const NO_DRIVER: &str = "ridelock_no_driver_total";
/// Requests that ended `cancelled`.
pub const CANCELLATIONS: &str = "ridelock_cancellations_total";
/// Offers by how they ended (`outcome`).
pub const OFFERS: &str = "ridelock_offers_total";
/// Lock attempts on drivers.
pub const LOCK_ATTEMPTS: &str = "ridelock_lock_attempts_total";
/// Lock attempts refused (the driver was taken or went away: contention).
pub const LOCK_REFUSALS: &str = "ridelock_lock_refusals_total";
/// How long a driver's lock was held, grant to end.
pub const LOCK_HOLD: &str = "ridelock_lock_hold_seconds";
/// Request read by the session to the first offer handed to the driver's
/// connection (includes the wait in the matcher's queue).
pub const REQUEST_TO_OFFER: &str = "ridelock_request_to_offer_seconds";
/// Request received to `matched`.
pub const REQUEST_TO_MATCHED: &str = "ridelock_request_to_matched_seconds";
/// Offer made to the driver's accept or decline.
pub const OFFER_RESPONSE: &str = "ridelock_offer_response_seconds";
/// One nearest-driver look-up in the index.
pub const INDEX_QUERY: &str = "ridelock_index_query_seconds";
/// Drivers asked per request, counted when the request ends.
pub const CANDIDATES_TRIED: &str = "ridelock_candidates_tried";
/// Searches in flight.
pub const SEARCHES_IN_FLIGHT: &str = "ridelock_searches_in_flight";
/// Searches parked waiting for a driver.
pub const WAITING_RIDERS: &str = "ridelock_waiting_riders";
/// Drivers in the spatial index (offerable).
pub const INDEX_DRIVERS: &str = "ridelock_index_drivers";
/// Location updates taken from drivers.
pub const LOCATION_UPDATES: &str = "ridelock_location_updates_total";
/// Drivers taken out of the index because their last location grew older
/// than `--location-max-age-s`.
pub const STALE_DRIVERS: &str = "ridelock_stale_drivers_total";
/// Batch dispatch: requests in each batch's assignment (those waiting for
/// a nearer driver again in each assignment they sit out).
pub const BATCH_REQUESTS: &str = "ridelock_batch_requests";
/// Batch dispatch: requests that sat out an assignment for a nearer driver
/// (`--batch-wait-m`), once per assignment.
pub const BATCH_WAITS: &str = "ridelock_batch_waits_total";
/// Batch dispatch: the time one batch took to assign (candidate look-ups
/// and solving), on the matcher thread.
pub const BATCH_ASSIGNMENT: &str = "ridelock_batch_assignment_seconds";
/// Pickup distance of each match, in metres.
pub const PICKUP_DISTANCE: &str = "ridelock_pickup_distance_meters";
/// Ride requests by the service `area` of their pickup (only with
/// `--service-area`).
pub const AREA_REQUESTS: &str = "ridelock_area_requests_total";
/// With `--service-area`: what was outside every area, by `kind`:
/// `request` (refused with `outside_service_area`) or `driver` (a change of
/// a driver connected to this node, to a position outside every area; a
/// driver moves the index only every few metres, so this is not per
/// location update).
pub const OUTSIDE_SERVICE_AREA: &str = "ridelock_outside_service_area_total";
/// Ride requests by how many vehicles they ask for (`size`, 1 to 4).
pub const GROUP_SIZE_REQUESTS: &str = "ridelock_requests_by_group_size_total";
/// Group requests (more than one vehicle): request to every member's
/// accept (the group complete).
pub const GROUP_COMPLETION: &str = "ridelock_group_completion_seconds";
/// Group requests that failed, by `reason` (group_incomplete,
/// rider_cancelled).
pub const GROUPS_FAILED: &str = "ridelock_groups_failed_total";
/// Drivers an older group took back from a younger one.
pub const PREEMPTIONS: &str = "ridelock_preemptions_total";
/// Batches sent on the ops feed (one per interval with changes, however
/// many watchers).
pub const OPS_BATCHES: &str = "ridelock_ops_batches_total";
/// Bytes of those batches (each serialised once for every watcher).
pub const OPS_BATCH_BYTES: &str = "ridelock_ops_batch_bytes_total";
/// Ops watchers sent a fresh snapshot because they fell behind the batches.
pub const OPS_RESYNCS: &str = "ridelock_ops_resyncs_total";
/// WebSocket messages by `direction` (in, out).
pub const WS_MESSAGES: &str = "ridelock_ws_messages_total";
/// Errors sent to clients by `code`.
pub const PROTOCOL_ERRORS: &str = "ridelock_protocol_errors_total";
/// Incoming frames that had to wait for their connection's allowance (the
/// session stops reading until a token is there).
pub const FRAMES_DELAYED: &str = "ridelock_frames_delayed_total";
/// Connections closed for flooding (1008).
pub const FLOOD_CLOSES: &str = "ridelock_flood_closes_total";
/// Connections refused before the upgrade, by `reason`: `unauthorized`
/// (401), `origin` (403), `address_limit` (429), `connection_limit` (503).
pub const CONNECTIONS_REFUSED: &str = "ridelock_connections_refused_total";

/// The `reason` labels of [`CONNECTIONS_REFUSED`].
pub const REFUSAL_REASONS: [&str; 4] = [
    "unauthorized",
    "origin",
    "address_limit",
    "connection_limit",
];

/// Cluster mode: one Redis lock operation across the servers, by `op`
/// (acquire, confirm, renew, release, finish, settle).
pub const REDIS_OP: &str = "ridelock_redis_op_seconds";
/// Cluster mode: lock operations that failed, by `kind`: `held` (another
/// offer holds the lock), `no_quorum`, `slow`, `lost` (an accept's confirm or
/// a trip's renewal found the lock gone), `undecided` (a settle try without a
/// majority answering).
pub const REDIS_LOCK_ERRORS: &str = "ridelock_redis_lock_errors_total";
/// Cluster mode: lock acquisitions refused because fewer than a majority of
/// Redis servers answered in time.
pub const REDIS_QUORUM_FAILURES: &str = "ridelock_redis_quorum_failures_total";
/// Cluster mode: messages to other nodes (availability and offers) by
/// `result` (ok, failed), counted per server written to.
pub const CLUSTER_MESSAGES: &str = "ridelock_cluster_messages_total";
/// Cluster mode: what this node read from the others, by `kind`:
/// `message` (pub/sub messages), `announcement` (other nodes' drivers'
/// availability changes, however many a message carries).
pub const CLUSTER_RECEIVED: &str = "ridelock_cluster_received_total";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

// Handles for the per-message counters, looked up once: `counter!` hashes the
// key into the registry on every call, which shows in profiles at 100k
// messages per second. They are first touched after `install` (the engine
// installs the recorder before it serves anything).
static LOCATION_UPDATES_COUNTER: LazyLock<Counter> = LazyLock::new(|| counter!(LOCATION_UPDATES));
static WS_IN_COUNTER: LazyLock<Counter> =
    LazyLock::new(|| counter!(WS_MESSAGES, "direction" => "in"));
static WS_OUT_COUNTER: LazyLock<Counter> =
    LazyLock::new(|| counter!(WS_MESSAGES, "direction" => "out"));

/// Installs the Prometheus recorder (once per process; later calls return the
/// same handle) and starts its upkeep thread, which drains histogram samples.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(CANDIDATES_TRIED.into()),
                        CANDIDATE_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(PICKUP_DISTANCE.into()),
                        DISTANCE_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(BATCH_REQUESTS.into()), BATCH_BUCKETS)
                })
                .expect("bucket lists are non-empty");
            let handle = match builder.install_recorder() {
                Ok(handle) => handle,
                // Another recorder is installed (an embedding program's own):
                // keep a private one so /metrics still renders.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            };
            describe();
            preregister();
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(Duration::from_secs(5));
                    upkeep.run_upkeep();
                })
                .expect("spawn metrics upkeep thread");
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(DRIVERS, "Driver actors by state");
    describe_gauge!(CONNECTIONS, "Open WebSocket connections by role");
    describe_counter!(RIDE_REQUESTS, "Ride requests taken");
    describe_counter!(MATCHES, "Requests matched to a driver");
    describe_counter!(
        NO_DRIVER,
        "Requests that found no driver before their deadline"
    );
    describe_counter!(CANCELLATIONS, "Requests cancelled by the rider");
    describe_counter!(OFFERS, "Offers by outcome");
    describe_counter!(LOCK_ATTEMPTS, "Attempts to lock a driver");
    describe_counter!(LOCK_REFUSALS, "Lock attempts refused by the driver");
    describe_histogram!(LOCK_HOLD, Unit::Seconds, "Time a driver's lock was held");
    describe_histogram!(
        REQUEST_TO_OFFER,
        Unit::Seconds,
        "Ride request to first offer"
    );
    describe_histogram!(REQUEST_TO_MATCHED, Unit::Seconds, "Ride request to matched");
    describe_histogram!(
        OFFER_RESPONSE,
        Unit::Seconds,
        "Offer to the driver's answer"
    );
    describe_histogram!(INDEX_QUERY, Unit::Seconds, "Nearest-driver index look-up");
    describe_histogram!(CANDIDATES_TRIED, Unit::Count, "Drivers asked per request");
    describe_gauge!(SEARCHES_IN_FLIGHT, "Searches in flight");
    describe_gauge!(
        WAITING_RIDERS,
        "Searches waiting for a driver to become free"
    );
    describe_gauge!(INDEX_DRIVERS, "Available drivers in the spatial index");
    describe_counter!(LOCATION_UPDATES, "Driver location updates");
    describe_counter!(
        STALE_DRIVERS,
        "Drivers taken out of the index for a location older than --location-max-age-s"
    );
    describe_histogram!(
        PICKUP_DISTANCE,
        "Distance from the matched driver to the pickup, in metres"
    );
    describe_counter!(AREA_REQUESTS, "Ride requests by service area");
    describe_histogram!(
        BATCH_REQUESTS,
        "Requests in each batch's assignment, waiting ones included (--dispatch batch)"
    );
    describe_counter!(
        BATCH_WAITS,
        "Requests that sat out a batch's assignment for a nearer driver, once per assignment (--batch-wait-m)"
    );
    describe_histogram!(
        BATCH_ASSIGNMENT,
        Unit::Seconds,
        "Time to assign one batch on the matcher thread (--dispatch batch)"
    );
    describe_counter!(
        OUTSIDE_SERVICE_AREA,
        "Requests refused and driver positions ignored for being outside every service area, by kind"
    );
    describe_counter!(
        GROUP_SIZE_REQUESTS,
        "Ride requests by how many vehicles they ask for"
    );
    describe_histogram!(
        GROUP_COMPLETION,
        Unit::Seconds,
        "Group request to every member accepted"
    );
    describe_counter!(GROUPS_FAILED, "Group requests failed by reason");
    describe_counter!(
        PREEMPTIONS,
        "Drivers an older group took back from a younger one"
    );
    describe_counter!(OPS_BATCHES, "Batches of changes sent on the ops feed");
    describe_counter!(OPS_BATCH_BYTES, "Bytes of the ops feed's batches");
    describe_counter!(
        OPS_RESYNCS,
        "Ops watchers sent a snapshot after falling behind"
    );
    describe_counter!(WS_MESSAGES, "WebSocket messages by direction");
    describe_counter!(PROTOCOL_ERRORS, "Errors sent to clients by code");
    describe_counter!(
        FRAMES_DELAYED,
        "Incoming frames that waited for their connection's allowance"
    );
    describe_counter!(FLOOD_CLOSES, "Connections closed for flooding");
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections refused before the upgrade by reason"
    );
    describe_histogram!(REDIS_OP, Unit::Seconds, "Redis lock operations by op");
    describe_counter!(REDIS_LOCK_ERRORS, "Failed Redis lock operations by kind");
    describe_counter!(
        REDIS_QUORUM_FAILURES,
        "Lock acquisitions without a majority of Redis servers answering"
    );
    describe_counter!(
        CLUSTER_MESSAGES,
        "Messages published to other nodes by result"
    );
    describe_counter!(
        CLUSTER_RECEIVED,
        "Messages and driver announcements read from other nodes"
    );
}

/// Creates every counter and gauge at zero, with every label value it can
/// take, so dashboards show a flat zero instead of "no data" and `rate()` has
/// a starting point.
fn preregister() {
    for counter in [
        RIDE_REQUESTS,
        MATCHES,
        NO_DRIVER,
        CANCELLATIONS,
        LOCK_ATTEMPTS,
        LOCK_REFUSALS,
        LOCATION_UPDATES,
        STALE_DRIVERS,
        REDIS_QUORUM_FAILURES,
        FRAMES_DELAYED,
        FLOOD_CLOSES,
        PREEMPTIONS,
        OPS_BATCHES,
        OPS_BATCH_BYTES,
        OPS_RESYNCS,
        BATCH_WAITS,
    ] {
        counter!(counter).increment(0);
    }
    for size in 1..=crate::protocol::MAX_VEHICLES {
        counter!(GROUP_SIZE_REQUESTS, "size" => size.to_string()).increment(0);
    }
    for reason in [Ending::GroupIncomplete, Ending::RiderCancelled] {
        counter!(GROUPS_FAILED, "reason" => reason.as_str()).increment(0);
    }
    for reason in REFUSAL_REASONS {
        counter!(CONNECTIONS_REFUSED, "reason" => reason).increment(0);
    }
    for kind in ["held", "no_quorum", "slow", "lost", "undecided"] {
        counter!(REDIS_LOCK_ERRORS, "kind" => kind).increment(0);
    }
    for result in ["ok", "failed"] {
        counter!(CLUSTER_MESSAGES, "result" => result).increment(0);
    }
    for kind in ["message", "announcement"] {
        counter!(CLUSTER_RECEIVED, "kind" => kind).increment(0);
    }
    for kind in ["request", "driver"] {
        counter!(OUTSIDE_SERVICE_AREA, "kind" => kind).increment(0);
    }
    for ending in [
        Ending::Accepted,
        Ending::Declined,
        Ending::Expired,
        Ending::RiderCancelled,
        Ending::DriverDisconnected,
        Ending::GroupIncomplete,
        Ending::Preempted,
    ] {
        counter!(OFFERS, "outcome" => ending.as_str()).increment(0);
    }
    for direction in ["in", "out"] {
        counter!(WS_MESSAGES, "direction" => direction).increment(0);
    }
    for code in ErrorCode::ALL {
        counter!(PROTOCOL_ERRORS, "code" => code.as_str()).increment(0);
    }
    for state in [
        Availability::Offline,
        Availability::Available,
        Availability::Offered,
        Availability::OnTrip,
    ] {
        gauge!(DRIVERS, "state" => state.as_str()).increment(0.0);
    }
    for role in ["driver", "rider", "ops"] {
        gauge!(CONNECTIONS, "role" => role).increment(0.0);
    }
    matcher_gauges(0, 0, 0);
}

pub(crate) fn driver_state_entered(state: Availability) {
    gauge!(DRIVERS, "state" => state.as_str()).increment(1.0);
}

pub(crate) fn driver_state_left(state: Availability) {
    gauge!(DRIVERS, "state" => state.as_str()).decrement(1.0);
}

pub(crate) fn connection_opened(role: &'static str) {
    gauge!(CONNECTIONS, "role" => role).increment(1.0);
}

pub(crate) fn connection_closed(role: &'static str) {
    gauge!(CONNECTIONS, "role" => role).decrement(1.0);
}

pub(crate) fn request_received() {
    counter!(RIDE_REQUESTS).increment(1);
}

pub(crate) fn request_vehicles(vehicles: u8) {
    // Four label values: the counters exist already (`preregister`).
    const SIZES: [&str; 4] = ["1", "2", "3", "4"];
    let size = SIZES[usize::from(vehicles.clamp(1, 4)) - 1];
    counter!(GROUP_SIZE_REQUESTS, "size" => size).increment(1);
}

pub(crate) fn group_completed(age: Duration) {
    histogram!(GROUP_COMPLETION).record(age);
}

pub(crate) fn group_failed(why: Ending) {
    counter!(GROUPS_FAILED, "reason" => why.as_str()).increment(1);
}

pub(crate) fn preemption() {
    counter!(PREEMPTIONS).increment(1);
}

pub(crate) fn ops_batch(bytes: usize) {
    counter!(OPS_BATCHES).increment(1);
    counter!(OPS_BATCH_BYTES).increment(bytes as u64);
}

pub(crate) fn ops_resynced() {
    counter!(OPS_RESYNCS).increment(1);
}

pub(crate) fn search_finished(message: &ServerMessage, age: Duration, candidates: u32) {
    match message {
        ServerMessage::Matched { .. } => {
            counter!(MATCHES).increment(1);
            histogram!(REQUEST_TO_MATCHED).record(age);
        }
        ServerMessage::NoDriver { .. } => counter!(NO_DRIVER).increment(1),
        ServerMessage::Cancelled { .. } => counter!(CANCELLATIONS).increment(1),
        _ => {}
    }
    histogram!(CANDIDATES_TRIED).record(candidates as f64);
}

pub(crate) fn offer_ended(ending: Ending, held_for: Duration) {
    counter!(OFFERS, "outcome" => ending.as_str()).increment(1);
    histogram!(LOCK_HOLD).record(held_for);
    if matches!(ending, Ending::Accepted | Ending::Declined) {
        histogram!(OFFER_RESPONSE).record(held_for);
    }
}

pub(crate) fn lock_attempt(granted: bool) {
    counter!(LOCK_ATTEMPTS).increment(1);
    if !granted {
        counter!(LOCK_REFUSALS).increment(1);
    }
}

pub(crate) fn request_to_offer(elapsed: Duration) {
    histogram!(REQUEST_TO_OFFER).record(elapsed);
}

pub(crate) fn index_query(elapsed: Duration) {
    histogram!(INDEX_QUERY).record(elapsed);
}

pub(crate) fn matcher_gauges(searches: usize, waiting: usize, indexed: usize) {
    gauge!(SEARCHES_IN_FLIGHT).set(searches as f64);
    gauge!(WAITING_RIDERS).set(waiting as f64);
    gauge!(INDEX_DRIVERS).set(indexed as f64);
}

pub(crate) fn location_update() {
    LOCATION_UPDATES_COUNTER.increment(1);
}

pub(crate) fn driver_went_stale() {
    counter!(STALE_DRIVERS).increment(1);
}

pub(crate) fn pickup_distance(metres: f64) {
    histogram!(PICKUP_DISTANCE).record(metres);
}

pub(crate) fn batch_assigned(requests: usize, took: Duration) {
    histogram!(BATCH_REQUESTS).record(requests as f64);
    histogram!(BATCH_ASSIGNMENT).record(took.as_secs_f64());
}

pub(crate) fn batch_waited(requests: usize) {
    counter!(BATCH_WAITS).increment(requests as u64);
}

pub(crate) fn area_request(area: &str) {
    counter!(AREA_REQUESTS, "area" => area.to_string()).increment(1);
}

pub(crate) fn outside_service_area(kind: &'static str) {
    counter!(OUTSIDE_SERVICE_AREA, "kind" => kind).increment(1);
}

pub(crate) fn ws_message_in() {
    WS_IN_COUNTER.increment(1);
}

pub(crate) fn ws_messages_out(count: u64) {
    WS_OUT_COUNTER.increment(count);
}

pub(crate) fn protocol_error(code: ErrorCode) {
    counter!(PROTOCOL_ERRORS, "code" => code.as_str()).increment(1);
}

pub(crate) fn frame_delayed() {
    counter!(FRAMES_DELAYED).increment(1);
}

pub(crate) fn flood_closed() {
    counter!(FLOOD_CLOSES).increment(1);
}

pub(crate) fn connection_refused(reason: &'static str) {
    counter!(CONNECTIONS_REFUSED, "reason" => reason).increment(1);
}

pub(crate) fn redis_op(op: &'static str, elapsed: Duration, ok: bool) {
    histogram!(REDIS_OP, "op" => op).record(elapsed);
    if !ok && (op == "confirm" || op == "renew") {
        counter!(REDIS_LOCK_ERRORS, "kind" => "lost").increment(1);
    }
}

pub(crate) fn redis_lock_refused(error: &crate::cluster::store::LockError) {
    let kind = error.kind();
    counter!(REDIS_LOCK_ERRORS, "kind" => kind).increment(1);
    if kind == "no_quorum" {
        counter!(REDIS_QUORUM_FAILURES).increment(1);
    }
}

pub(crate) fn redis_settle_undecided() {
    counter!(REDIS_LOCK_ERRORS, "kind" => "undecided").increment(1);
}

pub(crate) fn cluster_received(messages: u64, announcements: u64) {
    counter!(CLUSTER_RECEIVED, "kind" => "message").increment(messages);
    counter!(CLUSTER_RECEIVED, "kind" => "announcement").increment(announcements);
}

pub(crate) fn cluster_published(messages: usize, ok: bool) {
    let result = if ok { "ok" } else { "failed" };
    counter!(CLUSTER_MESSAGES, "result" => result).increment(messages as u64);
}
