//! [`Redlock`]: a driver's lock over several servers, by majority.

use std::time::Duration;

use futures_util::future::join_all;
use tokio::time::Instant;

use super::{Grant, GroupMember, LockError, LockServer, StoreError, TripRecord};
use crate::cluster::redlock::{
    current_trip_verdict, judge, majority_did, quorum, renewal_verdict, retry_delay,
    settle_verdict, AttemptFailed, Renewal,
};
use crate::core::lock::{FencingToken, TripId};
use crate::core::Settled;

/// The longest random wait before a split vote is tried again.
const SPLIT_VOTE_RETRY: Duration = Duration::from_millis(50);

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

    /// `driver` accepted a group's offer: keeps `owner`'s lock for `ttl`
    /// where it still holds it. `Some(true)` when a majority did, and then
    /// the lock can be relied on until `ttl` after the call was made, less
    /// the clock drift allowance (see `judge`); `Some(false)` when a
    /// majority certainly did not; `None` when too few servers answered.
    pub async fn hold(
        &self,
        driver: &str,
        owner: &str,
        ttl: Duration,
        token: FencingToken,
    ) -> Option<bool> {
        let answers = join_all(
            self.servers
                .iter()
                .map(|s| s.hold(driver, owner, ttl, token)),
        )
        .await;
        let answers: Vec<Option<bool>> = answers.into_iter().map(Result::ok).collect();
        majority_did(&answers)
    }

    /// Every member of a group is held: books all their trips where every
    /// member's lock still holds, atomically on each server, keeping each
    /// lock for `keep`. `Some(true)`
    /// when a majority did (every member's trip stands), `Some(false)` when
    /// a majority certainly did not (no member's does), `None` when too few
    /// answered (ask again: it is idempotent, and once a member's hold has
    /// been settled it fails for good where the settle came first).
    pub async fn confirm_group(&self, members: &[GroupMember], keep: Duration) -> Option<bool> {
        let answers = join_all(self.servers.iter().map(|s| s.confirm_group(members, keep))).await;
        let answers: Vec<Option<bool>> = answers.into_iter().map(Result::ok).collect();
        majority_did(&answers)
    }

    /// Keeps `owner`'s lock of a driver on a trip for another [`TRIP_HOLD`]
    /// wherever it still holds it: the verdict of [`renewal_verdict`]
    /// (`None` when too few servers answered).
    pub async fn renew(&self, driver: &str, trip: &TripRecord, repair: bool) -> Option<Renewal> {
        let answers = join_all(self.servers.iter().map(|s| s.renew(driver, trip, repair))).await;
        let answers: Vec<_> = answers.into_iter().map(Result::ok).collect();
        renewal_verdict(&answers)
    }

    /// `owner`'s trip of `driver` ended: frees its lock everywhere. Whether a
    /// majority of servers answered (then the lock is free, or was not
    /// `owner`'s any more); `false` means ask again.
    pub async fn finish(&self, driver: &str, owner: &str, trip_id: TripId) -> bool {
        let answers = join_all(
            self.servers
                .iter()
                .map(|s| s.finish(driver, owner, trip_id)),
        )
        .await;
        answers.iter().filter(|r| r.is_ok()).count() >= quorum(self.servers.len())
    }

    /// The driver's app completed `trip_id` on a node that does not hold
    /// it: if any server records it as the driver's current trip, it is
    /// finished under its owner everywhere, which frees its lock and marks
    /// the owner, so that the node holding it lets it go at its next
    /// renewal. `Some(true)` when it was found and finished by a majority,
    /// `Some(false)` when a majority answered and none records it, `None`
    /// when too few answered to tell (ask again).
    pub async fn finish_trip(&self, driver: &str, trip_id: TripId) -> Option<bool> {
        let records = join_all(self.servers.iter().map(|s| s.recorded_trip(driver))).await;
        let answered = records.iter().filter(|r| r.is_ok()).count();
        let owner = records
            .into_iter()
            .filter_map(|r| r.ok().flatten())
            .find(|record| record.trip_id == trip_id)
            .map(|record| record.owner);
        match owner {
            Some(owner) => self.finish(driver, &owner, trip_id).await.then_some(true),
            None => (answered >= quorum(self.servers.len())).then_some(false),
        }
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
