//! The WebSocket protocol: JSON text frames with a `type` field.
//!
//! These types are the contract with the rider and driver apps (and the
//! simulator, which reuses them); `docs/protocol.md` documents every message
//! and error code. Parsing never panics and turns every bad frame into a
//! [`ProtocolError`] whose code tells the client what to fix.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::location::LatLon;
use crate::lock::{Ending, FencingToken, OfferId, TripId};

/// Longest accepted `request_id`, in bytes. Ids are kept while a search runs,
/// so their size is bounded like everything else a client controls.
pub const MAX_REQUEST_ID_LEN: usize = 64;

/// Most vehicles one request may ask for (see `request_ride`'s `vehicles`).
pub const MAX_VEHICLES: u8 = 4;

/// Longest explanation in an error, in bytes (then cut, with an ellipsis).
pub const MAX_ERROR_MESSAGE_LEN: usize = 256;

/// A driver's id: a verified token's `sub` (or, in open mode, the `id`
/// query parameter); see [`crate::auth`].
pub type DriverId = Arc<str>;
/// A rider's id, from where a driver's comes.
pub type RiderId = Arc<str>;
/// A ride request's id, chosen by the rider app, unique per rider.
pub type RequestId = Arc<str>;

/// A position on the wire: `{"lat": .., "lon": ..}`.
pub type Position = LatLon;

/// What a driver app sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DriverCommand {
    /// The driver's current position.
    Location {
        /// Latitude in degrees.
        lat: f64,
        /// Longitude in degrees.
        lon: f64,
    },
    /// The driver wants offers.
    Available,
    /// The driver wants no more offers (declines one in flight).
    Unavailable,
    /// The driver takes the offer.
    Accept {
        /// The offer being answered.
        offer_id: OfferId,
        /// The offer's fencing token, when the app sends it back: an accept
        /// whose token is not the offer's (a stale one) is refused with
        /// `offer_expired`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fencing_token: Option<FencingToken>,
    },
    /// The driver turns the offer down.
    Decline {
        /// The offer being answered.
        offer_id: OfferId,
    },
    /// The driver finished the trip and is free again.
    TripCompleted {
        /// The trip finished.
        trip_id: TripId,
    },
}

/// What a rider app sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RiderCommand {
    /// Find and lock a driver near `pickup`.
    RequestRide {
        /// The rider's id for this request (at most 64 bytes).
        request_id: RequestId,
        /// Where to be picked up.
        pickup: Position,
        /// How many vehicles, 1 to 4: all of them come or none does.
        #[serde(
            default = "one_vehicle",
            deserialize_with = "vehicles",
            skip_serializing_if = "is_one"
        )]
        vehicles: u8,
    },
    /// Withdraw a request still in flight.
    Cancel {
        /// The request to withdraw.
        request_id: RequestId,
    },
}

fn one_vehicle() -> u8 {
    1
}

fn is_one(n: &u8) -> bool {
    *n == 1
}

/// `vehicles` as a `u8`, with an error that names the field (serde's own
/// says only what type it expected).
fn vehicles<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    u8::deserialize(d).map_err(|_| {
        serde::de::Error::custom(format!(
            "vehicles must be an integer from 1 to {MAX_VEHICLES}"
        ))
    })
}

/// Why an offer was taken back from a driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevokeReason {
    /// Nobody answered before the deadline.
    Expired,
    /// The rider cancelled the request.
    RiderCancelled,
    /// The group of vehicles this offer was part of could not be completed
    /// before the request's deadline.
    GroupIncomplete,
    /// An older group request took the driver (see `docs/design.md`).
    Preempted,
}

/// One vehicle of a `matched`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MatchedDriver {
    /// The driver.
    pub driver_id: DriverId,
    /// The driver's trip.
    pub trip_id: TripId,
    /// The driver's position when accepting.
    pub driver_location: Position,
    /// Great-circle distance from the driver to the pickup, metres.
    pub distance_m: f64,
}

