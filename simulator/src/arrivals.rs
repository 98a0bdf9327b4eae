//! Rider arrivals: a Poisson process.

use std::time::Duration;

use rand::Rng;

/// Arrivals at a mean `rate_per_s`, independent of one another: gaps are
/// exponentially distributed.
#[derive(Clone, Copy, Debug)]
pub struct Poisson {
    rate_per_s: f64,
}

impl Poisson {
    /// A process with the given mean rate (0 means no arrivals).
    pub fn new(rate_per_s: f64) -> Self {
        Poisson { rate_per_s }
    }

    /// The gap until the next arrival; `None` when the rate is zero.
    pub fn next_gap(&self, rng: &mut impl Rng) -> Option<Duration> {
        if self.rate_per_s <= 0.0 {
            return None;
        }
        // Inverse transform sampling; 1 - u keeps ln away from zero.
        let u: f64 = rng.random();
        Some(Duration::from_secs_f64(-(1.0 - u).ln() / self.rate_per_s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    #[test]
    fn gaps_are_exponential_with_the_right_mean() {
        let process = Poisson::new(200.0);
        let mut rng = SmallRng::seed_from_u64(3);
        let gaps: Vec<f64> = (0..50_000)
            .map(|_| process.next_gap(&mut rng).unwrap().as_secs_f64())
            .collect();
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64;
        assert!((mean - 0.005).abs() < 0.0002, "mean {mean}");
        // Exponential: standard deviation equals the mean.
        assert!(
            (var.sqrt() / mean - 1.0).abs() < 0.03,
            "cv {}",
            var.sqrt() / mean
        );
        // Memoryless: P(gap > mean) = 1/e.
        let over = gaps.iter().filter(|g| **g > 0.005).count() as f64 / gaps.len() as f64;
        assert!((over - (-1f64).exp()).abs() < 0.01, "{over}");
    }

    #[test]
    fn zero_rate_means_no_arrivals() {
        let mut rng = SmallRng::seed_from_u64(4);
        assert_eq!(Poisson::new(0.0).next_gap(&mut rng), None);
    }
}
