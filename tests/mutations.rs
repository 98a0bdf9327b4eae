//! Structure-aware property tests of the message parser, and the same
//! mutated messages sent through real sockets: valid messages with one field
//! swapped for another type, numbers at the edges, huge and unicode strings,
//! deep nesting; and arbitrary bytes. Never a panic, always an error for the
//! sender, never a change for anyone else.

mod common;

use std::time::Duration;

use common::{wait_for_available, Client};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as ProptestConfig, RngAlgorithm, TestRng, TestRunner};
use ridelock::location::LatLon;
use ridelock::protocol::{
    Command, DriverCommand, ErrorCode, RiderCommand, ServerMessage, MAX_REQUEST_ID_LEN,
};
use serde_json::{json, Value};

const LAT: f64 = 52.5200;
const LON: f64 = 13.4050;

/// Every command either endpoint accepts, with arbitrary valid values.
fn valid_command() -> impl Strategy<Value = Value> {
    let lat = -90.0..=90.0f64;
    let lon = -180.0..=180.0f64;
    let id = "[a-z0-9]{1,64}";
    prop_oneof![
        (lat.clone(), lon.clone())
            .prop_map(|(lat, lon)| json!({"type": "location", "lat": lat, "lon": lon})),
        Just(json!({"type": "available"})),
        Just(json!({"type": "unavailable"})),
        any::<u64>().prop_map(|id| json!({"type": "accept", "offer_id": id})),
        any::<u64>().prop_map(|id| json!({"type": "decline", "offer_id": id})),
        any::<u64>().prop_map(|id| json!({"type": "trip_completed", "trip_id": id})),
        (id, lat, lon).prop_map(|(id, lat, lon)| json!({
            "type": "request_ride", "request_id": id, "pickup": {"lat": lat, "lon": lon}
        })),
        // Several vehicles (1, the default, is written by leaving it out).
        ("[a-z0-9]{1,64}", 2u8..=4).prop_map(|(id, vehicles)| json!({
            "type": "request_ride", "request_id": id, "pickup": {"lat": LAT, "lon": LON},
            "vehicles": vehicles,
        })),
        "[a-z0-9]{1,64}".prop_map(|id| json!({"type": "cancel", "request_id": id})),
    ]
}

/// JSON values that break fields: other types, numbers at the edges, huge
/// and unicode strings, deep nesting.
fn hostile_value() -> impl Strategy<Value = Value> {
    let nested = (0usize..300).prop_map(|depth| {
        let mut v = json!(1);
        for _ in 0..depth {
            v = json!([v]);
        }
        v
    });
    let deep_object = (0usize..300).prop_map(|depth| {
        let mut v = json!({});
        for _ in 0..depth {
            v = json!({"a": v});
        }
        v
    });
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        Just(json!(i64::MIN)),
        Just(json!(u64::MAX)),
        Just(json!(-1)),
        Just(json!(0)),
        Just(json!(1e308)),
        Just(json!(-0.0)),
        Just(json!(f64::MIN_POSITIVE)),
        Just(json!(90.000_000_000_1)),
        Just(json!(-180.000_000_1)),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,80}".prop_map(Value::from),
        "\\PC{0,40}".prop_map(Value::from),
        (1usize..20_000).prop_map(|n| Value::from("x".repeat(n))),
        Just(Value::from("\u{202e}\u{0}\u{feff}\u{10ffff}")),
        Just(json!([13.40, 52.52])),
        Just(json!({"lat": "52", "lon": 13})),
        nested,
        deep_object,
    ]
}

/// A valid command with one field (or the type) replaced, added or removed.
fn mutated_command() -> impl Strategy<Value = Value> {
    (
        valid_command(),
        hostile_value(),
        any::<prop::sample::Index>(),
        0..3u8,
    )
        .prop_map(|(mut command, hostile, which, how)| {
            let object = command.as_object_mut().expect("commands are objects");
            let keys: Vec<String> = object.keys().cloned().collect();
            let key = which.get(&keys).clone();
            match how {
                0 => {
                    object.insert(key, hostile);
                }
                1 => {
                    object.remove(&key);
                }
                _ => {
                    // Nested fields too: the pickup's lat or lon.
                    match object.get_mut("pickup").and_then(Value::as_object_mut) {
                        Some(pickup) => {
                            let field = if which.index(2) == 0 { "lat" } else { "lon" };
                            pickup.insert(field.into(), hostile);
                        }
                        None => {
                            object.insert(key, hostile);
                        }
                    }
                }
            }
            command
        })
}

