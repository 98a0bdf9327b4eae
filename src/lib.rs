//! ridelock: a ride-sharing matchmaking engine.
//!
//! When a rider asks for a ride, ridelock finds the nearest available drivers
//! and locks exactly one of them for that rider while the driver decides: a
//! timed offer that ends accepted, declined, expired, cancelled or
//! disconnected, after which the driver is free for anyone else.
//!
//! The parts, from the inside out:
//! - [`core`]: every booking decision as a deterministic state machine (time
//!   is passed in, effects are returned): one driver's lock rules
//!   ([`core::lock`]), its bookings in Redis ([`core::booking`]), and the
//!   matcher's searches ([`core::search`]); unit, property and fault
//!   simulation tests drive them directly;
//! - [`spatial`]: the R-tree of available drivers, nearest first in metres;
//! - [`actors`]: the actix actors that carry the core's effects out: one
//!   per driver ([`driver`]) and the matcher ([`matcher`]);
//! - [`cluster`]: Redis I/O for several nodes sharing one city;
//! - [`protocol`], [`session`], [`server`], [`peers`]: the WebSocket API; [`auth`]: who
//!   a connection is (signed tokens); [`connections`]: connection caps;
//! - [`engine`]: starts and stops it all; [`config`]: its flags.
#![deny(missing_docs)]

pub mod actors;
pub mod areas;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod connections;
pub mod core;
pub mod engine;
pub mod ids;
pub mod limits;
pub mod location;
pub mod metrics;
pub mod ops;
pub mod peers;
pub mod protocol;
pub mod server;
pub mod session;
pub mod spatial;
pub mod web;

pub use self::actors::{driver, matcher};
pub use self::core::lock;
pub use config::Config;
pub use engine::Engine;
