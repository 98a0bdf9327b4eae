//! The spatial index: who is near a point, nearest first, in metres.
//!
//! An R-tree (rstar) over points on the unit sphere. rstar's nearest-neighbour
//! search is Euclidean in the coordinates it is given; chord length between
//! unit vectors grows strictly with the great-circle angle, so searching unit
//! vectors yields neighbours in great-circle order. Distances reported (and
//! the radius filter) are geo's Haversine metres, measured on the same sphere.
//!
//! Moving an entry is remove-then-insert with its exact old point, which the
//! index keeps in a map per key, so an entry is never leaked or duplicated.

use std::collections::HashMap;
use std::hash::Hash;

use rstar::primitives::GeomWithData;
use rstar::RTree;

use crate::location::{chord2_for_metres, LatLon};

type Entry<K> = GeomWithData<[f64; 3], K>;

/// A set of keyed positions answering "nearest within R metres".
#[derive(Debug)]
pub struct SpatialIndex<K: Clone + Eq + Hash> {
    tree: RTree<Entry<K>>,
    positions: HashMap<K, (LatLon, [f64; 3])>,
}

impl<K: Clone + Eq + Hash> Default for SpatialIndex<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Clone + Eq + Hash> SpatialIndex<K> {
    /// An empty index.
    pub fn new() -> Self {
        SpatialIndex {
            tree: RTree::new(),
            positions: HashMap::new(),
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// Whether `key` is indexed.
    pub fn contains(&self, key: &K) -> bool {
        self.positions.contains_key(key)
    }

    /// The indexed position of `key`.
    pub fn position(&self, key: &K) -> Option<LatLon> {
        self.positions.get(key).map(|(at, _)| *at)
    }

    /// Inserts `key` at `at`, or moves it there. `O(log n)`.
    ///
    /// ```
    /// use ridelock::{location::LatLon, spatial::SpatialIndex};
    /// let mut index = SpatialIndex::new();
    /// index.upsert("d1", LatLon::new(52.52, 13.40).unwrap());
    /// index.upsert("d1", LatLon::new(52.53, 13.41).unwrap());
    /// assert_eq!(index.len(), 1);
    /// ```
    pub fn upsert(&mut self, key: K, at: LatLon) {
        let point = at.unit_vector();
        if let Some((old_at, old_point)) = self.positions.insert(key.clone(), (at, point)) {
            if old_at == at {
                return;
            }
            self.tree.remove(&GeomWithData::new(old_point, key.clone()));
        }
        self.tree.insert(GeomWithData::new(point, key));
    }

    /// Removes `key`; returns whether it was there. `O(log n)`.
    pub fn remove(&mut self, key: &K) -> bool {
        match self.positions.remove(key) {
            Some((_, point)) => {
                self.tree.remove(&GeomWithData::new(point, key.clone()));
                true
            }
            None => false,
        }
    }

    /// Entries within `radius_m` metres of `at`, nearest first, with their
    /// great-circle distance in metres. Lazy: each step costs about
    /// `O(log n)`, so taking the first few is cheap however large the index.
    ///
    /// ```
    /// use ridelock::{location::LatLon, spatial::SpatialIndex};
    /// let mut index = SpatialIndex::new();
    /// let centre = LatLon::new(48.8566, 2.3522).unwrap();
    /// index.upsert("far", LatLon::new(48.90, 2.3522).unwrap());
    /// index.upsert("near", LatLon::new(48.86, 2.3522).unwrap());
    /// let found: Vec<_> = index.nearest_within(centre, 10_000.0).map(|(k, _)| k).collect();
    /// assert_eq!(found, vec!["near", "far"]);
    /// ```
    pub fn nearest_within(&self, at: LatLon, radius_m: f64) -> impl Iterator<Item = (K, f64)> + '_ {
        let query = at.unit_vector();
        // A hair of slack so that float error in the chord conversion never
        // drops an entry the Haversine check below would keep.
        let max_chord2 = chord2_for_metres(radius_m) * (1.0 + 1e-9) + 1e-18;
        self.tree
            .nearest_neighbor_iter_with_distance_2(&query)
            .take_while(move |(_, d2)| *d2 <= max_chord2)
            .filter_map(move |(entry, _)| {
                let (position, _) = self.positions.get(&entry.data)?;
                let metres = at.distance_m(*position);
                (metres <= radius_m).then(|| (entry.data.clone(), metres))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ll(lat: f64, lon: f64) -> LatLon {
        LatLon::new(lat, lon).unwrap()
    }

    #[test]
    fn moving_never_duplicates_or_leaks() {
        let mut index = SpatialIndex::new();
        for step in 0..100 {
            index.upsert(1u32, ll(10.0 + step as f64 * 0.001, 10.0));
        }
        assert_eq!(index.len(), 1);
        assert_eq!(index.tree.size(), 1);
        assert!(index.remove(&1));
        assert!(!index.remove(&1));
        assert_eq!(index.tree.size(), 0);
    }

    #[test]
    fn finds_across_the_antimeridian() {
        let mut index = SpatialIndex::new();
        index.upsert("east", ll(0.0, 179.999));
        index.upsert("far", ll(0.0, 170.0));
        let found: Vec<_> = index.nearest_within(ll(0.0, -179.999), 1_000.0).collect();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, "east");
        assert!(found[0].1 < 300.0);
    }

    #[test]
    fn east_west_degrees_near_the_pole_are_short() {
        // At 80°N a degree of longitude is ~19 km, a degree of latitude ~111 km:
        // a degree-space index would rank these the wrong way round.
        let mut index = SpatialIndex::new();
        let centre = ll(80.0, 0.0);
        index.upsert("north", ll(80.3, 0.0));
        index.upsert("east", ll(80.0, 1.0));
        let found: Vec<_> = index
            .nearest_within(centre, 100_000.0)
            .map(|(k, _)| k)
            .collect();
        assert_eq!(found, vec!["east", "north"]);
    }

    fn point() -> impl Strategy<Value = LatLon> {
        // A city-sized box plus some far-away points.
        prop_oneof![
            4 => (52.3f64..52.7, 13.0f64..13.8).prop_map(|(a, o)| ll(a, o)),
            1 => (-89.9f64..89.9, -180.0f64..180.0).prop_map(|(a, o)| ll(a, o)),
        ]
    }

    #[derive(Debug, Clone)]
    enum Op {
        Upsert(u16, LatLon),
        Remove(u16),
    }

    proptest! {
        /// After random inserts, moves and removals, a query agrees with a
        /// brute-force Haversine scan: the same keys, nearest first.
        #[test]
        fn agrees_with_brute_force(
            ops in prop::collection::vec(prop_oneof![
                3 => (0u16..60, point()).prop_map(|(k, p)| Op::Upsert(k, p)),
                1 => (0u16..60).prop_map(Op::Remove),
            ], 1..300),
            centre in point(),
            radius_m in 10.0f64..30_000.0,
        ) {
            let mut index = SpatialIndex::new();
            let mut truth: HashMap<u16, LatLon> = HashMap::new();
            for op in ops {
                match op {
                    Op::Upsert(k, p) => { index.upsert(k, p); truth.insert(k, p); }
                    Op::Remove(k) => { prop_assert_eq!(index.remove(&k), truth.remove(&k).is_some()); }
                }
            }
            prop_assert_eq!(index.len(), truth.len());
            prop_assert_eq!(index.tree.size(), truth.len());

            let found: Vec<(u16, f64)> = index.nearest_within(centre, radius_m).collect();
            let mut expected: Vec<(u16, f64)> = truth
                .iter()
                .map(|(k, p)| (*k, centre.distance_m(*p)))
                .filter(|(_, d)| *d <= radius_m)
                .collect();
            expected.sort_by(|a, b| a.1.total_cmp(&b.1));

            let mut found_keys: Vec<u16> = found.iter().map(|(k, _)| *k).collect();
            let mut expected_keys: Vec<u16> = expected.iter().map(|(k, _)| *k).collect();
            found_keys.sort();
            expected_keys.sort();
            prop_assert_eq!(found_keys, expected_keys);
            // Nearest first (ties within a millimetre may come either way).
            for pair in found.windows(2) {
                prop_assert!(pair[0].1 <= pair[1].1 + 1e-3, "out of order: {:?}", pair);
            }
        }
    }
}
