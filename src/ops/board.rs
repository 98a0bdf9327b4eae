//! The operations map's picture of this node: every driver's dot, the open
//! requests, recent matches and the counts, kept up to date as drivers
//! change, and turned into a snapshot for a new watcher and into batches of
//! changes for those already watching.
//!
//! A plain state machine (time passed in, nothing sent): the feed
//! (`feed.rs`) locks it, feeds it and carries its output to the sockets.
//! Changes are recorded per driver, not per event: a driver that moves ten
//! times between two batches is sent once, at its newest place, so a batch
//! is never larger than the number of drivers however busy the city is.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::core::search::{OpenRequest, Stage};
use crate::location::LatLon;
use crate::protocol::{DriverId, RequestId, RiderId};

/// How long a match stays on the map (as a line from driver to pickup).
pub const MATCH_SHOWN: Duration = Duration::from_secs(10);
/// The window of the "matched in the last minute" counter.
const MATCH_COUNTED: Duration = Duration::from_secs(60);
/// At most this many recent match lines are kept (a burst past it only
/// loses the oldest lines; the counts are kept apart, per second).
const MAX_RECENT_MATCHES: usize = 10_000;
/// The width of one bucket of the last-minute count.
const MATCH_BUCKET: Duration = Duration::from_secs(1);

/// What a driver is doing, as coloured on the map. Sent as its index in
/// [`DriverShow::NAMES`], which every snapshot carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DriverShow {
    /// Free and offerable.
    Available = 0,
    /// Offered a ride, or held for a group, waiting for its answer or group.
    Offered = 1,
    /// On a trip.
    OnTrip = 2,
    /// Connected but not offerable (unavailable, or no fresh location).
    Unavailable = 3,
    /// Not connected to this node.
    Offline = 4,
}

impl DriverShow {
    /// The names, by code.
    pub const NAMES: [&'static str; 5] =
        ["available", "offered", "on_trip", "unavailable", "offline"];
}

/// One driver as the map shows it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DriverDot {
    /// Its last location, if it sent one.
    pub at: Option<LatLon>,
    /// What it is doing.
    pub show: DriverShow,
    /// The pickup of its offer or trip.
    pub pickup: Option<LatLon>,
}

/// A match: the driver's place and the rider's pickup, when it happened.
#[derive(Clone, Debug, PartialEq)]
struct MatchLine {
    driver: DriverId,
    from: LatLon,
    to: LatLon,
    at: Instant,
}

/// A driver on the wire: `[id, lat, lon, state, pickup_lat, pickup_lon]`
/// (positions `null` when unknown).
pub type DriverRow = (
    DriverId,
    Option<f64>,
    Option<f64>,
    u8,
    Option<f64>,
    Option<f64>,
);
/// An open request on the wire:
/// `[rider_id, request_id, lat, lon, stage, vehicles, age_ms]`.
pub type RequestRow = (RiderId, RequestId, f64, f64, &'static str, u8, u64);
/// A match on the wire: `[driver_id, lat, lon, pickup_lat, pickup_lon, age_ms]`.
pub type MatchRow = (DriverId, f64, f64, f64, f64, u64);

/// The key counts, in every snapshot and batch.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Counters {
    /// Drivers known to this node, by state name.
    pub drivers: HashMap<&'static str, usize>,
    /// Open ride requests.
    pub requests: usize,
    /// Of which parked, waiting for a driver to come near.
    pub waiting: usize,
    /// Drivers gone on a trip since the engine started.
    pub matched_total: u64,
    /// Of which in the last minute.
    pub matched_last_minute: usize,
}

/// Everything a new watcher needs.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    /// The batch sequence this snapshot follows: batches numbered up to it
    /// are already in it.
    pub seq: u64,
    /// The state names, by code.
    pub states: [&'static str; 5],
    /// Every driver.
    pub drivers: Vec<DriverRow>,
    /// Every open request.
    pub requests: Vec<RequestRow>,
    /// Matches of the last [`MATCH_SHOWN`].
    pub matches: Vec<MatchRow>,
    /// The counts.
    pub counters: Counters,
}

