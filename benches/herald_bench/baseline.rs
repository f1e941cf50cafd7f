//! The raw ceilings, measured in the same run as Herald on the same box: PostgreSQL inserts of the
//! rows Herald writes, RabbitMQ publish/consume of the messages Herald sends, lapin consume+ack.
//!
//! Each one does what Herald's own path does at that stage and nothing more: the same table (a copy
//! of `events` with its indexes and foreign key), the same statement, the same message size and
//! properties, the same prefetch and confirm window, on a quorum queue.

use crate::node::Names;
use crate::protocol::{FineQuantiles, Ingested};
use futures_util::StreamExt;
use futures_util::future;
use futures_util::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use herald::event::{Envelope, EventId, EventName, UserId, now_unix_ms};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde::Serialize;
use serde_json::value::RawValue;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The raw broker's closed loop: messages consumed over the measured window.
#[derive(Clone, Debug, Serialize)]
pub struct BrokerE2e {
    pub events: u64,
    pub secs: f64,
    pub rate: f64,
}

/// The raw broker's publish -> consume latency, ms.
#[derive(Clone, Debug, Serialize)]
pub struct BrokerLatency {
    #[serde(flatten)]
    pub waits: FineQuantiles,
    pub sent: u64,
}

/// lapin's consume + ack of a filled queue, with the CPU this process spent on it.
#[derive(Clone, Debug, Serialize)]
pub struct ConsumeCpu {
    pub events: u64,
    pub secs: f64,
    pub rate: f64,
    pub cpu_secs: f64,
    pub cpu_us_per_event: f64,
}

/// Raw queues made so far, so each measurement starts on an empty queue of its own.
static QUEUES: AtomicU64 = AtomicU64::new(0);

/// A fresh raw queue name: `<prefix>.raw.<n>`.
fn raw_queue(names: &Names) -> String {
    format!(
        "{}.raw.{}",
        names.prefix,
        QUEUES.fetch_add(1, Ordering::Relaxed)
    )
}

/// Deletes a raw queue once its measurement is over (leftovers must not feed the next one).
async fn delete_queue(names: &Names, queue: &str) {
    if let Ok((connection, channel)) = connect(names, "cleanup").await {
        let _ = channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await;
        let _ = connection.close(200, "done".into()).await;
    }
}

/// A pool on this run's database, `connections` wide.
pub async fn pool(names: &Names, connections: u32) -> anyhow::Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(connections)
        .connect(&names.database_url())
        .await?)
}

/// `raw_events`: `events` with its defaults, checks, indexes and foreign key, minus Herald.
pub async fn create_raw_table(pool: &PgPool) -> anyhow::Result<i64> {
    // A copy of `events` as Herald has it: columns, defaults, indexes, and (which LIKE does not
    // copy) its storage parameters, fillfactor included. Its constraints but foreign keys come
    // with LIKE, and `events` has none.
    sqlx::query("CREATE TABLE IF NOT EXISTS raw_events (LIKE events INCLUDING ALL)")
        .execute(pool)
        .await?;
    let options: Option<Vec<String>> =
        sqlx::query_scalar("SELECT reloptions FROM pg_class WHERE relname = 'events'")
            .fetch_one(pool)
            .await?;
    if let Some(options) = options.filter(|o| !o.is_empty()) {
        sqlx::query(&format!(
            "ALTER TABLE raw_events SET ({})",
            options.join(", ")
        ))
        .execute(pool)
        .await?;
    }
    let producer: i64 = sqlx::query_scalar("SELECT id FROM producers LIMIT 1")
        .fetch_one(pool)
        .await?;
    Ok(producer)
}

/// A bare `INSERT ... UNNEST` of the events' columns into `raw_events`: what a group commit would
/// cost without seqs, keys or an outbox.
pub const UNNEST_INSERT: &str = "INSERT INTO raw_events (id, producer_id, user_id, seq, event, data, idempotency_key, enqueued_at)
     SELECT id, p, u, s, e, d::jsonb, k, to_timestamp(t / 1000.0)
     FROM UNNEST($1::uuid[], $2::int8[], $3::text[], $4::int8[], $5::text[], $6::text[],
                 $7::text[], $8::int8[]) AS x(id, p, u, s, e, d, k, t)";

const SINGLE_INSERT: &str = "INSERT INTO raw_events (id, producer_id, user_id, seq, event, data, idempotency_key, enqueued_at)
     VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, to_timestamp($8 / 1000.0))";

