//! Caps on open connections: per client address, counted from the moment a
//! socket is accepted, and in total, counted over upgraded WebSockets.
//!
//! The per-address cap keeps one machine from holding every file descriptor
//! with silent sockets; the total cap keeps WebSockets below the open-file
//! limit with room to spare, so that `/healthz` and new clients from other
//! addresses are still answered when it is reached.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// File descriptors kept back from WebSockets when the total cap is derived
/// from the open-file limit: handshakes in progress, health checks, scrapes,
/// Redis connections, log files.
pub const RESERVED_FDS: usize = 1024;

/// Both caps and their counts.
#[derive(Debug)]
pub struct ConnectionLimits {
    max_sessions: usize,
    sessions: AtomicUsize,
    max_per_address: usize,
    // A std mutex: the critical section is one hash-map update, never held
    // across an await.
    per_address: Mutex<HashMap<IpAddr, usize>>,
}

impl ConnectionLimits {
    /// At most `max_sessions` WebSockets in all and `max_per_address`
    /// sockets per client address (0: no per-address cap).
    pub fn new(max_sessions: usize, max_per_address: usize) -> Arc<Self> {
        Arc::new(ConnectionLimits {
            max_sessions,
            sessions: AtomicUsize::new(0),
            max_per_address,
            per_address: Mutex::new(HashMap::new()),
        })
    }

    /// The total cap for `configured` (0: derive it from `open_files`, the
    /// process's open-file limit).
    pub fn total_cap(configured: usize, open_files: u64) -> usize {
        match configured {
            0 => usize::try_from(open_files)
                .unwrap_or(usize::MAX)
                .saturating_sub(RESERVED_FDS)
                .max(64),
            n => n,
        }
    }

    /// The total cap in force.
    pub fn max_sessions(&self) -> usize {
        self.max_sessions
    }

    /// Counts a newly accepted socket from `address`; `None` when that
    /// address already holds its share.
    pub fn admit_socket(self: &Arc<Self>, address: IpAddr) -> Option<AddressGuard> {
        if self.max_per_address > 0 {
            let mut counts = self.per_address.lock().unwrap_or_else(|e| e.into_inner());
            let count = counts.entry(address).or_insert(0);
            if *count >= self.max_per_address {
                return None;
            }
            *count += 1;
        }
        Some(AddressGuard {
            limits: self.clone(),
            address,
        })
    }

    /// Takes a place for one WebSocket; `None` when the total cap is reached.
    pub fn admit_session(self: &Arc<Self>) -> Option<SessionGuard> {
        if self.sessions.fetch_add(1, Ordering::AcqRel) >= self.max_sessions {
            self.sessions.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(SessionGuard {
            limits: self.clone(),
        })
    }

    /// WebSockets open now.
    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::Acquire)
    }
}

/// One accepted socket's place in its address's count, given back on drop.
#[derive(Debug)]
pub struct AddressGuard {
    limits: Arc<ConnectionLimits>,
    address: IpAddr,
}

impl Drop for AddressGuard {
    fn drop(&mut self) {
        if self.limits.max_per_address == 0 {
            return;
        }
        let mut counts = self
            .limits
            .per_address
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                // Forget the address: the map holds only addresses with
                // sockets open, however many clients came and went.
                counts.remove(&self.address);
            }
        }
    }
}

/// One WebSocket's place under the total cap, given back on drop.
#[derive(Debug)]
pub struct SessionGuard {
    limits: Arc<ConnectionLimits>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.limits.sessions.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_has_its_own_share_and_gets_it_back() {
        let limits = ConnectionLimits::new(100, 2);
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let first = limits.admit_socket(a).unwrap();
        let _second = limits.admit_socket(a).unwrap();
        assert!(limits.admit_socket(a).is_none());
        assert!(limits.admit_socket(b).is_some());
        drop(first);
        assert!(limits.admit_socket(a).is_some());
    }

    #[test]
    fn the_total_cap_counts_sessions() {
        let limits = ConnectionLimits::new(2, 0);
        let one = limits.admit_session().unwrap();
        let _two = limits.admit_session().unwrap();
        assert!(limits.admit_session().is_none());
        assert_eq!(limits.sessions(), 2);
        drop(one);
        assert!(limits.admit_session().is_some());
    }

    #[test]
    fn no_per_address_cap_when_zero() {
        let limits = ConnectionLimits::new(10, 0);
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let guards: Vec<_> = (0..1000).map(|_| limits.admit_socket(a)).collect();
        assert!(guards.iter().all(Option::is_some));
    }

    #[test]
    fn the_derived_total_leaves_a_reserve() {
        assert_eq!(
            ConnectionLimits::total_cap(0, 20_000),
            20_000 - RESERVED_FDS
        );
        assert_eq!(ConnectionLimits::total_cap(0, 100), 64);
        assert_eq!(ConnectionLimits::total_cap(500, 20_000), 500);
    }
}
