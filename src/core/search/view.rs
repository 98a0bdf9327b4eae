//! What the operations map shows of the searches: every open request, where
//! its rider waits and how far it has got. A read of the machine's state,
//! changing nothing; the matcher runs it a few times a second, and only while
//! someone watches the map.

use std::time::Instant;

use super::{Phase, SearchKey, Searches};
use crate::location::LatLon;
use crate::protocol::{RequestId, RiderId};

/// How far an open request has got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Looking for a driver, or asking one for its lock.
    Searching,
    /// Parked: no free driver in reach; woken by the next one nearby.
    Waiting,
    /// A driver has the offer (for a group: at least one member does, or
    /// is held for it).
    Offered,
}

/// One open ride request.
#[derive(Clone, Debug, PartialEq)]
pub struct OpenRequest {
    /// The rider.
    pub rider_id: RiderId,
    /// The rider's id for the request.
    pub request_id: RequestId,
    /// Where the rider waits.
    pub pickup: LatLon,
    /// How many vehicles it asks for.
    pub vehicles: u8,
    /// When it started.
    pub started: Instant,
    /// How far it has got.
    pub stage: Stage,
}

impl<R: Clone> Searches<R> {
    /// Every open request, a group once (not once per member). O(searches).
    pub fn open_requests(&self) -> Vec<OpenRequest> {
        let mut open = Vec::with_capacity(self.searches.len());
        for (key, search) in &self.searches {
            if search.group.is_none() {
                open.push(OpenRequest {
                    rider_id: key.0.clone(),
                    request_id: key.1.clone(),
                    pickup: search.pickup,
                    vehicles: 1,
                    started: search.started,
                    stage: self.stage(key),
                });
            }
        }
        for (key, group) in &self.groups {
            // A group shows its furthest member: offered (or held) beats
            // searching, which beats waiting.
            let stages = group.members.iter().map(|member| self.stage(member));
            let stage = stages
                .max_by_key(|stage| match stage {
                    Stage::Waiting => 0,
                    Stage::Searching => 1,
                    Stage::Offered => 2,
                })
                .unwrap_or(Stage::Searching);
            open.push(OpenRequest {
                rider_id: key.0.clone(),
                request_id: key.1.clone(),
                pickup: group.pickup,
                vehicles: group.size,
                started: group.started,
                stage,
            });
        }
        open
    }

    fn stage(&self, key: &SearchKey) -> Stage {
        match self.searches.get(key) {
            Some(search) if matches!(search.phase, Phase::Offered { .. }) => Stage::Offered,
            Some(search) if self.waiting.contains_key(&search.seq) => Stage::Waiting,
            _ => Stage::Searching,
        }
    }
}