/// What changed since the last batch.
#[derive(Debug, Serialize)]
pub struct Batch {
    /// Numbered from 1; a watcher skips batches its snapshot already holds.
    pub seq: u64,
    /// Drivers that changed, at their newest.
    pub drivers: Vec<DriverRow>,
    /// Drivers this node no longer knows.
    pub gone: Vec<DriverId>,
    /// Requests new or changed.
    pub requests: Vec<RequestRow>,
    /// Requests ended: `[rider_id, request_id]`.
    pub ended: Vec<(RiderId, RequestId)>,
    /// New matches.
    pub matches: Vec<MatchRow>,
    /// The counts.
    pub counters: Counters,
}

/// This node's picture.
#[derive(Default)]
pub struct Board {
    drivers: HashMap<DriverId, DriverDot>,
    counts: [usize; 5],
    /// Drivers changed (or gone) since the last batch; kept only while
    /// someone watches.
    changed: HashSet<DriverId>,
    watched: bool,
    requests: HashMap<(RiderId, RequestId), OpenRequest>,
    new_requests: Vec<(RiderId, RequestId)>,
    ended_requests: Vec<(RiderId, RequestId)>,
    matches: VecDeque<MatchLine>,
    /// Matches at the back of `matches` not sent in a batch yet.
    unsent_matches: usize,
    matched_total: u64,
    /// Matches counted per [`MATCH_BUCKET`] (the bucket's start, its
    /// count), over the last [`MATCH_COUNTED`]: a count that no cap on
    /// the lines can cut short.
    match_buckets: VecDeque<(Instant, usize)>,
    /// The counts the last batch carried: a batch goes out when they change
    /// even if nothing else did (the last-minute count falls by itself).
    counters_sent: Option<Counters>,
    seq: u64,
}

impl Board {
    /// An empty board.
    pub fn new() -> Self {
        Board::default()
    }

    /// `driver` is now `dot`. A driver going from an offer to a trip is a
    /// match.
    pub fn driver_changed(&mut self, now: Instant, driver: &DriverId, dot: DriverDot) {
        let old = self.drivers.insert(driver.clone(), dot);
        if let Some(old) = old {
            self.counts[old.show as usize] -= 1;
            if old.show == DriverShow::Offered && dot.show == DriverShow::OnTrip {
                if let (Some(from), Some(to)) = (dot.at.or(old.at), dot.pickup) {
                    self.matched(now, driver.clone(), from, to);
                }
            }
        }
        self.counts[dot.show as usize] += 1;
        if self.watched {
            self.changed.insert(driver.clone());
        }
    }

    /// This node no longer has `driver`.
    pub fn driver_gone(&mut self, driver: &DriverId) {
        if let Some(old) = self.drivers.remove(driver) {
            self.counts[old.show as usize] -= 1;
            if self.watched {
                self.changed.insert(driver.clone());
            }
        }
    }

    fn matched(&mut self, now: Instant, driver: DriverId, from: LatLon, to: LatLon) {
        self.matched_total += 1;
        self.matches.push_back(MatchLine {
            driver,
            from,
            to,
            at: now,
        });
        self.unsent_matches += 1;
        match self.match_buckets.back_mut() {
            Some((start, n)) if now.saturating_duration_since(*start) < MATCH_BUCKET => *n += 1,
            _ => self.match_buckets.push_back((now, 1)),
        }
        if self.matches.len() > MAX_RECENT_MATCHES {
            self.matches.pop_front();
            self.unsent_matches = self.unsent_matches.min(self.matches.len());
        }
    }

    /// The open requests are now `open` (the matcher's word, read a few
    /// times a second while someone watches).
    pub fn requests_are(&mut self, open: Vec<OpenRequest>) {
        let mut now_open = HashMap::with_capacity(open.len());
        for request in open {
            let key = (request.rider_id.clone(), request.request_id.clone());
            let same = self.requests.get(&key).is_some_and(|old| *old == request);
            if !same {
                self.new_requests.push(key.clone());
            }
            now_open.insert(key, request);
        }
        for key in self.requests.keys() {
            if !now_open.contains_key(key) {
                self.ended_requests.push(key.clone());
            }
        }
        self.requests = now_open;
    }

    /// Nobody watches: stop recording what changed (the next watcher starts
    /// from a snapshot). The open requests are forgotten too: nobody reads
    /// them from the matcher while nobody watches, so by the next snapshot
    /// they would be stale; the first batch after it brings them.
    pub fn unwatched(&mut self) {
        self.watched = false;
        self.changed = HashSet::new();
        self.requests.clear();
        self.new_requests.clear();
        self.ended_requests.clear();
        self.unsent_matches = 0;
        self.counters_sent = None;
    }

