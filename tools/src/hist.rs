//! A log-linear latency histogram (nanoseconds): 64 linear sub-buckets per power of two, so a
//! recorded value is reproduced within ~1.6 %. Recording is a shift, a `leading_zeros` and an
//! increment; histograms merge by addition and travel between processes as sparse text.

const SUB_BITS: u32 = 6;
const SUB: usize = 1 << SUB_BITS;
/// Largest exponent kept (2^41 ns ≈ 36 min); larger values are clamped.
const MAX_EXP: u32 = 41;
const BUCKETS: usize = (MAX_EXP as usize - SUB_BITS as usize + 2) * SUB;

#[derive(Clone)]
pub struct Hist {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

impl Default for Hist {
    fn default() -> Self {
        Hist::new()
    }
}

fn index(value: u64) -> usize {
    if value < SUB as u64 {
        return value as usize;
    }
    let exp = (63 - value.leading_zeros()).min(MAX_EXP);
    let value = value.min((1u64 << (MAX_EXP + 1)) - 1);
    let sub = ((value >> (exp - SUB_BITS)) as usize) & (SUB - 1);
    (exp - SUB_BITS + 1) as usize * SUB + sub
}

/// Middle of the value range that lands in bucket `idx`.
fn value_at(idx: usize) -> u64 {
    if idx < SUB {
        return idx as u64;
    }
    let exp = (idx / SUB) as u32 + SUB_BITS - 1;
    let sub = (idx % SUB) as u64;
    let low = (1u64 << exp) | (sub << (exp - SUB_BITS));
    low + (1u64 << (exp - SUB_BITS)) / 2
}

impl Hist {
    pub fn new() -> Hist {
        Hist { counts: vec![0; BUCKETS], total: 0, max: 0 }
    }

    #[inline]
    pub fn record(&mut self, value: u64) {
        self.counts[index(value)] += 1;
        self.total += 1;
        if value > self.max {
            self.max = value;
        }
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    pub fn merge(&mut self, other: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += *b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    /// The value at quantile `q` (0..=1); 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (idx, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return value_at(idx).min(self.max);
            }
        }
        self.max
    }

    /// Sparse text form: `max;idx:count,idx:count,...` (`-` when empty).
    pub fn encode(&self) -> String {
        if self.total == 0 {
            return "-".to_string();
        }
        let mut out = format!("{};", self.max);
        let mut first = true;
        for (idx, &count) in self.counts.iter().enumerate() {
            if count > 0 {
                if !first {
                    out.push(',');
                }
                first = false;
                out.push_str(&format!("{idx}:{count}"));
            }
        }
        out
    }

    pub fn decode(text: &str) -> Option<Hist> {
        let mut hist = Hist::new();
        if text == "-" {
            return Some(hist);
        }
        let (max, rest) = text.split_once(';')?;
        hist.max = max.parse().ok()?;
        for pair in rest.split(',').filter(|p| !p.is_empty()) {
            let (idx, count) = pair.split_once(':')?;
            let idx: usize = idx.parse().ok()?;
            let count: u64 = count.parse().ok()?;
            *hist.counts.get_mut(idx)? += count;
            hist.total += count;
        }
        Some(hist)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_within_two_percent() {
        for value in [0u64, 1, 63, 64, 65, 100, 1_000, 12_345, 1_000_000, 49_999_999, 10_000_000_000] {
            let back = value_at(index(value));
            let error = (back as f64 - value as f64).abs() / (value.max(1) as f64);
            assert!(error < 0.02, "{value} -> {back}");
        }
    }

    #[test]
    fn quantiles_and_codec() {
        let mut hist = Hist::new();
        for v in 1..=1000u64 {
            hist.record(v * 1000);
        }
        let p50 = hist.quantile(0.5) as f64;
        assert!((p50 - 500_000.0).abs() / 500_000.0 < 0.02);
        let back = Hist::decode(&hist.encode()).unwrap();
        assert_eq!(back.count(), 1000);
        assert_eq!(back.quantile(0.99), hist.quantile(0.99));
        assert_eq!(Hist::decode("-").unwrap().count(), 0);
    }
}
