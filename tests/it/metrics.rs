//! Metrics reach both outputs from one declaration: the StatsD packets and Prometheus' `/metrics`
//! (parsed with an OpenMetrics parser) carry the same metrics and tags, every metric tagged with the
//! node and its roles exactly once, each output in its own units (StatsD ms, Prometheus seconds),
//! and the histograms move as events are delivered.

use crate::common::{PATIENCE, StatsdListener, TestApp, spawn_app_with, wait_until};
use herald::metrics::DECLARED;
use openmetrics_parser::{MetricFamily, MetricsExposition, OpenMetricsType, OpenMetricsValue};
use serde_json::json;
use std::collections::HashMap;

type Exposition = MetricsExposition<OpenMetricsType, OpenMetricsValue>;
type Family = MetricFamily<OpenMetricsType, OpenMetricsValue>;

const NODE: &str = "metrics-node";
const ROLES: &str = "api+worker+socket";

/// The exposition at `/metrics`, or `None` while it has no metric family at all: a fresh node
/// may be scraped before it recorded anything (gauges are sampled each second), and that valid
/// empty exposition (`# EOF` alone) is one the parser refuses.
async fn scrape(app: &TestApp) -> Option<Exposition> {
    let addr = app.metrics_addr.expect("/metrics is served");
    let r = app
        .http
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .expect("scraped");
    assert_eq!(r.status(), 200);
    let content_type = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let text = r.text().await.unwrap();
    if text.trim() == "# EOF" {
        return None;
    }
    Some(
        openmetrics_parser::openmetrics::parse_openmetrics(&text)
            .unwrap_or_else(|e| panic!("not valid OpenMetrics ({e:?}):\n{text}")),
    )
}

fn family<'e>(exposition: &'e Exposition, name: &str) -> &'e Family {
    exposition
        .families
        .get(name)
        .unwrap_or_else(|| panic!("no family {name}"))
}

/// The labels of each metric of `family`, with its value.
fn metrics_of(family: &Family) -> Vec<(HashMap<String, String>, &OpenMetricsValue)> {
    family
        .iter_samples()
        .map(|sample| {
            let labels = sample.get_labelset().expect("a label set");
            let labels = labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            (labels, &sample.value)
        })
        .collect()
}

/// The value of the metric of `name` whose labels include `want` (and the node's identity).
fn value(exposition: &Exposition, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    let family = exposition.families.get(name)?;
    metrics_of(family)
        .into_iter()
        .find(|(labels, _)| {
            let has = |k: &str, v: &str| labels.get(k).map(String::as_str) == Some(v);
            has("node", NODE) && has("roles", ROLES) && want.iter().all(|(k, v)| has(k, v))
        })
        .map(|(_, value)| match value {
            OpenMetricsValue::Counter(c) => c.value.as_f64(),
            OpenMetricsValue::Gauge(g) | OpenMetricsValue::Unknown(g) => g.as_f64(),
            OpenMetricsValue::Histogram(h) => h.count.unwrap_or(0) as f64,
            other => panic!("{name}: unexpected {other:?}"),
        })
}

