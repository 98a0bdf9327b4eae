//! Cluster mode: booking a group whose every member is held.
//!
//! On one node the matcher books a complete group in one step of its own.
//! Across nodes the members' locks are in Redis, and a member's hold may
//! lapse there (its node paused past it) or be settled by its driver's
//! node (the hold ran out) while the rider's node decides. So the rider's
//! node asks Redis to book every member's trip in one script
//! (`CONFIRM_GROUP`), which on each server books them all or none, and
//! goes by the majority:
//!
//! - booked: each driver hears of its trip (a driver whose news is lost
//!   finds the trip when its hold runs out and is settled), and the rider
//!   gets one `matched`;
//! - refused: some member's lock no longer holds; the group fails
//!   (`group_incomplete`, or `rider_cancelled` if the rider cancelled
//!   meanwhile) and every member is let go;
//! - Redis can't tell: asked again (the script is idempotent, and a
//!   member's settle fixes each server's answer either way), every
//!   [`RETRY`] up to [`ATTEMPTS`] times; then this node settles every
//!   member itself, and the first settle that can tell decides: a trip
//!   found means the group was booked, a lock settled without one means it
//!   never can be.
//!
//! While Redis decides, nothing else does: a cancel or the deadline waits
//! for the answer (booked: the booking stands; refused: the group fails for
//! that reason), and members stay held for the booking. A member's driver
//! that reports meanwhile is evidence too, since a held driver in cluster
//! mode ends only by a commit or a settle: on its trip, the group was
//! booked; let go, it was not.
//!
//! A booked lock lives until the group's hold would have ended, and a trip
//! lock's time after that: a driver whose news is lost settles its hold
//! only when the hold ends, and its trip's first renewal must still find
//! the lock.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::{Awaited, Phase, SearchEffect, SearchKey, Searches, HOLD_MARGIN};
use crate::core::booking::{GroupMember, TripRecord, TRIP_HOLD};
use crate::core::lock::{Ending, TripId};
use crate::core::owner;

/// How often a group's booking Redis could not decide is asked, and how
/// far apart (the first few sooner).
pub(super) const ATTEMPTS: u32 = 60;
pub(super) const RETRY: Duration = Duration::from_millis(500);
const FIRST_RETRY: Duration = Duration::from_millis(100);
const FIRST_ATTEMPTS: u32 = 3;

/// A group's booking being asked of Redis.
pub(super) struct Commit {
    /// Each member's trip.
    trips: BTreeMap<SearchKey, TripId>,
    /// What Redis is asked.
    members: Vec<GroupMember>,
    /// Which try is out.
    attempt: u32,
    /// When the members' holds end.
    hold_until: Instant,
    /// Redis could not tell after every try: the members are settled.
    gave_up: bool,
}

impl<R: Clone> Searches<R> {
    /// Every member of group `key` is held: asks Redis to book them all.
    pub(super) fn start_commit(&mut self, now: Instant, key: &SearchKey) {
        let node = self.node.clone().expect("cluster mode");
        let Some(group) = self.groups.get(key) else {
            return;
        };
        let mut trips = BTreeMap::new();
        let mut members = Vec::with_capacity(group.held.len());
        for (member, holding) in &group.held {
            let trip_id = self.ids.next_trip();
            trips.insert(member.clone(), trip_id);
            members.push(GroupMember {
                driver: holding.driver.clone(),
                trip: TripRecord {
                    owner: owner(&node, holding.offer_id),
                    trip_id,
                    offer_id: holding.offer_id,
                    fencing_token: holding.fencing_token,
                    rider_id: member.0.clone(),
                    request_id: member.1.clone(),
                    pickup: group.pickup,
                    rider_node: node.clone(),
                    rider_is_remote: false,
                    rider_incarnation: 0,
                },
            });
        }
        let hold_until = group.started + self.settings.search_timeout + HOLD_MARGIN;
        self.effects.push(SearchEffect::ConfirmGroup {
            group: key.clone(),
            attempt: 1,
            members: members.clone(),
            keep: keep(now, hold_until),
        });
        if let Some(group) = self.groups.get_mut(key) {
            group.committing = Some(Commit {
                trips,
                members,
                attempt: 1,
                hold_until,
                gave_up: false,
            });
        }
    }