/// Everything the engine sends, to drivers and riders alike.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// To a driver: you are locked for this request until `expires_in_ms`.
    Offer {
        /// Answer with this id.
        offer_id: OfferId,
        /// The rider's request.
        request_id: RequestId,
        /// The rider.
        rider_id: RiderId,
        /// Where the rider waits.
        pickup: Position,
        /// Great-circle distance from the driver to the pickup, metres.
        distance_m: f64,
        /// Time left to answer, milliseconds.
        expires_in_ms: u64,
        /// The lock's fencing token (grows with every lock of this driver).
        fencing_token: FencingToken,
        /// How many vehicles the request asks for (1 for a plain request).
        #[serde(default = "one_vehicle")]
        group_size: u8,
    },
    /// To a driver who accepted an offer of a group that is not complete:
    /// you are held for it; `trip_assigned` or `offer_revoked` follows.
    WaitingForGroup {
        /// The offer accepted.
        offer_id: OfferId,
        /// The rider's request.
        request_id: RequestId,
        /// How many members have accepted so far.
        accepted: u8,
        /// How many vehicles the request asks for.
        group_size: u8,
    },
    /// To a driver: the offer ended without your answer.
    OfferRevoked {
        /// The offer taken back.
        offer_id: OfferId,
        /// Why.
        reason: RevokeReason,
    },
    /// To a driver: your accept was taken; drive to the pickup.
    TripAssigned {
        /// The trip; complete it with `trip_completed`.
        trip_id: TripId,
        /// The offer you accepted.
        offer_id: OfferId,
        /// The rider.
        rider_id: RiderId,
        /// Where the rider waits.
        pickup: Position,
        /// How many vehicles the request asked for (1 for a plain request).
        #[serde(default = "one_vehicle")]
        group_size: u8,
    },
    /// To a rider: the request was taken and the search has begun.
    Searching {
        /// The request.
        request_id: RequestId,
    },
    /// To a rider of a group request: members accepted so far.
    GroupProgress {
        /// The request.
        request_id: RequestId,
        /// How many members have accepted.
        accepted: u8,
        /// How many vehicles the request asks for.
        group_size: u8,
    },
    /// To a rider, final: a driver accepted.
    Matched {
        /// The request.
        request_id: RequestId,
        /// The trip.
        trip_id: TripId,
        /// The driver who accepted.
        driver_id: DriverId,
        /// The driver's position when accepting.
        driver_location: Position,
        /// Great-circle distance from the driver to the pickup, metres.
        distance_m: f64,
        /// Every vehicle, nearest first (one entry for a plain request,
        /// which the fields above repeat); for a group, the fields above
        /// are the first entry's.
        #[serde(default)]
        drivers: Vec<MatchedDriver>,
    },
    /// To a rider, final: nobody could be found before the search deadline.
    NoDriver {
        /// The request.
        request_id: RequestId,
        /// Why, when it was not simply that nobody took the ride in time.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<NoDriverReason>,
    },
    /// To a rider, final: the request was cancelled.
    Cancelled {
        /// The request.
        request_id: RequestId,
    },
    /// To anyone: the last message could not be acted on.
    Error {
        /// Machine-readable reason.
        code: ErrorCode,
        /// What to fix, for humans.
        message: String,
        /// The request concerned, for errors about one ride request.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<RequestId>,
    },
}

impl ServerMessage {
    /// An `error` message.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        ServerMessage::Error {
            code,
            message: message.into(),
            request_id: None,
        }
    }

    /// An `error` message about one ride request.
    pub fn request_error(
        code: ErrorCode,
        request_id: RequestId,
        message: impl Into<String>,
    ) -> Self {
        ServerMessage::Error {
            code,
            message: message.into(),
            request_id: Some(request_id),
        }
    }

    /// Whether this message ends a rider's request.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            ServerMessage::Matched { .. }
                | ServerMessage::NoDriver { .. }
                | ServerMessage::Cancelled { .. }
        )
    }
}

