//! Window widths as a log-linear histogram: constant memory however long the run, percentiles to
//! within 1/32 of their value.

/// Sub-buckets per power of two.
const SUB: u64 = 32;
const SUB_BITS: u32 = SUB.trailing_zeros();

#[derive(Clone, Debug, Default)]
pub struct Histogram {
    /// Counts by bucket: values below `SUB` get one bucket each, then `SUB` per power of two.
    buckets: Vec<u64>,
    count: u64,
    max: u64,
    sum: u128,
}

fn bucket(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // >= SUB_BITS
    let shift = exp - SUB_BITS;
    let sub = (v >> shift) - SUB; // 0..SUB
    (SUB + u64::from(shift) * SUB + sub) as usize
}

/// The largest value that falls in bucket `b`.
fn upper(b: usize) -> u64 {
    let b = b as u64;
    if b < SUB {
        return b;
    }
    let shift = (b - SUB) / SUB;
    let sub = (b - SUB) % SUB;
    (((SUB + sub + 1) as u128) << shift)
        .saturating_sub(1)
        .min(u64::MAX as u128) as u64
}

impl Histogram {
    pub fn record(&mut self, v: u64) {
        let b = bucket(v);
        if self.buckets.len() <= b {
            self.buckets.resize(b + 1, 0);
        }
        self.buckets[b] += 1;
        self.count += 1;
        self.max = self.max.max(v);
        self.sum += u128::from(v);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    /// Sum of all recorded values, exact.
    pub fn sum(&self) -> u128 {
        self.sum
    }

    /// The value at quantile `q` (0..=1): the top of the bucket holding it, never above the
    /// maximum. 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        // The rank (1-based) of the value asked for, as nearest-rank percentiles define it.
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return upper(b).min(self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn small_values_are_exact() {
        let mut h = Histogram::default();
        for v in 1..=10 {
            h.record(v);
        }
        assert_eq!(h.quantile(0.5), 5);
        assert_eq!(h.quantile(0.99), 10);
        assert_eq!(h.quantile(1.0), 10);
        assert_eq!(h.max(), 10);
        assert_eq!(h.sum(), 55);
    }

    #[test]
    fn empty_histogram_reports_zero() {
        assert_eq!(Histogram::default().quantile(0.5), 0);
    }

    #[test]
    fn p99_of_a_long_tail() {
        let mut h = Histogram::default();
        for _ in 0..990 {
            h.record(3_000);
        }
        for _ in 0..10 {
            h.record(1_000_000);
        }
        let p50 = h.quantile(0.5);
        assert!((3_000..3_000 + 3_000 / 32).contains(&p50), "{p50}");
        assert!((3_000..3_100).contains(&h.quantile(0.99)));
        assert_eq!(h.quantile(0.999), 1_000_000, "capped at the max");
    }

    proptest! {
        /// Every quantile is within 1/32 above the exact nearest-rank value, never below it.
        #[test]
        fn quantiles_within_a_thirty_second(mut values in prop::collection::vec(0u64..u64::MAX / 2, 1..300), q in 0.0f64..=1.0) {
            let mut h = Histogram::default();
            for &v in &values {
                h.record(v);
            }
            values.sort_unstable();
            let rank = ((q * values.len() as f64).ceil() as usize).max(1);
            let exact = values[rank - 1];
            let got = h.quantile(q);
            prop_assert!(got >= exact, "{got} < {exact}");
            prop_assert!(got - exact <= exact / 32, "{got} vs {exact}");
        }
    }
}