    /// The whole picture, for a new watcher; from here on changes are
    /// recorded for its batches.
    pub fn snapshot(&mut self, now: Instant) -> Snapshot {
        self.watched = true;
        self.forget_old_matches(now);
        let counters = self.counters(now);
        // The first watcher holds these counts now; watchers already there
        // hold what the last batch sent, and the next batch brings theirs
        // up to date.
        if self.counters_sent.is_none() {
            self.counters_sent = Some(counters.clone());
        }
        Snapshot {
            seq: self.seq,
            states: DriverShow::NAMES,
            drivers: self.drivers.iter().map(|(id, dot)| row(id, dot)).collect(),
            requests: self
                .requests
                .values()
                .map(|r| request_row(now, r))
                .collect(),
            // Unsent matches are left to the next batch, which this watcher
            // gets too (its number is past the snapshot's): in both, they
            // would be drawn twice.
            matches: self
                .matches
                .iter()
                .take(self.matches.len() - self.unsent_matches)
                .filter(|m| now.saturating_duration_since(m.at) < MATCH_SHOWN)
                .map(|m| match_row(now, m))
                .collect(),
            counters,
        }
    }

    /// What changed since the last batch, or `None` if nothing did.
    pub fn take_batch(&mut self, now: Instant) -> Option<Batch> {
        self.forget_old_matches(now);
        if !self.watched {
            // Nobody holds a snapshot to apply a batch to.
            return None;
        }
        let counters = self.counters(now);
        let nothing = self.changed.is_empty()
            && self.new_requests.is_empty()
            && self.ended_requests.is_empty()
            && self.unsent_matches == 0
            && self.counters_sent.as_ref() == Some(&counters);
        if nothing {
            return None;
        }
        self.counters_sent = Some(counters.clone());
        let mut drivers = Vec::new();
        let mut gone = Vec::new();
        for id in std::mem::take(&mut self.changed) {
            match self.drivers.get(&id) {
                Some(dot) => drivers.push(row(&id, dot)),
                None => gone.push(id),
            }
        }
        let requests = std::mem::take(&mut self.new_requests)
            .into_iter()
            .filter_map(|key| self.requests.get(&key))
            .map(|r| request_row(now, r))
            .collect();
        let skip = self.matches.len() - self.unsent_matches;
        let matches = self
            .matches
            .iter()
            .skip(skip)
            .map(|m| match_row(now, m))
            .collect();
        self.unsent_matches = 0;
        self.seq += 1;
        Some(Batch {
            seq: self.seq,
            drivers,
            gone,
            requests,
            ended: std::mem::take(&mut self.ended_requests),
            matches,
            counters,
        })
    }

    /// The counts.
    pub fn counters(&self, now: Instant) -> Counters {
        let drivers = DriverShow::NAMES
            .iter()
            .zip(self.counts)
            .map(|(name, n)| (*name, n))
            .collect();
        let waiting = self
            .requests
            .values()
            .filter(|r| r.stage == Stage::Waiting)
            .count();
        let matched_last_minute = self
            .match_buckets
            .iter()
            .filter(|(start, _)| now.saturating_duration_since(*start) < MATCH_COUNTED)
            .map(|(_, n)| n)
            .sum();
        Counters {
            drivers,
            requests: self.requests.len(),
            waiting,
            matched_total: self.matched_total,
            matched_last_minute,
        }
    }

    /// Matches too old to count; unsent ones stay (a batch sends them).
    fn forget_old_matches(&mut self, now: Instant) {
        while self
            .match_buckets
            .front()
            .is_some_and(|(start, _)| now.saturating_duration_since(*start) >= MATCH_COUNTED)
        {
            self.match_buckets.pop_front();
        }
        while self.matches.len() > self.unsent_matches
            && self
                .matches
                .front()
                .is_some_and(|m| now.saturating_duration_since(m.at) >= MATCH_COUNTED)
        {
            self.matches.pop_front();
        }
    }
}

/// Degrees rounded to about a metre: the map needs no more, and it keeps
/// the feed small.
fn deg(x: f64) -> f64 {
    (x * 1e5).round() / 1e5
}

fn row(id: &DriverId, dot: &DriverDot) -> DriverRow {
    (
        id.clone(),
        dot.at.map(|p| deg(p.lat)),
        dot.at.map(|p| deg(p.lon)),
        dot.show as u8,
        dot.pickup.map(|p| deg(p.lat)),
        dot.pickup.map(|p| deg(p.lon)),
    )
}

