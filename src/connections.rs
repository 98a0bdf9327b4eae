//! Caps on open connections: per client address (an IPv4 address, or an
//! IPv6 /64, which one host usually holds whole), counted from the moment a
//! socket is accepted; on sockets still in their handshake, in total; and on
//! upgraded WebSockets, in total.
//!
//! The per-address cap keeps one machine from holding every file descriptor
//! with silent sockets; the handshake cap bounds what many machines can hold
//! that way (each for the handshake timeout at most); the WebSocket cap keeps
//! sessions below the open-file limit with room to spare, so that `/healthz`
//! and new clients from other addresses are still answered when it is
//! reached.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// File descriptors kept back from WebSockets when the total cap is derived
/// from the open-file limit: handshakes in progress, health checks, scrapes,
/// Redis connections, log files.
pub const RESERVED_FDS: usize = 1024;

/// Sockets in their handshake at most, over all clients, by default: half the
/// descriptors kept back from WebSockets.
pub const DEFAULT_MAX_HANDSHAKES: usize = RESERVED_FDS / 2;

/// The caps and their counts.
#[derive(Debug)]
pub struct ConnectionLimits {
    max_sessions: usize,
    sessions: AtomicUsize,
    max_handshakes: usize,
    handshakes: AtomicUsize,
    max_per_address: usize,
    // A std mutex: the critical section is one hash-map update, never held
    // across an await.
    per_address: Mutex<HashMap<IpAddr, usize>>,
}

impl ConnectionLimits {
    /// At most `max_sessions` WebSockets in all, `max_handshakes` sockets
    /// in their handshake in all, and `max_per_address` sockets per client
    /// address (0: no per-address cap).
    pub fn new(max_sessions: usize, max_handshakes: usize, max_per_address: usize) -> Arc<Self> {
        Arc::new(ConnectionLimits {
            max_sessions,
            sessions: AtomicUsize::new(0),
            max_handshakes,
            handshakes: AtomicUsize::new(0),
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
        let address = client_of(address);
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

    /// Takes a place for one socket in its handshake; `None` when that many
    /// are in progress already.
    pub fn admit_handshake(self: &Arc<Self>) -> Option<HandshakeGuard> {
        if self.handshakes.fetch_add(1, Ordering::AcqRel) >= self.max_handshakes {
            self.handshakes.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(HandshakeGuard {
            limits: self.clone(),
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

/// The client an address stands for: an IPv4 address (IPv4-mapped IPv6
/// included) as it is, an IPv6 address by its /64, since one host or home
/// router is usually given a whole /64 and could otherwise use a fresh
/// address for every socket.
fn client_of(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

/// One socket's place among those in their handshake, given back on drop.
#[derive(Debug)]
pub struct HandshakeGuard {
    limits: Arc<ConnectionLimits>,
}

impl Drop for HandshakeGuard {
    fn drop(&mut self) {
        self.limits.handshakes.fetch_sub(1, Ordering::AcqRel);
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
        let limits = ConnectionLimits::new(100, 100, 2);
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
        let limits = ConnectionLimits::new(2, 100, 0);
        let one = limits.admit_session().unwrap();
        let _two = limits.admit_session().unwrap();
        assert!(limits.admit_session().is_none());
        assert_eq!(limits.sessions(), 2);
        drop(one);
        assert!(limits.admit_session().is_some());
    }

    #[test]
    fn no_per_address_cap_when_zero() {
        let limits = ConnectionLimits::new(10, 100, 0);
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let guards: Vec<_> = (0..1000).map(|_| limits.admit_socket(a)).collect();
        assert!(guards.iter().all(Option::is_some));
    }

    #[test]
    fn an_ipv6_64_is_one_client_and_mapped_ipv4_is_ipv4() {
        let limits = ConnectionLimits::new(100, 100, 2);
        let _a = limits
            .admit_socket("2001:db8:1:2::1".parse().unwrap())
            .unwrap();
        let _b = limits
            .admit_socket("2001:db8:1:2:ffff::9".parse().unwrap())
            .unwrap();
        assert!(limits
            .admit_socket("2001:db8:1:2:abcd::1".parse().unwrap())
            .is_none());
        assert!(limits
            .admit_socket("2001:db8:1:3::1".parse().unwrap())
            .is_some());
        let _c = limits
            .admit_socket("::ffff:10.0.0.1".parse().unwrap())
            .unwrap();
        let _d = limits.admit_socket("10.0.0.1".parse().unwrap()).unwrap();
        assert!(limits.admit_socket("10.0.0.1".parse().unwrap()).is_none());
    }

    #[test]
    fn handshakes_are_capped_in_total() {
        let limits = ConnectionLimits::new(100, 2, 0);
        let first = limits.admit_handshake().unwrap();
        let _second = limits.admit_handshake().unwrap();
        assert!(limits.admit_handshake().is_none());
        drop(first);
        assert!(limits.admit_handshake().is_some());
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