fn data(i: u64) -> String {
    format!(r#"{{"i":{i},"pad":"{}"}}"#, crate::loadgen::PAD)
}

/// `connections` connections each inserting `batch` rows per statement (one transaction each),
/// for `secs`. Returns rows/s.
pub async fn pg_unnest(
    pool: &PgPool,
    producer: i64,
    secs: f64,
    connections: usize,
    batch: usize,
) -> Ingested {
    let seq = AtomicU64::new(0);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let rows = AtomicU64::new(0);
    let errors = AtomicU64::new(0);
    let worker = |w: usize| {
        let (seq, rows, errors) = (&seq, &rows, &errors);
        async move {
            while Instant::now() < deadline {
                let first = seq.fetch_add(batch as u64, Ordering::Relaxed);
                let range = first..first + batch as u64;
                let ids: Vec<Uuid> = range.clone().map(|_| Uuid::now_v7()).collect();
                let producers = vec![producer; batch];
                let users: Vec<String> = range
                    .clone()
                    .map(|i| format!("rb{w}-{}", i % 100))
                    .collect();
                let seqs: Vec<i64> = range.clone().map(|i| i as i64).collect();
                let events = vec!["bench"; batch];
                let datas: Vec<String> = range.clone().map(data).collect();
                let keys: Vec<Option<&str>> = vec![None; batch];
                let ats = vec![now_unix_ms(); batch];
                let done = sqlx::query(UNNEST_INSERT)
                    .bind(&ids)
                    .bind(&producers)
                    .bind(&users)
                    .bind(&seqs)
                    .bind(&events)
                    .bind(&datas)
                    .bind(&keys)
                    .bind(&ats)
                    .execute(pool)
                    .await;
                match done {
                    Ok(_) => rows.fetch_add(batch as u64, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        }
    };
    future::join_all((0..connections).map(worker)).await;
    Ingested::over(
        started,
        rows.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
    )
}

/// `connections` connections each inserting one row per transaction, for `secs`. Returns rows/s.
pub async fn pg_single(pool: &PgPool, producer: i64, secs: f64, connections: usize) -> Ingested {
    let seq = AtomicU64::new(1 << 40);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let rows = AtomicU64::new(0);
    let errors = AtomicU64::new(0);
    let worker = |w: usize| {
        let (seq, rows, errors) = (&seq, &rows, &errors);
        async move {
            while Instant::now() < deadline {
                let i = seq.fetch_add(1, Ordering::Relaxed);
                let done = sqlx::query(SINGLE_INSERT)
                    .bind(Uuid::now_v7())
                    .bind(producer)
                    .bind(format!("rs{w}-{}", i % 100))
                    .bind(i as i64)
                    .bind("bench")
                    .bind(data(i))
                    .bind(None::<&str>)
                    .bind(now_unix_ms())
                    .execute(pool)
                    .await;
                match done {
                    Ok(_) => rows.fetch_add(1, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        }
    };
    future::join_all((0..connections).map(worker)).await;
    Ingested::over(
        started,
        rows.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
    )
}

/// The body Herald publishes for a benchmark event: its envelope, serialised by Herald's own code.
fn envelope_body(i: u64) -> Vec<u8> {
    let envelope = Envelope {
        id: EventId::mint(),
        user_id: UserId::parse(format!("s{}", i % 10_000)).unwrap_or_else(|_| unreachable!()),
        seq: i as i64,
        event: EventName::parse("bench").unwrap_or_else(|_| unreachable!()),
        at: now_unix_ms(),
        data: RawValue::from_string(data(i)).unwrap_or_else(|_| unreachable!()),
        trace: None,
    };
    herald::event::encode_batch(std::slice::from_ref(&envelope))
}

/// The properties Herald's publisher sets.
fn properties(id: Uuid) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(id.to_string().into())
}

async fn connect(names: &Names, role: &str) -> anyhow::Result<(Connection, Channel)> {
    let properties =
        ConnectionProperties::default().with_connection_name(format!("herald-bench-{role}").into());
    let connection = Connection::connect(&names.amqp, properties).await?;
    let channel = connection.create_channel().await?;
    Ok((connection, channel))
}

/// Declares a durable quorum queue, as Herald's topology does.
async fn declare(channel: &Channel, queue: &str) -> anyhow::Result<()> {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await?;
    Ok(())
}

async fn consumer(
    names: &Names,
    queue: &str,
    prefetch: u16,
) -> anyhow::Result<(Connection, Channel, lapin::Consumer)> {
    let (connection, channel) = connect(names, "consumer").await?;
    declare(&channel, queue).await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            queue.into(),
            "herald-bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((connection, channel, consumer))
}

async fn publisher(names: &Names, queue: &str) -> anyhow::Result<(Connection, Channel)> {
    let (connection, channel) = connect(names, "publisher").await?;
    declare(&channel, queue).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok((connection, channel))
}

async fn publish(
    channel: &Channel,
    queue: &str,
    body: &[u8],
) -> lapin::Result<lapin::PublisherConfirm> {
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            properties(Uuid::now_v7()),
        )
        .await
}

/// Publisher (persistent, up to `max_inflight` confirms outstanding, at most `window` messages
/// published but not yet consumed) and consumer (manual ack of each, `prefetch`) together on one
/// quorum queue. Same closed loop as Herald's end-to-end figure; returns consumed messages/s.
pub async fn broker_e2e(
    names: &Names,
    warmup: f64,
    secs: f64,
    prefetch: u16,
    max_inflight: usize,
    window: u64,
) -> anyhow::Result<BrokerE2e> {
    let queue = &raw_queue(names);
    let (pub_conn, pub_chan) = publisher(names, queue).await?;
    let (con_conn, _con_chan, mut deliveries) = consumer(names, queue, prefetch).await?;
    let consumed = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let consuming = {
        let (consumed, stop) = (Arc::clone(&consumed), stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    next = deliveries.next() => match next {
                        Some(Ok(delivery)) => {
                            let _ = delivery.ack(BasicAckOptions::default()).await;
                            consumed.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => return,
                    },
                    () = stop.cancelled() => return,
                }
            }
        })
    };
    let publishing = {
        let (consumed, stop, queue) = (Arc::clone(&consumed), stop.clone(), queue.clone());
        tokio::spawn(async move {
            let mut pending = FuturesUnordered::new();
            let mut published: u64 = 0;
            while !stop.is_cancelled() {
                if pending.len() >= max_inflight
                    || published - consumed.load(Ordering::Relaxed) >= window
                {
                    if pending.is_empty() {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    } else {
                        pending.next().await;
                    }
                    continue;
                }
                match publish(&pub_chan, &queue, &envelope_body(published)).await {
                    Ok(confirm) => pending.push(confirm),
                    Err(_) => return,
                }
                published += 1;
            }
            while pending.next().await.is_some() {}
        })
    };
    tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
    let (c0, t0) = (consumed.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let (c1, t1) = (consumed.load(Ordering::Relaxed), Instant::now());
    stop.cancel();
    let _ = publishing.await;
    let _ = consuming.await;
    let _ = pub_conn.close(200, "done".into()).await;
    let _ = con_conn.close(200, "done".into()).await;
    delete_queue(names, queue).await;
    let secs = (t1 - t0).as_secs_f64();
    Ok(BrokerE2e {
        events: c1 - c0,
        secs,
        rate: (c1 - c0) as f64 / secs,
    })
}

/// Publishes at `rate` messages/s (open loop, 10 ms ticks, confirms pipelined) and consumes with
/// manual acks; latency is consume time minus publish time, for messages published in the
/// measured window.
pub async fn broker_latency(
    names: &Names,
    rate: f64,
    warmup: f64,
    secs: f64,
    prefetch: u16,
) -> anyhow::Result<BrokerLatency> {
    let queue = &raw_queue(names);
    let (pub_conn, pub_chan) = publisher(names, queue).await?;
    let (con_conn, _con_chan, mut deliveries) = consumer(names, queue, prefetch).await?;
    let body_len = envelope_body(0).len().max(16);
    let started = Instant::now();
    let epoch = std::time::SystemTime::now();
    let now_us = move || epoch.elapsed().map_or(0, |d| d.as_micros() as u64);
    let lo = ((warmup * 1e6) as u64, ((warmup + secs) * 1e6) as u64);
    let histogram = Arc::new(std::sync::Mutex::new(Histogram::<u64>::new_with_bounds(
        1,
        3_600_000_000,
        3,
    )?));
    let consumed = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let consuming = {
        let (consumed, stop, histogram) =
            (Arc::clone(&consumed), stop.clone(), Arc::clone(&histogram));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    next = deliveries.next() => match next {
                        Some(Ok(delivery)) => {
                            let mut stamp = [0u8; 8];
                            stamp.copy_from_slice(&delivery.data[..8]);
                            let sent = u64::from_le_bytes(stamp);
                            if sent >= lo.0 && sent <= lo.1 && let Ok(mut h) = histogram.lock() {
                                h.saturating_record(now_us().saturating_sub(sent));
                            }
                            let _ = delivery.ack(BasicAckOptions::default()).await;
                            consumed.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => return,
                    },
                    () = stop.cancelled() => return,
                }
            }
        })
    };
    let total = Duration::from_secs_f64(warmup + secs);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut pending = FuturesUnordered::new();
    let mut published: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some(_) = pending.next(), if !pending.is_empty() => continue,
        }
        let elapsed = started.elapsed();
        if elapsed >= total {
            break;
        }
        let due = (rate * elapsed.as_secs_f64()) as u64;
        while published < due {
            let mut body = vec![b' '; body_len];
            body[..8].copy_from_slice(&now_us().to_le_bytes());
            pending.push(publish(&pub_chan, queue, &body).await?);
            published += 1;
        }
    }
    while pending.next().await.is_some() {}
    let deadline = Instant::now() + Duration::from_secs(30);
    while consumed.load(Ordering::Relaxed) < published && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.cancel();
    let _ = consuming.await;
    let _ = pub_conn.close(200, "done".into()).await;
    let _ = con_conn.close(200, "done".into()).await;
    delete_queue(names, queue).await;
    let h = histogram
        .lock()
        .map_err(|_| anyhow::anyhow!("histogram poisoned"))?
        .clone();
    Ok(BrokerLatency {
        waits: FineQuantiles::of_micros(&h),
        sent: published,
    })
}