impl RevokeReason {
    /// The reason a driver is told when an offer ends without their answer;
    /// `None` for endings the driver caused (accept, decline, disconnect).
    pub fn for_ending(ending: Ending) -> Option<Self> {
        match ending {
            Ending::Expired => Some(RevokeReason::Expired),
            Ending::RiderCancelled => Some(RevokeReason::RiderCancelled),
            Ending::GroupIncomplete => Some(RevokeReason::GroupIncomplete),
            Ending::Preempted => Some(RevokeReason::Preempted),
            Ending::Accepted | Ending::Declined | Ending::DriverDisconnected => None,
        }
    }
}

/// Why a request ended `no_driver`, when there is more to say than that
/// nobody in reach took it before its deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoDriverReason {
    /// Cluster mode: the lock store (Redis) could not grant locks; retrying
    /// later may succeed.
    LocksUnavailable,
}

/// Every error code a client can receive (see `docs/protocol.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not valid JSON.
    InvalidJson,
    /// The JSON value is not an object.
    NotAnObject,
    /// The object has no string `type` field.
    MissingType,
    /// `type` is not a message this endpoint accepts.
    UnknownType,
    /// A field is missing or has the wrong type or size.
    InvalidField,
    /// lat/lon out of range or not finite.
    InvalidCoordinates,
    /// `accept`/`decline` of an offer this driver never had.
    UnknownOffer,
    /// `accept`/`decline` of an offer that has already ended.
    OfferExpired,
    /// `trip_completed` of a trip that is not this driver's current trip.
    UnknownTrip,
    /// `cancel` of a request that is not in flight.
    UnknownRequest,
    /// `request_ride` repeating a request id that is still in flight.
    RequestInFlight,
    /// Too many requests in flight for this rider.
    TooManyRequests,
    /// Messages arrive faster than this connection may send them.
    RateLimited,
    /// Binary frames are not part of the protocol.
    BinaryNotSupported,
    /// The engine has too many requests queued; retry after a pause.
    Overloaded,
    /// `request_ride` with a pickup outside every service area.
    OutsideServiceArea,
    /// `accept`/`decline` of a group offer already accepted: the driver is
    /// held for the group until it completes or fails.
    AlreadyAccepted,
}

impl ErrorCode {
    /// Every code, for documentation and metrics.
    pub const ALL: [ErrorCode; 17] = [
        ErrorCode::InvalidJson,
        ErrorCode::NotAnObject,
        ErrorCode::MissingType,
        ErrorCode::UnknownType,
        ErrorCode::InvalidField,
        ErrorCode::InvalidCoordinates,
        ErrorCode::UnknownOffer,
        ErrorCode::OfferExpired,
        ErrorCode::UnknownTrip,
        ErrorCode::UnknownRequest,
        ErrorCode::RequestInFlight,
        ErrorCode::TooManyRequests,
        ErrorCode::RateLimited,
        ErrorCode::BinaryNotSupported,
        ErrorCode::Overloaded,
        ErrorCode::OutsideServiceArea,
        ErrorCode::AlreadyAccepted,
    ];

    /// The snake_case code as sent (also the metrics label).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::NotAnObject => "not_an_object",
            ErrorCode::MissingType => "missing_type",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::InvalidCoordinates => "invalid_coordinates",
            ErrorCode::UnknownOffer => "unknown_offer",
            ErrorCode::OfferExpired => "offer_expired",
            ErrorCode::UnknownTrip => "unknown_trip",
            ErrorCode::UnknownRequest => "unknown_request",
            ErrorCode::RequestInFlight => "request_in_flight",
            ErrorCode::TooManyRequests => "too_many_requests",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::BinaryNotSupported => "binary_not_supported",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::OutsideServiceArea => "outside_service_area",
            ErrorCode::AlreadyAccepted => "already_accepted",
        }
    }
}

/// A frame that could not be turned into a command.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ProtocolError {
    /// The code sent to the client.
    pub code: ErrorCode,
    /// The explanation sent to the client.
    pub message: String,
}

impl ProtocolError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        // serde's messages quote the offending value: a 4 KiB string field
        // would come back whole (found by the mutation tests).
        if message.len() > MAX_ERROR_MESSAGE_LEN {
            let mut cut = MAX_ERROR_MESSAGE_LEN;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        ProtocolError { code, message }
    }
}

