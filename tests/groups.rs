//! Group requests (several vehicles, all or none) through real sockets:
//! held members, replacements, cancels and deadlines that let every member
//! go, two groups racing for the same drivers, and an older group taking a
//! driver from a younger one.

mod common;

use std::time::Duration;

use common::{wait_for_available, wait_for_waiting, Client};
use ridelock::protocol::{MatchedDriver, RevokeReason, ServerMessage};
use serde_json::json;

const LAT: f64 = 52.5200;
const LON: f64 = 13.4050;

async fn request_group(rider: &mut Client, request_id: &str, lat: f64, lon: f64, vehicles: u8) {
    rider
        .send(json!({
            "type": "request_ride",
            "request_id": request_id,
            "pickup": {"lat": lat, "lon": lon},
            "vehicles": vehicles,
        }))
        .await;
    rider.expect_searching(request_id).await;
}

/// The next message must be an offer of a group of `size`: (offer id,
/// request id).
async fn expect_group_offer(driver: &mut Client, size: u8) -> (u64, String) {
    match driver.recv().await {
        ServerMessage::Offer {
            offer_id,
            request_id,
            group_size,
            ..
        } => {
            assert_eq!(group_size, size, "the offer's group size");
            (offer_id, request_id.to_string())
        }
        other => panic!("expected an offer, got {other:?}"),
    }
}

/// The next message must be `waiting_for_group` for `offer_id` with
/// `accepted` of `size`.
async fn expect_waiting(driver: &mut Client, offer_id: u64, accepted: u8, size: u8) {
    match driver.recv().await {
        ServerMessage::WaitingForGroup {
            offer_id: o,
            accepted: a,
            group_size,
            ..
        } => assert_eq!((o, a, group_size), (offer_id, accepted, size)),
        other => panic!("expected waiting_for_group, got {other:?}"),
    }
}

async fn expect_progress(rider: &mut Client, accepted: u8, size: u8) {
    match rider.recv().await {
        ServerMessage::GroupProgress {
            accepted: a,
            group_size,
            ..
        } => assert_eq!((a, group_size), (accepted, size)),
        other => panic!("expected group_progress, got {other:?}"),
    }
}

/// The next message must be `trip_assigned` for `offer_id` in a group of
/// `size`; its trip id.
async fn expect_trip(driver: &mut Client, offer_id: u64, size: u8) -> u64 {
    match driver.recv().await {
        ServerMessage::TripAssigned {
            trip_id,
            offer_id: o,
            group_size,
            ..
        } => {
            assert_eq!((o, group_size), (offer_id, size));
            trip_id
        }
        other => panic!("expected trip_assigned, got {other:?}"),
    }
}

async fn expect_revoked(driver: &mut Client, offer_id: u64, reason: RevokeReason) {
    match driver.recv().await {
        ServerMessage::OfferRevoked {
            offer_id: o,
            reason: r,
        } => assert_eq!((o, r), (offer_id, reason)),
        other => panic!("expected offer_revoked ({reason:?}), got {other:?}"),
    }
}

/// The next message must be `matched` for `request_id`; its drivers.
async fn expect_group_matched(rider: &mut Client, request_id: &str) -> Vec<MatchedDriver> {
    match rider.recv().await {
        ServerMessage::Matched {
            request_id: r,
            trip_id,
            driver_id,
            drivers,
            ..
        } => {
            assert_eq!(&*r, request_id);
            // The top-level fields are the first (nearest) vehicle's.
            assert_eq!(
                (trip_id, &driver_id),
                (drivers[0].trip_id, &drivers[0].driver_id)
            );
            let distances: Vec<f64> = drivers.iter().map(|d| d.distance_m).collect();
            assert!(
                distances.windows(2).all(|w| w[0] <= w[1]),
                "nearest first: {distances:?}"
            );
            drivers
        }
        other => panic!("expected matched, got {other:?}"),
    }
}

