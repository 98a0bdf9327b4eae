//! The ridelock load simulator: a city of drivers and riders over real
//! WebSockets, measuring the engine and checking from the clients' side that
//! it never double-books.
//!
//! - [`args`]: flags and scenario presets;
//! - [`city`], [`arrivals`]: where people are, how drivers move, when riders come;
//! - [`checker`]: the invariants, fed with what each client sees;
//! - [`run`]: one run (ramp, steady phase, drain) and its [`report`].

pub mod args;
pub mod arrivals;
pub mod checker;
pub mod city;
mod driver;
mod events;
mod flood;
pub mod net;
mod ops_watch;
pub mod report;
mod rider;
pub mod run;
pub mod stats;
pub mod totals;
pub mod workers;
