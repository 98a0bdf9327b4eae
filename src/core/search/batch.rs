//! Batched assignment (`--dispatch batch`): requests that arrived within a
//! window are given drivers together, by a minimum-cost assignment over
//! pickup distance, instead of each taking the nearest free driver as it
//! comes.
//!
//! Greedy is fast but can cross: the first rider takes the driver who was
//! the only close one for the second. A window of requests and each one's
//! few nearest free drivers form a bipartite graph; Kuhn–Munkres (from the
//! `pathfinding` crate) finds the assignment that serves the most requests
//! and, among those, has the shortest total pickup distance.
//!
//! The cost stays bounded at any rate: each request brings at most
//! [`CANDIDATES_PER_REQUEST`] drivers, requests that share no driver are
//! solved apart (connected components), and a component larger than
//! [`MAX_ROWS`] requests is solved in slices, oldest requests first, each
//! slice leaving out the drivers the earlier ones took. Requests waiting
//! for a nearer driver (`--batch-wait-m`) join the next assignment beside
//! the batch's own, at most [`MAX_HELD`] of them. Kuhn–Munkres is
//! cubic in a slice's size, so a slice costs at most about
//! `MAX_ROWS² × MAX_ROWS × CANDIDATES_PER_REQUEST` steps.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use pathfinding::kuhn_munkres::kuhn_munkres_min;
use pathfinding::matrix::Matrix;

use super::{Dispatch, Phase, Searches};
use crate::metrics as m;
use crate::protocol::DriverId;

/// Requests a batch holds at most: it closes at its window or at this many
/// requests, whichever comes first, so that at a high rate one assignment
/// never holds the matcher for long (at 5,000 requests/s a 500 ms window
/// gathered 2,300 requests and took up to 94 ms to assign; see
/// BENCHMARKS.md).
pub const MAX_BATCH: usize = 256;
/// Requests held over for a nearer driver at most, beside a batch's own:
/// past this, a request takes what it can get (or parks), so that however
/// many requests find nobody near, an assignment stays bounded.
pub const MAX_HELD: usize = 4 * MAX_BATCH;
/// Drivers considered per request: its nearest free ones in reach.
pub const CANDIDATES_PER_REQUEST: usize = 6;
/// Requests solved together at most (see the module docs).
pub const MAX_ROWS: usize = 48;
/// The cost of a pair that is not a candidate: more than any real
/// distance, so the solver serves as many requests as it can before it
/// looks at distances, and small enough that a slice's sum can't overflow.
const NOT_A_CANDIDATE: i64 = 1_000_000_000;

