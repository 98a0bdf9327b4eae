//! ridelock: a ride-sharing matchmaking engine.
//!
//! When a rider asks for a ride, ridelock finds the nearest available drivers
//! and locks exactly one of them for that rider while the driver decides: a
//! timed offer that ends accepted, declined, expired, cancelled or
//! disconnected, after which the driver is free for anyone else.
//!
//! The parts, from the inside out:
//! - [`lock`]: the lock rules of one driver, a pure state machine (time is
//!   passed in) that unit and property tests drive directly;
//! - [`spatial`]: the R-tree of available drivers, nearest first in metres;
//! - [`driver`]: one actix actor per driver, the only owner of its lock;
//! - [`matcher`]: the actor that turns ride requests into locked drivers;
//! - [`protocol`], [`session`], [`server`], [`peers`]: the WebSocket API; [`auth`]: who
//!   a connection is (signed tokens); [`connections`]: connection caps;
//! - [`engine`]: starts and stops it all; [`config`]: its flags.
#![deny(missing_docs)]

pub mod auth;
pub mod cluster;
pub mod config;
pub mod connections;
pub mod driver;
pub mod engine;
pub mod ids;
pub mod limits;
pub mod location;
pub mod lock;
pub mod matcher;
pub mod metrics;
pub mod peers;
pub mod protocol;
pub mod server;
pub mod session;
pub mod spatial;

pub use config::Config;
pub use engine::Engine;