impl From<ProtocolError> for ServerMessage {
    fn from(e: ProtocolError) -> Self {
        ServerMessage::error(e.code, e.message)
    }
}

/// A command an endpoint accepts: its `type` names and its own checks.
pub trait Command: DeserializeOwned + Sized {
    /// The `type` values this endpoint accepts.
    const TYPES: &'static [&'static str];

    /// Checks serde cannot express (ranges, sizes).
    fn validate(self) -> Result<Self, ProtocolError>;

    /// Parses one text frame.
    fn parse(text: &str) -> Result<Self, ProtocolError> {
        // Fast path: a well-formed frame is parsed once, straight into the enum.
        match serde_json::from_str::<Self>(text) {
            Ok(command) => command.validate(),
            Err(_) => Err(diagnose::<Self>(text)),
        }
    }
}

/// Works out, for a frame that failed to parse, which rule it broke. Only
/// bad frames pay for this second parse.
fn diagnose<C: Command>(text: &str) -> ProtocolError {
    let value: serde_json::Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(e) => {
            return ProtocolError::new(ErrorCode::InvalidJson, format!("not valid JSON: {e}"))
        }
    };
    let Some(object) = value.as_object() else {
        return ProtocolError::new(
            ErrorCode::NotAnObject,
            "a message must be a JSON object with a \"type\" field",
        );
    };
    let Some(kind) = object
        .get("type")
        .and_then(|t| t.as_str())
        .map(str::to_owned)
    else {
        return ProtocolError::new(
            ErrorCode::MissingType,
            "a message needs a string \"type\" field",
        );
    };
    if !C::TYPES.contains(&kind.as_str()) {
        return ProtocolError::new(
            ErrorCode::UnknownType,
            format!(
                "unknown type \"{kind}\"; this endpoint accepts: {}",
                C::TYPES.join(", ")
            ),
        );
    }
    match C::deserialize(value) {
        Err(e) => ProtocolError::new(ErrorCode::InvalidField, format!("{kind}: {e}")),
        // The fast path failed on the text but the value parsed: only possible
        // for numbers serde reads differently from text (e.g. huge integers).
        Ok(_) => ProtocolError::new(ErrorCode::InvalidField, format!("{kind}: malformed field")),
    }
}

fn coordinates(lat: f64, lon: f64) -> Result<LatLon, ProtocolError> {
    LatLon::new(lat, lon)
        .map_err(|e| ProtocolError::new(ErrorCode::InvalidCoordinates, e.to_string()))
}

impl Command for DriverCommand {
    const TYPES: &'static [&'static str] = &[
        "location",
        "available",
        "unavailable",
        "accept",
        "decline",
        "trip_completed",
    ];

    fn validate(self) -> Result<Self, ProtocolError> {
        if let DriverCommand::Location { lat, lon } = self {
            coordinates(lat, lon)?;
        }
        Ok(self)
    }
}

