//! Who a search may reach, driven through the pure core with time passed
//! in: a radius that grows while a rider waits, and drivers whose last
//! location is too old to be offered by.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ridelock::core::booking::{Booking, DriverEffect, DriverEvent};
use ridelock::core::search::{SearchEffect, SearchSettings, Searches};
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

fn indexed(effects: &[DriverEffect]) -> Vec<Option<LatLon>> {
    effects
        .iter()
        .filter_map(|e| match e {
            DriverEffect::Indexed(at) => Some(*at),
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
