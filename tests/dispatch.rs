//! Who may be offered to whom, through real sockets: service areas, drivers
//! whose location went stale, and a search radius that grows while a rider
//! waits.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{wait_for_available, wait_for_waiting, Client};
use ridelock::protocol::ServerMessage;
use serde_json::json;

const LAT: f64 = 52.5200;
const LON: f64 = 13.4050;

fn service_area_file() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/service-area.geojson"
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pickup_outside_every_service_area_is_refused_and_changes_nothing() {
    let engine = common::engine(|c| c.service_area = Some(service_area_file())).await;
    let mut rider = Client::rider(&engine, "r1").await;
    // East of "mitte" (which ends at 13.45) and north of "airport".
    rider.request_ride("outside", 52.52, 13.47).await;
    match rider.recv().await {
        ServerMessage::Error {
            code,
            request_id,
            message,
        } => {
            assert_eq!(code.as_str(), "outside_service_area");
            assert_eq!(request_id.as_deref(), Some("outside"));
            assert!(message.contains("outside every area"), "{message}");
        }
        other => panic!("expected an error, got {other:?}"),
    }
    assert_eq!(engine.stats().await.searches, 0);
    // Inside either area: searching as usual.
    rider.request_ride("mitte", LAT, LON).await;
    rider.expect_searching("mitte").await;
    rider.request_ride("airport", 52.37, 13.50).await;
    rider.expect_searching("airport").await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_outside_every_service_area_is_not_offered_until_inside() {
    let engine = common::engine(|c| c.service_area = Some(service_area_file())).await;
    // 1.4 km east of the pickup, but past the area's eastern edge.
    let mut driver = Client::available_driver(&engine, "d1", 52.52, 13.46).await;
    let mut rider = Client::rider(&engine, "r1").await;
    rider.request_ride("q", 52.52, 13.44).await;
    rider.expect_searching("q").await;
    wait_for_waiting(&engine, 1).await;
    driver.expect_silence(Duration::from_millis(300)).await;

    // The driver crosses into the area: the waiting rider gets it.
    driver
        .send(json!({"type": "location", "lat": 52.52, "lon": 13.449}))
        .await;
    let (offer_id, _) = driver.expect_offer().await;
    driver.accept(offer_id).await;
    assert_eq!(rider.expect_matched().await, "d1");
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_whose_location_went_stale_is_offered_again_after_a_fresh_one() {
    let engine = common::engine(|c| c.location_max_age_s = 1).await;
    let mut driver = Client::available_driver(&engine, "d1", LAT + 0.001, LON).await;
    wait_for_available(&engine, 1).await;
    // Connected and available, but silent for longer than the max age.
    wait_for_available(&engine, 0).await;

    let mut rider = Client::rider(&engine, "r1").await;
    rider.request_ride("q", LAT, LON).await;
    rider.expect_searching("q").await;
    wait_for_waiting(&engine, 1).await;
    driver.expect_silence(Duration::from_millis(300)).await;

    driver
        .send(json!({"type": "location", "lat": LAT + 0.001, "lon": LON}))
        .await;
    let (offer_id, _) = driver.expect_offer().await;
    driver.accept(offer_id).await;
    assert_eq!(rider.expect_matched().await, "d1");
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_search_radius_grows_until_a_driver_is_in_reach() {
    let engine = common::engine(|c| {
        c.radius_m = 1_000.0;
        c.radius_step_m = 1_000.0;
        c.radius_step_ms = 400;
        c.max_radius_m = Some(3_000.0);
    })
    .await;
    // About 2.5 km north: in reach once the radius has grown twice.
    let mut driver = Client::available_driver(&engine, "d1", LAT + 0.0225, LON).await;
    // 3.3 km south: never in reach.
    let mut beyond = Client::available_driver(&engine, "d2", LAT - 0.03, LON).await;
    wait_for_available(&engine, 2).await;

    let mut rider = Client::rider(&engine, "r1").await;
    rider.request_ride("q", LAT, LON).await;
    rider.expect_searching("q").await;
    wait_for_waiting(&engine, 1).await;
    let (offer_id, _) = driver.expect_offer().await;
    driver.decline(offer_id).await;
    // Declined: the search waits again, at its widest, and d2 stays out.
    wait_for_waiting(&engine, 1).await;
    beyond.expect_silence(Duration::from_millis(1_000)).await;
    engine.shutdown().await;
}

#[tokio::test]
async fn an_unusable_service_area_file_or_radius_stops_the_engine_saying_why() {
    let dir = std::env::temp_dir().join(format!("ridelock-areas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let line = dir.join("line.geojson");
    std::fs::write(
        &line,
        r#"{"type":"FeatureCollection","features":[{"type":"Feature","properties":{"name":"road"},"geometry":{"type":"LineString","coordinates":[[13.3,52.5],[13.4,52.5]]}}]}"#,
    )
    .unwrap();
    let refusal = |adjust: Box<dyn FnOnce(&mut ridelock::Config)>| async move {
        match ridelock::engine::Engine::start(common::config(adjust)).await {
            Err(e) => e.to_string(),
            Ok(engine) => {
                engine.shutdown().await;
                panic!("started")
            }
        }
    };
    let missing = dir.join("missing.geojson");
    let why = refusal(Box::new(move |c| c.service_area = Some(missing))).await;
    assert!(
        why.contains("--service-area") && why.contains("missing.geojson"),
        "{why}"
    );
    let why = refusal(Box::new(move |c| c.service_area = Some(line))).await;
    assert!(why.contains("Polygon"), "{why}");
    let why = refusal(Box::new(|c| c.max_radius_m = Some(100.0))).await;
    assert!(why.contains("--max-radius-m"), "{why}");
    let why = refusal(Box::new(|c| c.radius_step_m = -1.0)).await;
    assert!(why.contains("--radius-step-m"), "{why}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `metres` north of the test's pickup origin.
fn north(metres: f64) -> f64 {
    LAT + metres / 111_195.0
}

/// Rider A waits at 0 m and rider B at 600 m; driver "a" is at 300 m and
/// driver "b" at -400 m. Greedy gives A its nearest ("a", 300 m) and leaves
/// B with "b" at 1,000 m (1,300 m in all); the optimum is A–b and B–a
/// (700 m). The pickup each driver is offered says which request it got.
async fn crossing(dispatch: ridelock::config::DispatchMode) -> (String, String) {
    let engine = common::engine(|c| {
        c.dispatch = dispatch;
        c.batch_window_ms = 400;
        c.batch_wait_m = 0;
    })
    .await;
    let mut a = Client::available_driver(&engine, "a", north(300.0), LON).await;
    let mut b = Client::available_driver(&engine, "b", north(-400.0), LON).await;
    wait_for_available(&engine, 2).await;
    let mut rider_a = Client::rider(&engine, "rider-a").await;
    let mut rider_b = Client::rider(&engine, "rider-b").await;
    rider_a.request_ride("A", north(0.0), LON).await;
    rider_a.expect_searching("A").await;
    rider_b.request_ride("B", north(600.0), LON).await;
    rider_b.expect_searching("B").await;
    let (offer_a, got_a) = a.expect_offer().await;
    let (offer_b, got_b) = b.expect_offer().await;
    a.accept(offer_a).await;
    b.accept(offer_b).await;
    let matched_a = rider_a.expect_matched().await;
    let matched_b = rider_b.expect_matched().await;
    // Each rider is matched with the driver that was offered its request.
    let driver_for_a = if got_a == "A" { "a" } else { "b" };
    assert_eq!(matched_a, driver_for_a);
    assert_ne!(matched_a, matched_b);
    engine.shutdown().await;
    (got_a, got_b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_dispatch_does_not_cross_two_riders_that_greedy_crosses() {
    use ridelock::config::DispatchMode;
    // Greedy: A (first) takes "a", B is left with "b".
    assert_eq!(
        crossing(DispatchMode::Greedy).await,
        ("A".to_string(), "B".to_string())
    );
    // Batch: both are assigned together, 700 m in all instead of 1,300 m.
    assert_eq!(
        crossing(DispatchMode::Batch).await,
        ("B".to_string(), "A".to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_request_waits_for_a_nearer_driver_to_come_free() {
    use ridelock::config::DispatchMode;
    let engine = common::engine(|c| {
        c.dispatch = DispatchMode::Batch;
        c.batch_window_ms = 300;
        c.batch_wait_m = 200;
        // Three seconds of waiting at most: room for the second driver to
        // connect, however slow the machine.
        c.batch_max_waits = 10;
    })
    .await;
    let mut far = Client::available_driver(&engine, "far", north(1_000.0), LON).await;
    wait_for_available(&engine, 1).await;
    let mut rider = Client::rider(&engine, "r1").await;
    rider.request_ride("q", north(0.0), LON).await;
    rider.expect_searching("q").await;
    // The first window closes with only "far" in reach: the request waits.
    far.expect_silence(Duration::from_millis(400)).await;
    let mut near = Client::available_driver(&engine, "near", north(50.0), LON).await;
    let (offer_id, request) = near.expect_offer().await;
    assert_eq!(request, "q");
    near.accept(offer_id).await;
    assert_eq!(rider.expect_matched().await, "near");
    far.expect_silence(Duration::from_millis(300)).await;
    engine.shutdown().await;
}
