//! Driver locks on Redis: one server ([`LockServer`]) and a Redlock quorum of
//! several ([`Redlock`]).
//!
//! On each server a driver's lock is one key, set with `NX` and a `PX` expiry,
//! holding an owner value unique to that lock (node id and offer id). Every
//! action on it is a Lua script, so each is atomic on the server:
//! - acquire: set the key if free and, in the same step, take the next
//!   fencing token from the driver's counter (never below a floor the caller
//!   knows of, see [`Redlock::acquire`]);
//! - release and confirm: act only while the key still holds the caller's
//!   owner value. A plain `DEL` could free a lock that expired and was taken
//!   by someone else in the meantime.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

use super::redlock::AttemptFailed;
pub use super::redlock::Renewal;
use crate::lock::{FencingToken, LockRefused, TripId};

mod quorum;
mod scripts;

pub use quorum::Redlock;
use scripts::*;

pub use crate::core::booking::{GroupMember, TripRecord, TRIP_HOLD};
pub use crate::core::Settled;

/// How long trip records and settled marks are kept: far longer than any
/// offer, so that a requester settling late still finds them.
pub const RECORD_TTL: Duration = Duration::from_secs(600);

/// What can go wrong talking to a lock server.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The server did not answer within the per-server timeout.
    #[error("redis {server}: no answer within {timeout:?}")]
    Timeout {
        /// Which server.
        server: String,
        /// The timeout.
        timeout: Duration,
    },
    /// The server refused or the connection failed.
    #[error("redis {server}: {source}")]
    Redis {
        /// Which server.
        server: String,
        /// What it said.
        source: redis::RedisError,
    },
}

/// Why a driver's lock was not taken across the quorum.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Not enough servers granted it in time; released everywhere.
    #[error("{reason} ({unreachable} servers unreachable)")]
    Refused {
        /// The Redlock verdict.
        reason: AttemptFailed,
        /// Servers that could not be asked.
        unreachable: usize,
    },
}

impl LockError {
    /// How a driver's actor reports this refusal: the lock held by another
    /// offer (some server said so), or the store unable to decide (every
    /// server that did not grant it was unreachable, or it was too slow).
    pub fn as_refusal(&self) -> LockRefused {
        match self {
            // Some server answered that another offer holds it: the driver is
            // taken, whatever the others said.
            LockError::Refused {
                reason:
                    AttemptFailed::NoQuorum {
                        granted, servers, ..
                    },
                unreachable,
            } if granted + unreachable < *servers => LockRefused::HeldElsewhere,
            LockError::Refused { .. } => LockRefused::StoreUnavailable,
        }
    }

    /// A short name for metrics labels: `held` (another offer has it),
    /// `no_quorum` (too few servers answered), `slow` (a majority granted
    /// it, but too late to rely on).
    pub fn kind(&self) -> &'static str {
        match self {
            LockError::Refused {
                reason: AttemptFailed::Expired,
                ..
            } => "slow",
            _ if self.as_refusal() == LockRefused::HeldElsewhere => "held",
            _ => "no_quorum",
        }
    }
}

/// The driver's lock, held by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The largest fencing token the granting servers issued.
    pub fencing_token: FencingToken,
    /// How long the lock can be relied on from when `acquire` returned.
    pub validity: Duration,
    /// Servers that granted it.
    pub granted: usize,
}

fn lock_key(driver: &str) -> String {
    format!("ridelock:driver:{driver}:lock")
}

fn token_key(driver: &str) -> String {
    format!("ridelock:driver:{driver}:token")
}

fn fence_key(driver: &str) -> String {
    format!("ridelock:driver:{driver}:fence")
}

fn current_trip_key(driver: &str) -> String {
    format!("ridelock:driver:{driver}:trip")
}

/// A node's liveness key (see `bus`): present while the node is alive,
/// holding the incarnation of the process that runs it.
pub(crate) fn alive_key(node: &str) -> String {
    format!("ridelock:node:{node}:alive")
}

fn trip_key(owner: &str) -> String {
    format!("ridelock:owner:{owner}:trip")
}

fn settled_key(owner: &str) -> String {
    format!("ridelock:owner:{owner}:settled")
}

fn finished_key(owner: &str) -> String {
    format!("ridelock:owner:{owner}:finished")
}

/// Locks on one Redis server.
#[derive(Clone)]
pub struct LockServer {
    url: String,
    connection: ConnectionManager,
    timeout: Duration,
}

