//! Cluster mode: drivers of other nodes in the index, and settling in Redis
//! the remote offers whose news is overdue.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashSet};
use std::time::Instant;

use super::{
    Awaited, Phase, SearchEffect, SearchKey, Searches, SettleTicket, SETTLE_ATTEMPTS, SETTLE_RETRY,
};
use crate::cluster::wire::NodeId;
use crate::core::lock::{Ending, OfferId};
use crate::core::{owner, Settled};
use crate::location::LatLon;
use crate::metrics as m;
use crate::protocol::DriverId;

impl<R: Clone> Searches<R> {
    /// A driver on another node is offerable at `at`, or (`None`) no longer.
    pub fn remote_driver(
        &mut self,
        now: Instant,
        node: NodeId,
        driver: DriverId,
        at: Option<LatLon>,
    ) {
        match at.filter(|at| self.offerable_at(*at)) {
            // A driver connected here is this node's to announce, until its
            // actor here says otherwise.
            Some(at) if self.local.contains(&driver) => {
                self.shadowed.insert(driver, (node, at));
            }
            Some(at) => {
                self.remote.insert(driver.clone(), node);
                self.drivers.upsert(driver.clone(), at);
                self.wake_parked(now, &driver, at);
            }
            None => {
                if self.remote.get(&driver) == Some(&node) {
                    self.forget_remote(&driver);
                }
                if self.shadowed.get(&driver).is_some_and(|(n, _)| *n == node) {
                    self.shadowed.remove(&driver);
                }
            }
        }
    }

    /// Every offerable driver of another node, replacing what this node had
    /// for it (sent when the subscription to Redis starts).
    pub fn remote_snapshot(
        &mut self,
        now: Instant,
        node: NodeId,
        drivers: Vec<(DriverId, LatLon)>,
    ) {
        self.forget_node(&node);
        for (driver, at) in drivers {
            self.remote_driver(now, node.clone(), driver, Some(at));
        }
    }

    /// A node left or died: its drivers are not offerable here until they
    /// reconnect somewhere, and offers out to them are settled now rather
    /// than at their deadline, so their riders move on and the locks are
    /// freed for the drivers' reconnections elsewhere.
    pub fn node_gone(&mut self, now: Instant, node: NodeId) {
        self.forget_node(&node);
        // A group's member held by a driver of that node is let go (settled
        // below, and replaced): its actor died with the node, and nothing
        // would tell the driver of its trip. Unless the group is being
        // booked: then Redis's answer decides.
        let held: Vec<(SearchKey, OfferId)> = self
            .searches
            .iter()
            .filter_map(|(key, s)| match &s.phase {
                Phase::Offered {
                    node: Some(n),
                    offer_id,
                    ..
                } if *n == node => Some((key.clone(), *offer_id)),
                _ => None,
            })
            .collect();
        for (key, offer_id) in held {
            if !self.group_committing(&key) {
                self.unhold(&key, offer_id);
            }
        }
        for (key, search) in &self.searches {
            if let Phase::Locking {
                node: Some(n),
                offer_id,
                ..
            }
            | Phase::Offered {
                node: Some(n),
                offer_id,
                ..
            } = &search.phase
            {
                if *n == node {
                    self.remote_due.push(Reverse((
                        now,
                        search.seq,
                        *offer_id,
                        0,
                        Awaited::Any,
                        key.clone(),
                    )));
                }
            }
        }
        self.settle_due(now);
    }

    /// The nodes alive, as a (re)subscription found them (this one aside):
    /// remote drivers of any other node are forgotten.
    pub fn live_nodes(&mut self, now: Instant, nodes: Vec<NodeId>) {
        let live: HashSet<&NodeId> = nodes.iter().collect();
        let dead: BTreeSet<NodeId> = self
            .remote
            .values()
            .chain(self.shadowed.values().map(|(node, _)| node))
            .filter(|node| !live.contains(node))
            .cloned()
            .collect();
        for node in dead {
            self.node_gone(now, node);
        }
    }

