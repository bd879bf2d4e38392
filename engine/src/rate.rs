//! Rolling rate windows for tenant-wide limits (PROTOCOL.md §9.2): a ring of buckets, one per
//! tick; the average is the window's sum over the time the window covers so far. Pure: the
//! driver calls [`RateWindow::tick`] every [`TICK`].

use std::time::Duration;

/// Bucket length for events, joins and presence events.
pub const TICK: Duration = Duration::from_secs(5);
/// Buckets in a window (60 s).
pub const BUCKETS: usize = 12;
/// Bucket length of the REST request rate (PROTOCOL.md §8.1, §9.2: 1 s ticks, 60 buckets).
pub const HTTP_TICK: Duration = Duration::from_secs(1);

/// One shard's share of a tenant-wide counter: `N` buckets of `TICK_SECS` seconds.
#[derive(Debug, Clone)]
pub struct Window<const N: usize, const TICK_SECS: u64> {
    buckets: [u64; N],
    current: usize,
    /// Buckets that have been current so far (≤ N): the window is shorter during the first
    /// minute, so a short burst weighs more (§9.2).
    filled: usize,
}

/// Events, joins, presence events: 12 buckets of 5 s.
pub type RateWindow = Window<BUCKETS, 5>;
/// REST requests: 60 buckets of 1 s.
pub type HttpWindow = Window<60, 1>;

impl<const N: usize, const TICK_SECS: u64> Default for Window<N, TICK_SECS> {
    fn default() -> Self {
        Window { buckets: [0; N], current: 0, filled: 0 }
    }
}

impl<const N: usize, const TICK_SECS: u64> Window<N, TICK_SECS> {
    /// Counts `n` events in the current bucket.
    pub fn add(&mut self, n: u64) {
        self.buckets[self.current] += n;
        self.filled = self.filled.max(1);
    }

    /// The sum over the window.
    pub fn sum(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Seconds the window covers so far.
    pub fn seconds(&self) -> u64 {
        self.filled.max(1) as u64 * TICK_SECS
    }

    /// Ends the current bucket; returns the window sum as of this tick.
    pub fn tick(&mut self) -> u64 {
        let sum = self.sum();
        self.current = (self.current + 1) % N;
        self.buckets[self.current] = 0;
        self.filled = (self.filled + 1).min(N);
        sum
    }
}

/// Whether a tenant-wide average is above `limit` (0 = unlimited).
pub fn above(sum: u64, seconds: u64, limit: u32) -> bool {
    limit != 0 && sum > u64::from(limit) * seconds.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn averages_over_the_window_so_far() {
        let mut window = RateWindow::default();
        window.add(600);
        // First tick: 600 events over 5 s = 120/s.
        assert!(above(window.sum(), window.seconds(), 100));
        assert_eq!(window.tick(), 600);
        for _ in 0..BUCKETS {
            window.tick();
        }
        assert_eq!(window.sum(), 0, "old buckets roll out");
        assert_eq!(window.seconds(), 60);
        assert!(!above(5_000, 60, 100));
        assert!(above(6_001, 60, 100));
        assert!(!above(u64::MAX / 2, 60, 0), "0 = unlimited");
        let mut http = HttpWindow::default();
        http.add(30);
        assert_eq!(http.seconds(), 1);
        for _ in 0..60 {
            http.tick();
        }
        assert_eq!((http.sum(), http.seconds()), (0, 60));
    }
}
