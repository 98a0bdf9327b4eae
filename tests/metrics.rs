//! `/metrics` through a real scrape: counters move by the right amounts,
//! latencies are histograms with buckets, and the Grafana dashboard asks only
//! for metrics the engine exports.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;

use common::{wait_for_available, Client};
use ridelock::protocol::ServerMessage;
use serde_json::Value;

const LAT: f64 = 52.5200;
const LON: f64 = 13.4050;

/// The recorder is global to the process: the tests in this file take turns
/// so one's traffic never shows up in the other's deltas.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Scrapes `/metrics` the way a Prometheus with an `ops` token does.
async fn scrape(addr: SocketAddr) -> String {
    let token = common::token(ridelock::auth::Role::Ops, "prometheus");
    let request =
        format!("GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n");
    let response = common::http_raw(addr, &request).await;
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_string()
}

/// Samples of an exposition: `name{labels}` → value.
fn samples(exposition: &str) -> HashMap<String, f64> {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("`series value` lines");
            (series.to_string(), value.parse().expect("numeric sample"))
        })
        .collect()
}

fn value(samples: &HashMap<String, f64>, series: &str) -> f64 {
    samples.get(series).copied().unwrap_or(0.0)
}

/// Metric names in a scrape, as PromQL sees them (`_bucket` etc. included).
fn names(exposition: &str) -> BTreeSet<String> {
    samples(exposition)
        .keys()
        .map(|series| series.split('{').next().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_match_moves_the_counters_and_fills_the_histograms() {
    let _serial = SERIAL.lock().await;
    let engine = common::engine(|_| {}).await;
    let mut driver = Client::available_driver(&engine, "d", LAT, LON).await;
    wait_for_available(&engine, 1).await;
    let before = samples(&scrape(engine.local_addr()).await);

    let mut rider = Client::rider(&engine, "r").await;
    rider.request_ride("q", LAT, LON).await;
    rider.expect_searching("q").await;
    let (offer_id, _) = driver.expect_offer().await;
    driver.accept(offer_id).await;
    assert!(matches!(rider.recv().await, ServerMessage::Matched { .. }));
    assert!(matches!(
        driver.recv().await,
        ServerMessage::TripAssigned { .. }
    ));
    driver.accept(999_999).await;
    assert_eq!(driver.expect_error().await, "unknown_offer");

    let after = samples(&scrape(engine.local_addr()).await);
    let delta = |series: &str| value(&after, series) - value(&before, series);
    assert_eq!(delta("ridelock_ride_requests_total"), 1.0);
    assert_eq!(delta("ridelock_matches_total"), 1.0);
    assert_eq!(delta("ridelock_no_driver_total"), 0.0);
    assert_eq!(delta("ridelock_cancellations_total"), 0.0);
    assert_eq!(delta(r#"ridelock_offers_total{outcome="accepted"}"#), 1.0);
    assert_eq!(delta(r#"ridelock_offers_total{outcome="declined"}"#), 0.0);
    assert_eq!(delta("ridelock_lock_attempts_total"), 1.0);
    assert_eq!(delta("ridelock_lock_refusals_total"), 0.0);
    assert_eq!(
        delta(r#"ridelock_protocol_errors_total{code="unknown_offer"}"#),
        1.0
    );
    // in: request, accept, bad accept; out: searching, offer, matched, trip_assigned, error.
    assert_eq!(delta(r#"ridelock_ws_messages_total{direction="in"}"#), 3.0);
    assert_eq!(delta(r#"ridelock_ws_messages_total{direction="out"}"#), 5.0);
    assert_eq!(value(&after, r#"ridelock_drivers{state="on_trip"}"#), 1.0);
    assert_eq!(value(&after, r#"ridelock_connections{role="rider"}"#), 1.0);

    for histogram in [
        "ridelock_request_to_offer_seconds",
        "ridelock_request_to_matched_seconds",
        "ridelock_offer_response_seconds",
        "ridelock_lock_hold_seconds",
    ] {
        assert_eq!(delta(&format!("{histogram}_count")), 1.0, "{histogram}");
        // Real buckets, not a summary: cumulative, ending in +Inf.
        let inf = format!(r#"{histogram}_bucket{{le="+Inf"}}"#);
        assert_eq!(delta(&inf), 1.0, "{histogram} has no +Inf bucket");
        assert!(after.contains_key(&format!(r#"{histogram}_bucket{{le="0.001"}}"#)));
        assert!(!after
            .keys()
            .any(|k| k.starts_with(histogram) && k.contains("quantile=")));
    }
    // The request took well under a minute: the top finite bucket holds it.
    assert_eq!(
        delta(r#"ridelock_request_to_matched_seconds_bucket{le="60"}"#),
        1.0
    );
    assert!(delta("ridelock_index_query_seconds_count") >= 1.0);
    assert_eq!(delta("ridelock_candidates_tried_count"), 1.0);
    assert_eq!(delta("ridelock_candidates_tried_sum"), 1.0);
    engine.shutdown().await;
}

/// Every metric name a PromQL expression mentions.
fn metric_names_in(expr: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find("ridelock_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        found.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    found
}

fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    let mut exprs = Vec::new();
    let panels = dashboard["panels"].as_array().expect("panels");
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().expect("expr").to_string());
        }
    }
    exprs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_only_asks_for_exported_metrics() {
    let _serial = SERIAL.lock().await;
    // A cluster node (on a private Redis), so that the Redis side's metrics
    // are exported too; everything else is the same as on its own.
    let redis = common::redis::RedisServer::start();
    // The first offer must expire; the later ones are answered, which a
    // loaded machine must manage within the offer's life: a second.
    let engine = common::engine(|c| {
        c.offer_timeout_ms = 1_000;
        c.search_timeout_ms = 500;
        c.redis = vec![redis.url.clone()];
        c.node_id = Some("metrics".into());
        // Batches of one, so that the batch metrics are exported too.
        c.dispatch = ridelock::config::DispatchMode::Batch;
        c.batch_window_ms = 5;
        // So that requests are counted by area too.
        c.service_area = Some(
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/service-area.geojson"
            )
            .into(),
        );
    })
    .await;
    // Traffic that touches every histogram: an expiry, a decline, an accept.
    let mut driver = Client::available_driver(&engine, "d", LAT, LON).await;
    let mut rider = Client::rider(&engine, "r").await;
    rider.request_ride("q1", LAT, LON).await;
    rider.expect_searching("q1").await;
    driver.expect_offer().await;
    assert!(matches!(
        driver.recv().await,
        ServerMessage::OfferRevoked { .. }
    ));
    assert!(matches!(rider.recv().await, ServerMessage::NoDriver { .. }));
    rider.request_ride("q2", LAT, LON).await;
    let (offer_id, _) = driver.expect_offer().await;
    driver.decline(offer_id).await;
    rider.request_ride("q3", LAT, LON).await;
    let (offer_id, _) = driver.expect_offer().await;
    driver.accept(offer_id).await;
    assert!(matches!(
        driver.recv().await,
        ServerMessage::TripAssigned { .. }
    ));
    // The match is counted (with its pickup distance) as the rider is told.
    loop {
        if let ServerMessage::Matched { request_id, .. } = rider.recv().await {
            assert_eq!(&*request_id, "q3");
            break;
        }
    }

    // A group of two, completed: on an engine of its own (cluster mode
    // serves single vehicles only); the exporter is the process's, so the
    // cluster node's /metrics shows it too.
    let single = common::engine(|_| {}).await;
    let mut d1 = Client::available_driver(&single, "g1", LAT, LON).await;
    let mut d2 = Client::available_driver(&single, "g2", LAT + 0.001, LON).await;
    common::wait_for_available(&single, 2).await;
    let mut group_rider = Client::rider(&single, "gr").await;
    group_rider
        .send(serde_json::json!({
            "type": "request_ride", "request_id": "g",
            "pickup": {"lat": LAT, "lon": LON}, "vehicles": 2,
        }))
        .await;
    group_rider.expect_searching("g").await;
    for d in [&mut d1, &mut d2] {
        let (offer_id, _) = d.expect_offer().await;
        d.accept(offer_id).await;
    }
    loop {
        if let ServerMessage::Matched { drivers, .. } = group_rider.recv().await {
            assert_eq!(drivers.len(), 2);
            break;
        }
    }
    single.shutdown().await;

    let exported = names(&scrape(engine.local_addr()).await);
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string("dashboards/ridelock.json").unwrap())
            .expect("the dashboard is JSON");

    // Imports as is: a prometheus datasource variable, no fixed datasource uid.
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(variables.iter().any(|v| v["type"] == "datasource"
        && v["query"] == "prometheus"
        && v["name"] == "datasource"));
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] != "row" {
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "{}",
                panel["title"]
            );
        }
    }

    let exprs = dashboard_exprs(&dashboard);
    assert!(exprs.len() >= 20, "only {} expressions", exprs.len());
    let mut used = BTreeSet::new();
    for expr in &exprs {
        let mentioned = metric_names_in(expr);
        assert!(!mentioned.is_empty(), "{expr} names no ridelock metric");
        for name in mentioned {
            assert!(
                exported.contains(&name),
                "{expr} uses {name}, which the engine does not export"
            );
            used.insert(name);
        }
    }
    // And the dashboard shows every family the engine exports.
    for name in exported.iter().filter(|n| n.starts_with("ridelock_")) {
        let family = name
            .trim_end_matches("_bucket")
            .trim_end_matches("_sum")
            .trim_end_matches("_count");
        assert!(
            used.iter().any(|u| u.starts_with(family)),
            "{family} is exported but on no panel"
        );
    }
    engine.shutdown().await;
}

#[test]
fn metric_names_are_found_in_promql() {
    assert_eq!(
        metric_names_in(
            "sum(rate(ridelock_a_total[1m])) / sum(rate(ridelock_b_total{x=\"y\"}[1m]))"
        ),
        vec!["ridelock_a_total", "ridelock_b_total"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_typed_and_described() {
    let _serial = SERIAL.lock().await;
    let engine = common::engine(|_| {}).await;
    let body = scrape(engine.local_addr()).await;
    assert!(
        body.contains("# TYPE ridelock_offers_total counter"),
        "{body}"
    );
    assert!(
        body.contains("# HELP ridelock_offers_total Offers by outcome"),
        "{body}"
    );
    assert!(body.contains("# TYPE ridelock_drivers gauge"), "{body}");
    engine.shutdown().await;
}
