//! The Redlock rules as plain arithmetic (no I/O), after the algorithm's
//! description in the Redis documentation:
//!
//! - a lock counts only when a majority of the independent servers granted it;
//! - and only for what is left of its time to live once the time spent asking
//!   and an allowance for clock drift are taken off (its *validity*);
//! - a failed attempt is released on every server, and retried after a random
//!   delay so that competing nodes don't keep splitting the vote.

use std::time::Duration;

use rand::Rng;

use crate::core::lock::TripId;
use crate::core::Settled;

/// Clock drift allowed per unit of time to live (1%), as Redlock suggests.
pub const DRIFT_FACTOR: f64 = 0.01;
/// Constant part of the drift allowance: the resolution of expiry on the
/// servers (Redis expires keys with millisecond precision).
pub const DRIFT_FLOOR: Duration = Duration::from_millis(2);

/// Servers out of `servers` that make a majority.
///
/// ```
/// use ridelock::cluster::redlock::quorum;
/// assert_eq!(quorum(1), 1);
/// assert_eq!(quorum(3), 2);
/// assert_eq!(quorum(4), 3);
/// assert_eq!(quorum(5), 3);
/// ```
pub fn quorum(servers: usize) -> usize {
    servers / 2 + 1
}

/// The clock-drift allowance for a lock of `ttl`.
pub fn drift(ttl: Duration) -> Duration {
    ttl.mul_f64(DRIFT_FACTOR) + DRIFT_FLOOR
}

/// How long a lock of `ttl` can be relied on after `elapsed` was spent
/// acquiring it; `None` when nothing is left.
pub fn validity(ttl: Duration, elapsed: Duration) -> Option<Duration> {
    ttl.checked_sub(elapsed)?
        .checked_sub(drift(ttl))
        .filter(|left| !left.is_zero())
}

/// Why an attempt did not produce a lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AttemptFailed {
    /// Fewer servers than a majority granted it.
    #[error("only {granted} of {servers} servers granted the lock; {needed} needed")]
    NoQuorum {
        /// Servers that granted it.
        granted: usize,
        /// Servers asked.
        servers: usize,
        /// A majority.
        needed: usize,
    },
    /// A majority granted it, but asking took longer than the lock lives.
    #[error("the lock expired while it was being acquired")]
    Expired,
}

/// The verdict on one acquisition attempt: the lock's validity if it counts.
pub fn judge(
    granted: usize,
    servers: usize,
    ttl: Duration,
    elapsed: Duration,
) -> Result<Duration, AttemptFailed> {
    let needed = quorum(servers);
    if granted < needed {
        return Err(AttemptFailed::NoQuorum {
            granted,
            servers,
            needed,
        });
    }
    validity(ttl, elapsed).ok_or(AttemptFailed::Expired)
}

/// The verdict of a majority on a conditional write (a confirm): per server,
/// `Some(done)` or `None` when it did not answer. `Some(true)` when a
/// majority did it, `Some(false)` when a majority certainly did not (even
/// the silent servers could not make one), `None` when it can't be told.
pub fn majority_did(answers: &[Option<bool>]) -> Option<bool> {
    let needed = quorum(answers.len());
    let did = answers.iter().filter(|a| **a == Some(true)).count();
    let silent = answers.iter().filter(|a| a.is_none()).count();
    if did >= needed {
        Some(true)
    } else if did + silent < needed {
        Some(false)
    } else {
        None
    }
}

/// One server's answer to a renewal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Renewal {
    /// Kept (or taken back) for the owner.
    Kept,
    /// Not the owner's here.
    Lost,
    /// The trip was finished: let it go, whatever other servers say.
    Finished,
}

/// The verdict on a renewal (`None` for a server that did not answer):
/// `Finished` when any server heard the trip finish, `Kept` when a majority
/// kept the lock, `Lost` when a majority answered that it is no longer the
/// caller's, `None` otherwise.
///
/// One server's finish is enough because a finish is only ever sent for a
/// trip that ended; without it, a holder whose finish reached a minority
/// (and whose finishing node then died) would renew the trip forever. It is
/// a verdict of its own because the holder then spreads the finish to every
/// server (the trip under that owner is over, whoever holds it), which a
/// `Lost` must not do: the owner's trip may have been taken over elsewhere.
pub fn renewal_verdict(answers: &[Option<Renewal>]) -> Option<Renewal> {
    if answers.contains(&Some(Renewal::Finished)) {
        return Some(Renewal::Finished);
    }
    let needed = quorum(answers.len());
    let count = |want| answers.iter().filter(|a| **a == Some(want)).count();
    if count(Renewal::Kept) >= needed {
        Some(Renewal::Kept)
    } else if count(Renewal::Lost) >= needed {
        Some(Renewal::Lost)
    } else {
        None
    }
}

