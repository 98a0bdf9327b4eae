//! Service areas: where the engine takes requests and offers drivers
//! (`--service-area FILE`).
//!
//! The file is GeoJSON (parsed by the `geojson` crate): a
//! `FeatureCollection` whose features are polygons or multipolygons, each
//! with a string `name` property (the label of its metrics). A point is in
//! an area when it lies inside the area or on its border. Areas are found
//! through an R-tree of their bounding boxes, so that a look-up costs a
//! few box tests and one exact test whatever the number of areas.

use geo::{BoundingRect, Intersects, MultiPolygon, Point};
use geojson::{GeoJson, GeometryValue};
use rstar::primitives::{GeomWithData, Rectangle};
use rstar::RTree;

use crate::location::LatLon;

/// Longest area name: names become metric labels.
pub const MAX_NAME_LEN: usize = 64;

/// Why a service-area file can't be used.
#[derive(Debug, thiserror::Error)]
pub enum AreaError {
    /// Not GeoJSON.
    #[error("not valid GeoJSON: {0}")]
    Parse(#[from] Box<geojson::Error>),
    /// GeoJSON, but not a feature collection of named areas.
    #[error("{0}")]
    Shape(String),
}

type Envelope = GeomWithData<Rectangle<[f64; 2]>, usize>;

/// The areas served, and an index of their bounding boxes.
#[derive(Debug)]
pub struct ServiceAreas {
    names: Vec<String>,
    shapes: Vec<MultiPolygon<f64>>,
    boxes: RTree<Envelope>,
}

impl ServiceAreas {
    /// Reads a GeoJSON `FeatureCollection` of named polygons and
    /// multipolygons; anything else is an error saying which feature and why.
    pub fn from_geojson(text: &str) -> Result<Self, AreaError> {
        let shape = |why: String| AreaError::Shape(why);
        let GeoJson::FeatureCollection(collection) = text.parse::<GeoJson>().map_err(Box::new)?
        else {
            return Err(shape(
                "a service-area file must be a GeoJSON FeatureCollection".into(),
            ));
        };
        if collection.features.is_empty() {
            return Err(shape("the FeatureCollection has no features".into()));
        }
        let mut names = Vec::new();
        let mut shapes = Vec::new();
        let mut envelopes = Vec::new();
        for (i, feature) in collection.features.iter().enumerate() {
            let name = match feature.property("name").and_then(|n| n.as_str()) {
                Some(name) if !name.is_empty() && name.len() <= MAX_NAME_LEN => name.to_string(),
                _ => {
                    return Err(shape(format!(
                        "feature {i} needs a string \"name\" property of 1 to {MAX_NAME_LEN} bytes"
                    )))
                }
            };
            if names.contains(&name) {
                return Err(shape(format!(
                    "feature {i}: the name {name:?} is used twice"
                )));
            }
            let area: MultiPolygon<f64> = match feature.geometry.as_ref().map(|g| &g.value) {
                Some(value @ GeometryValue::Polygon { .. }) => {
                    MultiPolygon::new(vec![value.try_into().map_err(Box::new)?])
                }
                Some(value @ GeometryValue::MultiPolygon { .. }) => {
                    value.try_into().map_err(Box::new)?
                }
                _ => {
                    return Err(shape(format!(
                        "feature {i} ({name}) must be a Polygon or a MultiPolygon"
                    )))
                }
            };
            let Some(bounds) = area.bounding_rect() else {
                return Err(shape(format!("feature {i} ({name}) has no points")));
            };
            let in_range =
                |x: f64, y: f64| (-180.0..=180.0).contains(&x) && (-90.0..=90.0).contains(&y);
            if !in_range(bounds.min().x, bounds.min().y)
                || !in_range(bounds.max().x, bounds.max().y)
            {
                return Err(shape(format!(
                    "feature {i} ({name}) has coordinates out of range (GeoJSON is [longitude, latitude])"
                )));
            }
            envelopes.push(GeomWithData::new(
                Rectangle::from_corners(bounds.min().into(), bounds.max().into()),
                shapes.len(),
            ));
            names.push(name);
            shapes.push(area);
        }
        Ok(ServiceAreas {
            names,
            shapes,
            boxes: RTree::bulk_load(envelopes),
        })
    }

    /// The name of an area `at` is in (the first in the file, if several).
    pub fn area_of(&self, at: LatLon) -> Option<&str> {
        let point = Point::new(at.lon, at.lat);
        self.boxes
            .locate_all_at_point(&[at.lon, at.lat])
            .map(|envelope| envelope.data)
            .filter(|&i| self.shapes[i].intersects(&point))
            .min()
            .map(|i| self.names[i].as_str())
    }