#[tokio::test]
async fn statsd_and_prometheus_carry_the_same_names_and_tags_and_histograms_move() {
    let statsd = StatsdListener::bind().await;
    let app = spawn_app_with(|s| {
        s.metrics.statsd_addr = statsd.addr.to_string();
        s.node.name = NODE.into();
        s.faults.fail_events = vec!["poison".into()];
        s.retry.schedule_ms = vec![100];
        s.retry.max_attempts = 2;
    })
    .await;
    let before = scrape(&app).await;
    assert_eq!(
        before
            .and_then(|before| value(&before, "pipeline_push_delivered_seconds", &[]))
            .unwrap_or(0.0),
        0.0,
        "nothing delivered yet"
    );

    let mut client = app.connect_joined("3").await;
    app.enqueue(json!({"user_id": "3", "event": "push_timed", "data": {}}))
        .await;
    client.recv_push().await;
    let poison = app
        .enqueue(json!({"user_id": "4", "event": "poison", "data": {}}))
        .await;
    app.wait_status(&poison, "failed").await;

    // StatsD: every line carries the node and its roles exactly once (cadence's default tags),
    // including the metrics that used to carry them twice or not at all.
    let lines = statsd.lines_until("pipeline.dead_lettered:", 1).await;
    for line in &lines {
        let tags = line.split_once("|#").map(|(_, t)| t).unwrap_or_default();
        let tags: Vec<&str> = tags.split(',').collect();
        let count = |prefix: &str| tags.iter().filter(|t| t.starts_with(prefix)).count();
        assert_eq!(count("node:"), 1, "{line}");
        assert_eq!(count("roles:"), 1, "{line}");
        assert!(tags.contains(&"node:metrics-node"), "{line}");
        assert!(tags.contains(&"roles:api+worker+socket"), "{line}");
    }
    let find = |head: &str, tag: &str| {
        lines
            .iter()
            .find(|l| l.starts_with(head) && (tag.is_empty() || l.contains(tag)))
            .unwrap_or_else(|| panic!("no StatsD line {head} {tag} in {lines:#?}"))
            .clone()
    };
    assert!(find("pipeline.push_delivered:", "").contains("|h|#"));
    assert!(find("pipeline.worker.process_time:", "outcome:pushed").contains("|ms|#"));
    find("api.events.accepted:1|c", "endpoint:single");
    find("channel_join:1|c", "channel:UserChannel");
    find("pipeline.retry.scheduled:1|c", "attempt:1");
    find("pipeline.dead_lettered:1|c", "");

    // Prometheus: every metric StatsD got, under its declared name (dots as underscores, times
    // in `_seconds`), the same tags as labels.
    let after = scrape(&app).await.expect("metrics after deliveries");
    for line in &lines {
        let name = line.split(':').next().unwrap();
        let spec = DECLARED
            .iter()
            .find(|spec| spec.name == name)
            .unwrap_or_else(|| panic!("StatsD sends {name}, which is not declared"));
        assert!(
            after.families.contains_key(&spec.prometheus_family()),
            "StatsD sends {name} but /metrics lacks {}",
            spec.prometheus_family()
        );
    }
    let latency = family(&after, "pipeline_push_delivered_seconds");
    assert_eq!(latency.family_type, OpenMetricsType::Histogram);
    let delivered = value(&after, "pipeline_push_delivered_seconds", &[]).expect("push_delivered");
    assert!(delivered >= 1.0, "the histogram moved: {delivered}");
    let pushed = value(
        &after,
        "pipeline_worker_process_time_seconds",
        &[("outcome", "pushed")],
    );
    assert!(pushed.is_some_and(|n| n >= 1.0), "{pushed:?}");
    assert_eq!(
        value(&after, "api_events_accepted", &[("endpoint", "single")]),
        Some(2.0)
    );
    assert_eq!(
        value(
            &after,
            "channel_join",
            &[("status", "success"), ("channel", "UserChannel")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&after, "pipeline_retry_scheduled", &[("attempt", "1")]),
        Some(1.0)
    );
    assert_eq!(value(&after, "pipeline_dead_lettered", &[]), Some(1.0));
    let Some(OpenMetricsValue::Histogram(histogram)) =
        latency.iter_samples().next().map(|m| &m.value)
    else {
        panic!("push_delivered is a histogram");
    };
    let bounds: Vec<f64> = histogram.buckets.iter().map(|b| b.upper_bound).collect();
    assert!(
        bounds.len() > 10 && bounds[0] == 0.001 && bounds.contains(&300.0),
        "latency buckets from 1 ms to 5 minutes, in seconds: {bounds:?}"
    );
    // The same observations as StatsD's milliseconds, in seconds.
    let statsd_ms: Vec<f64> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("pipeline.push_delivered:"))
        .map(|l| l.split('|').next().unwrap().parse().unwrap())
        .collect();
    let sum = histogram
        .sum
        .as_ref()
        .map(|s| s.as_f64())
        .unwrap_or_default();
    assert_eq!(histogram.count, Some(statsd_ms.len() as u64));
    assert!(
        (sum * 1_000.0 - statsd_ms.iter().sum::<f64>()).abs() < 1e-6,
        "sum {sum} s, StatsD {statsd_ms:?} ms"
    );

    // The operator's gauges, sampled every second.
    let gauges = wait_until("the gauges sampled", PATIENCE, || async {
        let scraped = scrape(&app).await?;
        let connections = value(&scraped, "socket_connections", &[])?;
        let channels = value(&scraped, "socket_channels", &[])?;
        let pool = value(
            &scraped,
            "store_pool_connections",
            &[("pool", "writes"), ("state", "idle")],
        )?;
        let owned = value(&scraped, "pipeline_partitions_owned", &[])?;
        let ready = value(&scraped, "queue_partition_ready", &[("partition", "0")])?;
        value(&scraped, "pipeline_worker_in_flight", &[])?;
        (connections >= 1.0 && channels >= 1.0 && owned == 4.0).then_some((pool, ready))
    })
    .await;
    println!("writes pool idle, partition 0 ready: {gauges:?}");
}
