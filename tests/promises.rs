//! Promises of docs/protocol.md that had no test, each through real sockets:
//! connection timers and limits (run in milliseconds through their flags),
//! the request ids on errors, offers that ended, deadlines, availability
//! across reconnects, and what is re-sent to a driver who comes back.

mod common;

use std::time::Duration;

use common::{wait_for_available, wait_for_stats, wait_for_waiting, Client};
use futures_util::{SinkExt, StreamExt};
use ridelock::protocol::{RevokeReason, ServerMessage};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const LAT: f64 = 52.5200;
const LON: f64 = 13.4050;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_closed_with_1001_after_the_client_timeout() {
    let engine = common::engine(|c| {
        c.ping_interval_ms = 50;
        c.client_timeout_ms = 200;
    })
    .await;
    let mut driver = Client::available_driver(&engine, "d", LAT, LON).await;
    wait_for_available(&engine, 1).await;
    // Not reading means not answering the engine's pings either: silence.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        driver.closed_within(common::EXPECT_WITHIN).await,
        Some(1001)
    );
    // And the driver is no longer offered.
    wait_for_available(&engine, 0).await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_pinged_at_the_ping_interval_and_kept() {
    let engine = common::engine(|c| {
        c.ping_interval_ms = 50;
        c.client_timeout_ms = 300;
    })
    .await;
    let mut driver = Client::driver(&engine, "d").await;
    // Reading answers the pings (tungstenite pongs by itself), so the
    // connection lives well past the client timeout.
    let mut pings = 0;
    let until = tokio::time::Instant::now() + Duration::from_millis(900);
    while let Ok(frame) = tokio::time::timeout_at(until, driver.ws.next()).await {
        match frame {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("expected pings only, got {other:?}"),
        }
    }
    assert!(pings >= 3, "{pings} pings in 900 ms at a 50 ms interval");
    driver.send(json!({"type": "available"})).await;
    driver.expect_silence(Duration::from_millis(100)).await;

    // With the default interval (20 s), no ping comes in that time.
    let quiet = common::engine(|_| {}).await;
    let mut idle = Client::driver(&quiet, "d").await;
    idle.expect_silence(Duration::from_millis(300)).await;
    quiet.shutdown().await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_is_dropped_after_the_write_timeout() {
    let engine = common::engine(|c| {
        c.write_timeout_ms = 200;
        c.max_messages_per_s = 10_000_000;
    })
    .await;
    let mut rider = Client::rider(&engine, "r").await;
    rider.request_ride("q", LAT, LON).await;
    rider.expect_searching("q").await;
    wait_for_waiting(&engine, 1).await;
    // Each `{}` earns a ~100-byte error; the rider never reads them, so the
    // socket buffers fill and the engine's write stalls.
    let frames = tokio::spawn(async move {
        for _ in 0..400_000 {
            if rider.ws.feed(Message::text("{}")).await.is_err() {
                break;
            }
        }
        let _ = rider.ws.flush().await;
        rider
    });
    // The engine gave up on the connection: its search was cancelled.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while engine.stats().await.searches > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled connection is still open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(frames);
    engine.shutdown().await;
}

/// Sends `n` ride requests (`q0`, `q1`, …) in one go, without waiting for
/// answers (the engine may close the connection part way).
async fn burst_of_requests(rider: &mut Client, n: usize) {
    for i in 0..n {
        let text = json!({
            "type": "request_ride", "request_id": format!("q{i}"),
            "pickup": {"lat": LAT, "lon": LON},
        })
        .to_string();
        if rider.ws.feed(Message::text(text)).await.is_err() {
            return;
        }
    }
    let _ = rider.ws.flush().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_closes_the_connection_with_1008() {
    let engine = common::engine(|c| {
        c.outbox_capacity = 1;
        c.max_messages_per_s = 100_000;
        c.max_requests_per_rider = 100_000;
    })
    .await;
    let mut rider = Client::rider(&engine, "r").await;
    // Every request is answered through the outbox by the matcher, faster
    // than one connection drains a queue of one.
    burst_of_requests(&mut rider, 2_000).await;
    assert_eq!(rider.closed_within(common::EXPECT_WITHIN).await, Some(1008));
    // The closed connection's searches are cancelled.
    wait_for_stats(&engine, "no searches", |s| s.searches == 0).await;
    engine.shutdown().await;
}

/// The next message must be an error with `code` about `request_id`.
async fn expect_request_error(client: &mut Client, code: &str, request_id: &str) {
    match client.recv().await {
        ServerMessage::Error {
            code: c,
            request_id: r,
            ..
        } => {
            assert_eq!(c.as_str(), code);
            assert_eq!(r.as_deref(), Some(request_id), "{code}");
        }
        other => panic!("expected {code} for {request_id}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_about_a_request_carry_its_id() {
    let engine = common::engine(|c| c.max_requests_per_rider = 2).await;
    let mut rider = Client::rider(&engine, "r").await;
    rider.request_ride("a", LAT, LON).await;
    rider.expect_searching("a").await;
    rider.request_ride("a", LAT, LON).await;
    expect_request_error(&mut rider, "request_in_flight", "a").await;
    rider.request_ride("b", LAT, LON).await;
    rider.expect_searching("b").await;
    rider.request_ride("c", LAT, LON).await;
    expect_request_error(&mut rider, "too_many_requests", "c").await;
    rider
        .send(json!({"type": "cancel", "request_id": "zz"}))
        .await;
    expect_request_error(&mut rider, "unknown_request", "zz").await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_a_small_queue_is_refused_overloaded_one_by_one() {
    let engine = common::engine(|c| {
        c.max_queued_requests = 2;
        c.max_messages_per_s = 100_000;
        c.max_requests_per_rider = 100_000;
    })
    .await;
    let mut rider = Client::rider(&engine, "r").await;
    let n = 1_000;
    burst_of_requests(&mut rider, n).await;
    // Each request gets exactly one answer: searching, or overloaded with
    // its id; the queue of two can't take a burst of a thousand.
    let mut answered = std::collections::HashSet::new();
    let mut overloaded = 0;
    while answered.len() < n {
        match rider.recv().await {
            ServerMessage::Searching { request_id } => {
                assert!(answered.insert(request_id.to_string()));
            }
            ServerMessage::Error {
                code, request_id, ..
            } => {
                assert_eq!(code.as_str(), "overloaded");
                let id = request_id.expect("overloaded names its request");
                assert!(answered.insert(id.to_string()));
                overloaded += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(overloaded > 0, "a queue of 2 took a burst of {n}");
    assert_eq!(engine.stats().await.searches, n - overloaded);
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answering_an_offer_twice_is_offer_expired() {
    let engine = common::engine(|_| {}).await;
    let mut driver = Client::available_driver(&engine, "d", LAT, LON).await;
    let mut rider = Client::rider(&engine, "r").await;
    rider.request_ride("q1", LAT, LON).await;
    let (declined, _) = driver.expect_offer().await;
    driver.decline(declined).await;
    driver.decline(declined).await;
    assert_eq!(driver.expect_error().await, "offer_expired");
    driver.accept(declined).await;
    assert_eq!(driver.expect_error().await, "offer_expired");
    // q1 excluded this driver: it waits. q2 is offered and accepted.
    rider.request_ride("q2", LAT, LON).await;
    rider.expect_searching("q1").await;
    rider.expect_searching("q2").await;
    let (accepted, request) = driver.expect_offer().await;
    assert_eq!(request, "q2");
    driver.accept(accepted).await;
    assert!(matches!(
        driver.recv().await,
        ServerMessage::TripAssigned { .. }
    ));
    driver.accept(accepted).await;
    assert_eq!(driver.expect_error().await, "offer_expired");
    driver.decline(accepted).await;
    assert_eq!(driver.expect_error().await, "offer_expired");
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_older_than_the_last_eight_is_unknown() {
    let engine = common::engine(|_| {}).await;
    let mut driver = Client::available_driver(&engine, "d", LAT, LON).await;
    let mut offers = Vec::new();
    let mut riders = Vec::new();
    for i in 0..10 {
        let mut rider = Client::rider(&engine, &format!("r{i}")).await;
        rider.request_ride("q", LAT, LON).await;
        rider.expect_searching("q").await;
        let (offer, _) = driver.expect_offer().await;
        driver.decline(offer).await;
        offers.push(offer);
        riders.push(rider);
    }
    // The last eight endings are remembered; the first two are forgotten.
    driver.accept(offers[9]).await;
    assert_eq!(driver.expect_error().await, "offer_expired");
    driver.accept(offers[2]).await;
    assert_eq!(driver.expect_error().await, "offer_expired");
    driver.accept(offers[1]).await;
    assert_eq!(driver.expect_error().await, "unknown_offer");
    driver.accept(offers[0]).await;
    assert_eq!(driver.expect_error().await, "unknown_offer");
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_may_be_used_again_once_its_request_ended() {
    let engine = common::engine(|_| {}).await;
    let mut driver = Client::available_driver(&engine, "d", LAT, LON).await;
    let mut rider = Client::rider(&engine, "r").await;
    rider.request_ride("q", LAT, LON).await;
    rider.expect_searching("q").await;
    let (offer, _) = driver.expect_offer().await;
    driver.accept(offer).await;
    let trip_id = match driver.recv().await {
        ServerMessage::TripAssigned { trip_id, .. } => trip_id,
        other => panic!("expected trip_assigned, got {other:?}"),
    };
    assert_eq!(rider.expect_matched().await, "d");
    driver
        .send(json!({"type": "trip_completed", "trip_id": trip_id}))
        .await;
    wait_for_available(&engine, 1).await;
    // The same id again: a new search, a new offer.
    rider.request_ride("q", LAT, LON).await;
    rider.expect_searching("q").await;
    let (again, request) = driver.expect_offer().await;
    assert_eq!(request, "q");
    assert_ne!(again, offer);
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_out_at_the_search_deadline_may_still_match_but_none_goes_out_after() {
    let engine = common::engine(|c| {
        c.search_timeout_ms = 300;
        c.offer_timeout_ms = 5_000;
    })
    .await;
    let mut first = Client::available_driver(&engine, "first", LAT, LON).await;
    let mut rider = Client::rider(&engine, "r").await;
    rider.request_ride("q", LAT, LON).await;
    rider.expect_searching("q").await;
    let (offer, _) = first.expect_offer().await;
    // Past the deadline, the offer still stands: a decline now must not
    // lead to a new offer to the second driver who shows up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut second = Client::available_driver(&engine, "second", LAT, LON + 0.001).await;
    wait_for_available(&engine, 1).await;
    first.decline(offer).await;
    match rider.recv().await {
        ServerMessage::NoDriver { request_id, .. } => assert_eq!(&*request_id, "q"),
        other => panic!("expected no_driver, got {other:?}"),
    }
    second.expect_silence(Duration::from_millis(200)).await;

    // And an accept of an offer out at the deadline matches: q2 goes to
    // the nearest driver, who answers after the deadline.
    rider.request_ride("q2", LAT, LON).await;
    rider.expect_searching("q2").await;
    let (offer, _) = first.expect_offer().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    first.accept(offer).await;
    assert!(matches!(
        first.recv().await,
        ServerMessage::TripAssigned { .. }
    ));
    assert_eq!(rider.expect_matched().await, "first");
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_while_offered_is_a_decline_and_the_search_moves_on() {
    let engine = common::engine(|_| {}).await;
    let mut near = Client::available_driver(&engine, "near", LAT, LON).await;
    let mut far = Client::available_driver(&engine, "far", LAT + 0.01, LON).await;
    wait_for_available(&engine, 2).await;
    let mut rider = Client::rider(&engine, "r").await;
    rider.request_ride("q", LAT, LON).await;
    rider.expect_searching("q").await;
    let (offer, _) = near.expect_offer().await;
    near.send(json!({"type": "unavailable"})).await;
    let (next, _) = far.expect_offer().await;
    // The declined offer is over for the driver, too.
    near.accept(offer).await;
    assert_eq!(near.expect_error().await, "offer_expired");
    far.accept(next).await;
    assert_eq!(rider.expect_matched().await, "far");
    // And near is not offered again while unavailable.
    let mut other = Client::rider(&engine, "r2").await;
    other.request_ride("q", LAT, LON).await;
    other.expect_searching("q").await;
    near.expect_silence(Duration::from_millis(200)).await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_driver_says_available_again_but_a_replacing_one_need_not() {
    let engine = common::engine(|_| {}).await;
    let mut first = Client::available_driver(&engine, "d", LAT, LON).await;
    wait_for_available(&engine, 1).await;
    // Replaced while open: the new connection keeps `available`.
    let mut second = Client::driver(&engine, "d").await;
    assert_eq!(first.expect_closed().await, Some(1008));
    wait_for_available(&engine, 1).await;
    let mut rider = Client::rider(&engine, "r").await;
    rider.request_ride("q", LAT, LON).await;
    let (offer, _) = second.expect_offer().await;
    second.decline(offer).await;
    // q now waits (it excludes d), and d is free again.
    wait_for_waiting(&engine, 1).await;
    wait_for_available(&engine, 1).await;
    // Closed, then a new connection: not available until it says so. The
    // engine's echo of the close comes after it let go of the connection,
    // so the next connection is a reconnect, not a replacement.
    second.close_normally().await;
    assert_eq!(second.expect_closed().await, Some(1000));
    wait_for_available(&engine, 0).await;
    let mut third = Client::driver(&engine, "d").await;
    rider.request_ride("q2", LAT, LON).await;
    rider.expect_searching("q").await;
    rider.expect_searching("q2").await;
    third.expect_silence(Duration::from_millis(200)).await;
    third.send(json!({"type": "available"})).await;
    // The position was kept by the driver's actor; q (which this driver
    // declined) is not offered to it again, q2 is.
    let (_, request) = third.expect_offer().await;
    assert_eq!(request, "q2");
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_sent_again_on_reconnect_carries_the_time_left() {
    let engine = common::engine(|c| c.offer_timeout_ms = 10_000).await;
    let mut driver = Client::available_driver(&engine, "d", LAT, LON).await;
    let mut rider = Client::rider(&engine, "r").await;
    rider.request_ride("q", LAT, LON).await;
    let first = match driver.recv().await {
        ServerMessage::Offer {
            offer_id,
            expires_in_ms,
            ..
        } => (offer_id, expires_in_ms),
        other => panic!("expected an offer, got {other:?}"),
    };
    assert!(first.1 > 9_000 && first.1 <= 10_000, "{}", first.1);
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let mut again = Client::driver(&engine, "d").await;
    match again.recv().await {
        ServerMessage::Offer {
            offer_id,
            expires_in_ms,
            ..
        } => {
            assert_eq!(offer_id, first.0);
            assert!(
                expires_in_ms < first.1 - 1_000,
                "{expires_in_ms} ms left after 1.2 s of {}",
                first.1
            );
        }
        other => panic!("expected the offer again, got {other:?}"),
    }
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_reconnecting_mid_trip_is_told_the_trip_again() {
    let engine = common::engine(|_| {}).await;
    let mut driver = Client::available_driver(&engine, "d", LAT, LON).await;
    let mut rider = Client::rider(&engine, "r").await;
    rider.request_ride("q", LAT, LON).await;
    let (offer, _) = driver.expect_offer().await;
    driver.accept(offer).await;
    let trip = match driver.recv().await {
        ServerMessage::TripAssigned { trip_id, .. } => trip_id,
        other => panic!("expected trip_assigned, got {other:?}"),
    };
    driver.ws.close(None).await.unwrap();
    drop(driver);
    let mut back = Client::driver(&engine, "d").await;
    match back.recv().await {
        ServerMessage::TripAssigned {
            trip_id, offer_id, ..
        } => assert_eq!((trip_id, offer_id), (trip, offer)),
        other => panic!("expected the trip again, got {other:?}"),
    }
    // And it can complete it from the new connection.
    back.send(json!({"type": "trip_completed", "trip_id": trip}))
        .await;
    back.send(json!({"type": "available"})).await;
    wait_for_available(&engine, 1).await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_riders_disconnect_cancels_every_request_of_that_connection() {
    let engine = common::engine(|_| {}).await;
    let mut driver = Client::available_driver(&engine, "d", LAT, LON).await;
    let mut rider = Client::rider(&engine, "r").await;
    // The same rider on a second connection keeps its own request.
    let mut other_connection = Client::rider(&engine, "r").await;
    other_connection.request_ride("kept", LAT + 0.5, LON).await;
    other_connection.expect_searching("kept").await;
    for q in ["a", "b", "c"] {
        rider.request_ride(q, LAT, LON).await;
        rider.expect_searching(q).await;
    }
    let (offer, _) = driver.expect_offer().await;
    drop(rider);
    match driver.recv().await {
        ServerMessage::OfferRevoked { offer_id, reason } => {
            assert_eq!(offer_id, offer);
            assert_eq!(reason, RevokeReason::RiderCancelled);
        }
        other => panic!("expected offer_revoked, got {other:?}"),
    }
    wait_for_stats(&engine, "only the other connection's search", |s| {
        s.searches == 1
    })
    .await;
    // The freed driver is not offered the cancelled requests.
    driver.expect_silence(Duration::from_millis(200)).await;
    engine.shutdown().await;
}