/// `N` available drivers d1, d2, … 111 m apart north of the pickup, d1
/// nearest, all in the index.
async fn drivers_north<const N: usize>(engine: &ridelock::Engine) -> [Client; N] {
    let mut drivers = Vec::new();
    for i in 1..=N {
        let lat = LAT + 0.001 * i as f64;
        drivers.push(Client::available_driver(engine, &format!("d{i}"), lat, LON).await);
    }
    wait_for_available(engine, N).await;
    match drivers.try_into() {
        Ok(drivers) => drivers,
        Err(_) => unreachable!("N drivers were made"),
    }
}

fn ids(drivers: &[MatchedDriver]) -> Vec<&str> {
    drivers.iter().map(|d| &*d.driver_id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_two_is_matched_once_both_accept() {
    let engine = common::engine(|_| {}).await;
    let [mut d1, mut d2] = drivers_north(&engine).await;
    let mut rider = Client::rider(&engine, "r1").await;
    request_group(&mut rider, "g1", LAT, LON, 2).await;

    let (o1, request) = expect_group_offer(&mut d1, 2).await;
    assert_eq!(request, "g1", "drivers see the rider's own request id");
    let (o2, _) = expect_group_offer(&mut d2, 2).await;
    d1.accept(o1).await;
    expect_waiting(&mut d1, o1, 1, 2).await;
    expect_progress(&mut rider, 1, 2).await;
    d2.accept(o2).await;

    let t1 = expect_trip(&mut d1, o1, 2).await;
    let t2 = expect_trip(&mut d2, o2, 2).await;
    let drivers = expect_group_matched(&mut rider, "g1").await;
    assert_eq!(ids(&drivers), ["d1", "d2"]);
    assert_eq!((drivers[0].trip_id, drivers[1].trip_id), (t1, t2));
    assert_ne!(t1, t2);
    assert_eq!(engine.stats().await.searches, 0, "no member search is left");

    // Each completes its own trip.
    d1.send(json!({"type": "trip_completed", "trip_id": t1}))
        .await;
    d2.send(json!({"type": "trip_completed", "trip_id": t2}))
        .await;
    wait_for_available(&engine, 2).await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_vehicle_keeps_its_fields_and_lists_one_driver() {
    let engine = common::engine(|_| {}).await;
    let mut d1 = Client::available_driver(&engine, "d1", LAT + 0.001, LON).await;
    let mut rider = Client::rider(&engine, "r1").await;
    request_group(&mut rider, "q", LAT, LON, 1).await;
    let (offer, _) = expect_group_offer(&mut d1, 1).await;
    d1.accept(offer).await;
    let trip = expect_trip(&mut d1, offer, 1).await;
    let drivers = expect_group_matched(&mut rider, "q").await;
    assert_eq!(ids(&drivers), ["d1"]);
    assert_eq!(drivers[0].trip_id, trip);
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_who_declines_is_replaced_while_the_others_stay_held() {
    let engine = common::engine(|_| {}).await;
    let [mut d1, mut d2, mut d3] = drivers_north(&engine).await;
    let mut rider = Client::rider(&engine, "r1").await;
    request_group(&mut rider, "g", LAT, LON, 2).await;
    let (o1, _) = expect_group_offer(&mut d1, 2).await;
    let (o2, _) = expect_group_offer(&mut d2, 2).await;
    d1.accept(o1).await;
    expect_waiting(&mut d1, o1, 1, 2).await;
    expect_progress(&mut rider, 1, 2).await;

    // A held driver's word is final: no second answer, and `unavailable`
    // waits for the trip.
    d1.decline(o1).await;
    assert_eq!(d1.expect_error().await, "already_accepted");
    d1.accept(o1).await;
    assert_eq!(d1.expect_error().await, "already_accepted");
    d1.send(json!({"type": "unavailable"})).await;
    d1.expect_silence(Duration::from_millis(200)).await;

    d2.decline(o2).await;
    let (o3, _) = expect_group_offer(&mut d3, 2).await;
    d3.accept(o3).await;
    expect_trip(&mut d1, o1, 2).await;
    expect_trip(&mut d3, o3, 2).await;
    let drivers = expect_group_matched(&mut rider, "g").await;
    assert_eq!(ids(&drivers), ["d1", "d3"]);
    // The driver who declined is not asked again.
    d2.expect_silence(Duration::from_millis(200)).await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rider_cancelling_frees_every_held_member_at_once() {
    let engine = common::engine(|_| {}).await;
    let [mut d1, mut d2] = drivers_north(&engine).await;
    let mut rider = Client::rider(&engine, "r1").await;
    // Three vehicles, two drivers: never complete.
    request_group(&mut rider, "g", LAT, LON, 3).await;
    let (o1, _) = expect_group_offer(&mut d1, 3).await;
    let (o2, _) = expect_group_offer(&mut d2, 3).await;
    wait_for_waiting(&engine, 1).await;
    d1.accept(o1).await;
    expect_waiting(&mut d1, o1, 1, 3).await;
    expect_progress(&mut rider, 1, 3).await;
    d2.accept(o2).await;
    expect_waiting(&mut d2, o2, 2, 3).await;
    expect_progress(&mut rider, 2, 3).await;
    // Every held driver hears the new count.
    expect_waiting(&mut d1, o1, 2, 3).await;

    rider
        .send(json!({"type": "cancel", "request_id": "g"}))
        .await;
    expect_revoked(&mut d1, o1, RevokeReason::RiderCancelled).await;
    expect_revoked(&mut d2, o2, RevokeReason::RiderCancelled).await;
    match rider.recv().await {
        ServerMessage::Cancelled { request_id } => assert_eq!(&*request_id, "g"),
        other => panic!("expected cancelled, got {other:?}"),
    }
    assert_eq!(engine.stats().await.searches, 0);

    // Both are free again: the next request gets d1 at once.
    wait_for_available(&engine, 2).await;
    rider.request_ride("next", LAT, LON).await;
    rider.expect_searching("next").await;
    let (offer, request) = expect_group_offer(&mut d1, 1).await;
    assert_eq!(request, "next");
    d1.accept(offer).await;
    assert_eq!(rider.expect_matched().await, "d1");
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_incomplete_at_its_deadline_lets_every_member_go() {
    let engine = common::engine(|c| c.search_timeout_ms = 1_500).await;
    let mut d1 = Client::available_driver(&engine, "d1", LAT + 0.001, LON).await;
    wait_for_available(&engine, 1).await;
    let mut rider = Client::rider(&engine, "r1").await;
    request_group(&mut rider, "g", LAT, LON, 2).await;
    let (o1, _) = expect_group_offer(&mut d1, 2).await;
    d1.accept(o1).await;
    expect_waiting(&mut d1, o1, 1, 2).await;
    expect_progress(&mut rider, 1, 2).await;

    expect_revoked(&mut d1, o1, RevokeReason::GroupIncomplete).await;
    match rider.recv().await {
        ServerMessage::NoDriver { request_id, .. } => assert_eq!(&*request_id, "g"),
        other => panic!("expected no_driver (never a partial matched), got {other:?}"),
    }
    wait_for_available(&engine, 1).await;
    assert_eq!(engine.stats().await.searches, 0);
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_member_who_disconnects_stays_held_and_one_who_had_not_accepted_is_replaced() {
    let engine = common::engine(|_| {}).await;
    let [mut d1, mut d2, mut d3] = drivers_north(&engine).await;
    let mut rider = Client::rider(&engine, "r1").await;
    request_group(&mut rider, "g", LAT, LON, 2).await;
    let (o1, _) = expect_group_offer(&mut d1, 2).await;
    let (_o2, _) = expect_group_offer(&mut d2, 2).await;
    d1.accept(o1).await;
    expect_waiting(&mut d1, o1, 1, 2).await;
    expect_progress(&mut rider, 1, 2).await;

    // d1 (held) and d2 (still deciding) lose their connections.
    d1.close_normally().await;
    d2.close_normally().await;
    let (o3, _) = expect_group_offer(&mut d3, 2).await;
    d3.accept(o3).await;
    expect_trip(&mut d3, o3, 2).await;
    let drivers = expect_group_matched(&mut rider, "g").await;
    assert_eq!(ids(&drivers), ["d1", "d3"], "the held member is booked");

    // d1 comes back to its trip.
    let mut d1 = Client::driver(&engine, "d1").await;
    let trip = expect_trip(&mut d1, o1, 2).await;
    assert_eq!(trip, drivers[0].trip_id);
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_member_reconnecting_is_told_it_waits() {
    let engine = common::engine(|_| {}).await;
    let mut d1 = Client::available_driver(&engine, "d1", LAT + 0.001, LON).await;
    wait_for_available(&engine, 1).await;
    let mut rider = Client::rider(&engine, "r1").await;
    request_group(&mut rider, "g", LAT, LON, 2).await;
    let (o1, _) = expect_group_offer(&mut d1, 2).await;
    d1.accept(o1).await;
    expect_waiting(&mut d1, o1, 1, 2).await;
    d1.close_normally().await;
    let mut d1 = Client::driver(&engine, "d1").await;
    expect_waiting(&mut d1, o1, 1, 2).await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_groups_racing_for_three_drivers_complete_one_within_one_offer_round() {
    let engine = common::engine(|c| c.search_timeout_ms = 2_000).await;
    let mut drivers = Vec::new();
    for (i, dlat) in [0.001, 0.0015, 0.002].into_iter().enumerate() {
        drivers
            .push(Client::available_driver(&engine, &format!("d{}", i + 1), LAT + dlat, LON).await);
    }
    wait_for_available(&engine, 3).await;
    let mut r1 = Client::rider(&engine, "r1").await;
    let mut r2 = Client::rider(&engine, "r2").await;
    // Both at once: neither waits for the other's answer.
    for rider in [&mut r1, &mut r2] {
        rider
            .send(json!({
                "type": "request_ride", "request_id": "g",
                "pickup": {"lat": LAT, "lon": LON}, "vehicles": 2,
            }))
            .await;
    }
    r1.expect_searching("g").await;
    r2.expect_searching("g").await;

    // One offer round: every driver gets exactly one offer and accepts it.
    let mut offers = Vec::new();
    for driver in &mut drivers {
        let (offer, _) = expect_group_offer(driver, 2).await;
        driver.accept(offer).await;
        offers.push(offer);
    }
    // Exactly one group completes; the other holds its one driver until its
    // deadline and fails. No driver is in both.
    let mut matched = Vec::new();
    let mut failed = 0;
    for rider in [&mut r1, &mut r2] {
        loop {
            match rider.recv().await {
                ServerMessage::GroupProgress { .. } => continue,
                ServerMessage::Matched { drivers, .. } => {
                    matched.extend(drivers.into_iter().map(|d| d.driver_id.to_string()));
                }
                ServerMessage::NoDriver { .. } => failed += 1,
                other => panic!("unexpected {other:?}"),
            }
            break;
        }
    }
    assert_eq!(
        (matched.len(), failed),
        (2, 1),
        "one group of two, one failed"
    );
    for (driver, offer) in drivers.iter_mut().zip(offers) {
        let booked = matched.contains(&driver_id(driver));
        // Held first, unless its accept completed the group at once.
        let mut saw = Vec::new();
        loop {
            match driver.recv().await {
                ServerMessage::WaitingForGroup { .. } => saw.push("waiting"),
                ServerMessage::TripAssigned { offer_id, .. } => {
                    assert!(booked && offer_id == offer);
                    break;
                }
                ServerMessage::OfferRevoked { offer_id, reason } => {
                    assert!(!booked && offer_id == offer);
                    assert_eq!(reason, RevokeReason::GroupIncomplete);
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(saw.len() <= 2, "{saw:?}");
    }
    engine.shutdown().await;
}

fn driver_id(client: &Client) -> String {
    client.id.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_group_takes_a_driver_from_a_younger_one() {
    // Group a waits for a second driver beyond its first radius; group b,
    // younger, holds the only one there. When a's radius grows to reach it,
    // a takes it: b's driver is revoked `preempted` and offered to a.
    let engine = common::engine(|c| {
        c.radius_m = 1_000.0;
        c.radius_step_m = 3_000.0;
        c.radius_step_ms = 1_000;
        c.max_radius_m = Some(4_000.0);
        c.search_timeout_ms = 4_000;
    })
    .await;
    let b_lat = LAT + 0.027; // 3 km north of a's pickup
    let mut d1 = Client::available_driver(&engine, "d1", LAT + 0.001, LON).await;
    let mut d2 = Client::available_driver(&engine, "d2", b_lat + 0.001, LON).await;
    wait_for_available(&engine, 2).await;
    let mut a = Client::rider(&engine, "ra").await;
    request_group(&mut a, "ga", LAT, LON, 2).await;
    let (o1, request) = expect_group_offer(&mut d1, 2).await;
    assert_eq!(request, "ga");
    d1.accept(o1).await;
    expect_waiting(&mut d1, o1, 1, 2).await;
    expect_progress(&mut a, 1, 2).await;

    let mut b = Client::rider(&engine, "rb").await;
    request_group(&mut b, "gb", b_lat, LON, 2).await;
    let (o2, request) = expect_group_offer(&mut d2, 2).await;
    assert_eq!(request, "gb");
    d2.accept(o2).await;
    expect_waiting(&mut d2, o2, 1, 2).await;
    expect_progress(&mut b, 1, 2).await;

    // A second later a's radius reaches d2.
    expect_revoked(&mut d2, o2, RevokeReason::Preempted).await;
    let (o3, request) = expect_group_offer(&mut d2, 2).await;
    assert_eq!(request, "ga");
    d2.accept(o3).await;
    expect_trip(&mut d1, o1, 2).await;
    expect_trip(&mut d2, o3, 2).await;
    let drivers = expect_group_matched(&mut a, "ga").await;
    assert_eq!(ids(&drivers), ["d1", "d2"]);
    // The younger group never completes: it fails at its deadline.
    match b.recv().await {
        ServerMessage::NoDriver { request_id, .. } => assert_eq!(&*request_id, "gb"),
        other => panic!("expected no_driver for the younger group, got {other:?}"),
    }
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_vehicles_value_is_refused_and_starts_nothing() {
    let engine = common::engine(|_| {}).await;
    let mut rider = Client::rider(&engine, "r1").await;
    for bad in [
        json!(0),
        json!(5),
        json!(-1),
        json!(1.5),
        json!("2"),
        json!(null),
        json!(true),
        json!(256),
        json!([2]),
    ] {
        rider
            .send(json!({
                "type": "request_ride", "request_id": "g",
                "pickup": {"lat": LAT, "lon": LON}, "vehicles": bad,
            }))
            .await;
        match rider.recv().await {
            ServerMessage::Error { code, message, .. } => {
                assert_eq!(code.as_str(), "invalid_field", "{bad}");
                assert!(message.contains("vehicles"), "{bad}: {message}");
            }
            other => panic!("{bad}: expected an error, got {other:?}"),
        }
    }
    assert_eq!(engine.stats().await.searches, 0);
    // The connection is fine and the id unused: a good request starts.
    request_group(&mut rider, "g", LAT, LON, 4).await;
    engine.shutdown().await;
}
