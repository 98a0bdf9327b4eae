//! The Lua scripts: every action on a driver's lock is one script, atomic
//! on its server.

use std::sync::LazyLock;

use redis::Script;

/// Sets the lock if free and takes a fencing token in the same step: one
/// above the driver's counter and the caller's floor, and never below the
/// server's clock in microseconds, so that tokens keep growing after a
/// restart that lost the counter. KEYS: lock, token counter, the owner's
/// settled mark. ARGV: owner, ttl ms, token floor. Returns the token, or nil
/// when the lock is held or the owner has already given up on it (see
/// [`SETTLE`]).
pub(super) const ACQUIRE: &str = r#"
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
pub(super) const RELEASE: &str = r#"
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
pub(super) const CONFIRM: &str = r#"
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
/// app is connected to it, or a majority held the lock at the caller's last
/// word from Redis, so its trip is certainly going on).
/// The owner's trip record (what a settle reads) is written again too, so
/// that a server that missed the confirm or lost it tells a settle the
/// truth.
/// 2 when the trip was finished (by whichever node or app): the caller lets
/// it go, whatever the other servers say.
/// KEYS: lock, the driver's current trip, the owner's settled mark, the
/// owner's trip record, the owner's finished mark. ARGV: owner, hold ms, the
/// trip (JSON), repair ('1' or '0'), trip id, record ttl ms.
pub(super) const RENEW: &str = r#"
if redis.call('EXISTS', KEYS[5]) == 1 then
  return 2
end
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1]
    or (not holder and ARGV[4] == '1' and redis.call('EXISTS', KEYS[3]) == 0) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  redis.call('SET', KEYS[2], ARGV[1] .. '|' .. ARGV[3], 'PX', ARGV[2])
  redis.call('SET', KEYS[4], ARGV[5], 'PX', ARGV[6])
  return 1
end
return 0
"#;

/// The trip ended: frees the lock and the driver's current trip, each only
/// if it is still the caller's, marks the owner settled so that no late
/// renewal (an actor that has not heard yet) takes the lock back, and
/// records the trip under the owner, so that a settle reading this server
/// finds it even if the confirm missed it (or it lost it).
/// It also marks the trip finished, which every later renewal of it hears.
/// KEYS: lock, the driver's current trip, the owner's settled mark, the
/// owner's trip record, the owner's finished mark. ARGV: owner, mark ttl
/// ms, trip id.
pub(super) const FINISH: &str = r#"
redis.call('SET', KEYS[3], '1', 'PX', ARGV[2])
redis.call('SET', KEYS[5], '1', 'PX', ARGV[2])
redis.call('SET', KEYS[4], ARGV[3], 'PX', ARGV[2])
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
pub(super) const SETTLE: &str = r#"
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
pub(super) const CURRENT_TRIP: &str = r#"
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

/// A driver accepted an offer of a group: its lock is kept until the
/// group's hold ends (`ttl`), only while the caller still owns it, its
/// requester has not given up on it, and its fencing token is not older
/// than the driver's fence. The lock is what keeps every other node off the
/// driver while the rest of the group is found.
/// KEYS: lock, the owner's settled mark, the driver's fence. ARGV: owner,
/// ttl ms, the lock's fencing token. Returns 1 when kept, else 0.
pub(super) const HOLD: &str = r#"
if redis.call('EXISTS', KEYS[2]) == 0
    and redis.call('GET', KEYS[1]) == ARGV[1]
    and tonumber(redis.call('GET', KEYS[3]) or '0') <= tonumber(ARGV[3]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// Every member of a group is held: books all of their trips in one step,
/// or none. For each member it checks what [`CONFIRM`] checks for one
/// driver (the lock still the owner's, the owner not settled, the token
/// not older than the fence); only if every member passes are all the trips
/// recorded (under the owner, as the driver's current trip, the fence
/// moved) and every lock kept for the trip, until the members' holds would
/// have ended and a trip lock's time after: a member whose news is lost
/// learns of its trip only when its hold ends, and its first renewal must
/// still find the lock. So on each server the group is
/// booked whole or not at all, and a member's settle (its hold ran out)
/// fixes that server's answer either way: after it, a group confirm fails
/// there, and the settle reports the trip if the confirm came first.
/// Asked again after its answer was lost, it says 1 where it landed.
/// KEYS, five per member: lock, the owner's trip record, the owner's
/// settled mark, the driver's current trip, the driver's fence. ARGV:
/// record ttl ms, how long the locks are kept (ms), then four per member: owner, trip id, the trip
/// (JSON), the lock's fencing token.
pub(super) const CONFIRM_GROUP: &str = r#"
local n = #KEYS / 5
local landed = 0
for i = 0, n - 1 do
  if redis.call('GET', KEYS[i * 5 + 2]) == ARGV[i * 4 + 4] then
    landed = landed + 1
  end
end
if landed == n then
  return 1
end
for i = 0, n - 1 do
  local k, a = i * 5, i * 4 + 2
  if redis.call('EXISTS', KEYS[k + 3]) == 1
      or redis.call('GET', KEYS[k + 1]) ~= ARGV[a + 1]
      or tonumber(redis.call('GET', KEYS[k + 5]) or '0') > tonumber(ARGV[a + 4]) then
    return 0
  end
end
for i = 0, n - 1 do
  local k, a = i * 5, i * 4 + 2
  redis.call('SET', KEYS[k + 2], ARGV[a + 2], 'PX', ARGV[1])
  redis.call('PEXPIRE', KEYS[k + 1], ARGV[2])
  redis.call('SET', KEYS[k + 4], ARGV[a + 1] .. '|' .. ARGV[a + 3], 'PX', ARGV[2])
  redis.call('SET', KEYS[k + 5], ARGV[a + 4])
end
return 1
"#;

pub(super) static ACQUIRE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(ACQUIRE));
pub(super) static RELEASE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE));
pub(super) static CONFIRM_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(CONFIRM));
pub(super) static HOLD_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(HOLD));
pub(super) static CONFIRM_GROUP_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(CONFIRM_GROUP));
pub(super) static SETTLE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(SETTLE));
pub(super) static RENEW_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RENEW));
pub(super) static FINISH_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(FINISH));
pub(super) static CURRENT_TRIP_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(CURRENT_TRIP));
