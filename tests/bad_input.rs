//! Bad input gets a clear error to that client and changes nothing else; the
//! connection stays open (oversized frames excepted, which close only that
//! one connection).

mod common;

use std::time::Duration;

use common::{wait_for_available, Client};
use futures_util::SinkExt;
use ridelock::protocol::ServerMessage;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

const LAT: f64 = 52.5200;
const LON: f64 = 13.4050;

/// Sends `frame` and expects an error with `code`.
async fn refused(client: &mut Client, frame: &str, code: &str) {
    client.send_text(frame).await;
    assert_eq!(client.expect_error().await, code, "for {frame}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_driver_messages_are_refused_and_change_nothing() {
    let engine = common::engine(|_| {}).await;
    let mut driver = Client::available_driver(&engine, "d", LAT, LON).await;
    wait_for_available(&engine, 1).await;

    refused(&mut driver, "not json", "invalid_json").await;
    refused(&mut driver, "[1, 2, 3]", "not_an_object").await;
    refused(&mut driver, "\"available\"", "not_an_object").await;
    refused(&mut driver, r#"{"lat": 1}"#, "missing_type").await;
    refused(&mut driver, r#"{"type": 7}"#, "missing_type").await;
    refused(&mut driver, r#"{"type": "teleport"}"#, "unknown_type").await;
    refused(&mut driver, r#"{"type": "request_ride"}"#, "unknown_type").await;
    refused(
        &mut driver,
        r#"{"type": "location", "lat": 1}"#,
        "invalid_field",
    )
    .await;
    refused(
        &mut driver,
        r#"{"type": "location", "lat": "1", "lon": 2}"#,
        "invalid_field",
    )
    .await;
    refused(&mut driver, r#"{"type": "accept"}"#, "invalid_field").await;
    refused(
        &mut driver,
        r#"{"type": "accept", "offer_id": -1}"#,
        "invalid_field",
    )
    .await;
    refused(
        &mut driver,
        r#"{"type": "location", "lat": 95, "lon": 0}"#,
        "invalid_coordinates",
    )
    .await;
    refused(
        &mut driver,
        r#"{"type": "location", "lat": 0, "lon": -180.5}"#,
        "invalid_coordinates",
    )
    .await;
    refused(
        &mut driver,
        r#"{"type": "location", "lat": 1e999, "lon": 0}"#,
        "invalid_json",
    )
    .await;
    refused(
        &mut driver,
        r#"{"type": "accept", "offer_id": 424242}"#,
        "unknown_offer",
    )
    .await;
    refused(
        &mut driver,
        r#"{"type": "decline", "offer_id": 424242}"#,
        "unknown_offer",
    )
    .await;
    refused(
        &mut driver,
        r#"{"type": "trip_completed", "trip_id": 9}"#,
        "unknown_trip",
    )
    .await;
    driver
        .ws
        .send(Message::binary(vec![1u8, 2, 3]))
        .await
        .unwrap();
    assert_eq!(driver.expect_error().await, "binary_not_supported");

    // Nothing moved: the driver is where it was, still available, and the
    // connection still works.
    wait_for_available(&engine, 1).await;
    let mut rider = Client::rider(&engine, "r").await;
    rider.request_ride("q", LAT, LON).await;
    rider.expect_searching("q").await;
    match driver.recv().await {
        ServerMessage::Offer { distance_m, .. } => assert!(distance_m < 1.0),
        other => panic!("expected offer, got {other:?}"),
    }
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_rider_messages_are_refused_and_start_nothing() {
    let engine = common::engine(|_| {}).await;
    let mut rider = Client::rider(&engine, "r").await;
    refused(&mut rider, "{", "invalid_json").await;
    refused(&mut rider, "null", "not_an_object").await;
    refused(
        &mut rider,
        r#"{"type": "location", "lat": 0, "lon": 0}"#,
        "unknown_type",
    )
    .await;
    refused(
        &mut rider,
        r#"{"type": "request_ride", "request_id": "q"}"#,
        "invalid_field",
    )
    .await;
    refused(
        &mut rider,
        r#"{"type": "request_ride", "request_id": 5, "pickup": {"lat": 0, "lon": 0}}"#,
        "invalid_field",
    )
    .await;
    let long_id = "x".repeat(65);
    refused(
        &mut rider,
        &json!({"type": "request_ride", "request_id": long_id, "pickup": {"lat": 0, "lon": 0}})
            .to_string(),
        "invalid_field",
    )
    .await;
    refused(
        &mut rider,
        r#"{"type": "request_ride", "request_id": "q", "pickup": {"lat": -91, "lon": 0}}"#,
        "invalid_coordinates",
    )
    .await;
    refused(
        &mut rider,
        r#"{"type": "cancel", "request_id": "nope"}"#,
        "unknown_request",
    )
    .await;
    assert_eq!(engine.stats().await.searches, 0);

    // Still open and serving.
    rider.request_ride("q", LAT, LON).await;
    rider.expect_searching("q").await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_closes_only_that_connection() {
    let engine = common::engine(|_| {}).await;
    let mut driver = Client::available_driver(&engine, "d", LAT, LON).await;
    let mut bully = Client::rider(&engine, "bully").await;
    let huge = format!(
        r#"{{"type":"cancel","request_id":"{}"}}"#,
        "x".repeat(64 * 1024)
    );
    // The engine may close before the whole frame is written.
    let _ = bully.ws.send(Message::text(huge)).await;
    assert_eq!(bully.expect_closed().await, Some(1009));

    let mut rider = Client::rider(&engine, "r").await;
    rider.request_ride("q", LAT, LON).await;
    rider.expect_searching("q").await;
    driver.expect_offer().await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_past_the_allowance_wait_their_turn_and_are_told_once_a_second() {
    let engine = common::engine(|c| c.max_messages_per_s = 20).await;
    let mut driver = Client::available_driver(&engine, "d", LAT, LON).await;
    let started = std::time::Instant::now();
    // 70 bad frames at once: the burst (40, less the two set-up messages)
    // is read at once, the rest at 20 a second. None is dropped: each gets
    // its error, and the client is told it is being slowed.
    for _ in 0..70 {
        driver.ws.feed(Message::text("{}")).await.unwrap();
    }
    driver.ws.flush().await.unwrap();
    let (mut answered, mut notices) = (0, 0);
    while answered < 70 {
        match driver.recv().await {
            ServerMessage::Error { code, .. } if code.as_str() == "missing_type" => answered += 1,
            ServerMessage::Error { code, .. } if code.as_str() == "rate_limited" => notices += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    // The last of them was read at the allowed rate, not at once.
    assert!(
        started.elapsed() >= Duration::from_millis(1_000),
        "70 frames at 20/s after a burst of 38 took {:?}",
        started.elapsed()
    );
    // One notice per one-second window the waiting spanned, not one per frame.
    let windows = started.elapsed().as_secs() + 1;
    assert!(
        notices >= 1 && notices <= windows,
        "{notices} notices over {windows} windows"
    );
    // The driver is still connected and offerable.
    wait_for_available(&engine, 1).await;
    let mut rider = Client::rider(&engine, "r").await;
    rider.request_ride("q", LAT, LON).await;
    driver.expect_offer().await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_endpoints_and_bad_handshakes() {
    let engine = common::engine(|_| {}).await;
    let addr = engine.local_addr();
    let get = |path: &'static str| common::http_get(addr, path);
    assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
    assert!(get("/nowhere").await.starts_with("HTTP/1.1 404"));
    // A WebSocket path without a token, and one without the upgrade headers.
    assert!(get("/ws/driver").await.starts_with("HTTP/1.1 401"));
    let token = common::token(ridelock::auth::Role::Driver, "d");
    let no_upgrade = get(Box::leak(
        format!("/ws/driver?token={token}").into_boxed_str(),
    ))
    .await;
    assert!(no_upgrade.starts_with("HTTP/1.1 400"), "{no_upgrade}");

    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"POST /ws/driver?id=d HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 405"), "{response}");

    // And the engine still serves WebSockets.
    let mut rider = Client::rider(&engine, "r").await;
    rider.request_ride("q", LAT, LON).await;
    rider.expect_searching("q").await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rider_may_not_hold_unbounded_requests() {
    let engine = common::engine(|c| c.max_requests_per_rider = 3).await;
    let mut rider = Client::rider(&engine, "r").await;
    for i in 0..3 {
        let id = format!("q{i}");
        rider.request_ride(&id, LAT, LON).await;
        rider.expect_searching(&id).await;
    }
    rider.request_ride("q3", LAT, LON).await;
    assert_eq!(rider.expect_error().await, "too_many_requests");
    assert_eq!(engine.stats().await.searches, 3);
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_behind_on_requests_refuses_new_ones_by_id() {
    // No room in the queue: every request is refused, and says which.
    let engine = common::engine(|c| c.max_queued_requests = 0).await;
    let mut driver = Client::available_driver(&engine, "d", LAT, LON).await;
    let mut rider = Client::rider(&engine, "r").await;
    rider.request_ride("q1", LAT, LON).await;
    match rider.recv().await {
        ServerMessage::Error {
            code, request_id, ..
        } => {
            assert_eq!(code.as_str(), "overloaded");
            assert_eq!(request_id.as_deref(), Some("q1"));
        }
        other => panic!("expected overloaded, got {other:?}"),
    }
    assert_eq!(engine.stats().await.searches, 0);
    driver.expect_silence(Duration::from_millis(200)).await;
    // Cancels still go through (and find nothing).
    rider
        .send(json!({"type": "cancel", "request_id": "q1"}))
        .await;
    assert_eq!(rider.expect_error().await, "unknown_request");
    engine.shutdown().await;
}