    /// The areas' names, in file order.
    pub fn names(&self) -> &[String] {
        &self.names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn square(name: &str, lon: f64, lat: f64, side: f64) -> String {
        format!(
            r#"{{"type":"Feature","properties":{{"name":"{name}"}},"geometry":{{"type":"Polygon","coordinates":[[[{lon},{lat}],[{},{lat}],[{},{}],[{lon},{}],[{lon},{lat}]]]}}}}"#,
            lon + side,
            lon + side,
            lat + side,
            lat + side
        )
    }

    fn collection(features: &[String]) -> String {
        format!(
            r#"{{"type":"FeatureCollection","features":[{}]}}"#,
            features.join(",")
        )
    }

    fn at(lat: f64, lon: f64) -> LatLon {
        LatLon::new(lat, lon).unwrap()
    }

    #[test]
    fn a_point_is_in_the_area_that_holds_it_border_included() {
        let areas = ServiceAreas::from_geojson(&collection(&[
            square("mitte", 13.0, 52.0, 1.0),
            square("east", 14.0, 52.0, 1.0),
        ]))
        .unwrap();
        assert_eq!(areas.area_of(at(52.5, 13.5)), Some("mitte"));
        assert_eq!(areas.area_of(at(52.5, 14.5)), Some("east"));
        assert_eq!(areas.area_of(at(52.0, 13.2)), Some("mitte"), "border");
        assert_eq!(
            areas.area_of(at(52.5, 14.0)),
            Some("mitte"),
            "shared border: the first"
        );
        assert_eq!(areas.area_of(at(51.9, 13.5)), None);
        assert_eq!(areas.names(), ["mitte", "east"]);
    }

    #[test]
    fn a_hole_and_a_multipolygon_are_honoured() {
        let text = r#"{"type":"FeatureCollection","features":[
          {"type":"Feature","properties":{"name":"ring"},"geometry":{"type":"Polygon","coordinates":[
            [[0,0],[10,0],[10,10],[0,10],[0,0]],
            [[4,4],[6,4],[6,6],[4,6],[4,4]]]}},
          {"type":"Feature","properties":{"name":"islands"},"geometry":{"type":"MultiPolygon","coordinates":[
            [[[20,0],[21,0],[21,1],[20,1],[20,0]]],
            [[[30,0],[31,0],[31,1],[30,1],[30,0]]]]}}]}"#;
        let areas = ServiceAreas::from_geojson(text).unwrap();
        assert_eq!(areas.area_of(at(1.0, 1.0)), Some("ring"));
        assert_eq!(areas.area_of(at(5.0, 5.0)), None, "in the hole");
        assert_eq!(areas.area_of(at(0.5, 30.5)), Some("islands"));
        assert_eq!(areas.area_of(at(0.5, 25.0)), None, "between the islands");
    }

    #[test]
    fn hundreds_of_areas_are_told_apart() {
        let features: Vec<String> = (0..400)
            .map(|i| square(&format!("cell-{i}"), (i % 20) as f64, (i / 20) as f64, 0.5))
            .collect();
        let areas = ServiceAreas::from_geojson(&collection(&features)).unwrap();
        for i in 0..400 {
            let (lon, lat) = ((i % 20) as f64 + 0.25, (i / 20) as f64 + 0.25);
            assert_eq!(
                areas.area_of(at(lat, lon)),
                Some(format!("cell-{i}").as_str())
            );
            assert_eq!(areas.area_of(at(lat + 0.5, lon + 0.5)), None);
        }
    }

    #[test]
    fn a_file_that_is_not_named_areas_is_refused_saying_why() {
        let refused = |text: &str| ServiceAreas::from_geojson(text).unwrap_err().to_string();
        assert!(refused("{").contains("not valid GeoJSON"));
        assert!(refused(r#"{"type":"Point","coordinates":[1,2]}"#).contains("FeatureCollection"));
        assert!(refused(&collection(&[])).contains("no features"));
        let unnamed = square("x", 1.0, 1.0, 1.0).replace(r#""name":"x""#, r#""title":"x""#);
        assert!(refused(&collection(&[unnamed])).contains("\"name\""));
        let line = r#"{"type":"Feature","properties":{"name":"road"},"geometry":{"type":"LineString","coordinates":[[0,0],[1,1]]}}"#;
        assert!(refused(&collection(&[line.to_string()])).contains("Polygon"));
        let twice = [square("a", 1.0, 1.0, 1.0), square("a", 3.0, 1.0, 1.0)];
        assert!(refused(&collection(&twice)).contains("twice"));
        assert!(
            refused(&collection(&[square("swapped", 13.0, 95.0, 1.0)])).contains("out of range")
        );
    }
}