    /// Redis's word on booking group `key` (try `attempt`): booked
    /// (`Some(true)`), refused (`Some(false)`), or can't tell (`None`).
    pub fn group_confirmed(
        &mut self,
        now: Instant,
        key: SearchKey,
        attempt: u32,
        verdict: Option<bool>,
    ) {
        let Some(group) = self.groups.get_mut(&key) else {
            return;
        };
        let Some(commit) = group
            .committing
            .as_mut()
            .filter(|commit| commit.attempt == attempt)
        else {
            return; // an answer to an earlier try
        };
        match verdict {
            Some(true) => {
                let trips = std::mem::take(&mut commit.trips);
                self.book_group(now, &key, trips);
            }
            None if attempt < ATTEMPTS => {
                commit.attempt += 1;
                let wait = if attempt < FIRST_ATTEMPTS {
                    FIRST_RETRY
                } else {
                    RETRY
                };
                self.group_retries
                    .push(Reverse((now + wait, commit.attempt, key)));
            }
            None => {
                // Redis has not been able to tell for long: each member is
                // settled from here (see `settle_due`), and the first that
                // can tell decides (`member_news`).
                tracing::warn!(request = %key.1, "Redis could not tell whether a group was booked; settling its members");
                commit.gave_up = true;
                let members = group.members.clone();
                for member in members {
                    let Some(search) = self.searches.get(&member) else {
                        continue;
                    };
                    if let Some(offer_id) = search.current_offer() {
                        let due = (now, search.seq, offer_id, 0, Awaited::Any, member);
                        self.remote_due.push(Reverse(due));
                    }
                }
                self.settle_due(now);
            }
            Some(false) => self.abandon_commit(now, &key),
        }
    }

    /// Group `key`'s booking certainly did not land (or can't be told, at
    /// the last): the group fails, for the reason that waited if any.
    pub(super) fn abandon_commit(&mut self, now: Instant, key: &SearchKey) {
        let Some(group) = self.groups.get_mut(key) else {
            return;
        };
        if group.committing.take().is_none() {
            return;
        }
        let why = group.pending_end.take().unwrap_or(Ending::GroupIncomplete);
        self.end_group(now, key, why);
        // Members whose driver was let go while Redis was asked are looking
        // no more: they end with the group.
        let members = self.groups.get(key).map(|g| g.members.clone());
        for member in members.unwrap_or_default() {
            let looking = self
                .searches
                .get(&member)
                .is_some_and(|s| matches!(s.phase, Phase::Looking));
            if looking {
                self.advance(now, member);
            }
        }
    }

    /// News of member `member`'s driver while its group is being booked
    /// (`trip`: it went on that trip; `None`: it was let go, or a settle of
    /// its lock found no trip). Whether it was taken as the group's answer.
    pub(super) fn member_news(
        &mut self,
        now: Instant,
        member: &SearchKey,
        trip: Option<TripId>,
    ) -> bool {
        let Some(group_key) = self.searches.get(member).and_then(|s| s.group.clone()) else {
            return false;
        };
        let Some(commit) = self
            .groups
            .get(&group_key)
            .and_then(|g| g.committing.as_ref())
        else {
            return false;
        };
        match trip {
            Some(trip) if commit.trips.get(member) == Some(&trip) => {
                let trips = commit.trips.clone();
                self.book_group(now, &group_key, trips);
            }
            Some(_) => return false,
            None => self.abandon_commit(now, &group_key),
        }
        true
    }

    /// Whether member `key`'s group gave up asking Redis and settles its
    /// members (their news is awaited again).
    pub(super) fn commit_gave_up(&self, key: &SearchKey) -> bool {
        self.searches
            .get(key)
            .and_then(|s| s.group.as_ref())
            .and_then(|g| self.groups.get(g))
            .and_then(|g| g.committing.as_ref())
            .is_some_and(|c| c.gave_up)
    }

    /// Bookings Redis could not decide that are due to be asked again.
    pub(super) fn group_retries_due(&mut self, now: Instant) {
        while let Some(Reverse((at, ..))) = self.group_retries.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, attempt, key))) = self.group_retries.pop() else {
                break;
            };
            let members = self
                .groups
                .get(&key)
                .and_then(|g| g.committing.as_ref())
                .filter(|commit| commit.attempt == attempt && !commit.gave_up)
                .map(|commit| (commit.members.clone(), commit.hold_until));
            if let Some((members, hold_until)) = members {
                self.effects.push(SearchEffect::ConfirmGroup {
                    group: key,
                    attempt,
                    members,
                    keep: keep(now, hold_until),
                });
            }
        }
    }
}

/// How long a booked group's locks are kept from `now`: past the members'
/// holds (`hold_until`), a trip lock's time more.
fn keep(now: Instant, hold_until: Instant) -> Duration {
    hold_until.saturating_duration_since(now) + TRIP_HOLD
}
