//! The double-booking scenario: hundreds of drivers and riders answering at
//! random, all at once, over one engine or spread over several nodes.
//! Between offers, drivers move, go unavailable and come back, and drop their
//! connection and reconnect (to the next node, in a cluster): where two
//! actors, or two connections, for one driver could exist. No driver ever
//! holds two offers or two trips, every request gets exactly one final
//! message, and every `matched` names a driver who accepted that request.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::Client;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ridelock::protocol::ServerMessage;
use serde_json::json;
use tokio::time::Instant;

const DRIVERS: usize = 200;
const RIDERS: usize = 200;
const REQUESTS_PER_RIDER: usize = 2;
const LAT: f64 = 52.5200;
const LON: f64 = 13.4050;

#[derive(Default)]
struct Log {
    violations: Vec<String>,
    /// (rider, request) -> (driver, trip) for every accept the engine confirmed.
    accepted: HashMap<(String, String), (String, u64)>,
    /// (rider, request) -> final messages received.
    finals: HashMap<(String, String), Vec<ServerMessage>>,
    offers: usize,
    /// Drivers' life between offers: reconnects, `unavailable`s, moves.
    reconnects: usize,
    unavailables: usize,
    moves: usize,
}

#[derive(Clone)]
struct Held {
    offer_id: u64,
    rider: String,
    request: String,
}

enum DriverState {
    Idle,
    Offered(Held),
    Accepting(Held),
    OnTrip,
}

/// A driver's life between offers.
fn life_event(rng: &mut StdRng, unavailable: bool) -> (Instant, serde_json::Value) {
    let at = Instant::now() + Duration::from_millis(rng.random_range(200..1_000));
    let roll: f64 = rng.random();
    let action = if unavailable {
        json!({"type": "available"})
    } else if roll < 0.7 {
        let (dlat, dlon) = (
            rng.random_range(-0.002..0.002),
            rng.random_range(-0.003..0.003),
        );
        json!({"type": "location", "lat": LAT + dlat, "lon": LON + dlon})
    } else if roll < 0.9 {
        json!({"type": "unavailable"})
    } else {
        json!({"type": "_reconnect"})
    };
    (at, action)
}

