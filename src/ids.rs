//! Engine-wide id sources.
//!
//! Offer ids, trip ids and session ids only need to be unique; fencing tokens
//! must also grow. One atomic counter per kind gives both across every driver
//! of this engine, even when a driver's actor is retired and later recreated.
//! (Several engine nodes take fencing tokens from Redis instead, and start
//! their offer and trip ids at random points, see [`Ids::for_cluster`].)

use std::sync::atomic::{AtomicU64, Ordering};

use crate::lock::{FencingToken, OfferId, TripId};

/// Counters shared by the matcher, the driver actors and the sessions.
#[derive(Debug, Default)]
pub struct Ids {
    offers: AtomicU64,
    trips: AtomicU64,
    tokens: AtomicU64,
    sessions: AtomicU64,
}

impl Ids {
    /// Counters for a node of a cluster: offer and trip ids start at a random
    /// multiple of 2^32 below 2^53 (so they stay exact in JavaScript clients).
    /// A driver may get offers from any node, and its app tells them apart by
    /// id: two nodes' ranges overlap only if they drew the same of 2^21
    /// starting points.
    pub fn for_cluster() -> Self {
        let base = || u64::from(rand::random::<u32>() & 0x1F_FFFF) << 32;
        Ids {
            offers: AtomicU64::new(base()),
            trips: AtomicU64::new(base()),
            ..Ids::default()
        }
    }

    /// Counters whose fencing tokens start at the wall clock in microseconds,
    /// so that tokens keep growing across restarts of a one-node engine (as
    /// long as the clock does not go back by more than the time between
    /// them).
    pub fn for_node() -> Self {
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        Ids {
            tokens: AtomicU64::new(micros),
            ..Ids::default()
        }
    }

    /// Counters whose offer and trip ids start after the given bases (for
    /// tests that stand in for several nodes).
    pub fn starting_at(offers: u64, trips: u64) -> Self {
        Ids {
            offers: AtomicU64::new(offers),
            trips: AtomicU64::new(trips),
            ..Ids::default()
        }
    }

    /// A fresh offer id.
    pub fn next_offer(&self) -> OfferId {
        self.offers.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A fresh trip id.
    pub fn next_trip(&self) -> TripId {
        self.trips.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A fencing token greater than every one handed out before.
    pub fn next_token(&self) -> FencingToken {
        self.tokens.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A fresh connection id.
    pub fn next_session(&self) -> u64 {
        self.sessions.fetch_add(1, Ordering::Relaxed) + 1
    }
}
