//! Points on the Earth: validated latitude/longitude and the great-circle
//! distance between them.

use geo::{Distance, Haversine, Point};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

/// The sphere geo's `Haversine` measures on (GRS80 mean radius), in metres.
/// The spatial index converts radii with the same value so that its filter and
/// the distances it reports agree.
pub const EARTH_RADIUS_M: f64 = 6_371_008.8;

/// A WGS84 position in degrees, as the apps send it.
///
/// Construct it with [`LatLon::new`] to have it validated; the serde
/// representation is `{"lat": .., "lon": ..}` and is validated by the protocol
/// layer before any engine code sees it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct LatLon {
    /// Latitude in degrees, -90..=90.
    pub lat: f64,
    /// Longitude in degrees, -180..=180.
    pub lon: f64,
}

/// Only `{"lat": .., "lon": ..}`: serde's derive would also take a
/// two-element array, and `[13.40, 52.52]` in GeoJSON's lon/lat order would
/// then silently become a pickup in the wrong place.
impl<'de> Deserialize<'de> for LatLon {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(field_identifier, rename_all = "lowercase")]
        enum Field {
            Lat,
            Lon,
            #[serde(other)]
            Other,
        }

        struct LatLonVisitor;

        impl<'de> Visitor<'de> for LatLonVisitor {
            type Value = LatLon;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(r#"an object {"lat": .., "lon": ..}"#)
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<LatLon, A::Error> {
                let (mut lat, mut lon) = (None, None);
                while let Some(field) = map.next_key()? {
                    match field {
                        Field::Lat if lat.is_some() => {
                            return Err(de::Error::duplicate_field("lat"))
                        }
                        Field::Lon if lon.is_some() => {
                            return Err(de::Error::duplicate_field("lon"))
                        }
                        Field::Lat => lat = Some(map.next_value()?),
                        Field::Lon => lon = Some(map.next_value()?),
                        Field::Other => {
                            map.next_value::<de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(LatLon {
                    lat: lat.ok_or_else(|| de::Error::missing_field("lat"))?,
                    lon: lon.ok_or_else(|| de::Error::missing_field("lon"))?,
                })
            }
        }

        deserializer.deserialize_map(LatLonVisitor)
    }
}

/// Why a coordinate was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CoordinateError {
    /// A value was NaN or infinite.
    #[error("lat and lon must be finite numbers")]
    NotFinite,
    /// Latitude outside -90..=90.
    #[error("lat {0} is out of range -90..=90")]
    LatitudeOutOfRange(f64),
    /// Longitude outside -180..=180.
    #[error("lon {0} is out of range -180..=180")]
    LongitudeOutOfRange(f64),
}

impl LatLon {
    /// A validated position.
    ///
    /// ```
    /// use ridelock::location::LatLon;
    /// assert!(LatLon::new(52.52, 13.405).is_ok());
    /// assert!(LatLon::new(91.0, 0.0).is_err());
    /// assert!(LatLon::new(f64::NAN, 0.0).is_err());
    /// ```
    pub fn new(lat: f64, lon: f64) -> Result<Self, CoordinateError> {
        LatLon { lat, lon }.validated()
    }

    /// Checks a position that came from outside (for example from serde).
    pub fn validated(self) -> Result<Self, CoordinateError> {
        if !self.lat.is_finite() || !self.lon.is_finite() {
            return Err(CoordinateError::NotFinite);
        }
        if !(-90.0..=90.0).contains(&self.lat) {
            return Err(CoordinateError::LatitudeOutOfRange(self.lat));
        }
        if !(-180.0..=180.0).contains(&self.lon) {
            return Err(CoordinateError::LongitudeOutOfRange(self.lon));
        }
        Ok(self)
    }

    /// Great-circle distance in metres (geo's Haversine).
    pub fn distance_m(self, other: LatLon) -> f64 {
        Haversine.distance(self.point(), other.point())
    }

    /// The position as a point on the unit sphere.
    ///
    /// Euclidean (chord) distance between unit vectors grows strictly with the
    /// great-circle angle, so an R-tree over these points returns neighbours in
    /// great-circle order, which degrees of lat/lon would not (a degree of
    /// longitude shrinks towards the poles and the antimeridian splits the map).
    pub fn unit_vector(self) -> [f64; 3] {
        let (lat, lon) = (self.lat.to_radians(), self.lon.to_radians());
        [lat.cos() * lon.cos(), lat.cos() * lon.sin(), lat.sin()]
    }

    fn point(self) -> Point<f64> {
        Point::new(self.lon, self.lat)
    }
}

/// The squared chord length on the unit sphere that spans `metres` of
/// great-circle distance: the R-tree's own metric for a radius in metres.
pub fn chord2_for_metres(metres: f64) -> f64 {
    let angle = (metres / EARTH_RADIUS_M).min(std::f64::consts::PI);
    let chord = 2.0 * (angle / 2.0).sin();
    chord * chord
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_distance_berlin_to_paris() {
        let berlin = LatLon::new(52.5200, 13.4050).unwrap();
        let paris = LatLon::new(48.8566, 2.3522).unwrap();
        let d = berlin.distance_m(paris);
        assert!((d - 877_500.0).abs() < 2_000.0, "got {d}");
    }

    #[test]
    fn refuses_out_of_range_and_non_finite() {
        assert_eq!(
            LatLon::new(-90.5, 0.0),
            Err(CoordinateError::LatitudeOutOfRange(-90.5))
        );
        assert_eq!(
            LatLon::new(0.0, 180.5),
            Err(CoordinateError::LongitudeOutOfRange(180.5))
        );
        assert_eq!(
            LatLon::new(0.0, f64::INFINITY),
            Err(CoordinateError::NotFinite)
        );
        assert!(LatLon::new(90.0, -180.0).is_ok());
    }

    #[test]
    fn chord_matches_unit_vectors() {
        let a = LatLon::new(10.0, 20.0).unwrap();
        let b = LatLon::new(10.01, 20.02).unwrap();
        let (ua, ub) = (a.unit_vector(), b.unit_vector());
        let d2: f64 = (0..3).map(|i| (ua[i] - ub[i]).powi(2)).sum();
        let expected = chord2_for_metres(a.distance_m(b));
        assert!((d2 - expected).abs() < 1e-15, "{d2} vs {expected}");
    }
}