impl<R: Clone> Searches<R> {
    /// The batch window closed: its requests still looking get their first
    /// drivers together; those left without one (or that can't be assigned:
    /// cancelled, out of time) go the greedy way, which asks the nearest
    /// free driver left or parks. With `wait_m`, a request whose best
    /// driver is farther than that waits for the next window instead, for
    /// up to `max_waits` windows.
    pub(super) fn assign_batch(&mut self, now: Instant) {
        let Dispatch::Batch {
            window,
            wait_m,
            max_waits,
        } = self.settings.dispatch
        else {
            return;
        };
        self.batch_due = None;
        let mut keys = std::mem::take(&mut self.batch_held);
        keys.append(&mut self.batch);
        let mut open = Vec::new();
        let mut wanted = Vec::new();
        // Requests given the choice to wait, oldest first.
        let mut may_hold = MAX_HELD;
        for (seq, key) in keys {
            // A request that ended in the window (and perhaps was asked
            // again under the same id: a new search) is not this entry's.
            let Some(search) = self.searches.get(&key).filter(|s| s.seq == seq) else {
                continue;
            };
            let out_of_time =
                search.deadline_passed || now >= search.started + self.settings.search_timeout;
            if !matches!(search.phase, Phase::Looking)
                || search.cancel_requested
                || out_of_time
                || self.waiting.contains_key(&search.seq)
            {
                // Moved on already, or ends now: `advance` says how.
                if matches!(search.phase, Phase::Looking) && !self.waiting.contains_key(&search.seq)
                {
                    self.advance(now, key);
                }
                continue;
            }
            self.index_queries += 1;
            let radius = self
                .settings
                .radius_at(now.saturating_duration_since(search.started));
            let candidates: Vec<(DriverId, f64)> = self
                .drivers
                .nearest_within(search.pickup, radius)
                .filter(|(id, _)| !search.excluded.contains(id) && !self.locking.contains(id))
                .take(CANDIDATES_PER_REQUEST)
                .collect();
            // Group members never wait: a group holds the drivers who
            // accepted while it looks for the rest. Waiting is bounded in
            // time, not in assignments (a batch can close early, when
            // full): at most `max_waits` windows past the first assignment,
            // and never into the last window before the deadline.
            let age = now.saturating_duration_since(search.started);
            let deadline = search.started + self.settings.search_timeout;
            let may_wait = wait_m > 0
                && search.group.is_none()
                && age <= window * max_waits
                && now + window < deadline
                && may_hold > 0;
            may_hold -= usize::from(may_wait);
            wanted.push(Wanted {
                candidates,
                wait_m: may_wait.then_some(f64::from(wait_m)),
            });
            open.push((seq, key));
        }
        self.batched += open.len();
        let chosen = assign(&wanted);
        // Assigned first, so that the greedy fallbacks see those drivers as
        // being locked.
        let mut unassigned = Vec::new();
        let waited = chosen.iter().filter(|c| **c == Choice::Wait).count();
        if waited > 0 {
            m::batch_waited(waited);
        }
        for ((seq, key), choice) in open.into_iter().zip(chosen) {
            match choice {
                Choice::Driver(driver) => self.ask_for_lock(now, key, driver),
                Choice::Wait => {
                    self.batch_held.push((seq, key));
                    self.batch_due.get_or_insert(now + window);
                }
                Choice::Nobody => unassigned.push(key),
            }
        }
        for key in unassigned {
            self.advance(now, key);
        }
    }

    /// Requests assigned by batches since the last call (for the batch
    /// metrics, which the caller times).
    pub fn take_batched(&mut self) -> usize {
        std::mem::take(&mut self.batched)
    }
}

/// One request of a batch.
#[derive(Clone, Debug, Default)]
pub struct Wanted {
    /// Its candidates with their distance in metres, nearest first.
    pub candidates: Vec<(DriverId, f64)>,
    /// If it may wait for the next window: what waiting costs, in metres
    /// (a driver farther than this is worse than waiting).
    pub wait_m: Option<f64>,
}

/// What a request of a batch gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Choice {
    Driver(DriverId),
    /// Its best driver is farther than waiting costs: the next window.
    Wait,
    /// No driver for it in this batch.
    Nobody,
}

/// For each request, the driver it gets, or whether it waits. No driver is
/// given twice.
pub fn assign(requests: &[Wanted]) -> Vec<Choice> {
    let mut chosen = vec![Choice::Nobody; requests.len()];
    let mut taken: HashSet<DriverId> = HashSet::new();
    for component in components(requests) {
        for slice in component.chunks(MAX_ROWS) {
            solve(requests, slice, &mut taken, &mut chosen);
        }
    }
    chosen
}

/// Requests grouped by the drivers they share, each group in request order,
/// groups in order of their first request.
fn components(requests: &[Wanted]) -> Vec<Vec<usize>> {
    let mut parent: Vec<usize> = (0..requests.len()).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let mut first_with: HashMap<&DriverId, usize> = HashMap::new();
    for (i, wanted) in requests.iter().enumerate() {
        for (driver, _) in &wanted.candidates {
            let other = *first_with.entry(driver).or_insert(i);
            let (a, b) = (root(&mut parent, i), root(&mut parent, other));
            // The older request's root wins, so roots are first members.
            parent[a.max(b)] = a.min(b);
        }
    }
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut group_of_root: HashMap<usize, usize> = HashMap::new();
    for i in 0..requests.len() {
        let r = root(&mut parent, i);
        let g = *group_of_root.entry(r).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[g].push(i);
    }
    groups
}

/// Decimetres: fine enough to tell drivers apart, whole numbers so that the
/// solver's sums are exact.
fn cost_of(metres: f64) -> i64 {
    (metres * 10.0).round() as i64
}

