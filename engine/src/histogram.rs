//! A fixed-bucket latency histogram for `/metrics`, shared between one writer thread and the
//! scraper: relaxed atomics, no locks, no allocation after creation. Values are microseconds;
//! Prometheus exposition renders seconds.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds of the buckets, µs: 100 µs … 10 s, roughly ×2.5 apart (+Inf is implicit).
pub const LATENCY_BOUNDS_MICROS: [u64; 12] = [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 500_000, 2_000_000, 10_000_000];

/// Counts per bucket (not cumulative), the sum and the count.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BOUNDS_MICROS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one value.
    pub fn observe(&self, micros: u64) {
        let index = LATENCY_BOUNDS_MICROS.iter().position(|&bound| micros <= bound).unwrap_or(LATENCY_BOUNDS_MICROS.len());
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// How many values were recorded, and the mean (µs).
    pub fn count_and_mean_micros(&self) -> (u64, u64) {
        let count: u64 = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum();
        (count, self.sum_micros.load(Ordering::Relaxed).checked_div(count).unwrap_or(0))
    }

    /// The upper bound (µs) of the bucket holding the `q`-quantile (0 < q ≤ 1); `None` when
    /// empty, `u64::MAX` when it lies above the last bound.
    pub fn quantile_bound_micros(&self, q: f64) -> Option<u64> {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut cumulative = 0;
        for (count, bound) in counts.iter().zip(LATENCY_BOUNDS_MICROS.iter().copied().chain([u64::MAX])) {
            cumulative += count;
            if cumulative >= rank {
                return Some(bound);
            }
        }
        Some(u64::MAX)
    }

    /// Renders the sum of `histograms` as one Prometheus histogram `name` (seconds).
    pub fn render<'a>(name: &str, help: &str, histograms: impl Iterator<Item = &'a Histogram>, out: &mut String) {
        let mut counts = [0u64; LATENCY_BOUNDS_MICROS.len() + 1];
        let mut sum = 0u64;
        for histogram in histograms {
            for (total, bucket) in counts.iter_mut().zip(&histogram.buckets) {
                *total += bucket.load(Ordering::Relaxed);
            }
            sum += histogram.sum_micros.load(Ordering::Relaxed);
        }
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (count, bound) in counts.iter().zip(LATENCY_BOUNDS_MICROS.iter().map(Some).chain([None])) {
            cumulative += count;
            match bound {
                Some(bound) => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {cumulative}", *bound as f64 / 1e6);
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {cumulative}", sum as f64 / 1e6);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_bucket_bounds() {
        let h = Histogram::default();
        assert_eq!(h.quantile_bound_micros(0.5), None);
        for micros in [50, 60, 70, 2_000, 30_000_000] {
            h.observe(micros);
        }
        assert_eq!(h.quantile_bound_micros(0.5), Some(100));
        assert_eq!(h.quantile_bound_micros(0.8), Some(2_500));
        assert_eq!(h.quantile_bound_micros(1.0), Some(u64::MAX));
        assert_eq!(h.count_and_mean_micros(), (5, (50 + 60 + 70 + 2_000 + 30_000_000) / 5));
    }

    #[test]
    fn buckets_are_cumulative_and_sum_in_seconds() {
        let a = Histogram::default();
        let b = Histogram::default();
        a.observe(50);
        a.observe(300);
        b.observe(20_000_000);
        let mut out = String::new();
        Histogram::render("x_seconds", "help", [&a, &b].into_iter(), &mut out);
        assert!(out.contains("x_seconds_bucket{le=\"0.0001\"} 1\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"0.0005\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_count 3\n"), "{out}");
        assert!(out.contains("x_seconds_sum 20.00035\n"), "{out}");
    }
}
