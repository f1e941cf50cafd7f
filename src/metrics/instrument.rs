//! An instrument is one metric on both outputs: each record goes to StatsD and into the
//! Prometheus series in the same call, so the two cannot disagree on a name, a tag or a value. An
//! instrument with `N` tag keys takes exactly `N` tag values.

use super::declare::{Kind, Spec};
use super::prometheus::{Cell, Histogram, Series};
use super::snapshot::Buckets;
use super::statsd::send;
use cadence::StatsdClient;
use cadence::prelude::*;
use prometheus_client::metrics::{counter, gauge};
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// A metric with `N` tag keys, holding its Prometheus series in cells of type `C`.
pub(super) struct Instrument<C, const N: usize> {
    spec: Spec,
    statsd: Arc<StatsdClient>,
    series: Series<C, N>,
}

/// StatsD `|c`, Prometheus `<name>_total`.
pub(super) type Counter<const N: usize> = Instrument<counter::Counter, N>;
/// StatsD `|g`, Prometheus gauge.
pub(super) type Gauge<const N: usize> = Instrument<gauge::Gauge, N>;
/// StatsD `|h` or `|ms`, Prometheus histogram (in seconds for durations).
pub(super) type Distribution<const N: usize> = Instrument<Histogram, N>;

impl<C: Cell, const N: usize> Instrument<C, N> {
    pub(super) fn register(
        registry: &mut Registry,
        statsd: &Arc<StatsdClient>,
        spec: Spec,
        keys: [&'static str; N],
    ) -> Self {
        let series = Series::new(spec.kind, keys);
        // The registry ends the help with a full stop itself. A duration's family is named with
        // its unit but carries no `# UNIT` line: the name is what Prometheus' conventions ask for,
        // and strict readers (openmetrics-parser, which the tests use) refuse `UNIT` on histograms.
        let help = spec.help.trim_end_matches('.');
        registry.register(spec.prometheus_family(), help, series.clone());
        let statsd = Arc::clone(statsd);
        Self {
            spec,
            statsd,
            series,
        }
    }
}

impl<const N: usize> Counter<N> {
    /// Counts `n` (nothing at all for 0).
    pub(super) fn add(&self, n: u64, values: [&str; N]) {
        if n == 0 {
            return;
        }
        let statsd_value = n.min(i64::MAX as u64) as i64;
        let metric = self.statsd.count_with_tags(self.spec.name, statsd_value);
        send(metric, self.spec.tags, &values);
        self.series.with(values, |counter| {
            counter.inc_by(n);
        });
    }

    /// The count so far over the tag values `pick` accepts.
    pub(super) fn total(&self, pick: impl Fn(&[String; N]) -> bool) -> u64 {
        let cells = self.series.cells();
        let picked = cells.iter().filter(|(values, _)| pick(values));
        picked.map(|(_, counter)| counter.get()).sum()
    }
}

impl<const N: usize> Gauge<N> {
    pub(super) fn set(&self, value: u64, values: [&str; N]) {
        let metric = self.statsd.gauge_with_tags(self.spec.name, value);
        send(metric, self.spec.tags, &values);
        self.series.with(values, |gauge| {
            gauge.set(value.min(i64::MAX as u64) as i64);
        });
    }

    /// Forgets every tag value set so far, so that Prometheus lists only those set from now on.
    pub(super) fn clear(&self) {
        self.series.clear();
    }

    /// The value last set for `values` (0 if never).
    pub(super) fn get(&self, values: [&str; N]) -> u64 {
        let key = values.map(str::to_owned);
        let value = self.series.cells().get(&key).map(|gauge| gauge.get());
        value.unwrap_or(0).max(0) as u64
    }
}

impl<const N: usize> Distribution<N> {
    /// Observes `value`, in StatsD's units (ms for a duration); StatsD gets it rounded.
    pub(super) fn observe(&self, value: f64, values: [&str; N]) {
        let (name, whole) = (self.spec.name, value.round() as u64);
        match self.spec.kind {
            Kind::TimingMs(_) => send(
                self.statsd.time_with_tags(name, whole),
                self.spec.tags,
                &values,
            ),
            _ => send(
                self.statsd.histogram_with_tags(name, whole),
                self.spec.tags,
                &values,
            ),
        }
        self.series
            .with(values, |histogram| histogram.observe(value));
    }

    /// The buckets of `values` so far, in StatsD's units (none before the first observation).
    pub(super) fn buckets(&self, values: [&str; N]) -> Buckets {
        let key = values.map(str::to_owned);
        let buckets = self.series.cells().get(&key).map(Histogram::buckets);
        buckets.unwrap_or_default()
    }
}
