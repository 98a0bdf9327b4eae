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

use std::sync::LazyLock;
use std::time::Duration;

use futures_util::future::join_all;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use tokio::time::Instant;

use super::redlock::{
    current_trip_verdict, judge, majority_did, majority_kept, quorum, retry_delay, settle_verdict,
    AttemptFailed,
};
use crate::lock::{FencingToken, LockRefused, TripId};

/// Sets the lock if free and takes a fencing token in the same step: one
/// above the driver's counter and the caller's floor, and never below the
/// server's clock in microseconds, so that tokens keep growing after a
/// restart that lost the counter. KEYS: lock, token counter, the owner's
/// settled mark. ARGV: owner, ttl ms, token floor. Returns the token, or nil
/// when the lock is held or the owner has already given up on it (see
/// [`SETTLE`]).
const ACQUIRE: &str = r#"
if redis.call('EXISTS', KEYS[3]) == 1 then
  return false
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local time = redis.call('TIME')
  local clock = tonumber(time[1]) * 1000000 + tonumber(time[2])
  local current = tonumber(redis.call('GET', KEYS[2]) or '0')
  local token = math.max(current + 1, tonumber(ARGV[3]) + 1, clock)
  redis.call('SET', KEYS[2], string.format('%d', token))
  return token
end
return false
"#;

/// Deletes the lock only if the caller still owns it. KEYS: lock. ARGV: owner.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// The driver accepted: only if the caller still owns the lock, its
/// requester has not given up on it, and the requester's node is alive,
/// records the trip under the owner (for a settle) and as the driver's
/// current trip (for the driver's app reconnecting to another node), and
/// keeps the lock for the trip, so no node can lock a driver on a trip.
/// Asked again after an answer was lost, it says 1 where the first one
/// landed, even if a settle has come since: the settle found that trip.
/// The trip record is the resource a driver's lock guards, and its fence
/// (the newest fencing token that booked this driver here) refuses a write
/// carrying an older token: a lock that lost out to a newer one can't book
/// even where its owner value would still match.
/// KEYS: lock, the owner's trip record, the owner's settled mark, the
/// requesting node's liveness key, the driver's current trip, the driver's
/// fence. ARGV: owner, trip id, record ttl ms, hold ms, the trip (JSON),
/// whether the requesting node is another node ('1': its liveness is
/// checked, and it must be the same process that asked; the confirming node
/// itself is alive by definition), the lock's fencing token, the requesting
/// node's incarnation.
const CONFIRM: &str = r#"
if redis.call('GET', KEYS[2]) == ARGV[2] then
  return 1
end
local token = tonumber(ARGV[7])
if redis.call('EXISTS', KEYS[3]) == 0
    and (ARGV[6] == '0' or redis.call('GET', KEYS[4]) == ARGV[8])
    and redis.call('GET', KEYS[1]) == ARGV[1]
    and tonumber(redis.call('GET', KEYS[6]) or '0') <= token then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  redis.call('SET', KEYS[5], ARGV[1] .. '|' .. ARGV[5], 'PX', ARGV[4])
  redis.call('SET', KEYS[6], ARGV[7])
  return 1
end
return 0
"#;

/// A trip's lock and the driver's current trip: kept for `hold` more while
/// the caller owns the lock, and taken back where it is free and the owner
/// was never finished or settled (this server restarted without its data:
/// a renewal repairs it while the other servers still hold the trip). 0
/// when it is another owner's, or this owner's is over (the trip ended on
/// another node the driver moved to).
/// Taking back happens only when the caller says so (`repair`: the driver's
/// app is connected to it, so its trip is certainly going on).
/// KEYS: lock, the driver's current trip, the owner's settled mark.
/// ARGV: owner, hold ms, the trip (JSON), repair ('1' or '0').
const RENEW: &str = r#"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1]
    or (not holder and ARGV[4] == '1' and redis.call('EXISTS', KEYS[3]) == 0) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  redis.call('SET', KEYS[2], ARGV[1] .. '|' .. ARGV[3], 'PX', ARGV[2])
  return 1
end
return 0
"#;

