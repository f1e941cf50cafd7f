//! The Prometheus side of the instruments: series that `/metrics` encodes and the console reads in
//! place. prometheus_client's `Family` can be encoded but not iterated, and its `Histogram` hides
//! its buckets, so the console used to render the whole registry to text and parse it back by
//! name; these series keep the same figures readable where they are.
//!
//! A distribution keeps StatsD's units (milliseconds) and is converted to Prometheus' base unit
//! (seconds) only when encoded: the bounds the console reads are then exactly the declared ones,
//! with no float round trip, and Prometheus still gets `le="0.25"` for 250 ms.

use super::declare::Kind;
use super::snapshot::Buckets;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use std::collections::HashMap;
use std::fmt::Debug;
use std::iter::once;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// What a series holds per set of tag values.
pub(super) trait Cell: EncodeMetric + TypedMetric + Debug + Send + Sync + 'static {
    /// A zeroed cell for an instrument of `kind`.
    fn new(kind: Kind) -> Self;
}

impl Cell for Counter {
    fn new(_: Kind) -> Self {
        Self::default()
    }
}

impl Cell for Gauge {
    fn new(_: Kind) -> Self {
        Self::default()
    }
}

/// One instrument's series: a cell per set of its tag values, `N` tags. Clones share the cells
/// (the registry encodes one clone, the instrument records into another).
#[derive(Debug)]
pub(super) struct Series<C, const N: usize> {
    inner: Arc<Cells<C, N>>,
}

#[derive(Debug)]
struct Cells<C, const N: usize> {
    kind: Kind,
    keys: [&'static str; N],
    cells: RwLock<HashMap<[String; N], C>>,
}

impl<C, const N: usize> Clone for Series<C, N> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<C: Cell, const N: usize> Series<C, N> {
    pub(super) fn new(kind: Kind, keys: [&'static str; N]) -> Self {
        let cells = RwLock::default();
        Self {
            inner: Arc::new(Cells { kind, keys, cells }),
        }
    }

    /// Runs `record` on the cell of `values`, made on first use.
    pub(super) fn with(&self, values: [&str; N], record: impl Fn(&C)) {
        let key = values.map(str::to_owned);
        if self.cells().get(&key).map(&record).is_none() {
            let mut cells = self.cells_mut();
            record(cells.entry(key).or_insert_with(|| C::new(self.inner.kind)));
        }
    }

    /// Every cell, by tag values.
    pub(super) fn cells(&self) -> RwLockReadGuard<'_, HashMap<[String; N], C>> {
        // Cells are only added, or all cleared: a panic cannot leave them torn, so a poisoned
        // lock still holds good cells.
        self.inner
            .cells
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn cells_mut(&self) -> RwLockWriteGuard<'_, HashMap<[String; N], C>> {
        self.inner
            .cells
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops every cell: a gauge whose tag values come and go lists only the current ones.
    pub(super) fn clear(&self) {
        self.cells_mut().clear();
    }
}

impl<C: Cell, const N: usize> EncodeMetric for Series<C, N> {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (values, cell) in self.cells().iter() {
            let labels: [(&str, &str); N] =
                std::array::from_fn(|i| (self.inner.keys[i], values[i].as_str()));
            cell.encode(encoder.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        C::TYPE
    }

    /// A family with no series yet is left out of the exposition (as prometheus_client does).
    fn is_empty(&self) -> bool {
        self.cells().is_empty()
    }
}

/// A distribution over fixed buckets, kept in StatsD's units.
#[derive(Debug)]
pub(super) struct Histogram {
    /// Upper bounds, ascending, in StatsD's units; +Inf is implied after the last.
    bounds: &'static [f64],
    /// StatsD units per Prometheus unit (1,000 for ms to seconds, or 1).
    per_unit: f64,
    observed: Mutex<Observed>,
}

#[derive(Debug)]
struct Observed {
    /// Observations per bucket (not cumulative), one more than `bounds` for +Inf.
    counts: Vec<u64>,
    sum: f64,
}

impl Cell for Histogram {
    fn new(kind: Kind) -> Self {
        let bounds = kind.buckets();
        Self {
            bounds,
            per_unit: kind.per_prometheus_unit(),
            observed: Mutex::new(Observed {
                counts: vec![0; bounds.len() + 1],
                sum: 0.0,
            }),
        }
    }
}

impl Histogram {
    pub(super) fn observe(&self, value: f64) {
        // The first bound at or above the value (`le`), else +Inf.
        let bucket = self.bounds.partition_point(|bound| *bound < value);
        let mut observed = self.lock();
        observed.counts[bucket] += 1;
        observed.sum += value;
    }

    /// Cumulative counts at each bound, in StatsD's units, as Prometheus keeps them.
    pub(super) fn buckets(&self) -> Buckets {
        let observed = self.lock();
        let bounds = self.bounds.iter().map(|b| Some(*b)).chain(once(None));
        let buckets: Vec<_> = bounds
            .zip(observed.counts.iter().scan(0, |total, n| {
                *total += n;
                Some(*total)
            }))
            .collect();
        Buckets {
            count: buckets.last().map_or(0, |(_, n)| *n),
            buckets,
            sum: observed.sum,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Observed> {
        // Counts and a sum: a panic between two of their updates can at worst miscount one.
        self.observed.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (buckets, count, sum) = {
            let observed = self.lock();
            let bounds = self.bounds.iter().map(|b| b / self.per_unit);
            let buckets: Vec<(f64, u64)> = bounds
                .chain(once(f64::INFINITY))
                .zip(observed.counts.iter().copied())
                .collect();
            let count = observed.counts.iter().sum();
            (buckets, count, observed.sum / self.per_unit)
        };
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}