/// What a parse may produce: a valid command (mutations can land on valid
/// values), or an error with a code and an explanation.
fn check_parse<C: Command + std::fmt::Debug>(text: &str, valid: impl Fn(&C) -> bool) {
    match C::parse(text) {
        Ok(command) => assert!(valid(&command), "{text} parsed into {command:?}"),
        Err(e) => {
            assert!(ErrorCode::ALL.contains(&e.code));
            assert!(!e.message.is_empty(), "{text}: empty explanation");
            // Errors are sent back: a client's huge input must not come back
            // whole.
            assert!(
                e.message.len() <= ridelock::protocol::MAX_ERROR_MESSAGE_LEN + 3,
                "{text}: {} byte error",
                e.message.len()
            );
        }
    }
}

fn valid_driver(command: &DriverCommand) -> bool {
    match command {
        DriverCommand::Location { lat, lon } => LatLon::new(*lat, *lon).is_ok(),
        _ => true,
    }
}

fn valid_rider(command: &RiderCommand) -> bool {
    let request_id = match command {
        RiderCommand::RequestRide {
            request_id,
            pickup,
            vehicles,
        } => {
            if LatLon::new(pickup.lat, pickup.lon).is_err() || !(1..=4).contains(vehicles) {
                return false;
            }
            request_id
        }
        RiderCommand::Cancel { request_id } => request_id,
    };
    !request_id.is_empty()
        && request_id.len() <= MAX_REQUEST_ID_LEN
        && !request_id.chars().any(char::is_control)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn mutated_messages_are_refused_or_valid(command in mutated_command()) {
        let text = command.to_string();
        check_parse::<DriverCommand>(&text, valid_driver);
        check_parse::<RiderCommand>(&text, valid_rider);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let text = String::from_utf8_lossy(&bytes);
        check_parse::<DriverCommand>(&text, valid_driver);
        check_parse::<RiderCommand>(&text, valid_rider);
    }

    #[test]
    fn every_valid_command_round_trips(command in valid_command()) {
        let text = command.to_string();
        let parsed: Result<Value, _> = match command["type"].as_str() {
            Some("request_ride" | "cancel") => RiderCommand::parse(&text)
                .map(|c| serde_json::to_value(c).unwrap()),
            _ => DriverCommand::parse(&text).map(|c| serde_json::to_value(c).unwrap()),
        };
        let parsed = parsed.unwrap_or_else(|e| panic!("{text}: {e}"));
        prop_assert_eq!(parsed, command);
    }
}

/// Every message the engine sends, with arbitrary values in every field.
fn server_message() -> impl Strategy<Value = ServerMessage> {
    use ridelock::protocol::{MatchedDriver, NoDriverReason, RevokeReason};
    let pos = (-90.0..=90.0f64, -180.0..=180.0f64).prop_map(|(lat, lon)| LatLon { lat, lon });
    let id = "[A-Za-z0-9_.:@-]{1,64}".prop_map(|s| std::sync::Arc::<str>::from(s.as_str()));
    let code = prop::sample::select(ErrorCode::ALL.to_vec());
    prop_oneof![
        (
            any::<u64>(),
            id.clone(),
            id.clone(),
            pos.clone(),
            0.0..1e7f64,
            any::<u64>(),
            (any::<u64>(), 1u8..=4)
        )
            .prop_map(
                |(
                    offer_id,
                    request_id,
                    rider_id,
                    pickup,
                    distance_m,
                    expires_in_ms,
                    (fencing_token, group_size),
                )| {
                    ServerMessage::Offer {
                        offer_id,
                        request_id,
                        rider_id,
                        pickup,
                        distance_m,
                        expires_in_ms,
                        fencing_token,
                        group_size,
                    }
                }
            ),
        (
            any::<u64>(),
            prop::sample::select(vec![
                RevokeReason::Expired,
                RevokeReason::RiderCancelled,
                RevokeReason::GroupIncomplete,
                RevokeReason::Preempted,
            ])
        )
            .prop_map(|(offer_id, reason)| ServerMessage::OfferRevoked { offer_id, reason }),
        (any::<u64>(), id.clone(), 0u8..=4, 1u8..=4).prop_map(
            |(offer_id, request_id, accepted, group_size)| ServerMessage::WaitingForGroup {
                offer_id,
                request_id,
                accepted,
                group_size,
            }
        ),
        (id.clone(), 0u8..=4, 1u8..=4).prop_map(|(request_id, accepted, group_size)| {
            ServerMessage::GroupProgress {
                request_id,
                accepted,
                group_size,
            }
        }),
        (any::<u64>(), any::<u64>(), id.clone(), pos.clone(), 1u8..=4).prop_map(
            |(trip_id, offer_id, rider_id, pickup, group_size)| ServerMessage::TripAssigned {
                trip_id,
                offer_id,
                rider_id,
                pickup,
                group_size,
            }
        ),
        id.clone()
            .prop_map(|request_id| ServerMessage::Searching { request_id }),
        (
            id.clone(),
            prop::collection::vec((any::<u64>(), id.clone(), pos, 0.0..1e7f64), 1..=4)
        )
            .prop_map(|(request_id, vehicles)| {
                let drivers: Vec<MatchedDriver> = vehicles
                    .into_iter()
                    .map(
                        |(trip_id, driver_id, driver_location, distance_m)| MatchedDriver {
                            driver_id,
                            trip_id,
                            driver_location,
                            distance_m,
                        },
                    )
                    .collect();
                let first = drivers[0].clone();
                ServerMessage::Matched {
                    request_id,
                    trip_id: first.trip_id,
                    driver_id: first.driver_id,
                    driver_location: first.driver_location,
                    distance_m: first.distance_m,
                    drivers,
                }
            }),
        (
            id.clone(),
            prop::option::of(Just(NoDriverReason::LocksUnavailable))
        )
            .prop_map(|(request_id, reason)| ServerMessage::NoDriver { request_id, reason }),
        id.clone()
            .prop_map(|request_id| ServerMessage::Cancelled { request_id }),
        (code, "\\PC{0,100}", prop::option::of(id)).prop_map(|(code, message, request_id)| {
            ServerMessage::Error {
                code,
                message,
                request_id,
            }
        }),
    ]
}

