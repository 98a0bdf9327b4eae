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
//!   [`RETRY`] up to [`ATTEMPTS`] times; then the group is let go, and each
//!   member's settle says whether it was booked after all.
//!
//! While Redis decides, nothing else does: a cancel or the deadline waits
//! for the answer (booked: the booking stands; refused: the group fails for
//! that reason), and members whose driver's hold ended meanwhile don't look
//! for another.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::{Phase, SearchEffect, SearchKey, Searches};
use crate::core::booking::{GroupMember, TripRecord};
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
}

impl<R: Clone> Searches<R> {
    /// Every member of group `key` is held: asks Redis to book them all.
    pub(super) fn start_commit(&mut self, key: &SearchKey) {
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
        self.effects.push(SearchEffect::ConfirmGroup {
            group: key.clone(),
            attempt: 1,
            members: members.clone(),
        });
        if let Some(group) = self.groups.get_mut(key) {
            group.committing = Some(Commit {
                trips,
                members,
                attempt: 1,
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
                if trips.len() != group.held.len() {
                    // A member's hold ended as settled without a trip, and
                    // yet a majority booked the group: Redis lost data.
                    tracing::error!(request = %key.1, "a group was booked after one of its holds ended");
                }
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
            _ => {
                // Refused, or Redis has not been able to tell for long: the
                // group fails. Each member's driver settles its hold as it
                // is let go, which books it if the group was booked after
                // all (the known gap: the rider was told otherwise).
                if verdict.is_none() {
                    tracing::warn!(request = %key.1, "Redis could not tell whether a group was booked; letting its members go");
                }
                group.committing = None;
                let why = group.pending_end.take().unwrap_or(Ending::GroupIncomplete);
                self.end_group(now, &key, why);
                // Members whose hold ended while Redis was asked are looking
                // no more: they end with the group.
                let members = self.groups.get(&key).map(|g| g.members.clone());
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
        }
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
                .filter(|commit| commit.attempt == attempt)
                .map(|commit| commit.members.clone());
            if let Some(members) = members {
                self.effects.push(SearchEffect::ConfirmGroup {
                    group: key,
                    attempt,
                    members,
                });
            }
        }
    }
}
