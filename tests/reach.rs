//! Who a search may reach, driven through the pure core with time passed
//! in: a radius that grows while a rider waits, and drivers whose last
//! location is too old to be offered by.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ridelock::areas::ServiceAreas;
use ridelock::core::booking::{Booking, DriverEffect, DriverEvent};
use ridelock::core::search::{Dispatch, SearchEffect, SearchSettings, Searches};
use ridelock::ids::Ids;
use ridelock::location::LatLon;
use ridelock::protocol::DriverCommand;

fn pickup() -> LatLon {
    LatLon::new(52.52, 13.405).unwrap()
}

/// `metres` north of the pickup.
fn north(metres: f64) -> LatLon {
    // One degree of latitude is about 111.2 km on geo's sphere.
    LatLon::new(52.52 + metres / 111_195.0, 13.405).unwrap()
}

fn settings() -> SearchSettings {
    SearchSettings {
        radius_m: 5_000.0,
        radius_step_m: 1_000.0,
        radius_step: Duration::from_secs(10),
        max_radius_m: 7_000.0,
        max_candidates: 5,
        search_timeout: Duration::from_secs(60),
        offer_timeout: Duration::from_secs(15),
        max_requests_per_rider: 8,
        max_searches: 100,
        lock_margin: Duration::from_secs(1),
        dispatch: Dispatch::Greedy,
    }
}

fn locked(effects: &[SearchEffect<u32>]) -> Vec<String> {
    effects
        .iter()
        .filter_map(|e| match e {
            SearchEffect::Lock { driver, .. } => Some(driver.to_string()),
            _ => None,
        })
        .collect()
}

#[test]
fn the_radius_grows_by_steps_up_to_its_maximum() {
    let s = settings();
    assert_eq!(s.radius_at(Duration::ZERO), 5_000.0);
    assert_eq!(s.radius_at(Duration::from_millis(9_999)), 5_000.0);
    assert_eq!(s.radius_at(Duration::from_secs(10)), 6_000.0);
    assert_eq!(s.radius_at(Duration::from_secs(25)), 7_000.0);
    assert_eq!(s.radius_at(Duration::from_secs(3_600)), 7_000.0);
    let t0 = Instant::now();
    assert_eq!(
        s.next_widening(t0, t0 + Duration::from_secs(3)),
        Some(t0 + Duration::from_secs(10))
    );
    assert_eq!(s.next_widening(t0, t0 + Duration::from_secs(20)), None);
    let fixed = SearchSettings {
        radius_step_m: 0.0,
        ..settings()
    };
    assert_eq!(fixed.radius_at(Duration::from_secs(600)), 5_000.0);
    assert_eq!(fixed.next_widening(t0, t0), None);
}

#[test]
fn a_waiting_search_reaches_a_driver_just_outside_its_first_radius() {
    let t0 = Instant::now();
    let mut searches: Searches<u32> = Searches::new(settings(), Arc::new(Ids::default()), None);
    searches.driver_changed(t0, "far".into(), Some(north(6_500.0)));
    searches.driver_changed(t0, "too-far".into(), Some(north(7_500.0)));
    searches.request(t0, 1, "r1".into(), 1, "q1".into(), pickup(), t0);
    assert!(locked(&searches.take_effects()).is_empty());
    assert_eq!(searches.counts().waiting, 1);

    // At 10 s the radius is 6 km: still nobody. At 20 s, 7 km: "far".
    assert_eq!(searches.next_timeout(), Some(t0 + Duration::from_secs(10)));
    searches.tick(t0 + Duration::from_secs(10));
    assert!(locked(&searches.take_effects()).is_empty());
    assert_eq!(searches.next_timeout(), Some(t0 + Duration::from_secs(20)));
    searches.tick(t0 + Duration::from_secs(20));
    assert_eq!(locked(&searches.take_effects()), ["far"]);
}