    fn forget_node(&mut self, node: &NodeId) {
        self.shadowed.retain(|_, (n, _)| n != node);
        let gone: Vec<DriverId> = self
            .remote
            .iter()
            .filter(|(_, n)| *n == node)
            .map(|(d, _)| d.clone())
            .collect();
        for driver in gone {
            self.forget_remote(&driver);
        }
    }

    /// A cancel of `offer_id` could not reach `driver`'s actor on this node
    /// (it is gone). On one node its state is gone with it: the offer is
    /// over without a trip. In cluster mode an accept of it may have booked
    /// in Redis: the offer is settled there at once.
    pub fn offer_undeliverable(&mut self, now: Instant, driver: &DriverId, offer_id: OfferId) {
        let found = self
            .searches
            .iter()
            .find(|(_, s)| {
                s.current_offer() == Some(offer_id) && s.offered_driver().as_ref() == Some(driver)
            })
            .map(|(key, s)| (key.clone(), s.seq));
        let Some((key, seq)) = found else {
            return;
        };
        if self.node.is_none() {
            return self.offer_lost(now, key, driver.clone());
        }
        self.remote_due
            .push(Reverse((now, seq, offer_id, 0, Awaited::Any, key)));
        self.settle_due(now);
    }

    /// Takes a remote driver out of the index.
    pub(super) fn forget_remote(&mut self, driver_id: &DriverId) {
        if self.remote.remove(driver_id).is_some() {
            self.drivers.remove(driver_id);
        }
    }

    /// News of an offer is overdue: in cluster mode, the lock is settled in
    /// Redis (below); on one node, the offer is taken as lost.
    ///
    /// Cluster mode: news of a remote lock is overdue (the answer or the
    /// outcome was lost between nodes, or the driver's node died). Settling
    /// it in Redis tells for certain whether the driver accepted, and stops
    /// any later acceptance; until Redis can tell, it is asked again.
    pub(super) fn settle_due(&mut self, now: Instant) {
        while let Some(Reverse((due, ..))) = self.remote_due.peek() {
            if *due > now {
                break;
            }
            let Some(Reverse((_, seq, offer_id, attempts, awaited, key))) = self.remote_due.pop()
            else {
                break;
            };
            let awaited_here = self.searches.get(&key).is_some_and(|s| {
                let still_awaited = matches!(
                    (awaited, &s.phase),
                    (Awaited::Answer, Phase::Locking { .. })
                        | (Awaited::Outcome, Phase::Offered { .. })
                        | (Awaited::Any, _)
                );
                s.seq == seq
                    && s.current_offer() == Some(offer_id)
                    && s.settling != Some(offer_id)
                    && still_awaited
            });
            if !awaited_here {
                continue;
            }
            // A group member the driver accepted is held until its group
            // completes or fails, which the group's deadline bounds; its
            // news is not overdue (and the hold has its own deadline).
            if self.is_held(&key, offer_id) && !self.commit_gave_up(&key) {
                continue;
            }
            let Some(search) = self.searches.get_mut(&key) else {
                continue;
            };
            let Some(driver) = search.offered_driver() else {
                continue;
            };
            let Some(node) = &self.node else {
                // One node, no Redis: nothing can tell whether the driver
                // accepted but the driver's actor. It is asked to end the
                // offer (a no-op if it has ended: then its news is on the
                // way); a dead actor can't be asked, which the caller
                // reports (`offer_undeliverable`). Asked again while no
                // news comes.
                let Phase::Offered { fencing_token, .. } = search.phase else {
                    self.offer_lost(now, key, driver);
                    continue;
                };
                tracing::warn!(driver = %driver, offer_id, "no news of an offer past its deadline; withdrawing it");
                // Withdrawn: a group hold of it that comes in after this
                // must not count (the cancel ends it at the driver).
                search.revoking = Some(offer_id);
                self.effects.push(SearchEffect::Cancel {
                    driver,
                    node: None,
                    offer_id,
                    fencing_token,
                    why: Ending::RiderCancelled,
                });
                let due = now + super::REMOTE_ANSWER_WAIT;
                self.remote_due
                    .push(Reverse((due, seq, offer_id, 0, Awaited::Outcome, key)));
                continue;
            };
            search.settling = Some(offer_id);
            self.effects.push(SearchEffect::Settle {
                owner: owner(node, offer_id),
                ticket: SettleTicket {
                    key,
                    seq,
                    offer_id,
                    attempts: attempts + 1,
                    driver: driver.clone(),
                },
                driver,
            });
        }
    }