/// The trip ended: frees the lock and the driver's current trip, each only
/// if it is still the caller's, and marks the owner settled so that no late
/// renewal (an actor that has not heard yet) takes the lock back.
/// KEYS: lock, the driver's current trip, the owner's settled mark.
/// ARGV: owner, mark ttl ms.
const FINISH: &str = r#"
redis.call('SET', KEYS[3], '1', 'PX', ARGV[2])
local freed = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  freed = 1
end
local trip = redis.call('GET', KEYS[2])
if trip and string.sub(trip, 1, #ARGV[1] + 1) == ARGV[1] .. '|' then
  redis.call('DEL', KEYS[2])
end
return freed
"#;

/// The requester gives up waiting for news of a lock (a message between
/// nodes was lost): marks the owner settled, so that no later acquire or
/// confirm for it can succeed, and says what had happened: the trip id if
/// the driver had accepted, `released` if the lock was still held (it is now
/// freed), `gone` otherwise. KEYS: lock, the owner's trip record, the
/// owner's settled mark. ARGV: owner, mark ttl ms.
const SETTLE: &str = r#"
redis.call('SET', KEYS[3], '1', 'PX', ARGV[2])
local trip = redis.call('GET', KEYS[2])
if trip then
  return trip
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 'released'
end
return 'gone'
"#;

/// The driver's current trip, only while its lock is still held by the
/// trip's owner: a record that outlived its trip (a finish that did not
/// reach this server, or a lock lost) is not a trip to take over.
/// KEYS: the driver's current trip, lock. Returns the record or nil.
const CURRENT_TRIP: &str = r#"
local trip = redis.call('GET', KEYS[1])
if not trip then
  return false
end
local sep = string.find(trip, '|', 1, true)
if sep and redis.call('GET', KEYS[2]) == string.sub(trip, 1, sep - 1) then
  return trip
end
return false
"#;

static ACQUIRE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(ACQUIRE));
static RELEASE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE));
static CONFIRM_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(CONFIRM));
static SETTLE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(SETTLE));
static RENEW_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RENEW));
static FINISH_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(FINISH));
static CURRENT_TRIP_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(CURRENT_TRIP));

pub use crate::core::booking::{TripRecord, TRIP_HOLD};
pub use crate::core::Settled;