impl Command for RiderCommand {
    const TYPES: &'static [&'static str] = &["request_ride", "cancel"];

    fn validate(self) -> Result<Self, ProtocolError> {
        let request_id = match &self {
            RiderCommand::RequestRide {
                request_id,
                pickup,
                vehicles,
            } => {
                coordinates(pickup.lat, pickup.lon)?;
                if !(1..=MAX_VEHICLES).contains(vehicles) {
                    return Err(ProtocolError::new(
                        ErrorCode::InvalidField,
                        format!("vehicles must be an integer from 1 to {MAX_VEHICLES}"),
                    ));
                }
                request_id
            }
            RiderCommand::Cancel { request_id } => request_id,
        };
        // Control characters are refused: the engine names a group's
        // members by the request id and one (see `core::search`), and ids
        // are echoed into logs.
        if request_id.is_empty()
            || request_id.len() > MAX_REQUEST_ID_LEN
            || request_id.chars().any(char::is_control)
        {
            return Err(ProtocolError::new(
                ErrorCode::InvalidField,
                format!("request_id must be 1 to {MAX_REQUEST_ID_LEN} bytes of printable text"),
            ));
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_of<C: Command + std::fmt::Debug>(text: &str) -> ErrorCode {
        C::parse(text).expect_err(text).code
    }

    #[test]
    fn parses_every_driver_command() {
        assert_eq!(
            DriverCommand::parse(r#"{"type":"location","lat":1.5,"lon":-2}"#).unwrap(),
            DriverCommand::Location {
                lat: 1.5,
                lon: -2.0
            }
        );
        assert_eq!(
            DriverCommand::parse(r#"{"type":"accept","offer_id":7}"#).unwrap(),
            DriverCommand::Accept {
                offer_id: 7,
                fencing_token: None
            }
        );
        assert_eq!(
            DriverCommand::parse(r#"{"type":"accept","offer_id":7,"fencing_token":9}"#).unwrap(),
            DriverCommand::Accept {
                offer_id: 7,
                fencing_token: Some(9)
            }
        );
        assert_eq!(
            DriverCommand::parse(r#" {"type":"available","extra":true} "#).unwrap(),
            DriverCommand::Available
        );
    }

    #[test]
    fn classifies_bad_frames() {
        assert_eq!(code_of::<DriverCommand>("{nope"), ErrorCode::InvalidJson);
        assert_eq!(code_of::<DriverCommand>("[1,2]"), ErrorCode::NotAnObject);
        assert_eq!(code_of::<DriverCommand>("42"), ErrorCode::NotAnObject);
        assert_eq!(
            code_of::<DriverCommand>(r#"{"lat":1}"#),
            ErrorCode::MissingType
        );
        assert_eq!(
            code_of::<DriverCommand>(r#"{"type":5}"#),
            ErrorCode::MissingType
        );
        assert_eq!(
            code_of::<DriverCommand>(r#"{"type":"fly"}"#),
            ErrorCode::UnknownType
        );
        assert_eq!(
            code_of::<DriverCommand>(r#"{"type":"request_ride"}"#),
            ErrorCode::UnknownType
        );
        assert_eq!(
            code_of::<DriverCommand>(r#"{"type":"location","lat":1}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code_of::<DriverCommand>(r#"{"type":"accept","offer_id":"x"}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code_of::<DriverCommand>(r#"{"type":"location","lat":91,"lon":0}"#),
            ErrorCode::InvalidCoordinates
        );
        assert_eq!(
            code_of::<RiderCommand>(
                r#"{"type":"request_ride","request_id":"","pickup":{"lat":0,"lon":0}}"#
            ),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code_of::<RiderCommand>(
                r#"{"type":"request_ride","request_id":"r","pickup":{"lat":0,"lon":-181}}"#
            ),
            ErrorCode::InvalidCoordinates
        );
    }

    #[test]
    fn a_pickup_must_be_an_object() {
        // GeoJSON order ([lon, lat]) must not be read as lat/lon.
        let e = RiderCommand::parse(
            r#"{"type":"request_ride","request_id":"r","pickup":[13.40,52.52]}"#,
        )
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidField);
        assert!(e.message.contains("lat"), "{}", e.message);
        for pickup in [
            r#"{"lat":1}"#,
            r#"{"lat":1,"lon":2,"lat":3}"#,
            r#""1,2""#,
            "null",
        ] {
            let text = format!(r#"{{"type":"request_ride","request_id":"r","pickup":{pickup}}}"#);
            assert_eq!(
                code_of::<RiderCommand>(&text),
                ErrorCode::InvalidField,
                "{text}"
            );
        }
        // Other fields beside lat and lon are ignored, as before.
        let ok = RiderCommand::parse(
            r#"{"type":"request_ride","request_id":"r","pickup":{"lat":1,"lon":2,"alt":3}}"#,
        )
        .unwrap();
        assert_eq!(
            ok,
            RiderCommand::RequestRide {
                request_id: "r".into(),
                pickup: LatLon { lat: 1.0, lon: 2.0 },
                vehicles: 1,
            }
        );
    }

    #[test]
    fn vehicles_are_one_to_four() {
        let request = |vehicles: &str| {
            format!(
                r#"{{"type":"request_ride","request_id":"r","pickup":{{"lat":1,"lon":2}}{vehicles}}}"#
            )
        };
        let parsed = RiderCommand::parse(&request("")).unwrap();
        assert!(matches!(
            parsed,
            RiderCommand::RequestRide { vehicles: 1, .. }
        ));
        for n in 1..=4 {
            let parsed = RiderCommand::parse(&request(&format!(r#","vehicles":{n}"#))).unwrap();
            assert!(
                matches!(parsed, RiderCommand::RequestRide { vehicles, .. } if vehicles == n),
                "{n}"
            );
        }
        for bad in [
            "0", "5", "-1", "1.5", "\"2\"", "null", "true", "300", "1e9", "[2]",
        ] {
            let text = request(&format!(r#","vehicles":{bad}"#));
            let e = RiderCommand::parse(&text).expect_err(&text);
            assert_eq!(e.code, ErrorCode::InvalidField, "{text}");
            assert!(e.message.contains("vehicles"), "{text}: {}", e.message);
        }
    }

    #[test]
    fn request_ids_are_printable() {
        let text = r#"{"type":"request_ride","request_id":"a\u0000b","pickup":{"lat":1,"lon":2}}"#;
        assert_eq!(code_of::<RiderCommand>(text), ErrorCode::InvalidField);
        let text = r#"{"type":"cancel","request_id":"a\nb"}"#;
        assert_eq!(code_of::<RiderCommand>(text), ErrorCode::InvalidField);
    }

    #[test]
    fn long_explanations_are_cut() {
        let text = format!(r#"{{"type":"cancel","request_id":{}}}"#, "7".repeat(3000));
        let e = RiderCommand::parse(&text).unwrap_err();
        assert!(
            e.message.len() <= MAX_ERROR_MESSAGE_LEN + '…'.len_utf8(),
            "{}",
            e.message
        );
        let text = format!(
            r#"{{"type":"location","lat":"{}","lon":1}}"#,
            "é".repeat(3000)
        );
        let e = DriverCommand::parse(&text).unwrap_err();
        assert!(e.message.ends_with('…'));
    }

    #[test]
    fn messages_name_the_problem() {
        let e = DriverCommand::parse(r#"{"type":"location","lat":1}"#).unwrap_err();
        assert!(e.message.contains("lon"), "{}", e.message);
        let e = DriverCommand::parse(r#"{"type":"fly"}"#).unwrap_err();
        assert!(e.message.contains("trip_completed"), "{}", e.message);
    }

    #[test]
    fn server_messages_carry_their_type() {
        let json = serde_json::to_string(&ServerMessage::NoDriver {
            request_id: "r1".into(),
            reason: None,
        })
        .unwrap();
        assert_eq!(json, r#"{"type":"no_driver","request_id":"r1"}"#);
        let json = serde_json::to_string(&ServerMessage::NoDriver {
            request_id: "r1".into(),
            reason: Some(NoDriverReason::LocksUnavailable),
        })
        .unwrap();
        assert_eq!(
            json,
            r#"{"type":"no_driver","request_id":"r1","reason":"locks_unavailable"}"#
        );
        let json =
            serde_json::to_value(ServerMessage::error(ErrorCode::UnknownOffer, "x")).unwrap();
        assert_eq!(json["code"], "unknown_offer");
    }
}

#[cfg(test)]
mod docs_tests {
    use super::*;

    /// docs/protocol.md stays true: every code is documented, and the wire
    /// name is the metrics label.
    #[test]
    fn every_error_code_is_documented() {
        let docs = include_str!("../docs/protocol.md");
        for code in ErrorCode::ALL {
            let wire = serde_json::to_value(code).unwrap();
            assert_eq!(wire, code.as_str());
            assert!(
                docs.contains(&format!("`{}`", code.as_str())),
                "{code:?} undocumented"
            );
        }
    }
}