async fn drive(
    mut client: Client,
    nodes: Vec<SocketAddr>,
    mut node: usize,
    log: Arc<Mutex<Log>>,
    seed: u64,
    stop: Instant,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut state = DriverState::Idle;
    let mut unavailable = false;
    // The driver's own next move, and when.
    let mut planned: Option<(Instant, serde_json::Value)> = None;
    // The offer last declined: the engine may revoke it (expiry, cancel)
    // before the decline reaches it.
    let mut declined: Option<u64> = None;
    loop {
        if planned.is_none() && matches!(state, DriverState::Idle) {
            planned = Some(life_event(&mut rng, unavailable));
        }
        let wake = planned.as_ref().map_or(stop, |(at, _)| (*at).min(stop));
        let message = tokio::select! {
            m = client.recv_within(Duration::from_secs(30)) => m,
            _ = tokio::time::sleep_until(wake) => {
                if Instant::now() >= stop {
                    return;
                }
                let Some((_, action)) = planned.take() else { continue };
                let idle = matches!(state, DriverState::Idle);
                match action["type"].as_str() {
                    // Drop the connection and come back, to the next node.
                    Some("_reconnect") if idle => {
                        log.lock().unwrap().reconnects += 1;
                        let _ = client.ws.close(None).await;
                        node = (node + 1) % nodes.len();
                        client = Client::connect(nodes[node], "driver", &client.id.clone()).await;
                        client
                            .send(json!({"type": "location", "lat": LAT, "lon": LON}))
                            .await;
                        client.send(json!({"type": "available"})).await;
                        unavailable = false;
                        declined = None;
                        continue;
                    }
                    Some("_reconnect") => continue,
                    Some("unavailable") => {
                        unavailable = true;
                        log.lock().unwrap().unavailables += 1;
                    }
                    Some("available") => unavailable = false,
                    Some("location") => log.lock().unwrap().moves += 1,
                    _ => {}
                }
                state = match (std::mem::replace(&mut state, DriverState::Idle), action["type"].as_str()) {
                    (DriverState::Offered(held), Some("decline")) => {
                        declined = Some(held.offer_id);
                        DriverState::Idle
                    }
                    (DriverState::Offered(held), Some("accept")) => DriverState::Accepting(held),
                    (DriverState::OnTrip, Some("trip_completed")) => DriverState::Idle,
                    (unchanged, _) => unchanged,
                };
                client.send(action).await;
                continue;
            }
        };
        let Some(message) = message else { return };
        let mut log = log.lock().unwrap();
        match message {
            ServerMessage::Offer {
                offer_id,
                request_id,
                rider_id,
                ..
            } => {
                log.offers += 1;
                if !matches!(state, DriverState::Idle) {
                    log.violations
                        .push(format!("{} offered {offer_id} while not idle", client.id));
                }
                state = DriverState::Offered(Held {
                    offer_id,
                    rider: rider_id.to_string(),
                    request: request_id.to_string(),
                });
                let roll: f64 = rng.random();
                let after = Instant::now() + Duration::from_millis(rng.random_range(0..60));
                planned = if roll < 0.5 {
                    Some((after, json!({"type": "accept", "offer_id": offer_id})))
                } else if roll < 0.8 {
                    Some((after, json!({"type": "decline", "offer_id": offer_id})))
                } else {
                    None // let it expire
                };
            }
            ServerMessage::OfferRevoked { offer_id, .. } => match &state {
                DriverState::Offered(held) | DriverState::Accepting(held)
                    if held.offer_id == offer_id =>
                {
                    state = DriverState::Idle;
                    planned = None;
                }
                _ if declined == Some(offer_id) => {}
                _ => log
                    .violations
                    .push(format!("{} revoked {offer_id} it did not hold", client.id)),
            },
            ServerMessage::TripAssigned {
                trip_id, offer_id, ..
            } => match std::mem::replace(&mut state, DriverState::OnTrip) {
                DriverState::Accepting(held) if held.offer_id == offer_id => {
                    let key = (held.rider, held.request);
                    if log
                        .accepted
                        .insert(key, (client.id.clone(), trip_id))
                        .is_some()
                    {
                        log.violations
                            .push(format!("request accepted twice (trip {trip_id})"));
                    }
                    let after = Instant::now() + Duration::from_millis(rng.random_range(0..100));
                    planned = Some((after, json!({"type": "trip_completed", "trip_id": trip_id})));
                }
                _ => log.violations.push(format!(
                    "{} assigned trip {trip_id} without accepting",
                    client.id
                )),
            },
            // An answer that lost the race with the offer's end (its expiry,
            // or `unavailable` sent just before the offer arrived, which
            // declined it without a revoke): the offer is over.
            ServerMessage::Error { code, message, .. } if code.as_str() == "offer_expired" => {
                // Only if it is about the offer held now ("offer {id} …"):
                // a late answer to an earlier offer says nothing of this one.
                let about = message
                    .split_whitespace()
                    .nth(1)
                    .and_then(|id| id.parse::<u64>().ok());
                match &state {
                    DriverState::Offered(held) | DriverState::Accepting(held)
                        if Some(held.offer_id) == about =>
                    {
                        state = DriverState::Idle;
                        planned = None;
                    }
                    _ => {}
                }
            }
            other => log.violations.push(format!("{} got {other:?}", client.id)),
        }
    }
}

/// Engine settings the scenario expects: short offers and searches so that
/// expiries and `no_driver` happen often, and rate limits out of the way.
pub fn adjust(c: &mut ridelock::Config) {
    c.offer_timeout_ms = 150;
    c.search_timeout_ms = 1_500;
    c.max_messages_per_s = 1_000;
}