/// The longest random wait before a split vote is tried again.
const SPLIT_VOTE_RETRY: Duration = Duration::from_millis(50);

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

    /// Keeps `owner`'s trip lock of `driver` (and the driver's current trip)
    /// for another [`TRIP_HOLD`]; whether `owner` still held it.
    pub async fn renew(
        &self,
        driver: &str,
        trip: &TripRecord,
        repair: bool,
    ) -> Result<bool, StoreError> {
        let json = serde_json::to_string(trip).expect("trip records serialize");
        let kept: i64 = self
            .run(
                &RENEW_SCRIPT,
                &[
                    lock_key(driver),
                    current_trip_key(driver),
                    settled_key(&trip.owner),
                ],
                &[
                    trip.owner.clone(),
                    TRIP_HOLD.as_millis().to_string(),
                    json,
                    if repair { "1" } else { "0" }.to_string(),
                ],
            )
            .await?;
        Ok(kept == 1)
    }

    /// `owner`'s trip of `driver` ended: frees its lock and the driver's
    /// current trip; whether the lock was still `owner`'s.
    pub async fn finish(&self, driver: &str, owner: &str) -> Result<bool, StoreError> {
        let freed: i64 = self
            .run(
                &FINISH_SCRIPT,
                &[
                    lock_key(driver),
                    current_trip_key(driver),
                    settled_key(owner),
                ],
                &[owner.to_string(), RECORD_TTL.as_millis().to_string()],
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

/// How often, and how many times, a server that did not answer an acquire
/// is asked to settle its owner (see [`settle_when_answered`]).
const UNANSWERED_SETTLE_RETRY: Duration = Duration::from_millis(500);
const UNANSWERED_SETTLE_ATTEMPTS: u32 = 120;

/// A driver lock across independent Redis servers (one server is the
/// degenerate case: a quorum of one).
#[derive(Clone)]
pub struct Redlock {
    servers: Vec<LockServer>,
}

impl Redlock {
    /// A server that did not answer an acquire in time (slow, paused, or
    /// cut off) may still apply it later: the command waits in its socket or
    /// its queue. Nobody would use that lock, and the driver would stay
    /// locked until it lapses. So once the owner is given up for good, it is
    /// settled there as soon as the server answers: settling frees the lock
    /// if the late acquire has landed, and makes it fail if it lands after
    /// (ACQUIRE refuses a settled owner), in whichever order the server sees
    /// the two (a reconnect may put them on different connections). Tried in
    /// the background for up to a minute; found by the paused-Redis test.
    fn settle_when_answered(&self, servers: Vec<usize>, driver: &str, owner: &str) {
        let mut servers = servers;
        servers.sort_unstable();
        servers.dedup();
        for server in servers.into_iter().map(|i| self.servers[i].clone()) {
            let (driver, owner) = (driver.to_string(), owner.to_string());
            tokio::spawn(async move {
                for _ in 0..UNANSWERED_SETTLE_ATTEMPTS {
                    if server.settle(&driver, &owner).await.is_ok() {
                        return;
                    }
                    tokio::time::sleep(UNANSWERED_SETTLE_RETRY).await;
                }
            });
        }
    }

    /// Connects to every server; any unreachable one is an error at start, so
    /// that a typo in a URL is found at once rather than as lost quorum later.
    pub async fn connect(
        urls: &[String],
        per_server_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let connected = join_all(
            urls.iter()
                .map(|url| LockServer::connect(url, per_server_timeout)),
        )
        .await;
        let servers = connected.into_iter().collect::<Result<Vec<_>, _>>()?;
        Ok(Redlock { servers })
    }

    /// Number of servers.
    pub fn servers(&self) -> usize {
        self.servers.len()
    }

    /// Takes `driver`'s lock for `owner` on a majority of servers within the
    /// lock's time; otherwise releases whatever was granted and refuses.
    ///
    /// Fencing tokens come from per-server counters, so the granted servers
    /// may disagree; the largest is used, and `token_floor` (the newest token
    /// the caller has seen for this driver) lifts lagging counters. Two
    /// majorities always share a server, but a server's counter can still lag
    /// another's: the token is a strong hint, and the driver's own actor, which
    /// refuses any token not newer than the last it saw, is what guarantees
    /// that a stale holder can never act.
    ///
    /// A split vote (some servers granted it, too few) is tried once more
    /// after a random delay, as Redlock prescribes, so that two actors of one
    /// driver on two nodes (a driver connected twice) don't keep splitting
    /// it. A lock held elsewhere is not retried: the matcher moves on to the
    /// next driver instead.
    pub async fn acquire(
        &self,
        driver: &str,
        owner: &str,
        ttl: Duration,
        token_floor: FencingToken,
    ) -> Result<Grant, LockError> {
        let (first, mut unanswered) = self.try_once(driver, owner, ttl, token_floor).await;
        let result = match first {
            Err(LockError::Refused {
                reason: AttemptFailed::NoQuorum { granted, .. },
                ..
            }) if granted > 0 => {
                let delay = retry_delay(SPLIT_VOTE_RETRY, &mut rand::rng());
                tokio::time::sleep(delay).await;
                let (second, more) = self.try_once(driver, owner, ttl, token_floor).await;
                unanswered.extend(more);
                second
            }
            result => result,
        };
        // Only once the owner is given up for good: settling after the first
        // attempt could free the lock the retry (same owner) was granted.
        if result.is_err() {
            self.settle_when_answered(unanswered, driver, owner);
        }
        result
    }

    /// One attempt on every server; also the servers that did not answer
    /// (where the attempt may still land later).
    async fn try_once(
        &self,
        driver: &str,
        owner: &str,
        ttl: Duration,
        token_floor: FencingToken,
    ) -> (Result<Grant, LockError>, Vec<usize>) {
        let started = Instant::now();
        let answers = join_all(
            self.servers
                .iter()
                .map(|server| server.try_acquire(driver, owner, ttl, token_floor)),
        )
        .await;
        let elapsed = started.elapsed();
        let unreachable = answers.iter().filter(|a| a.is_err()).count();
        let unanswered: Vec<usize> = answers
            .iter()
            .enumerate()
            .filter(|(_, a)| a.is_err())
            .map(|(i, _)| i)
            .collect();
        let tokens: Vec<FencingToken> = answers
            .into_iter()
            .filter_map(|a| a.ok().flatten())
            .collect();
        let result = match judge(tokens.len(), self.servers.len(), ttl, elapsed) {
            Ok(validity) => Ok(Grant {
                fencing_token: tokens.iter().copied().max().unwrap_or_default(),
                validity,
                granted: tokens.len(),
            }),
            Err(reason) => {
                self.release(driver, owner).await;
                Err(LockError::Refused {
                    reason,
                    unreachable,
                })
            }
        };
        (result, unanswered)
    }

    /// Frees `driver`'s lock wherever `owner` still holds it; on how many
    /// servers it did.
    pub async fn release(&self, driver: &str, owner: &str) -> usize {
        join_all(self.servers.iter().map(|s| s.release(driver, owner)))
            .await
            .into_iter()
            .filter(|r| matches!(r, Ok(true)))
            .count()
    }

    /// The driver accepted `trip`: records it and keeps the lock for the trip
    /// where its owner still holds it. `Some(true)` when a majority did,
    /// `Some(false)` when a majority certainly did not (a node that lost its
    /// lock learns it here and must not book), `None` when too few servers
    /// answered to tell (ask again: confirm is idempotent while the lock is
    /// held, and fails for good once it was settled).
    pub async fn confirm(&self, driver: &str, trip: &TripRecord) -> Option<bool> {
        let answers = join_all(self.servers.iter().map(|s| s.confirm(driver, trip))).await;
        let answers: Vec<Option<bool>> = answers.into_iter().map(Result::ok).collect();
        majority_did(&answers)
    }

    /// Keeps `owner`'s lock of a driver on a trip for another [`TRIP_HOLD`]
    /// wherever it still holds it. `Some(true)` when a majority did,
    /// `Some(false)` when a majority answered that it is no longer
    /// `owner`'s, `None` when too few servers answered.
    pub async fn renew(&self, driver: &str, trip: &TripRecord, repair: bool) -> Option<bool> {
        let answers = join_all(self.servers.iter().map(|s| s.renew(driver, trip, repair))).await;
        let answers: Vec<Option<bool>> = answers.into_iter().map(Result::ok).collect();
        majority_kept(&answers)
    }

    /// `owner`'s trip of `driver` ended: frees its lock everywhere. Whether a
    /// majority of servers answered (then the lock is free, or was not
    /// `owner`'s any more); `false` means ask again.
    pub async fn finish(&self, driver: &str, owner: &str) -> bool {
        let answers = join_all(self.servers.iter().map(|s| s.finish(driver, owner))).await;
        answers.iter().filter(|r| r.is_ok()).count() >= quorum(self.servers.len())
    }

    /// The driver's app completed `trip_id` on a node that does not hold
    /// it: if any server records it as the driver's current trip, it is
    /// finished under its owner everywhere, which frees its lock and marks
    /// the owner, so that the node holding it lets it go at its next
    /// renewal. Whether it was found.
    pub async fn finish_trip(&self, driver: &str, trip_id: TripId) -> bool {
        let records = join_all(self.servers.iter().map(|s| s.recorded_trip(driver))).await;
        let Some(owner) = records
            .into_iter()
            .filter_map(|r| r.ok().flatten())
            .find(|record| record.trip_id == trip_id)
            .map(|record| record.owner)
        else {
            return false;
        };
        self.finish(driver, &owner).await;
        true
    }

    /// The driver's current trip (see [`current_trip_verdict`]).
    pub async fn current_trip(&self, driver: &str) -> Result<Option<TripRecord>, ()> {
        let answers = join_all(self.servers.iter().map(|s| s.current_trip(driver))).await;
        current_trip_verdict(answers.into_iter().map(Result::ok).collect(), |a, b| {
            a.trip_id == b.trip_id && a.owner == b.owner
        })
    }

    /// The requester of `owner`'s lock gives up waiting for news of it: what
    /// had become of it, once that is certain (see [`settle_verdict`]).
    pub async fn settle(&self, driver: &str, owner: &str) -> Option<Settled> {
        let answers = join_all(self.servers.iter().map(|s| s.settle(driver, owner))).await;
        let answers: Vec<Option<Option<TripId>>> = answers.into_iter().map(Result::ok).collect();
        settle_verdict(&answers)
    }

    /// The servers, for the cluster's own commands.
    pub fn server_list(&self) -> &[LockServer] {
        &self.servers
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
