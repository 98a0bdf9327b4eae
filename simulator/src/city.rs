//! The simulated city: where drivers and riders are, and how drivers move.

use rand::Rng;
use ridelock::location::LatLon;

/// Metres per degree of latitude (and of longitude at the equator).
const METRES_PER_DEGREE: f64 = 111_320.0;

/// A disc-shaped city.
#[derive(Clone, Copy, Debug)]
pub struct City {
    centre: LatLon,
    radius_m: f64,
}

impl City {
    /// A city of `radius_m` metres around `centre`.
    pub fn new(centre: LatLon, radius_m: f64) -> Self {
        City { centre, radius_m }
    }

    /// A point uniformly distributed over the city's area.
    pub fn random_point(&self, rng: &mut impl Rng) -> LatLon {
        // sqrt: uniform over the area, not bunched at the centre.
        let r = self.radius_m * rng.random::<f64>().sqrt();
        let bearing = rng.random::<f64>() * std::f64::consts::TAU;
        offset(self.centre, r * bearing.cos(), r * bearing.sin())
    }
}

/// `at` moved `north_m` metres north and `east_m` east (flat-earth steps are
/// exact enough within a city).
pub fn offset(at: LatLon, north_m: f64, east_m: f64) -> LatLon {
    let lat = (at.lat + north_m / METRES_PER_DEGREE).clamp(-89.9, 89.9);
    let lon = at.lon + east_m / (METRES_PER_DEGREE * lat.to_radians().cos());
    let lon = (lon + 540.0).rem_euclid(360.0) - 180.0;
    LatLon { lat, lon }
}

/// A driver cruising between random destinations at street speed.
#[derive(Clone, Debug)]
pub struct Mover {
    /// Where the driver is.
    pub at: LatLon,
    target: LatLon,
    speed_mps: f64,
}

impl Mover {
    /// A driver at `at` heading for a random point of `city`.
    pub fn new(at: LatLon, speed_mps: f64, city: &City, rng: &mut impl Rng) -> Self {
        Mover {
            at,
            target: city.random_point(rng),
            speed_mps,
        }
    }

    /// Advances `seconds` of driving; picks a new destination on arrival.
    pub fn step(&mut self, seconds: f64, city: &City, rng: &mut impl Rng) -> LatLon {
        let mut budget = self.speed_mps * seconds;
        while budget > 0.0 {
            let left = self.at.distance_m(self.target);
            if left <= budget {
                budget -= left;
                self.at = self.target;
                self.target = city.random_point(rng);
                if left == 0.0 {
                    break;
                }
            } else {
                let f = budget / left;
                let north = (self.target.lat - self.at.lat) * METRES_PER_DEGREE * f;
                let east = (self.target.lon - self.at.lon)
                    * METRES_PER_DEGREE
                    * self.at.lat.to_radians().cos()
                    * f;
                self.at = offset(self.at, north, east);
                budget = 0.0;
            }
        }
        self.at
    }

    /// Jumps to `at` (the end of a trip) and heads somewhere new.
    pub fn teleport(&mut self, at: LatLon, city: &City, rng: &mut impl Rng) {
        self.at = at;
        self.target = city.random_point(rng);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    fn berlin() -> City {
        City::new(LatLon::new(52.52, 13.405).unwrap(), 10_000.0)
    }

    #[test]
    fn random_points_stay_in_the_city_and_fill_it() {
        let city = berlin();
        let mut rng = SmallRng::seed_from_u64(1);
        let distances: Vec<f64> = (0..10_000)
            .map(|_| city.centre.distance_m(city.random_point(&mut rng)))
            .collect();
        assert!(distances.iter().all(|d| *d <= 10_050.0));
        // Uniform over the area: half the points lie beyond r/√2.
        let outer = distances
            .iter()
            .filter(|d| **d > 10_000.0 / 2f64.sqrt())
            .count();
        assert!((4_700..5_300).contains(&outer), "{outer}");
    }

    #[test]
    fn a_driver_moves_at_street_speed() {
        let city = berlin();
        let mut rng = SmallRng::seed_from_u64(2);
        let mut mover = Mover::new(city.random_point(&mut rng), 10.0, &city, &mut rng);
        for _ in 0..100 {
            let before = mover.at;
            let after = mover.step(4.0, &city, &mut rng);
            // Never farther than 40 m in 4 s (less when it turned at a destination).
            assert!(
                before.distance_m(after) <= 40.5,
                "{}",
                before.distance_m(after)
            );
            assert!(LatLon::new(after.lat, after.lon).is_ok());
        }
    }
}