#[test]
fn a_driver_freeing_up_wakes_a_parked_search_within_its_grown_radius() {
    let t0 = Instant::now();
    let mut searches: Searches<u32> = Searches::new(settings(), Arc::new(Ids::default()), None);
    searches.request(t0, 1, "r1".into(), 1, "q1".into(), pickup(), t0);
    searches.take_effects();
    // Before the radius grew, a driver at 5.5 km is out of reach...
    searches.driver_changed(
        t0 + Duration::from_secs(5),
        "d".into(),
        Some(north(5_500.0)),
    );
    assert!(locked(&searches.take_effects()).is_empty());
    searches.driver_changed(t0 + Duration::from_secs(5), "d".into(), None);
    // ...after, the same driver becoming available is offered at once.
    let later = t0 + Duration::from_secs(11);
    searches.tick(later);
    searches.take_effects();
    searches.driver_changed(later, "d".into(), Some(north(5_500.0)));
    assert_eq!(locked(&searches.take_effects()), ["d"]);
}

#[test]
fn past_the_oldest_parked_searches_the_index_finds_one_within_its_grown_radius() {
    // More parked searches than the oldest-first scan looks at: the 64
    // oldest are far away, so the driver is found through the index of
    // parked pickups, each with its own (grown) radius.
    let t0 = Instant::now();
    let mut searches: Searches<u32> = Searches::new(settings(), Arc::new(Ids::default()), None);
    let far = LatLon::new(52.0, 13.405).unwrap();
    for i in 0..64 {
        let rider = format!("far{i}");
        searches.request(t0, 1, rider.as_str().into(), 1, "q".into(), far, t0);
    }
    for i in 0..6 {
        let rider = format!("near{i}");
        searches.request(t0, 1, rider.as_str().into(), 1, "q".into(), pickup(), t0);
    }
    searches.take_effects();
    assert_eq!(searches.counts().waiting, 70);
    let at = north(5_500.0);
    searches.driver_changed(t0 + Duration::from_secs(5), "d".into(), Some(at));
    assert!(
        locked(&searches.take_effects()).is_empty(),
        "5.5 km: out of a 5 km radius"
    );
    searches.driver_changed(t0 + Duration::from_secs(5), "d".into(), None);
    let later = t0 + Duration::from_secs(11);
    searches.tick(later);
    searches.take_effects();
    searches.driver_changed(later, "d".into(), Some(at));
    let asked: Vec<String> = searches
        .take_effects()
        .iter()
        .filter_map(|e| match e {
            SearchEffect::Lock { holder, .. } => Some(holder.rider_id.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(asked, ["near0"], "the oldest in reach, at 6 km");
}

#[test]
fn a_full_batch_is_assigned_before_its_window_closes() {
    use ridelock::core::search::MAX_BATCH;
    let t0 = Instant::now();
    let settings = SearchSettings {
        dispatch: Dispatch::Batch {
            window: Duration::from_millis(500),
            wait_m: 0,
            max_waits: 0,
        },
        max_searches: 10_000,
        ..settings()
    };
    let mut searches: Searches<u32> = Searches::new(settings, Arc::new(Ids::default()), None);
    // Riders 30 m apart along a street, each with a driver 10 m away.
    for i in 0..MAX_BATCH {
        let at = north(i as f64 * 30.0 + 10.0);
        searches.driver_changed(t0, format!("d{i}").into(), Some(at));
    }
    for i in 0..MAX_BATCH - 1 {
        let rider = format!("r{i}");
        let at = north(i as f64 * 30.0);
        searches.request(t0, 1, rider.as_str().into(), 1, "q".into(), at, t0);
    }
    assert!(
        locked(&searches.take_effects()).is_empty(),
        "the window is open"
    );
    let last = north((MAX_BATCH - 1) as f64 * 30.0);
    searches.request(t0, 1, "last".into(), 1, "q".into(), last, t0);
    let mut drivers = locked(&searches.take_effects());
    assert_eq!(drivers.len(), MAX_BATCH, "full: assigned at once");
    drivers.sort();
    drivers.dedup();
    assert_eq!(drivers.len(), MAX_BATCH, "each driver once");
}

#[test]
fn a_request_cancelled_and_asked_again_in_one_window_asks_one_driver() {
    // The review found it: the batch kept the cancelled request's key, and
    // the same id asked again was in the batch twice: two drivers were
    // asked for one search, and the first stayed "being locked" for good.
    let t0 = Instant::now();
    let settings = SearchSettings {
        dispatch: Dispatch::Batch {
            window: Duration::from_millis(500),
            wait_m: 0,
            max_waits: 0,
        },
        ..settings()
    };
    let mut searches: Searches<u32> = Searches::new(settings, Arc::new(Ids::default()), None);
    searches.driver_changed(t0, "d1".into(), Some(north(100.0)));
    searches.driver_changed(t0, "d2".into(), Some(north(200.0)));
    searches.request(t0, 1, "r1".into(), 1, "q".into(), pickup(), t0);
    searches.cancel(t0, 1, "r1".into(), "q".into());
    searches.request(t0, 1, "r1".into(), 1, "q".into(), pickup(), t0);
    searches.take_effects();
    searches.tick(t0 + Duration::from_millis(500));
    assert_eq!(locked(&searches.take_effects()), ["d1"]);
}

fn waiting_batch() -> SearchSettings {
    SearchSettings {
        dispatch: Dispatch::Batch {
            window: Duration::from_millis(500),
            wait_m: 200,
            max_waits: 2,
        },
        ..settings()
    }
}

#[test]
fn a_batched_request_waits_for_a_nearer_driver() {
    let t0 = Instant::now();
    let ms = |n| t0 + Duration::from_millis(n);
    let mut searches: Searches<u32> =
        Searches::new(waiting_batch(), Arc::new(Ids::default()), None);
    searches.driver_changed(t0, "far".into(), Some(north(1_000.0)));
    searches.request(t0, 1, "r1".into(), 1, "q".into(), north(0.0), t0);
    searches.tick(ms(500));
    assert_eq!(
        locked(&searches.take_effects()),
        Vec::<String>::new(),
        "1 km is worse than waiting 200 m' worth"
    );
    assert_eq!(searches.next_timeout(), Some(ms(1_000)), "the next window");
    // A driver frees up 50 m away meanwhile: not handed out on its own
    // (the request is not parked), but by the next window.
    searches.driver_changed(ms(700), "near".into(), Some(north(50.0)));
    assert_eq!(locked(&searches.take_effects()), Vec::<String>::new());
    searches.tick(ms(1_000));
    assert_eq!(locked(&searches.take_effects()), ["near"]);
}

#[test]
fn a_batched_request_takes_the_best_it_can_get_after_its_last_wait() {
    let t0 = Instant::now();
    let ms = |n| t0 + Duration::from_millis(n);
    let mut searches: Searches<u32> =
        Searches::new(waiting_batch(), Arc::new(Ids::default()), None);
    searches.driver_changed(t0, "far".into(), Some(north(1_000.0)));
    searches.driver_changed(t0, "near".into(), Some(north(150.0)));
    searches.request(t0, 1, "r1".into(), 1, "q".into(), north(0.0), t0);
    searches.request(t0, 2, "r2".into(), 1, "q".into(), north(20.0), t0);
    // Two riders, one driver within 200 m: one takes it, the other waits.
    searches.tick(ms(500));
    assert_eq!(locked(&searches.take_effects()), ["near"]);
    searches.tick(ms(1_000));
    assert_eq!(
        locked(&searches.take_effects()),
        Vec::<String>::new(),
        "waited once"
    );
    searches.tick(ms(1_500));
    assert_eq!(
        locked(&searches.take_effects()),
        ["far"],
        "after two waits, the nearest there is"
    );
    assert_eq!(
        searches.next_timeout(),
        Some(t0 + settings().search_timeout)
    );
}

#[test]
fn a_batch_closing_early_when_full_does_not_use_up_a_requests_wait() {
    // The review found it: waiting requests counted towards a batch's 256,
    // and each early close counted as a window waited, so a burst of
    // requests made a waiting rider take a far driver within milliseconds.
    use ridelock::core::search::MAX_BATCH;
    let t0 = Instant::now();
    let ms = |n| t0 + Duration::from_millis(n);
    let settings = SearchSettings {
        max_searches: 10_000,
        ..waiting_batch()
    };
    let mut searches: Searches<u32> = Searches::new(settings, Arc::new(Ids::default()), None);
    searches.driver_changed(t0, "far".into(), Some(north(1_000.0)));
    searches.request(t0, 1, "r1".into(), 1, "q".into(), north(0.0), t0);
    searches.tick(ms(500));
    assert_eq!(locked(&searches.take_effects()), Vec::<String>::new());
    // A burst, 100 km away from every driver: batches close when full.
    for i in 0..MAX_BATCH + 10 {
        let rider = format!("burst{i}");
        searches.request(
            ms(600),
            2,
            rider.as_str().into(),
            1,
            "q".into(),
            north(100_000.0),
            ms(600),
        );
    }
    assert_eq!(
        locked(&searches.take_effects()),
        Vec::<String>::new(),
        "still waiting: its two windows are not over"
    );
    searches.tick(ms(1_000));
    assert_eq!(locked(&searches.take_effects()), Vec::<String>::new());
    searches.tick(ms(1_500));
    assert_eq!(locked(&searches.take_effects()), ["far"]);
}

#[test]
fn requests_held_for_a_nearer_driver_are_bounded() {
    // The review's note: held requests did not count towards a batch's
    // 256, so a burst with nobody near would make one assignment as large
    // as the burst. Past MAX_HELD, a request takes what it can get.
    use ridelock::core::search::{MAX_BATCH, MAX_HELD};
    let t0 = Instant::now();
    let settings = SearchSettings {
        max_searches: 10_000,
        ..waiting_batch()
    };
    let mut searches: Searches<u32> = Searches::new(settings, Arc::new(Ids::default()), None);
    searches.driver_changed(t0, "far".into(), Some(north(1_000.0)));
    let burst = MAX_HELD + MAX_BATCH;
    for i in 0..burst {
        let rider = format!("r{i}");
        searches.request(t0, 1, rider.as_str().into(), 1, "q".into(), north(0.0), t0);
    }
    assert_eq!(
        locked(&searches.take_effects()),
        ["far"],
        "past the held ones, a request takes the far driver"
    );
    assert_eq!(
        searches.counts().waiting,
        MAX_BATCH - 1,
        "and the rest park"
    );
}

#[test]
fn a_batched_request_does_not_wait_past_its_deadline() {
    // The review found it: with a short search timeout a request waited
    // for a nearer driver until its deadline ended it with no_driver,
    // although a driver was free all along.
    let t0 = Instant::now();
    let ms = |n| t0 + Duration::from_millis(n);
    let settings = SearchSettings {
        search_timeout: Duration::from_secs(2),
        dispatch: Dispatch::Batch {
            window: Duration::from_millis(500),
            wait_m: 200,
            max_waits: 4,
        },
        ..settings()
    };
    let mut searches: Searches<u32> = Searches::new(settings, Arc::new(Ids::default()), None);
    searches.driver_changed(t0, "far".into(), Some(north(1_000.0)));
    searches.request(t0, 1, "r1".into(), 1, "q".into(), north(0.0), t0);
    for at in [500, 1_000] {
        searches.tick(ms(at));
        assert_eq!(locked(&searches.take_effects()), Vec::<String>::new());
    }
    searches.tick(ms(1_500));
    assert_eq!(
        locked(&searches.take_effects()),
        ["far"],
        "the last window before the deadline"
    );
}

fn indexed(effects: &[DriverEffect]) -> Vec<Option<LatLon>> {
    effects
        .iter()
        .filter_map(|e| match e {
            DriverEffect::Indexed { at, .. } => Some(*at),
            _ => None,
        })
        .collect()
}

#[test]
fn a_driver_whose_location_went_stale_leaves_the_index_until_its_next_one() {
    let max_age = Duration::from_secs(60);
    let t0 = Instant::now();
    let mut driver = Booking::new("d1".into(), Arc::new(Ids::default()), None, max_age);
    let command = |command| DriverEvent::Command {
        session: 1,
        command,
    };
    let at = pickup();
    let location = || {
        command(DriverCommand::Location {
            lat: at.lat,
            lon: at.lon,
        })
    };
    driver.handle(t0, DriverEvent::Attach { session: 1 });
    driver.handle(t0, location());
    driver.handle(t0, command(DriverCommand::Available));
    assert_eq!(indexed(&driver.take_effects()), [Some(at)]);

    // Updates keep it fresh; the check comes once per max age, and is then
    // put off to the newest update's age.
    driver.handle(t0 + Duration::from_secs(30), location());
    assert_eq!(driver.next_timeout(), Some(t0 + max_age));
    driver.handle(t0 + max_age, DriverEvent::Tick);
    assert!(indexed(&driver.take_effects()).is_empty());
    assert!(driver.lock().is_offerable());
    assert_eq!(
        driver.next_timeout(),
        Some(t0 + Duration::from_secs(30) + max_age)
    );

    // Silent for longer than the max age: out of the index, connection open.
    driver.handle(t0 + Duration::from_secs(90), DriverEvent::Tick);
    assert_eq!(indexed(&driver.take_effects()), [None]);
    assert!(!driver.lock().is_offerable());
    assert!(driver.lock().is_connected());

    // The next location puts it back.
    driver.handle(t0 + Duration::from_secs(100), location());
    assert_eq!(indexed(&driver.take_effects()), [Some(at)]);
    assert!(driver.lock().is_offerable());
}

fn indexed_and_announced(effects: &[DriverEffect]) -> Vec<(Option<LatLon>, bool)> {
    effects
        .iter()
        .filter_map(|e| match e {
            DriverEffect::Indexed { at, announce } => Some((*at, *announce)),
            _ => None,
        })
        .collect()
}

#[test]
fn other_nodes_hear_of_moves_past_50_m_across_a_border_and_every_change_of_offerability() {
    let areas = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/service-area.geojson"
    ))
    .unwrap();
    let t0 = Instant::now();
    let mut driver = Booking::new(
        "d1".into(),
        Arc::new(Ids::default()),
        // The flag is the core's either way; one node's actor ignores it
        // (and a cluster node's first asks Redis for a current trip).
        None,
        Duration::from_secs(60),
    );
    driver.serve_only(Arc::new(ServiceAreas::from_geojson(&areas).unwrap()));
    let command = |command| DriverEvent::Command {
        session: 1,
        command,
    };
    let location = |at: LatLon| {
        command(DriverCommand::Location {
            lat: at.lat,
            lon: at.lon,
        })
    };
    driver.handle(t0, DriverEvent::Attach { session: 1 });
    driver.handle(t0, location(north(0.0)));
    driver.handle(t0, command(DriverCommand::Available));
    assert_eq!(
        indexed_and_announced(&driver.take_effects()),
        [(Some(north(0.0)), true)]
    );
    let mut at = |metres: f64| {
        driver.handle(t0, location(north(metres)));
        (north(metres), indexed_and_announced(&driver.take_effects()))
    };
    // The matcher's own index follows every 5 m; other nodes every 50 m.
    let (p, seen) = at(10.0);
    assert_eq!(seen, [(Some(p), false)]);
    let (p, seen) = at(40.0);
    assert_eq!(seen, [(Some(p), false)]);
    let (_, seen) = at(42.0);
    assert!(seen.is_empty(), "2 m: not even the index");
    let (p, seen) = at(60.0);
    assert_eq!(seen, [(Some(p), true)], "60 m from the last announcement");
    // The area's northern edge is at 52.55°, about 3,336 m north.
    let (p, seen) = at(3_300.0);
    assert_eq!(seen, [(Some(p), true)]);
    let (p, seen) = at(3_320.0);
    assert_eq!(seen, [(Some(p), false)]);
    let (p, seen) = at(3_345.0);
    assert_eq!(seen, [(Some(p), true)], "45 m, but out of the area");
    driver.handle(t0, command(DriverCommand::Unavailable));
    assert_eq!(
        indexed_and_announced(&driver.take_effects()),
        [(None, true)]
    );
    assert_eq!(driver.announced_at(), None);
}

mod batches {
    //! Batch dispatch through the pure core, with drivers coming, going
    //! away (stale, unavailable) and moving out of the service area at
    //! random, riders cancelling and asking again under the same ids, and
    //! offers timing out: no lock is asked of a driver that is not offerable
    //! at that moment or already asked, and every request ends exactly once.

    use std::collections::{HashMap, HashSet};

    use proptest::prelude::*;
    use ridelock::areas::ServiceAreas;
    use ridelock::core::lock::{Ending, LockRefused, OfferId};
    use ridelock::core::search::{Dispatch, LockAnswer, OfferOutcome, SearchEffect, Searches};
    use ridelock::core::Granted;
    use ridelock::protocol::{DriverId, ServerMessage};

    use super::*;

    const AREA: &str = r#"{"type":"FeatureCollection","features":[{"type":"Feature","properties":{"name":"served"},"geometry":{"type":"Polygon","coordinates":[[[13.38,52.50],[13.43,52.50],[13.43,52.54],[13.38,52.54],[13.38,52.50]]]}}]}"#;

    #[derive(Clone, Debug)]
    enum Op {
        /// Driver d reports a position (x, y on a grid that runs past the
        /// area's eastern edge), or goes away.
        Driver(u8, Option<(u8, u8)>),
        /// Rider r asks (request id q) for a ride from grid point (x, y).
        Request(u8, u8, u8, u8),
        /// Rider r cancels request q.
        Cancel(u8, u8),
        Answer(usize, bool),
        End(usize, bool),
        Wait(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u8..8, proptest::option::weighted(0.8, (0u8..10, 0u8..10)))
                .prop_map(|(d, at)| Op::Driver(d, at)),
            3 => (0u8..3, 0u8..3, 0u8..10, 0u8..10).prop_map(|(r, q, x, y)| Op::Request(r, q, x, y)),
            1 => (0u8..3, 0u8..3).prop_map(|(r, q)| Op::Cancel(r, q)),
            2 => (0usize..4, any::<bool>()).prop_map(|(i, grant)| Op::Answer(i, grant)),
            2 => (0usize..4, any::<bool>()).prop_map(|(i, accept)| Op::End(i, accept)),
            2 => (1u16..2_000).prop_map(Op::Wait),
        ]
    }

    /// Grid point (x, y): x = 9 is east of the area.
    fn spot(x: u8, y: u8) -> LatLon {
        LatLon::new(52.505 + f64::from(y) * 0.003, 13.385 + f64::from(x) * 0.005).unwrap()
    }

    /// What the drivers' actors and the riders' apps would know.
    struct Model {
        areas: Arc<ServiceAreas>,
        searches: Searches<u32>,
        now: Instant,
        /// Where each driver is offerable.
        offerable: HashMap<String, LatLon>,
        /// Drivers with a lock request or an offer out.
        held: HashSet<String>,
        asked: Vec<LockAnswer>,
        granted: Vec<OfferOutcome>,
        /// `searching` and final messages per request id.
        searching: HashMap<String, usize>,
        endings: HashMap<String, usize>,
        trips: u64,
    }

    impl Model {
        fn driver_free(&mut self, driver: &DriverId, at: LatLon) {
            self.held.remove(&**driver);
            self.offerable.insert(driver.to_string(), at);
            self.searches
                .driver_changed(self.now, driver.clone(), Some(at));
        }

        /// Takes the core's effects, checking each, until none are left
        /// (withdrawals are answered as the driver's actor would).
        fn absorb(&mut self) -> Result<(), TestCaseError> {
            loop {
                let effects = self.searches.take_effects();
                if effects.is_empty() {
                    return Ok(());
                }
                let mut withdrawn: Vec<(DriverId, OfferId)> = Vec::new();
                for effect in effects {
                    match effect {
                        SearchEffect::Lock {
                            driver,
                            offer_id,
                            holder,
                            ..
                        } => {
                            let at = self.offerable.get(&*driver);
                            prop_assert!(at.is_some(), "{driver} asked while not offerable");
                            prop_assert!(
                                self.areas.area_of(*at.unwrap()).is_some(),
                                "{driver} outside"
                            );
                            prop_assert!(
                                self.held.insert(driver.to_string()),
                                "{driver} asked twice"
                            );
                            self.asked.push(LockAnswer {
                                driver_id: driver,
                                offer_id,
                                search: holder.search,
                                rider_id: holder.rider_id,
                                request_id: holder.request_id,
                                result: Err(LockRefused::Offline),
                                node: None,
                            });
                        }
                        SearchEffect::Cancel {
                            driver, offer_id, ..
                        } => withdrawn.push((driver, offer_id)),
                        SearchEffect::Tell { message, .. } => match message {
                            ServerMessage::Searching { request_id } => {
                                *self.searching.entry(request_id.to_string()).or_default() += 1;
                            }
                            ServerMessage::Matched { request_id, .. }
                            | ServerMessage::NoDriver { request_id, .. }
                            | ServerMessage::Cancelled { request_id } => {
                                let id = request_id.to_string();
                                *self.endings.entry(id.clone()).or_default() += 1;
                                prop_assert!(
                                    self.endings[&id]
                                        <= self.searching.get(&id).copied().unwrap_or(0),
                                    "{id} ended more often than it was taken"
                                );
                            }
                            ServerMessage::Error { .. } => {}
                            other => prop_assert!(false, "unexpected {other:?}"),
                        },
                        other => prop_assert!(false, "unexpected {other:?}"),
                    }
                }
                // A withdrawn offer ends as cancelled; a withdrawn grant the
                // search no longer waited for simply frees the driver.
                for (driver, offer_id) in withdrawn {
                    if let Some(i) = self.granted.iter().position(|o| o.offer_id == offer_id) {
                        let mut outcome = self.granted.remove(i);
                        outcome.ending = Ending::RiderCancelled;
                        self.searches.offer_ended(self.now, outcome);
                    }
                    if self.held.contains(&*driver)
                        && !self.asked.iter().any(|a| a.driver_id == driver)
                    {
                        self.driver_free(&driver, spot(0, 0));
                    }
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn batches_offer_only_offerable_drivers_and_end_every_request_once(
            ops in proptest::collection::vec(op(), 1..150)
        ) {
            let areas = Arc::new(ServiceAreas::from_geojson(AREA).unwrap());
            let mut settings = settings();
            // Waiting for a nearer driver too: a request may sit out up
            // to two windows.
            settings.dispatch = Dispatch::Batch {
                window: Duration::from_millis(300),
                wait_m: 150,
                max_waits: 2,
            };
            settings.search_timeout = Duration::from_secs(5);
            let mut searches: Searches<u32> = Searches::new(settings, Arc::new(Ids::default()), None);
            searches.serve_only(areas.clone());
            let mut m = Model {
                areas,
                searches,
                now: Instant::now(),
                offerable: HashMap::new(),
                held: HashSet::new(),
                asked: Vec::new(),
                granted: Vec::new(),
                searching: HashMap::new(),
                endings: HashMap::new(),
                trips: 0,
            };
            for op in ops {
                let now = m.now;
                match op {
                    Op::Driver(d, at) => {
                        let name = format!("d{d}");
                        if m.held.contains(&name) {
                            continue; // its actor says nothing while it is asked or offered
                        }
                        let at = at.map(|(x, y)| spot(x, y));
                        match at {
                            Some(at) => m.offerable.insert(name.clone(), at),
                            None => m.offerable.remove(&name),
                        };
                        m.searches.driver_changed(now, name.as_str().into(), at);
                    }
                    Op::Request(r, q, x, y) => {
                        let (rider, request) = (format!("r{r}"), format!("r{r}-q{q}"));
                        m.searches.request(now, 1, rider.as_str().into(), 1, request.as_str().into(), spot(x, y), now);
                    }
                    Op::Cancel(r, q) => {
                        let (rider, request) = (format!("r{r}"), format!("r{r}-q{q}"));
                        m.searches.cancel(now, 1, rider.as_str().into(), request.as_str().into());
                    }
                    Op::Answer(i, grant) if i < m.asked.len() => {
                        let mut answer = m.asked.remove(i);
                        if grant {
                            answer.result = Ok(Granted { fencing_token: 1 });
                            // Granted: the driver is offered, not offerable.
                            m.offerable.remove(&*answer.driver_id);
                            m.granted.push(OfferOutcome {
                                driver_id: answer.driver_id.clone(),
                                driver_location: None,
                                offer_id: answer.offer_id,
                                search: answer.search,
                                rider_id: answer.rider_id.clone(),
                                request_id: answer.request_id.clone(),
                                ending: Ending::Declined,
                                trip_id: None,
                            });
                        } else {
                            m.held.remove(&*answer.driver_id);
                        }
                        m.searches.lock_answered(now, answer);
                    }
                    Op::End(i, accept) if i < m.granted.len() => {
                        let mut outcome = m.granted.remove(i);
                        let driver = outcome.driver_id.clone();
                        if accept {
                            m.trips += 1;
                            outcome.ending = Ending::Accepted;
                            outcome.trip_id = Some(m.trips);
                        }
                        m.searches.offer_ended(now, outcome);
                        if accept {
                            m.held.remove(&*driver); // on its trip: never offerable here again
                        } else {
                            m.driver_free(&driver, spot(0, 0));
                        }
                    }
                    Op::Answer(..) | Op::End(..) => {}
                    Op::Wait(ms) => {
                        m.now += Duration::from_millis(u64::from(ms));
                        m.searches.tick(m.now);
                    }
                }
                m.absorb()?;
            }
            // Wind down: every lock refused, every offer declined, time runs out.
            for _ in 0..40 {
                for answer in std::mem::take(&mut m.asked) {
                    m.held.remove(&*answer.driver_id);
                    m.searches.lock_answered(m.now, answer);
                }
                for outcome in std::mem::take(&mut m.granted) {
                    m.held.remove(&*outcome.driver_id);
                    m.searches.offer_ended(m.now, outcome);
                }
                m.now += Duration::from_millis(500);
                m.searches.tick(m.now);
                m.absorb()?;
            }
            prop_assert!(m.asked.is_empty() && m.granted.is_empty());
            prop_assert_eq!(m.searches.counts().searches, 0);
            prop_assert_eq!(&m.endings, &m.searching, "every request that got searching ended once");
        }
    }
}

/// Wound-wait's second moment (see `core::search::wound`): an older group's
/// member that parked while a younger member's lock was still on its way
/// takes the driver as soon as the grant comes in, rather than waiting
/// beside it for its deadline.
#[test]
fn an_older_group_parked_beside_a_lock_in_flight_takes_the_driver_once_granted() {
    use ridelock::core::lock::Ending;
    use ridelock::core::search::LockAnswer;
    use ridelock::core::Granted;

    let t0 = Instant::now();
    let settings = SearchSettings {
        radius_m: 1_000.0,
        radius_step_m: 2_000.0,
        radius_step: Duration::from_secs(2),
        max_radius_m: 3_000.0,
        ..settings()
    };
    let mut searches: Searches<u32> = Searches::new(settings, Arc::new(Ids::default()), None);
    let near = north(100.0);
    searches.driver_changed(t0, "near".into(), Some(near));
    // The older group waits 2.5 km south of the driver: out of reach.
    let south = LatLon::new(52.52 - 2_500.0 / 111_195.0, 13.405).unwrap();
    let older = ("old".into(), 1, "g".into(), south, t0);
    searches.request_vehicles(t0, 1, older, 2);
    assert!(locked(&searches.take_effects()).is_empty());
    // The younger group, beside the driver, asks it for a lock...
    let t1 = t0 + Duration::from_millis(100);
    searches.request_vehicles(t1, 2, ("young".into(), 1, "g".into(), pickup(), t1), 2);
    let effects = searches.take_effects();
    let (offer_id, holder) = effects
        .iter()
        .find_map(|e| match e {
            SearchEffect::Lock {
                driver,
                offer_id,
                holder,
                ..
            } if &**driver == "near" => Some((*offer_id, holder.clone())),
            _ => None,
        })
        .expect("the younger group asks the driver beside it");
    // ...and while the answer is on its way the older group's radius grows
    // to reach it: nobody free, nothing to take yet (the lock is in flight).
    let t2 = t0 + Duration::from_secs(2);
    searches.tick(t2);
    let effects = searches.take_effects();
    assert!(
        !effects
            .iter()
            .any(|e| matches!(e, SearchEffect::Cancel { .. })),
        "{effects:?}"
    );
    // The grant comes in: the older group takes the driver at once.
    let answer = LockAnswer {
        driver_id: "near".into(),
        offer_id,
        search: holder.search,
        rider_id: holder.rider_id.clone(),
        request_id: holder.request_id.clone(),
        result: Ok(Granted { fencing_token: 9 }),
        node: None,
    };
    searches.lock_answered(t2, answer);
    let effects = searches.take_effects();
    assert!(
        effects.iter().any(|e| matches!(
            e,
            SearchEffect::Cancel { driver, offer_id: o, fencing_token: 9, why: Ending::Preempted, .. }
                if &**driver == "near" && *o == offer_id
        )),
        "{effects:?}"
    );
}