/// Fills a queue with `messages` Herald-sized messages, then consumes them with manual acks at
/// `prefetch` and reports the CPU time this process spent per message consumed.
pub async fn consume_cpu(
    names: &Names,
    messages: u64,
    prefetch: u16,
) -> anyhow::Result<ConsumeCpu> {
    let queue = &raw_queue(names);
    let (pub_conn, pub_chan) = publisher(names, queue).await?;
    let mut pending = FuturesUnordered::new();
    for i in 0..messages {
        if pending.len() >= 1000 {
            pending.next().await;
        }
        pending.push(publish(&pub_chan, queue, &envelope_body(i)).await?);
    }
    while pending.next().await.is_some() {}
    let _ = pub_conn.close(200, "done".into()).await;

    let cpu0 = crate::sys::own_cpu_time();
    let started = Instant::now();
    let (con_conn, _con_chan, mut deliveries) = consumer(names, queue, prefetch).await?;
    let mut consumed = 0;
    while consumed < messages {
        match tokio::time::timeout(Duration::from_secs(30), deliveries.next()).await {
            Ok(Some(Ok(delivery))) => {
                delivery.ack(BasicAckOptions::default()).await?;
                consumed += 1;
            }
            _ => break,
        }
    }
    let cpu = crate::sys::own_cpu_time() - cpu0;
    let secs = started.elapsed().as_secs_f64();
    let _ = con_conn.close(200, "done".into()).await;
    Ok(ConsumeCpu {
        events: consumed,
        secs,
        rate: consumed as f64 / secs,
        cpu_secs: cpu.as_secs_f64(),
        cpu_us_per_event: cpu.as_secs_f64() * 1e6 / consumed.max(1) as f64,
    })
}

/// Deletes every raw queue of this run (those a failed measurement left behind too).
pub async fn delete_raw_queues(names: &Names) {
    for n in 0..QUEUES.load(Ordering::Relaxed) {
        delete_queue(names, &format!("{}.raw.{n}", names.prefix)).await;
    }
}

/// Samples the ready-message count of the node's events queue every 250 ms until `stop`: where
/// the end-to-end loop's in-flight events wait (many ready: the worker side is the bottleneck;
/// few: the commit and publish side is).
pub async fn sample_ready(names: &Names, stop: CancellationToken) -> Vec<u32> {
    let mut samples = Vec::new();
    let Ok((connection, channel)) = connect(names, "sampler").await else {
        return samples;
    };
    let partitions = herald::config::QueueSettings::default().partitions;
    let topology = herald::queue::Topology::new(&names.prefix, partitions);
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    while !stop.is_cancelled() {
        let mut ready = 0;
        for p in 0..partitions {
            let queue = topology.partition_queue(p);
            if let Ok(q) = channel
                .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                .await
            {
                ready += q.message_count();
            }
        }
        samples.push(ready);
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
            () = stop.cancelled() => {}
        }
    }
    let _ = connection.close(200, "done".into()).await;
    samples
}