fn solve(
    requests: &[Wanted],
    slice: &[usize],
    taken: &mut HashSet<DriverId>,
    chosen: &mut [Choice],
) {
    let mut columns: Vec<&DriverId> = Vec::new();
    let mut column_of: HashMap<&DriverId, usize> = HashMap::new();
    for &i in slice {
        for (driver, _) in &requests[i].candidates {
            if !taken.contains(driver) && !column_of.contains_key(driver) {
                column_of.insert(driver, columns.len());
                columns.push(driver);
            }
        }
    }
    // Beside the drivers, each request has a column of its own: waiting,
    // for one that may, and otherwise nothing (which also gives the solver
    // the columns it needs, at least as many as rows).
    let drivers = columns.len();
    let mut costs = Matrix::new(slice.len(), drivers + slice.len(), NOT_A_CANDIDATE);
    for (row, &i) in slice.iter().enumerate() {
        for (driver, metres) in &requests[i].candidates {
            if let Some(&column) = column_of.get(driver) {
                costs[(row, column)] = cost_of(*metres);
            }
        }
        if let Some(wait_m) = requests[i].wait_m {
            costs[(row, drivers + row)] = cost_of(wait_m);
        }
    }
    let (_, assignment) = kuhn_munkres_min(&costs);
    for (row, &column) in assignment.iter().enumerate() {
        let i = slice[row];
        if costs[(row, column)] >= NOT_A_CANDIDATE {
            continue;
        }
        if column < drivers {
            let driver = columns[column].clone();
            taken.insert(driver.clone());
            chosen[i] = Choice::Driver(driver);
        } else {
            chosen[i] = Choice::Wait;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(name: &str) -> DriverId {
        name.into()
    }

    /// `assign` of requests that may not wait, as the driver each gets.
    fn assign_now(requests: &[Vec<(DriverId, f64)>]) -> Vec<Option<DriverId>> {
        let wanted: Vec<Wanted> = requests
            .iter()
            .map(|candidates| Wanted {
                candidates: candidates.clone(),
                wait_m: None,
            })
            .collect();
        assign(&wanted)
            .into_iter()
            .map(|choice| match choice {
                Choice::Driver(driver) => Some(driver),
                Choice::Nobody => None,
                Choice::Wait => panic!("waited without the choice to"),
            })
            .collect()
    }

    #[test]
    fn where_greedy_crosses_batch_finds_the_optimum() {
        // Greedy gives rider 0 its nearest (a, 100 m), leaving rider 1 with
        // b at 2,000 m: 2,100 m. Batch: 0 takes b (300 m), 1 takes a
        // (400 m): 700 m.
        let requests = vec![
            vec![(d("a"), 100.0), (d("b"), 300.0)],
            vec![(d("a"), 400.0), (d("b"), 2_000.0)],
        ];
        assert_eq!(assign_now(&requests), [Some(d("b")), Some(d("a"))]);
    }

    #[test]
    fn as_many_requests_as_possible_are_served_before_distance_counts() {
        // Rider 0 would rather have a, but then rider 1 gets nobody.
        let requests = vec![
            vec![(d("a"), 10.0), (d("b"), 4_000.0)],
            vec![(d("a"), 4_000.0)],
        ];
        assert_eq!(assign_now(&requests), [Some(d("b")), Some(d("a"))]);
    }

    #[test]
    fn more_requests_than_drivers_leaves_the_rest_unassigned() {
        let requests = vec![vec![(d("a"), 500.0)], vec![(d("a"), 100.0)], vec![]];
        assert_eq!(assign_now(&requests), [None, Some(d("a")), None]);
    }

    #[test]
    fn a_request_waits_when_every_driver_is_farther_than_waiting_costs() {
        let wanted = [Wanted {
            candidates: vec![(d("a"), 900.0), (d("b"), 1_200.0)],
            wait_m: Some(200.0),
        }];
        assert_eq!(assign(&wanted), [Choice::Wait]);
    }

    #[test]
    fn a_request_that_may_wait_leaves_a_far_driver_to_one_that_may_not() {
        // Rider 0 has waited its last window; rider 1 may still wait, and
        // the only driver is nearer to rider 1.
        let wanted = [
            Wanted {
                candidates: vec![(d("a"), 800.0)],
                wait_m: None,
            },
            Wanted {
                candidates: vec![(d("a"), 500.0), (d("b"), 150.0)],
                wait_m: Some(200.0),
            },
        ];
        assert_eq!(
            assign(&wanted),
            [Choice::Driver(d("a")), Choice::Driver(d("b"))]
        );
        let wanted = [
            wanted[0].clone(),
            Wanted {
                candidates: vec![(d("a"), 500.0)],
                wait_m: Some(200.0),
            },
        ];
        assert_eq!(assign(&wanted), [Choice::Driver(d("a")), Choice::Wait]);
    }

    #[test]
    fn a_request_with_no_candidate_waits_if_it_may() {
        let wanted = [
            Wanted {
                candidates: vec![],
                wait_m: Some(200.0),
            },
            Wanted {
                candidates: vec![],
                wait_m: None,
            },
        ];
        assert_eq!(assign(&wanted), [Choice::Wait, Choice::Nobody]);
    }

    /// The least total cost of a small case, every choice tried: each
    /// request takes a candidate nobody else has, waits (if it may), or is
    /// left without (which costs more than anything else).
    fn best_by_brute_force(requests: &[Wanted]) -> i64 {
        fn go(requests: &[Wanted], i: usize, used: &mut Vec<DriverId>, cost: i64, best: &mut i64) {
            if i == requests.len() {
                *best = (*best).min(cost);
                return;
            }
            let idle = requests[i].wait_m.map_or(NOT_A_CANDIDATE, cost_of);
            go(requests, i + 1, used, cost + idle, best);
            for (driver, metres) in &requests[i].candidates {
                if !used.contains(driver) {
                    used.push(driver.clone());
                    go(requests, i + 1, used, cost + cost_of(*metres), best);
                    used.pop();
                }
            }
        }
        let mut best = i64::MAX;
        go(requests, 0, &mut Vec::new(), 0, &mut best);
        best
    }

    proptest::proptest! {
        #[test]
        fn small_batches_are_solved_optimally(
            raw in proptest::collection::vec(
                (
                    proptest::collection::btree_map(0u8..7, 1u32..5_000, 0..4),
                    proptest::option::of(1u32..3_000),
                ),
                0..7,
            )
        ) {
            let requests: Vec<Wanted> = raw
                .iter()
                .map(|(m, wait)| Wanted {
                    candidates: m.iter().map(|(k, v)| (d(&format!("d{k}")), *v as f64)).collect(),
                    wait_m: wait.map(f64::from),
                })
                .collect();
            let chosen = assign(&requests);
            let mut used = HashSet::new();
            let mut cost = 0;
            for (i, choice) in chosen.iter().enumerate() {
                cost += match choice {
                    Choice::Driver(driver) => {
                        proptest::prop_assert!(used.insert(driver.clone()), "{driver} twice");
                        let metres = requests[i].candidates.iter().find(|(c, _)| c == driver).expect("a candidate").1;
                        cost_of(metres)
                    }
                    Choice::Wait => cost_of(requests[i].wait_m.expect("waited without the choice to")),
                    Choice::Nobody => NOT_A_CANDIDATE,
                };
            }
            proptest::prop_assert_eq!(cost, best_by_brute_force(&requests));
        }
    }

    #[test]
    fn a_large_component_is_solved_in_slices_without_giving_a_driver_twice() {
        // 200 requests all wanting the same 6 drivers, and 300 more each
        // with a driver of its own.
        let shared: Vec<(DriverId, f64)> = (0..6)
            .map(|k| (d(&format!("s{k}")), 100.0 * k as f64))
            .collect();
        let mut requests = vec![shared; 200];
        requests.extend((0..300).map(|i| vec![(d(&format!("own{i}")), 50.0)]));
        let chosen = assign_now(&requests);
        let served: Vec<&DriverId> = chosen.iter().flatten().collect();
        assert_eq!(served.len(), 306);
        assert_eq!(served.iter().collect::<HashSet<_>>().len(), 306);
        // The shared drivers went to the oldest slice.
        assert!(chosen[MAX_ROWS..200].iter().all(Option::is_none));
        assert_eq!(chosen[..MAX_ROWS].iter().flatten().count(), 6);
    }
}