    /// What settling an overdue remote lock found out (`None`: Redis could
    /// not tell).
    pub fn settled(&mut self, now: Instant, ticket: SettleTicket, outcome: Option<Settled>) {
        let SettleTicket {
            key,
            seq,
            offer_id,
            attempts,
            driver: driver_id,
        } = ticket;
        let committing = self.group_committing(&key);
        let Some(search) = self
            .searches
            .get_mut(&key)
            .filter(|s| s.seq == seq && s.current_offer() == Some(offer_id))
        else {
            return; // the news arrived after all
        };
        search.settling = None;
        // Leaving `Locking` (any outcome but "ask again") frees the driver
        // for other searches here.
        let leaves = outcome.is_some() || attempts >= SETTLE_ATTEMPTS;
        if leaves && matches!(search.phase, Phase::Locking { .. }) {
            self.locking.remove(&driver_id);
        }
        match outcome {
            Some(Settled::Trip(trip_id)) => {
                let at = search.offered_at.unwrap_or(search.pickup);
                self.finish_matched(now, &key, trip_id, driver_id, at);
            }
            Some(Settled::Dead) if committing => {
                // Settled without a trip while its group was being booked:
                // the booking can't land any more. The driver lets go of its
                // hold when its own settle finds the same.
                search.phase = Phase::Looking;
                self.member_news(now, &key, None);
            }
            Some(Settled::Dead) => {
                // Whatever happened to the offer (the driver's node died, or
                // news was lost), it is over without a trip. The driver is
                // not held against this rider: it may never have seen the
                // offer (a lost lock request: its node was resubscribing).
                // An offer it does hold is withdrawn (its lock is gone).
                tracing::info!(driver = %driver_id, offer_id, "no news of an offer; it ended without a trip");
                if let Phase::Offered {
                    node,
                    fencing_token,
                    ..
                } = &search.phase
                {
                    self.effects.push(SearchEffect::Cancel {
                        driver: driver_id.clone(),
                        node: node.clone(),
                        offer_id,
                        fencing_token: *fencing_token,
                        why: Ending::RiderCancelled,
                    });
                }
                search.phase = Phase::Looking;
                // A hold that overtook the settle is over with the lock: the
                // group must not count it (a member looking again would
                // complete the group with a dead lock).
                self.unhold(&key, offer_id);
                self.advance(now, key);
            }
            None if attempts < SETTLE_ATTEMPTS => {
                m::redis_settle_undecided();
                let due = now + SETTLE_RETRY;
                self.remote_due
                    .push(Reverse((due, seq, offer_id, attempts, Awaited::Any, key)));
            }
            None if committing && attempts >= SETTLE_ATTEMPTS => {
                // Neither the booking nor the settles can be told for a long
                // while: the rider is told, and each driver's own settle,
                // asked until Redis can tell, decides its hold.
                m::redis_settle_undecided();
                if let Some(group) = self.searches.get(&key).and_then(|s| s.group.clone()) {
                    self.abandon_commit(now, &group);
                }
            }
            None => {
                // Redis has not been able to tell for a long while: the rider
                // is told, and the lock lapses in Redis by itself.
                m::redis_settle_undecided();
                self.finish_without_locks(now, &key);
            }
        }
    }
}