/// The verdict on a settle: per server, the trip recorded under the owner
/// (`Some(Some(trip))`), none (`Some(None)`), or no answer (`None`).
///
/// A confirm that counted reached a majority before any settle mark did (a
/// mark blocks confirms), so every server asked shows its trip record. The
/// trip is certain when a majority shows it; its absence is certain when
/// even the servers that did not answer could not make a majority with
/// those that show it. Anything between is `None`: ask again later.
pub fn settle_verdict(answers: &[Option<Option<TripId>>]) -> Option<Settled> {
    let needed = quorum(answers.len());
    let trips: Vec<TripId> = answers.iter().filter_map(|a| a.flatten()).collect();
    let silent = answers.iter().filter(|a| a.is_none()).count();
    if trips.len() >= needed {
        trips.first().copied().map(Settled::Trip)
    } else if trips.len() + silent < needed {
        Some(Settled::Dead)
    } else {
        None
    }
}

/// The verdict on reading the driver's current trip: per server, the trip
/// it holds (see `store::CURRENT_TRIP`: only while the trip's lock is held)
/// or `None` when it did not answer. A trip counts when a majority shows
/// the same one (`same` tells records apart); none when no trip can reach
/// a majority any more; otherwise `Err`: ask again.
// `Err` only says "ask again": there is nothing more to carry.
#[allow(clippy::result_unit_err)]
pub fn current_trip_verdict<T>(
    answers: Vec<Option<Option<T>>>,
    same: impl Fn(&T, &T) -> bool,
) -> Result<Option<T>, ()> {
    let needed = quorum(answers.len());
    let silent = answers.iter().filter(|a| a.is_none()).count();
    let shown: Vec<T> = answers.into_iter().flatten().flatten().collect();
    let mut best = 0;
    for (i, trip) in shown.iter().enumerate() {
        let count = shown.iter().filter(|other| same(trip, other)).count();
        if count >= needed {
            return Ok(shown.into_iter().nth(i));
        }
        best = best.max(count);
    }
    if best + silent < needed {
        Ok(None)
    } else {
        Err(())
    }
}

/// A random delay before retrying, up to `max`, so that nodes competing for
/// the same driver don't retry in lockstep.
pub fn retry_delay(max: Duration, rng: &mut impl Rng) -> Duration {
    max.mul_f64(rng.random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn validity_takes_off_time_spent_and_drift() {
        // 15 s lock: drift 150 ms + 2 ms.
        assert_eq!(drift(MS(15_000)), MS(152));
        assert_eq!(validity(MS(15_000), MS(48)), Some(MS(14_800)));
        assert_eq!(validity(MS(100), MS(97)), None); // 100 - 97 - 3 = 0
        assert_eq!(validity(MS(100), MS(200)), None);
    }

    #[test]
    fn a_lock_counts_only_with_a_majority_in_time() {
        assert_eq!(judge(2, 3, MS(1_000), MS(10)), Ok(MS(978)));
        assert_eq!(
            judge(1, 3, MS(1_000), MS(10)),
            Err(AttemptFailed::NoQuorum {
                granted: 1,
                servers: 3,
                needed: 2
            })
        );
        assert_eq!(judge(3, 3, MS(1_000), MS(990)), Err(AttemptFailed::Expired));
        assert_eq!(judge(1, 1, MS(1_000), MS(0)), Ok(MS(988)));
        // Even numbers need more than half.
        assert!(judge(2, 4, MS(1_000), MS(0)).is_err());
    }

    #[test]
    fn retry_delays_spread_over_the_whole_range_below_the_maximum() {
        use rand::SeedableRng;
        // Seeded: the same draws every run.
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let delays: Vec<Duration> = (0..1_000).map(|_| retry_delay(MS(50), &mut rng)).collect();
        assert!(delays.iter().all(|d| *d <= MS(50)));
        // Spread, so competing nodes don't retry in lockstep: every fifth of
        // the range is used, and the mean is near the middle.
        for fifth in 0..5u64 {
            let (low, high) = (MS(fifth * 10), MS(fifth * 10 + 10));
            let n = delays.iter().filter(|d| **d >= low && **d < high).count();
            assert!(n > 100, "{n} of 1000 delays in {low:?}..{high:?}");
        }
        let mean = delays.iter().sum::<Duration>() / delays.len() as u32;
        assert!(mean > MS(20) && mean < MS(30), "mean {mean:?}");
    }
}
