//! Latency histograms: commit returned at the producer -> frame read by the consumer.
//!
//! Connections record into a small local buffer and flush it into one shared histogram now and
//! then, so a million samples a second cost a few thousand lock acquisitions, not a million, and
//! a thousand connections do not each carry a full histogram.

use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Samples kept locally before a flush.
const FLUSH_EVERY: usize = 512;

/// Microsecond resolution, up to ten minutes, three significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant histogram bounds are valid")
}

/// The shared histogram.
pub struct Latencies {
    histogram: Mutex<Histogram<u64>>,
}

impl Latencies {
    pub fn new() -> Latencies {
        Latencies {
            histogram: Mutex::new(new_histogram()),
        }
    }

    fn merge(&self, samples: &mut Vec<u64>) {
        let mut histogram = self
            .histogram
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for &micros in samples.iter() {
            histogram.saturating_record(micros.max(1));
        }
        samples.clear();
    }

    pub fn summary(&self) -> Summary {
        let histogram = self
            .histogram
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Summary::of(&histogram)
    }
}

/// A connection's buffer of samples.
pub struct Recorder<'a> {
    shared: &'a Latencies,
    samples: Vec<u64>,
}

impl<'a> Recorder<'a> {
    pub fn new(shared: &'a Latencies) -> Self {
        Recorder {
            shared,
            samples: Vec::new(),
        }
    }

    pub fn record_nanos(&mut self, nanos: u64) {
        self.samples.push(nanos / 1000);
        if self.samples.len() >= FLUSH_EVERY {
            self.shared.merge(&mut self.samples);
        }
    }
}

impl Drop for Recorder<'_> {
    fn drop(&mut self) {
        self.shared.merge(&mut self.samples);
    }
}

/// Percentiles of a histogram.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    pub samples: u64,
    pub p50: Duration,
    pub p99: Duration,
    pub p999: Duration,
    pub max: Duration,
}

impl Summary {
    pub fn of(histogram: &Histogram<u64>) -> Summary {
        let at = |q: f64| Duration::from_micros(histogram.value_at_quantile(q));
        Summary {
            samples: histogram.len(),
            p50: at(0.5),
            p99: at(0.99),
            p999: at(0.999),
            max: Duration::from_micros(histogram.max()),
        }
    }

    /// `p50 / p99 / max`, as the tables show it.
    pub fn p50_p99_max(&self) -> String {
        format!("{} / {} / {}", ms(self.p50), ms(self.p99), ms(self.max))
    }

    /// `p50 / p99 / p99.9 / max`, as the tables show it.
    pub fn p50_p99_p999_max(&self) -> String {
        format!(
            "{} / {} / {} / {}",
            ms(self.p50),
            ms(self.p99),
            ms(self.p999),
            ms(self.max)
        )
    }
}

/// Milliseconds with two decimals, for tables.
pub fn ms(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1000.0)
}