impl LockServer {
    /// Connects to `url`; every later call gives up after `timeout` (Redlock
    /// asks for a per-server timeout well below the lock's time to live, so
    /// that a dead server costs little). Reconnects by itself after losses.
    pub async fn connect(url: &str, timeout: Duration) -> Result<Self, StoreError> {
        let fail = |source| StoreError::Redis {
            server: url.to_string(),
            source,
        };
        let client = redis::Client::open(url).map_err(fail)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1);
        let connection = tokio::time::timeout(
            timeout * 4,
            client.get_connection_manager_with_config(config),
        )
        .await
        .map_err(|_| StoreError::Timeout {
            server: url.to_string(),
            timeout: timeout * 4,
        })?
        .map_err(fail)?;
        Ok(LockServer {
            url: url.to_string(),
            connection,
            timeout,
        })
    }

    /// The server's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A connection for other commands (publishing, the node registry).
    pub fn connection(&self) -> ConnectionManager {
        self.connection.clone()
    }

    /// The per-call timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        keys: &[String],
        args: &[String],
    ) -> Result<T, StoreError> {
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        for arg in args {
            invocation.arg(arg);
        }
        let mut connection = self.connection.clone();
        self.bounded(invocation.invoke_async(&mut connection)).await
    }

    /// Awaits one call to this server within the per-server timeout.
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result.map_err(|source| StoreError::Redis {
                server: self.url.clone(),
                source,
            }),
            Err(_) => Err(StoreError::Timeout {
                server: self.url.clone(),
                timeout: self.timeout,
            }),
        }
    }

    /// Takes `driver`'s lock for `owner` for `ttl` if nobody holds it; the
    /// fencing token it comes with, or `None` if it is held.
    pub async fn try_acquire(
        &self,
        driver: &str,
        owner: &str,
        ttl: Duration,
        token_floor: FencingToken,
    ) -> Result<Option<FencingToken>, StoreError> {
        let ttl_ms = ttl.as_millis().max(1).to_string();
        self.run(
            &ACQUIRE_SCRIPT,
            &[lock_key(driver), token_key(driver), settled_key(owner)],
            &[owner.to_string(), ttl_ms, token_floor.to_string()],
        )
        .await
    }

    /// Frees `driver`'s lock if `owner` still holds it; whether it did.
    pub async fn release(&self, driver: &str, owner: &str) -> Result<bool, StoreError> {
        let deleted: i64 = self
            .run(&RELEASE_SCRIPT, &[lock_key(driver)], &[owner.to_string()])
            .await?;
        Ok(deleted == 1)
    }

    /// `driver` accepted `trip` under its owner's lock: records it and keeps
    /// the lock for [`TRIP_HOLD`], only if the owner still holds it (and see
    /// [`CONFIRM`]); whether it did.
    pub async fn confirm(&self, driver: &str, trip: &TripRecord) -> Result<bool, StoreError> {
        let remote_rider = if trip.rider_is_remote { "1" } else { "0" };
        let json = serde_json::to_string(trip).expect("trip records serialize");
        let kept: i64 = self
            .run(
                &CONFIRM_SCRIPT,
                &[
                    lock_key(driver),
                    trip_key(&trip.owner),
                    settled_key(&trip.owner),
                    alive_key(&trip.rider_node),
                    current_trip_key(driver),
                    fence_key(driver),
                ],
                &[
                    trip.owner.clone(),
                    trip.trip_id.to_string(),
                    RECORD_TTL.as_millis().to_string(),
                    TRIP_HOLD.as_millis().to_string(),
                    json,
                    remote_rider.to_string(),
                    trip.fencing_token.to_string(),
                    trip.rider_incarnation.to_string(),
                ],
            )
            .await?;
        Ok(kept == 1)
    }

    /// `driver` accepted a group's offer: keeps `owner`'s lock for `ttl`
    /// while it still holds it (see [`HOLD`]); whether it did.
    pub async fn hold(
        &self,
        driver: &str,
        owner: &str,
        ttl: Duration,
        token: FencingToken,
    ) -> Result<bool, StoreError> {
        let kept: i64 = self
            .run(
                &HOLD_SCRIPT,
                &[lock_key(driver), settled_key(owner), fence_key(driver)],
                &[
                    owner.to_string(),
                    ttl.as_millis().max(1).to_string(),
                    token.to_string(),
                ],
            )
            .await?;
        Ok(kept == 1)
    }

    /// Every member of a group is held: books every member's trip, or none
    /// (see [`CONFIRM_GROUP`]), keeping each lock and current trip for
    /// `keep` (at least [`TRIP_HOLD`]); whether it did.
    pub async fn confirm_group(
        &self,
        members: &[GroupMember],
        keep: Duration,
    ) -> Result<bool, StoreError> {
        let mut keys = Vec::with_capacity(members.len() * 5);
        let mut args = vec![
            RECORD_TTL.as_millis().to_string(),
            keep.max(TRIP_HOLD).as_millis().to_string(),
        ];
        for GroupMember { driver, trip } in members {
            keys.extend([
                lock_key(driver),
                trip_key(&trip.owner),
                settled_key(&trip.owner),
                current_trip_key(driver),
                fence_key(driver),
            ]);
            args.extend([
                trip.owner.clone(),
                trip.trip_id.to_string(),
                serde_json::to_string(trip).expect("trip records serialize"),
                trip.fencing_token.to_string(),
            ]);
        }
        let kept: i64 = self.run(&CONFIRM_GROUP_SCRIPT, &keys, &args).await?;
        Ok(kept == 1)
    }

    /// Keeps `owner`'s trip lock of `driver` (and the driver's current trip)
    /// for another [`TRIP_HOLD`]; whether `owner` still held it.
    pub async fn renew(
        &self,
        driver: &str,
        trip: &TripRecord,
        repair: bool,
    ) -> Result<Renewal, StoreError> {
        let json = serde_json::to_string(trip).expect("trip records serialize");
        let kept: i64 = self
            .run(
                &RENEW_SCRIPT,
                &[
                    lock_key(driver),
                    current_trip_key(driver),
                    settled_key(&trip.owner),
                    trip_key(&trip.owner),
                    finished_key(&trip.owner),
                ],
                &[
                    trip.owner.clone(),
                    TRIP_HOLD.as_millis().to_string(),
                    json,
                    if repair { "1" } else { "0" }.to_string(),
                    trip.trip_id.to_string(),
                    RECORD_TTL.as_millis().to_string(),
                ],
            )
            .await?;
        Ok(match kept {
            1 => Renewal::Kept,
            2 => Renewal::Finished,
            _ => Renewal::Lost,
        })
    }

    /// `owner`'s trip of `driver` ended: frees its lock and the driver's
    /// current trip; whether the lock was still `owner`'s.
    pub async fn finish(
        &self,
        driver: &str,
        owner: &str,
        trip_id: TripId,
    ) -> Result<bool, StoreError> {
        let freed: i64 = self
            .run(
                &FINISH_SCRIPT,
                &[
                    lock_key(driver),
                    current_trip_key(driver),
                    settled_key(owner),
                    trip_key(owner),
                    finished_key(owner),
                ],
                &[
                    owner.to_string(),
                    RECORD_TTL.as_millis().to_string(),
                    trip_id.to_string(),
                ],
            )
            .await?;
        Ok(freed == 1)
    }

    /// The driver's current trip as recorded, whoever holds its lock.
    pub async fn recorded_trip(&self, driver: &str) -> Result<Option<TripRecord>, StoreError> {
        let mut connection = self.connection.clone();
        let value: Option<String> = self
            .bounded(
                redis::cmd("GET")
                    .arg(current_trip_key(driver))
                    .query_async(&mut connection),
            )
            .await?;
        Ok(value
            .and_then(|v| v.split_once('|').map(|(_, json)| json.to_string()))
            .and_then(|json| serde_json::from_str(&json).ok()))
    }

    /// The driver's current trip, if one is recorded and its lock is still
    /// held by the trip's owner (see [`CURRENT_TRIP`]).
    pub async fn current_trip(&self, driver: &str) -> Result<Option<TripRecord>, StoreError> {
        let value: Option<String> = self
            .run(
                &CURRENT_TRIP_SCRIPT,
                &[current_trip_key(driver), lock_key(driver)],
                &[],
            )
            .await?;
        Ok(value
            .and_then(|v| v.split_once('|').map(|(_, json)| json.to_string()))
            .and_then(|json| serde_json::from_str(&json).ok()))
    }

    /// Gives up on `owner`'s lock of `driver` for good (see [`SETTLE`]): the
    /// trip it became, or `None` when it can no longer become one.
    pub async fn settle(&self, driver: &str, owner: &str) -> Result<Option<TripId>, StoreError> {
        let answer: String = self
            .run(
                &SETTLE_SCRIPT,
                &[lock_key(driver), trip_key(owner), settled_key(owner)],
                &[owner.to_string(), RECORD_TTL.as_millis().to_string()],
            )
            .await?;
        Ok(answer.parse().ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_quorum(granted: usize, unreachable: usize) -> LockError {
        LockError::Refused {
            reason: AttemptFailed::NoQuorum {
                granted,
                servers: 3,
                needed: 2,
            },
            unreachable,
        }
    }

    #[test]
    fn a_refusal_is_held_when_any_server_says_so() {
        // One granted, one held, one down: taken, not a store outage.
        assert_eq!(no_quorum(1, 1).as_refusal(), LockRefused::HeldElsewhere);
        assert_eq!(no_quorum(0, 0).as_refusal(), LockRefused::HeldElsewhere);
        assert_eq!(no_quorum(0, 0).kind(), "held");
        // Everyone who did not grant it was unreachable: the store can't say.
        assert_eq!(no_quorum(1, 2).as_refusal(), LockRefused::StoreUnavailable);
        assert_eq!(no_quorum(0, 3).kind(), "no_quorum");
        let slow = LockError::Refused {
            reason: AttemptFailed::Expired,
            unreachable: 0,
        };
        assert_eq!(slow.as_refusal(), LockRefused::StoreUnavailable);
        assert_eq!(slow.kind(), "slow");
    }
}