proptest! {
    /// Apps (and the simulator) parse what the engine writes: every variant,
    /// every field, survives the wire unchanged.
    #[test]
    fn every_server_message_round_trips(message in server_message()) {
        let text = serde_json::to_string(&message).unwrap();
        let back: ServerMessage = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(back, message);
    }
}

/// Mutated frames from one driver and one rider, through real sockets: each
/// gets one error per bad frame (or the effect of a valid one), and a
/// bystander pair matches as if nothing happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_frames_over_sockets_cost_only_their_sender() {
    let engine = common::engine(|c| {
        c.max_messages_per_s = 100_000;
        c.max_requests_per_rider = 100_000;
        // Frames up to the default limit; larger ones close (tested elsewhere).
        c.max_message_bytes = 64 * 1024;
    })
    .await;
    let mut bystander = Client::available_driver(&engine, "bystander", LAT, LON).await;
    wait_for_available(&engine, 1).await;
    let mut driver = Client::driver(&engine, "fuzzed-d").await;
    let mut rider = Client::rider(&engine, "fuzzed-r").await;

    let mut runner = TestRunner::new_with_rng(
        ProptestConfig::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]),
    );
    let strategy = mutated_command();
    let (mut refused_driver, mut refused_rider) = (0, 0);
    for _ in 0..300 {
        let command = strategy.new_tree(&mut runner).unwrap().current();
        let text = command.to_string();
        let for_driver = DriverCommand::parse(&text).is_err();
        let for_rider = RiderCommand::parse(&text);
        if for_driver {
            driver.send_text(&text).await;
            assert!(
                matches!(driver.recv().await, ServerMessage::Error { .. }),
                "driver: {text}"
            );
            refused_driver += 1;
        }
        match for_rider {
            Err(_) => {
                rider.send_text(&text).await;
                assert!(
                    matches!(rider.recv().await, ServerMessage::Error { .. }),
                    "rider: {text}"
                );
                refused_rider += 1;
            }
            // A mutation that is still a valid cancel of nothing is answered
            // unknown_request; valid requests are not sent (they would
            // legitimately take the bystander).
            Ok(RiderCommand::Cancel { .. }) => {
                rider.send_text(&text).await;
                assert_eq!(rider.expect_error().await, "unknown_request");
            }
            Ok(RiderCommand::RequestRide { .. }) => {}
        }
    }
    assert!(refused_driver > 100 && refused_rider > 100);
    // Nothing reached anyone else: no search started, the bystander is still
    // available, untouched, and matches a real rider.
    assert_eq!(engine.stats().await.searches, 0);
    bystander.expect_silence(Duration::from_millis(50)).await;
    let mut real = Client::rider(&engine, "real").await;
    real.request_ride("q", LAT, LON).await;
    real.expect_searching("q").await;
    let (offer, _) = bystander.expect_offer().await;
    bystander.accept(offer).await;
    assert_eq!(real.expect_matched().await, "bystander");
    engine.shutdown().await;
}
