//! The message parser on arbitrary bytes: never a panic; what parses
//! survives a round trip unchanged, and carries only valid positions and ids.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ridelock::protocol::{Command, DriverCommand, RiderCommand, MAX_REQUEST_ID_LEN};

fn round_trip<C: Command + serde::Serialize + PartialEq + std::fmt::Debug>(command: &C) {
    let text = serde_json::to_string(command).expect("a parsed command serialises");
    let again = C::parse(&text).expect("a serialised command parses");
    assert_eq!(&again, command);
}

fuzz_target!(|data: &[u8]| {
    // The engine only parses text frames, which tungstenite has checked are
    // UTF-8; invalid UTF-8 never reaches the parser (it closes with 1007).
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match DriverCommand::parse(text) {
        Ok(command) => {
            if let DriverCommand::Location { lat, lon } = command {
                assert!(ridelock::location::LatLon::new(lat, lon).is_ok());
            }
            round_trip(&command);
        }
        Err(e) => assert!(!e.message.is_empty()),
    }
    match RiderCommand::parse(text) {
        Ok(command) => {
            let request_id = match &command {
                RiderCommand::RequestRide { request_id, pickup } => {
                    assert!(ridelock::location::LatLon::new(pickup.lat, pickup.lon).is_ok());
                    request_id
                }
                RiderCommand::Cancel { request_id } => request_id,
            };
            assert!(!request_id.is_empty() && request_id.len() <= MAX_REQUEST_ID_LEN);
            round_trip(&command);
        }
        Err(e) => assert!(!e.message.is_empty()),
    }
});