/// Runs the scenario against `nodes` (driver and rider `i` connect to node
/// `i % nodes.len()`) and asserts its invariants.
pub async fn no_double_booking(nodes: &[SocketAddr]) {
    let log = Arc::new(Mutex::new(Log::default()));
    let stop = Instant::now() + Duration::from_secs(20);
    let mut rng = StdRng::seed_from_u64(7);

    let mut drivers = Vec::new();
    for i in 0..DRIVERS {
        let (dlat, dlon) = (
            rng.random_range(-0.01..0.01),
            rng.random_range(-0.015..0.015),
        );
        let mut client = Client::connect(nodes[i % nodes.len()], "driver", &format!("d{i}")).await;
        client
            .send(json!({"type": "location", "lat": LAT + dlat, "lon": LON + dlon}))
            .await;
        client.send(json!({"type": "available"})).await;
        drivers.push(tokio::spawn(drive(
            client,
            nodes.to_vec(),
            i % nodes.len(),
            log.clone(),
            i as u64,
            stop,
        )));
    }

    let mut riders = Vec::new();
    for i in 0..RIDERS {
        let log = log.clone();
        let mut client = Client::connect(nodes[i % nodes.len()], "rider", &format!("r{i}")).await;
        let seed = 10_000 + i as u64;
        riders.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed);
            for n in 0..REQUESTS_PER_RIDER {
                let request = format!("q{n}");
                let (dlat, dlon) = (rng.random_range(-0.01..0.01), rng.random_range(-0.015..0.015));
                // Riders come over a few seconds, while drivers move, pause
                // and reconnect.
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..600))).await;
                client.request_ride(&request, LAT + dlat, LON + dlon).await;
                loop {
                    match client.recv().await {
                        ServerMessage::Searching { request_id } if *request_id == *request => break,
                        // A cancel that lost the race with the last final message.
                        ServerMessage::Error { code, .. } if code.as_str() == "unknown_request" => {}
                        other => panic!("{}: expected searching, got {other:?}", client.id),
                    }
                }
                if rng.random_bool(0.1) {
                    tokio::time::sleep(Duration::from_millis(rng.random_range(0..100))).await;
                    client.send(json!({"type": "cancel", "request_id": request})).await;
                }
                loop {
                    let message = client.recv().await;
                    let key = (client.id.clone(), request.clone());
                    match &message {
                        m if m.is_final() => {
                            log.lock().unwrap().finals.entry(key).or_default().push(message);
                            break;
                        }
                        // A cancel racing the final message finds it gone.
                        ServerMessage::Error { code, .. } if code.as_str() == "unknown_request" => {}
                        other => log
                            .lock()
                            .unwrap()
                            .violations
                            .push(format!("{} got {other:?}", client.id)),
                    }
                }
            }
            // Drain: no second final may follow.
            if let Some(extra) = client.recv_within(Duration::from_millis(300)).await {
                if !matches!(&extra, ServerMessage::Error { code, .. } if code.as_str() == "unknown_request") {
                    log.lock().unwrap().violations.push(format!("{} extra {extra:?}", client.id));
                }
            }
        }));
    }
    for rider in riders {
        rider.await.expect("rider task");
    }
    // Every `matched` a rider got has its `trip_assigned` on the way to the
    // driver: wait for the drivers to have logged them all, then stop them.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (matched, accepted) = {
            let log = log.lock().unwrap();
            let matched = log
                .finals
                .values()
                .flatten()
                .filter(|m| matches!(m, ServerMessage::Matched { .. }))
                .count();
            (matched, log.accepted.len())
        };
        if accepted >= matched || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for driver in &drivers {
        driver.abort();
    }

    let log = std::mem::take(&mut *log.lock().unwrap());
    assert!(
        log.violations.is_empty(),
        "violations: {:#?}",
        log.violations
    );
    assert_eq!(
        log.finals.len(),
        RIDERS * REQUESTS_PER_RIDER,
        "a request got no final message"
    );
    let mut matched = 0;
    for (key, finals) in &log.finals {
        assert_eq!(finals.len(), 1, "{key:?} got {finals:?}");
        if let ServerMessage::Matched {
            driver_id, trip_id, ..
        } = &finals[0]
        {
            matched += 1;
            let accepted = log.accepted.get(key);
            assert_eq!(
                accepted,
                Some(&(driver_id.to_string(), *trip_id)),
                "{key:?} matched to {driver_id} but the drivers' log says {accepted:?}"
            );
        }
    }
    // Every accept the engine confirmed reached its rider as `matched`.
    assert_eq!(matched, log.accepted.len());
    assert!(
        log.reconnects > 0 && log.unavailables > 0 && log.moves > 0,
        "drivers never reconnected ({}), paused ({}) or moved ({})",
        log.reconnects,
        log.unavailables,
        log.moves
    );
    assert!(
        matched > RIDERS / 2,
        "only {matched} matches: the test exercised too little"
    );
    assert!(
        log.offers > matched,
        "declines and expiries should add offers"
    );
}
