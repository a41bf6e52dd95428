//! Benchmarks: side-by-side measurements printed as tables (never asserted).

pub mod boot;
pub mod fs;
pub mod vsock;

use std::time::Duration;

/// Median of the samples (upper median for an even count).
pub fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    samples.get(samples.len() / 2).copied().unwrap_or(f64::NAN)
}

pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}