fn request_row(now: Instant, r: &OpenRequest) -> RequestRow {
    let stage = match r.stage {
        Stage::Searching => "searching",
        Stage::Waiting => "waiting",
        Stage::Offered => "offered",
    };
    (
        r.rider_id.clone(),
        r.request_id.clone(),
        deg(r.pickup.lat),
        deg(r.pickup.lon),
        stage,
        r.vehicles,
        now.saturating_duration_since(r.started).as_millis() as u64,
    )
}

fn match_row(now: Instant, m: &MatchLine) -> MatchRow {
    (
        m.driver.clone(),
        deg(m.from.lat),
        deg(m.from.lon),
        deg(m.to.lat),
        deg(m.to.lon),
        now.saturating_duration_since(m.at).as_millis() as u64,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(lat: f64, lon: f64) -> Option<LatLon> {
        Some(LatLon { lat, lon })
    }

    fn dot(show: DriverShow, lat: f64) -> DriverDot {
        DriverDot {
            at: at(lat, 13.4),
            show,
            pickup: None,
        }
    }

    #[test]
    fn a_batch_holds_each_changed_driver_once_at_its_newest() {
        let now = Instant::now();
        let mut board = Board::new();
        let d: DriverId = "d1".into();
        board.driver_changed(now, &d, dot(DriverShow::Available, 52.0));
        let snapshot = board.snapshot(now);
        assert_eq!(snapshot.drivers.len(), 1);
        assert_eq!(snapshot.seq, 0);
        assert!(
            board.take_batch(now).is_none(),
            "nothing changed since the snapshot"
        );
        for i in 1..=10 {
            board.driver_changed(
                now,
                &d,
                dot(DriverShow::Available, 52.0 + i as f64 / 1000.0),
            );
        }
        let batch = board.take_batch(now).expect("a batch");
        assert_eq!(batch.seq, 1);
        assert_eq!(batch.drivers.len(), 1);
        assert_eq!(batch.drivers[0].1, Some(52.01));
        assert_eq!(batch.counters.drivers["available"], 1);
        board.driver_gone(&d);
        let batch = board.take_batch(now).expect("a batch");
        assert_eq!(batch.gone, vec![d]);
        assert_eq!(batch.counters.drivers["available"], 0);
    }

    #[test]
    fn nothing_is_recorded_while_nobody_watches() {
        let now = Instant::now();
        let mut board = Board::new();
        board.driver_changed(now, &"d1".into(), dot(DriverShow::Available, 52.0));
        assert!(board.take_batch(now).is_none());
        board.snapshot(now);
        board.driver_changed(now, &"d2".into(), dot(DriverShow::Unavailable, 52.0));
        board.unwatched();
        assert!(board.take_batch(now).is_none());
        assert_eq!(board.counters(now).drivers["unavailable"], 1);
    }

    #[test]
    fn an_offer_turning_into_a_trip_is_a_match_line() {
        let now = Instant::now();
        let mut board = Board::new();
        board.snapshot(now);
        let d: DriverId = "d1".into();
        let pickup = at(52.1, 13.5);
        board.driver_changed(
            now,
            &d,
            DriverDot {
                pickup,
                ..dot(DriverShow::Offered, 52.0)
            },
        );
        board.driver_changed(
            now,
            &d,
            DriverDot {
                pickup,
                ..dot(DriverShow::OnTrip, 52.0)
            },
        );
        // A trip adopted without an offer (a reconnect) is not a new match.
        let e: DriverId = "d2".into();
        board.driver_changed(
            now,
            &e,
            DriverDot {
                pickup,
                ..dot(DriverShow::OnTrip, 52.0)
            },
        );
        let batch = board.take_batch(now).expect("a batch");
        assert_eq!(batch.matches, vec![(d, 52.0, 13.4, 52.1, 13.5, 0)]);
        assert_eq!(batch.counters.matched_total, 1);
        assert_eq!(batch.counters.matched_last_minute, 1);
        let later = now + MATCH_COUNTED;
        assert_eq!(board.snapshot(later).matches.len(), 0);
        assert_eq!(board.counters(later).matched_last_minute, 0);
        assert_eq!(board.counters(later).matched_total, 1);
    }

    #[test]
    fn requests_are_sent_when_new_or_changed_and_ended_when_gone() {
        let now = Instant::now();
        let mut board = Board::new();
        board.snapshot(now);
        let open = |stage| OpenRequest {
            rider_id: "r1".into(),
            request_id: "q1".into(),
            pickup: LatLon {
                lat: 52.0,
                lon: 13.0,
            },
            vehicles: 2,
            started: now,
            stage,
        };
        board.requests_are(vec![open(Stage::Searching)]);
        let batch = board.take_batch(now).expect("a batch");
        assert_eq!(batch.requests.len(), 1);
        assert_eq!(batch.requests[0].4, "searching");
        board.requests_are(vec![open(Stage::Searching)]);
        assert!(
            board.take_batch(now).is_none(),
            "unchanged requests are not resent"
        );
        board.requests_are(vec![open(Stage::Waiting)]);
        let batch = board.take_batch(now).expect("a batch");
        assert_eq!(batch.requests[0].4, "waiting");
        assert_eq!(batch.counters.waiting, 1);
        board.requests_are(vec![]);
        let batch = board.take_batch(now).expect("a batch");
        assert_eq!(batch.ended, vec![("r1".into(), "q1".into())]);
        assert_eq!(batch.counters.requests, 0);
    }

    fn matched_at(board: &mut Board, now: Instant, driver: &str) {
        let d: DriverId = driver.into();
        let pickup = at(52.1, 13.5);
        for show in [DriverShow::Offered, DriverShow::OnTrip] {
            board.driver_changed(
                now,
                &d,
                DriverDot {
                    pickup,
                    ..dot(show, 52.0)
                },
            );
        }
    }

    #[test]
    fn the_last_minute_count_is_not_cut_by_the_cap_on_lines_and_falls_by_itself() {
        let now = Instant::now();
        let mut board = Board::new();
        board.snapshot(now);
        for i in 0..MAX_RECENT_MATCHES + 500 {
            matched_at(&mut board, now, &format!("d{i}"));
        }
        let batch = board.take_batch(now).expect("a batch");
        assert_eq!(batch.matches.len(), MAX_RECENT_MATCHES);
        assert_eq!(batch.counters.matched_last_minute, MAX_RECENT_MATCHES + 500);
        let later = now + Duration::from_secs(30);
        matched_at(&mut board, later, "late");
        assert!(board.take_batch(later).is_some());
        // Nothing changes from here on, but the minute passes: the count
        // falls, and a batch says so.
        let after = now + MATCH_COUNTED + Duration::from_secs(1);
        let batch = board.take_batch(after).expect("the count fell");
        assert_eq!(batch.counters.matched_last_minute, 1);
        assert!(batch.drivers.is_empty() && batch.matches.is_empty());
        assert!(board.take_batch(after).is_none(), "and then nothing");
    }

    #[test]
    fn a_match_not_yet_batched_reaches_a_new_watcher_once() {
        let now = Instant::now();
        let mut board = Board::new();
        board.snapshot(now);
        matched_at(&mut board, now, "d1");
        board.take_batch(now).expect("a batch");
        matched_at(&mut board, now, "d2");
        // A second watcher arrives between two batches.
        let snapshot = board.snapshot(now);
        let batch = board.take_batch(now).expect("a batch");
        assert!(batch.seq > snapshot.seq, "the new watcher gets the batch");
        let in_snapshot: Vec<_> = snapshot.matches.iter().map(|m| m.0.clone()).collect();
        let in_batch: Vec<_> = batch.matches.iter().map(|m| m.0.clone()).collect();
        assert_eq!(in_snapshot, vec![DriverId::from("d1")]);
        assert_eq!(in_batch, vec![DriverId::from("d2")]);
    }

    #[test]
    fn requests_seen_before_an_unwatched_gap_are_not_in_the_next_snapshot() {
        let now = Instant::now();
        let mut board = Board::new();
        board.snapshot(now);
        board.requests_are(vec![OpenRequest {
            rider_id: "r1".into(),
            request_id: "q1".into(),
            pickup: LatLon {
                lat: 52.0,
                lon: 13.0,
            },
            vehicles: 1,
            started: now,
            stage: Stage::Searching,
        }]);
        assert_eq!(board.snapshot(now).requests.len(), 1);
        board.unwatched();
        let snapshot = board.snapshot(now);
        assert!(snapshot.requests.is_empty());
        assert_eq!(snapshot.counters.requests, 0);
    }
}
