//! The engine through its real interface: a real server on an ephemeral port,
//! real WebSocket clients.

mod common;

use std::time::Duration;

use common::{wait_for_available, Client};
use ridelock::protocol::{RevokeReason, ServerMessage};
use serde_json::json;

const LAT: f64 = 52.5200;
const LON: f64 = 13.4050;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rider_is_matched_with_a_driver_who_accepts() {
    let engine = common::engine(|_| {}).await;
    let mut driver = Client::available_driver(&engine, "d1", LAT + 0.001, LON).await;
    let mut rider = Client::rider(&engine, "r1").await;
    rider.request_ride("req-1", LAT, LON).await;
    rider.expect_searching("req-1").await;

    let offer = driver.recv().await;
    let ServerMessage::Offer {
        offer_id,
        request_id,
        rider_id,
        distance_m,
        expires_in_ms,
        fencing_token,
        ..
    } = offer
    else {
        panic!("expected an offer, got {offer:?}");
    };
    assert_eq!(&*request_id, "req-1");
    assert_eq!(&*rider_id, "r1");
    assert!((distance_m - 111.2).abs() < 1.0, "distance {distance_m}");
    assert!(expires_in_ms > 14_000 && expires_in_ms <= 15_000);
    assert!(fencing_token > 0);

    driver.accept(offer_id).await;
    let trip_id = match driver.recv().await {
        ServerMessage::TripAssigned {
            trip_id,
            offer_id: o,
            rider_id,
            ..
        } => {
            assert_eq!(o, offer_id);
            assert_eq!(&*rider_id, "r1");
            trip_id
        }
        other => panic!("expected trip_assigned, got {other:?}"),
    };
    match rider.recv().await {
        ServerMessage::Matched {
            request_id,
            trip_id: t,
            driver_id,
            driver_location,
            distance_m,
            drivers,
        } => {
            assert_eq!(&*request_id, "req-1");
            assert_eq!(t, trip_id);
            assert_eq!(&*driver_id, "d1");
            assert_eq!(driver_location.lat, LAT + 0.001);
            assert!((distance_m - 111.2).abs() < 1.0);
            // One vehicle: `drivers` repeats it.
            assert_eq!(drivers.len(), 1);
            assert_eq!(
                (&*drivers[0].driver_id, drivers[0].trip_id),
                ("d1", trip_id)
            );
        }
        other => panic!("expected matched, got {other:?}"),
    }
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nearest_driver_is_offered_first() {
    let engine = common::engine(|_| {}).await;
    let mut far = Client::available_driver(&engine, "far", LAT + 0.02, LON).await;
    let mut near = Client::available_driver(&engine, "near", LAT, LON + 0.002).await;
    let mut middle = Client::available_driver(&engine, "middle", LAT - 0.01, LON).await;
    // Out of the 5 km radius: never offered.
    let mut outside = Client::available_driver(&engine, "outside", LAT + 0.1, LON).await;
    wait_for_available(&engine, 4).await;

    let mut rider = Client::rider(&engine, "r1").await;
    rider.request_ride("q", LAT, LON).await;
    rider.expect_searching("q").await;
    let (offer_id, _) = near.expect_offer().await;
    near.decline(offer_id).await;
    let (offer_id, _) = middle.expect_offer().await;
    middle.decline(offer_id).await;
    let (offer_id, _) = far.expect_offer().await;
    far.decline(offer_id).await;
    outside.expect_silence(Duration::from_millis(200)).await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decline_moves_on_to_the_next_driver_and_never_back() {
    let engine = common::engine(|c| c.search_timeout_ms = 800).await;
    let mut first = Client::available_driver(&engine, "first", LAT + 0.001, LON).await;
    let mut second = Client::available_driver(&engine, "second", LAT + 0.003, LON).await;
    wait_for_available(&engine, 2).await;

    let mut rider = Client::rider(&engine, "r1").await;
    rider.request_ride("q", LAT, LON).await;
    rider.expect_searching("q").await;
    let (offer_id, _) = first.expect_offer().await;
    first.decline(offer_id).await;
    let (offer_id, request) = second.expect_offer().await;
    assert_eq!(request, "q");
    second.decline(offer_id).await;
    // Both declined: neither is asked again for this request, which runs out.
    match rider.recv().await {
        ServerMessage::NoDriver {
            request_id,
            reason: None,
        } => assert_eq!(&*request_id, "q"),
        other => panic!("expected no_driver, got {other:?}"),
    }
    first.expect_silence(Duration::from_millis(100)).await;
    second.expect_silence(Duration::from_millis(100)).await;

    // Both are free again for a new request.
    rider.request_ride("q2", LAT, LON).await;
    rider.expect_searching("q2").await;
    let (offer_id, _) = first.expect_offer().await;
    first.accept(offer_id).await;
    assert!(matches!(
        first.recv().await,
        ServerMessage::TripAssigned { .. }
    ));
    assert_eq!(rider.expect_matched().await, "first");
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_offer_moves_on_and_a_late_accept_is_refused() {
    let engine = common::engine(|c| c.offer_timeout_ms = 300).await;
    let mut sleepy = Client::available_driver(&engine, "sleepy", LAT + 0.001, LON).await;
    let mut awake = Client::available_driver(&engine, "awake", LAT + 0.004, LON).await;
    wait_for_available(&engine, 2).await;

    let mut rider = Client::rider(&engine, "r1").await;
    rider.request_ride("q", LAT, LON).await;
    rider.expect_searching("q").await;
    let (stale_offer, _) = sleepy.expect_offer().await;
    match sleepy.recv().await {
        ServerMessage::OfferRevoked { offer_id, reason } => {
            assert_eq!(offer_id, stale_offer);
            assert_eq!(reason, RevokeReason::Expired);
        }
        other => panic!("expected offer_revoked, got {other:?}"),
    }
    let (offer_id, _) = awake.expect_offer().await;
    sleepy.accept(stale_offer).await;
    assert_eq!(sleepy.expect_error().await, "offer_expired");
    awake.accept(offer_id).await;
    assert_eq!(rider.expect_matched().await, "awake");
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rider_cancelling_during_an_offer_frees_the_driver() {
    let engine = common::engine(|_| {}).await;
    let mut driver = Client::available_driver(&engine, "d1", LAT, LON).await;
    let mut rider = Client::rider(&engine, "r1").await;
    rider.request_ride("q", LAT, LON).await;
    rider.expect_searching("q").await;
    let (offer_id, _) = driver.expect_offer().await;

    rider
        .send(json!({"type": "cancel", "request_id": "q"}))
        .await;
    match driver.recv().await {
        ServerMessage::OfferRevoked {
            offer_id: o,
            reason,
        } => {
            assert_eq!(o, offer_id);
            assert_eq!(reason, RevokeReason::RiderCancelled);
        }
        other => panic!("expected offer_revoked, got {other:?}"),
    }
    assert!(
        matches!(rider.recv().await, ServerMessage::Cancelled { request_id } if &*request_id == "q")
    );
    driver.accept(offer_id).await;
    assert_eq!(driver.expect_error().await, "offer_expired");

    // Offerable again at once.
    let mut other = Client::rider(&engine, "r2").await;
    other.request_ride("q", LAT, LON).await;
    other.expect_searching("q").await;
    let (_, request) = driver.expect_offer().await;
    assert_eq!(request, "q");
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_disconnecting_during_an_offer_passes_it_on_at_once() {
    // A 30 s offer timeout: the next driver must be offered long before it.
    let engine = common::engine(|c| c.offer_timeout_ms = 30_000).await;
    let leaving = Client::available_driver(&engine, "leaving", LAT + 0.001, LON).await;
    let mut staying = Client::available_driver(&engine, "staying", LAT + 0.005, LON).await;
    wait_for_available(&engine, 2).await;
    let mut leaving = leaving;
    let mut rider = Client::rider(&engine, "r1").await;
    rider.request_ride("q", LAT, LON).await;
    rider.expect_searching("q").await;
    leaving.expect_offer().await;
    let started = std::time::Instant::now();
    drop(leaving);
    let (offer_id, _) = staying.expect_offer().await;
    assert!(started.elapsed() < Duration::from_secs(5));
    staying.accept(offer_id).await;
    assert_eq!(rider.expect_matched().await, "staying");
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_riders_racing_for_one_driver_one_wins() {
    let engine = common::engine(|c| c.search_timeout_ms = 700).await;
    let mut driver = Client::available_driver(&engine, "only", LAT, LON).await;
    wait_for_available(&engine, 1).await;
    let mut a = Client::rider(&engine, "a").await;
    let mut b = Client::rider(&engine, "b").await;
    a.request_ride("q", LAT, LON).await;
    b.request_ride("q", LAT, LON).await;
    a.expect_searching("q").await;
    b.expect_searching("q").await;
    let offer = driver.recv().await;
    let ServerMessage::Offer {
        offer_id, rider_id, ..
    } = offer
    else {
        panic!("expected offer, got {offer:?}");
    };
    // Only one offer at a time, whatever the other rider does.
    driver.accept(offer_id).await;
    assert!(matches!(
        driver.recv().await,
        ServerMessage::TripAssigned { .. }
    ));
    let (winner, loser) = if &*rider_id == "a" {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    assert!(matches!(winner.recv().await, ServerMessage::Matched { .. }));
    assert!(matches!(loser.recv().await, ServerMessage::NoDriver { .. }));
    driver.expect_silence(Duration::from_millis(200)).await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_rider_gets_a_driver_who_becomes_available() {
    let engine = common::engine(|_| {}).await;
    let mut rider = Client::rider(&engine, "r1").await;
    rider.request_ride("q", LAT, LON).await;
    rider.expect_searching("q").await;
    common::wait_for_waiting(&engine, 1).await;
    let mut driver = Client::available_driver(&engine, "late", LAT + 0.001, LON).await;
    let (offer_id, request) = driver.expect_offer().await;
    assert_eq!(request, "q");
    driver.accept(offer_id).await;
    assert!(matches!(rider.recv().await, ServerMessage::Matched { .. }));
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_riders_are_served_first_come_first_served() {
    let engine = common::engine(|_| {}).await;
    let mut first = Client::rider(&engine, "first").await;
    first.request_ride("q", LAT, LON).await;
    first.expect_searching("q").await;
    let mut second = Client::rider(&engine, "second").await;
    // The second rider's pickup is nearer the driver; the first still wins.
    second.request_ride("q", LAT + 0.002, LON).await;
    second.expect_searching("q").await;
    common::wait_for_waiting(&engine, 2).await;
    let mut driver = Client::available_driver(&engine, "d", LAT + 0.003, LON).await;
    let offer = driver.recv().await;
    assert!(
        matches!(&offer, ServerMessage::Offer { rider_id, .. } if &**rider_id == "first"),
        "{offer:?}"
    );
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_on_a_trip_is_not_offered_until_the_trip_completes() {
    let engine = common::engine(|_| {}).await;
    let mut driver = Client::available_driver(&engine, "d", LAT, LON).await;
    let mut a = Client::rider(&engine, "a").await;
    a.request_ride("q", LAT, LON).await;
    a.expect_searching("q").await;
    let (offer_id, _) = driver.expect_offer().await;
    driver.accept(offer_id).await;
    let ServerMessage::TripAssigned { trip_id, .. } = driver.recv().await else {
        panic!("expected trip_assigned");
    };
    assert!(matches!(a.recv().await, ServerMessage::Matched { .. }));

    let mut b = Client::rider(&engine, "b").await;
    b.request_ride("q", LAT, LON).await;
    b.expect_searching("q").await;
    driver.expect_silence(Duration::from_millis(300)).await;
    driver
        .send(json!({"type": "trip_completed", "trip_id": trip_id + 1000}))
        .await;
    assert_eq!(driver.expect_error().await, "unknown_trip");
    driver
        .send(json!({"type": "trip_completed", "trip_id": trip_id}))
        .await;
    let offer = driver.recv().await;
    assert!(
        matches!(&offer, ServerMessage::Offer { rider_id, .. } if &**rider_id == "b"),
        "{offer:?}"
    );
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_driver_is_not_offered() {
    let engine = common::engine(|c| c.search_timeout_ms = 500).await;
    let mut driver = Client::available_driver(&engine, "d", LAT, LON).await;
    // Available first (so that the wait below waits for the change).
    wait_for_available(&engine, 1).await;
    driver.send(json!({"type": "unavailable"})).await;
    wait_for_available(&engine, 0).await;
    let mut rider = Client::rider(&engine, "r").await;
    rider.request_ride("q", LAT, LON).await;
    rider.expect_searching("q").await;
    assert!(matches!(rider.recv().await, ServerMessage::NoDriver { .. }));
    driver.expect_silence(Duration::from_millis(100)).await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_request_id_in_flight_starts_no_second_search() {
    let engine = common::engine(|_| {}).await;
    let mut driver = Client::available_driver(&engine, "d", LAT, LON).await;
    let mut rider = Client::rider(&engine, "r").await;
    rider.request_ride("q", LAT, LON).await;
    rider.expect_searching("q").await;
    driver.expect_offer().await;
    rider.request_ride("q", LAT, LON).await;
    assert_eq!(rider.expect_error().await, "request_in_flight");
    assert_eq!(engine.stats().await.searches, 1);
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rider_disconnecting_cancels_their_searches() {
    let engine = common::engine(|_| {}).await;
    let mut driver = Client::available_driver(&engine, "d", LAT, LON).await;
    let mut rider = Client::rider(&engine, "r").await;
    rider.request_ride("q", LAT, LON).await;
    rider.expect_searching("q").await;
    let (offer_id, _) = driver.expect_offer().await;
    drop(rider);
    match driver.recv().await {
        ServerMessage::OfferRevoked {
            offer_id: o,
            reason,
        } => {
            assert_eq!(o, offer_id);
            assert_eq!(reason, RevokeReason::RiderCancelled);
        }
        other => panic!("expected offer_revoked, got {other:?}"),
    }
    common::wait_for_stats(&engine, "no searches", |s| s.searches == 0).await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_replaces_the_first() {
    let engine = common::engine(|_| {}).await;
    let mut old = Client::available_driver(&engine, "d", LAT, LON).await;
    wait_for_available(&engine, 1).await;
    let mut new = Client::driver(&engine, "d").await;
    // The old socket is closed by the engine and gets nothing more.
    assert_eq!(old.expect_closed().await, Some(1008));
    new.go_available(LAT, LON).await;
    wait_for_available(&engine, 1).await;
    assert_eq!(engine.driver_actors(), 1);
    let mut rider = Client::rider(&engine, "r").await;
    rider.request_ride("q", LAT, LON).await;
    let (offer_id, _) = new.expect_offer().await;

    // A third connection mid-offer is told about the offer it holds.
    let mut third = Client::driver(&engine, "d").await;
    let (resent, _) = third.expect_offer().await;
    assert_eq!(resent, offer_id);
    third.accept(offer_id).await;
    assert!(matches!(
        third.recv().await,
        ServerMessage::TripAssigned { .. }
    ));
    rider.expect_searching("q").await;
    assert!(matches!(rider.recv().await, ServerMessage::Matched { .. }));
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_grow_with_every_lock_of_a_driver() {
    let engine = common::engine(|_| {}).await;
    let mut driver = Client::available_driver(&engine, "d", LAT, LON).await;
    let mut rider = Client::rider(&engine, "r").await;
    let mut last = 0;
    for i in 0..5 {
        let request = format!("q{i}");
        rider.request_ride(&request, LAT, LON).await;
        rider.expect_searching(&request).await;
        let ServerMessage::Offer {
            offer_id,
            fencing_token,
            ..
        } = driver.recv().await
        else {
            panic!("expected offer");
        };
        assert!(fencing_token > last, "{fencing_token} after {last}");
        last = fencing_token;
        rider
            .send(json!({"type": "cancel", "request_id": request}))
            .await;
        assert!(
            matches!(driver.recv().await, ServerMessage::OfferRevoked { offer_id: o, .. } if o == offer_id)
        );
        assert!(matches!(
            rider.recv().await,
            ServerMessage::Cancelled { .. }
        ));
    }
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_free_driver_goes_to_the_oldest_waiting_rider_in_reach() {
    // Many older requests wait out of the driver's reach; the one in reach is
    // found anyway (past the oldest-first scan, through the spatial index).
    let engine = common::engine(|c| {
        c.max_requests_per_rider = 200;
        c.max_messages_per_s = 1_000;
    })
    .await;
    let mut far_riders = Client::rider(&engine, "far").await;
    for i in 0..80 {
        let id = format!("far{i}");
        far_riders.request_ride(&id, LAT + 0.2, LON).await; // ~22 km north
        far_riders.expect_searching(&id).await;
    }
    let mut near = Client::rider(&engine, "near").await;
    near.request_ride("q", LAT, LON).await;
    near.expect_searching("q").await;
    common::wait_for_waiting(&engine, 81).await;
    let mut driver = Client::available_driver(&engine, "d", LAT + 0.001, LON).await;
    let offer = driver.recv().await;
    assert!(
        matches!(&offer, ServerMessage::Offer { rider_id, .. } if &**rider_id == "near"),
        "{offer:?}"
    );
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_requests_at_one_spot_reaches_every_free_driver() {
    // More requests at once than the old look-up's cap: each must find its
    // own free driver instead of parking behind drivers being locked.
    const N: usize = 40;
    let engine = common::engine(|c| {
        c.max_requests_per_rider = 100;
        c.max_messages_per_s = 1_000;
    })
    .await;
    let mut drivers = Vec::new();
    for i in 0..N {
        let lat = LAT + 0.0001 * i as f64;
        drivers.push(Client::available_driver(&engine, &format!("d{i}"), lat, LON).await);
    }
    wait_for_available(&engine, N).await;
    let mut rider = Client::rider(&engine, "r").await;
    for i in 0..N {
        rider.request_ride(&format!("q{i}"), LAT, LON).await;
    }
    for driver in &mut drivers {
        let (offer_id, _) = driver.expect_offer().await;
        driver.accept(offer_id).await;
    }
    let mut matched = std::collections::HashSet::new();
    while matched.len() < N {
        match rider.recv().await {
            ServerMessage::Searching { .. } => {}
            ServerMessage::Matched { driver_id, .. } => {
                assert!(matched.insert(driver_id.to_string()))
            }
            other => panic!("expected searching or matched, got {other:?}"),
        }
    }
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_gives_up_after_max_candidates_offers() {
    let engine = common::engine(|c| c.max_candidates = 2).await;
    let mut drivers = Vec::new();
    for i in 0..3 {
        drivers.push(
            Client::available_driver(&engine, &format!("d{i}"), LAT + 0.001 * (i + 1) as f64, LON)
                .await,
        );
    }
    wait_for_available(&engine, 3).await;
    let mut rider = Client::rider(&engine, "r").await;
    rider.request_ride("q", LAT, LON).await;
    rider.expect_searching("q").await;
    for driver in drivers.iter_mut().take(2) {
        let (offer_id, _) = driver.expect_offer().await;
        driver.decline(offer_id).await;
    }
    assert!(matches!(rider.recv().await, ServerMessage::NoDriver { .. }));
    drivers[2].expect_silence(Duration::from_millis(200)).await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_moves_keep_the_exact_position_for_offers() {
    let engine = common::engine(|_| {}).await;
    let mut driver = Client::available_driver(&engine, "d", LAT, LON).await;
    wait_for_available(&engine, 1).await;
    // ~2.2 m north: below the index's move threshold, but the driver's actor
    // knows where the driver really is.
    driver
        .send(json!({"type": "location", "lat": LAT + 0.00002, "lon": LON}))
        .await;
    let mut rider = Client::rider(&engine, "r").await;
    rider.request_ride("q", LAT, LON).await;
    rider.expect_searching("q").await;
    match driver.recv().await {
        ServerMessage::Offer { distance_m, .. } => {
            assert!((distance_m - 2.22).abs() < 0.05, "{distance_m}")
        }
        other => panic!("expected offer, got {other:?}"),
    }
    engine.shutdown().await;
}
