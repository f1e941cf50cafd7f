//! The load generator: its own process (it shares the two cores with the node, but not its
//! runtime, allocator or scheduler queue), driven by the harness over stdin/stdout, one JSON command
//! per line in, one JSON answer per line out.
//!
//! It holds the N user sockets for the whole run (so the node carries them through every phase),
//! answers their heartbeats' replies, counts every pushed event and, while a latency window is open,
//! records receive time minus the event's `at` in an HDR histogram: latency as a client sees it.

use crate::protocol::{
    Background, BurstPlan, BurstReply, Closed, Command, Connected, Disconnected, E2eDone, E2eEnd,
    E2eStart, FineQuantiles, Ingested, KeepupReply, LatencyReply, Mark, PacedPlan, PacedReply,
    Quantiles,
};
use crate::zipf::{SplitMix64, Zipf};
use futures_util::stream::{self, StreamExt};
use futures_util::{SinkExt, future};
use hdrhistogram::Histogram;
use herald::event::{UserId, now_unix_ms, partition_of};
use herald::token::{TokenSigner, now_unix_secs};
use serde::Serialize;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The event name of every benchmark event; frames carrying it are pushes to count.
const EVENT: &str = "bench";
/// Padding in each event's data, so a message is the size of a small real notification.
pub const PAD: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
/// Events per request of the batch API (also the raw UNNEST baseline's rows per statement).
pub const BATCH: usize = 100;
/// Sockets connecting at once.
pub(crate) const CONNECT_CONCURRENCY: usize = 64;
/// Herald closes sockets silent for 60 s; clients heartbeat every 25 s like the JS client (30 s).
const HEARTBEAT: Duration = Duration::from_secs(25);

/// The closed loop's shape: producers, the window of events in flight, the users' skew, and
/// which API each producer posts to.
struct E2eShape {
    producers: usize,
    window: u64,
    skew: Option<f64>,
    apis: Vec<String>,
}

struct Shared {
    /// Benchmark events pushed to our sockets, all phases.
    received: AtomicU64,
    /// User sockets that ended (Herald closed them or the transport failed).
    closed: AtomicU64,
    /// Events with `at` in [lo, hi] (Unix ms) are recorded in `latency`.
    record_lo: AtomicI64,
    record_hi: AtomicI64,
    latency: Mutex<Histogram<u64>>,
    /// The burst's hot user: the socket whose pushes are counted apart (`u64::MAX`: none).
    hot: AtomicU64,
    /// Pushes the hot socket received since the burst began, and when it had `hot_target` of them.
    hot_received: AtomicU64,
    hot_target: AtomicU64,
    hot_done: Mutex<Option<Instant>>,
    /// The longest a hot push waited (receive time minus `at`), ms.
    hot_max_ms: AtomicU64,
    /// While set, every other socket's push is kept as (`at`, waited ms, socket): a phase picks
    /// its windows afterwards.
    sampling: AtomicBool,
    samples: Mutex<Vec<(i64, u64, u64)>>,
    /// Events whose `sent_us` (Unix µs, set by the paced producers) is in [lo, hi] are recorded
    /// in `paced`, in µs: the fixed-rate phase's waits, finer than the server's ms `at`.
    paced_lo: AtomicI64,
    paced_hi: AtomicI64,
    paced: Mutex<Histogram<u64>>,
    /// The paced requests' send -> 2xx, µs, over the same window.
    paced_answers: Mutex<Histogram<u64>>,
}

/// Events a skewed producer drew, and how many went to the most frequent user.
#[derive(Default)]
struct Drawn {
    all: AtomicU64,
    top: AtomicU64,
}

struct Loadgen {
    base: String,
    ws_base: String,
    key: String,
    signer: TokenSigner,
    http: reqwest::Client,
    shared: Arc<Shared>,
    users: usize,
    echo: Vec<Ws>,
    /// Round-robin position over the connected users, so each user's events go out in order.
    next_event: Arc<AtomicU64>,
    /// The user sockets' tasks, and what closes them all.
    sockets: TaskTracker,
    close_sockets: CancellationToken,
}

/// Answers the harness: one JSON line.
pub(crate) fn reply(answer: &impl Serialize) {
    let mut out = std::io::stdout().lock();
    if let Ok(line) = serde_json::to_string(answer) {
        let _ = writeln!(out, "{line}");
    }
    let _ = out.flush();
}

/// Runs commands from stdin until it closes.
pub async fn run(base: String, key: String) -> anyhow::Result<()> {
    crate::sys::raise_nofile_limit();
    let mut load = Loadgen {
        ws_base: base.replacen("http", "ws", 1),
        base,
        key,
        signer: TokenSigner::new(crate::node::SECRET),
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(1024)
            .build()?,
        shared: Arc::new(Shared {
            received: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            record_lo: AtomicI64::new(i64::MAX),
            record_hi: AtomicI64::new(i64::MIN),
            latency: Mutex::new(Histogram::new_with_bounds(1, 3_600_000, 3)?),
            hot: AtomicU64::new(u64::MAX),
            hot_received: AtomicU64::new(0),
            hot_target: AtomicU64::new(u64::MAX),
            hot_done: Mutex::new(None),
            hot_max_ms: AtomicU64::new(0),
            sampling: AtomicBool::new(false),
            samples: Mutex::new(Vec::new()),
            paced_lo: AtomicI64::new(i64::MAX),
            paced_hi: AtomicI64::new(i64::MIN),
            paced: Mutex::new(Histogram::new_with_bounds(1, 3_600_000_000, 3)?),
            paced_answers: Mutex::new(Histogram::new_with_bounds(1, 3_600_000_000, 3)?),
        }),
        users: 0,
        echo: Vec::new(),
        next_event: Arc::new(AtomicU64::new(0)),
        sockets: TaskTracker::new(),
        close_sockets: CancellationToken::new(),
    };
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let command: Command = serde_json::from_str(&line)?;
        match command {
            Command::ConnectEcho { port, n } => reply(&load.connect_echo(port, n).await),
            Command::CloseEcho => {
                load.echo.clear();
                reply(&Closed { closed: true });
            }
            Command::Connect { n, base } => {
                if let Some(base) = base {
                    load.ws_base = base.replacen("http", "ws", 1);
                    load.base = base;
                }
                reply(&load.connect(n).await)
            }
            Command::Disconnect => reply(&load.disconnect().await),
            Command::IngestBatch { secs, producers } => {
                reply(&load.ingest(secs, producers, true).await)
            }
            Command::IngestSingle { secs, clients } => {
                reply(&load.ingest(secs, clients, false).await)
            }
            Command::E2e {
                warmup,
                secs,
                producers,
                window,
                skew,
                apis,
            } => {
                let shape = E2eShape {
                    producers,
                    window,
                    skew,
                    apis,
                };
                load.e2e(warmup, secs, &shape).await
            }
            Command::Latency { rate, warmup, secs } => {
                reply(&load.latency(rate, warmup, secs).await)
            }
            Command::Keepup {
                warmup,
                secs,
                producers,
                drain,
            } => reply(&load.keepup(warmup, secs, producers, drain).await),
            Command::Burst(plan) => reply(&load.burst(&plan).await),
            Command::Paced(plan) => reply(&load.paced(&plan).await),
        }
    }
    Ok(())
}

/// One event as the API takes it.
pub(crate) fn event_json(user: &str, i: u64) -> String {
    format!(r#"{{"user_id":"{user}","event":"{EVENT}","data":{{"i":{i},"pad":"{PAD}"}}}}"#)
}

/// One event that carries its send time (Unix µs), for the paced phase's fine latency.
fn stamped_event_json(user: &str, i: u64, sent_us: i64) -> String {
    format!(
        r#"{{"user_id":"{user}","event":"{EVENT}","data":{{"i":{i},"sent_us":{sent_us},"pad":"{PAD}"}}}}"#
    )
}

/// Microseconds since the Unix epoch.
fn now_unix_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

pub(crate) fn batch_json(events: impl Iterator<Item = String>) -> String {
    let events: Vec<String> = events.collect();
    format!(r#"{{"events":[{}]}}"#, events.join(","))
}

/// The integer after `"key":` in `text`.
pub(crate) fn field_i64(text: &str, key: &str) -> Option<i64> {
    let start = text.find(key)? + key.len();
    let digits: String = text[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '-')
        .collect();
    digits.parse().ok()
}

impl Shared {
    /// A frame from socket `socket`.
    fn on_frame(&self, text: &str, socket: u64) {
        if !text.contains(r#","bench","#) {
            return; // a reply (join, heartbeat), not a push
        }
        self.received.fetch_add(1, Ordering::Relaxed);
        // Only while a paced phase is open: the other phases' frames are not searched for it.
        if self.paced_lo.load(Ordering::Relaxed) != i64::MAX
            && let Some(sent_us) = field_i64(text, r#""sent_us":"#)
        {
            self.on_paced(sent_us);
            return;
        }
        let Some(at) = field_i64(text, r#""at":"#) else {
            return;
        };
        if socket == self.hot.load(Ordering::Relaxed) {
            let waited = (now_unix_ms() - at).max(0) as u64;
            self.hot_max_ms.fetch_max(waited, Ordering::Relaxed);
            if self.hot_received.fetch_add(1, Ordering::Relaxed) + 1
                == self.hot_target.load(Ordering::Relaxed)
                && let Ok(mut done) = self.hot_done.lock()
            {
                *done = Some(Instant::now());
            }
            return;
        }
        if self.sampling.load(Ordering::Relaxed)
            && let Ok(mut samples) = self.samples.lock()
        {
            samples.push((at, (now_unix_ms() - at).max(0) as u64, socket));
        }
        if at >= self.record_lo.load(Ordering::Relaxed)
            && at <= self.record_hi.load(Ordering::Relaxed)
        {
            let waited = (now_unix_ms() - at).max(0) as u64;
            if let Ok(mut h) = self.latency.lock() {
                h.saturating_record(waited);
            }
        }
    }

    /// A paced event sent at `sent_us` arrived.
    fn on_paced(&self, sent_us: i64) {
        if (self.paced_lo.load(Ordering::Relaxed)..=self.paced_hi.load(Ordering::Relaxed))
            .contains(&sent_us)
            && let Ok(mut h) = self.paced.lock()
        {
            h.saturating_record((now_unix_us() - sent_us).max(1) as u64);
        }
    }
}

impl Loadgen {
    async fn post(&self, path: &str, body: String) -> bool {
        self.post_to(&self.base, path, body).await
    }

    /// [`Self::post`] to the API at `base`.
    async fn post_to(&self, base: &str, path: &str, body: String) -> bool {
        let sent = self
            .http
            .post(format!("{base}{path}"))
            .bearer_auth(&self.key)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        matches!(sent, Ok(r) if r.status().is_success())
    }

    async fn connect_echo(&mut self, port: u16, n: usize) -> Connected {
        let started = Instant::now();
        let url = format!("ws://127.0.0.1:{port}/");
        let sockets: Vec<Option<Ws>> = stream::iter(0..n)
            .map(|_| {
                let url = url.clone();
                async move {
                    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.ok()?;
                    ws.send(Message::Text("hello".into())).await.ok()?;
                    ws.next().await?.ok()?;
                    Some(ws)
                }
            })
            .buffer_unordered(CONNECT_CONCURRENCY)
            .collect()
            .await;
        let failed = sockets.iter().filter(|s| s.is_none()).count();
        self.echo = sockets.into_iter().flatten().collect();
        Connected {
            connected: self.echo.len(),
            failed,
            secs: started.elapsed().as_secs_f64(),
        }
    }

    async fn connect(&mut self, n: usize) -> Connected {
        let started = Instant::now();
        let from = self.users;
        let this = &*self;
        let (joined, failed) = join_all_users(from..n, |i| this.connect_user(i)).await;
        for (i, ws) in joined {
            self.sockets.spawn(serve_socket(
                ws,
                Arc::clone(&self.shared),
                i as u64,
                self.close_sockets.clone(),
            ));
        }
        self.users = n;
        Connected {
            connected: n - from - failed,
            failed,
            secs: started.elapsed().as_secs_f64(),
        }
    }

    async fn disconnect(&mut self) -> Disconnected {
        let started = Instant::now();
        let n = self.users;
        self.close_sockets.cancel();
        self.sockets.close();
        self.sockets.wait().await;
        (self.sockets, self.close_sockets) = (TaskTracker::new(), CancellationToken::new());
        self.users = 0;
        // Sockets closed on purpose are not failures of the next phases.
        self.shared.closed.store(0, Ordering::Relaxed);
        Disconnected {
            disconnected: n,
            secs: started.elapsed().as_secs_f64(),
        }
    }

    async fn connect_user(&self, i: usize) -> Option<Ws> {
        let user = UserId::parse(format!("s{i}")).ok()?;
        let token = self.signer.sign(&user, now_unix_secs() + 24 * 3600);
        let url = format!("{}/socket/websocket?vsn=2.0.0&token={token}", self.ws_base);
        join_user(url, &user).await
    }

    /// Offline users (nobody connected), so only the API and the commit are measured at the edge;
    /// the node still publishes and delivers them behind.
    async fn ingest(&self, secs: f64, concurrency: usize, batch: bool) -> Ingested {
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        let started = Instant::now();
        let accepted = AtomicU64::new(0);
        let errors = AtomicU64::new(0);
        let workers = (0..concurrency).map(|w| {
            let (accepted, errors) = (&accepted, &errors);
            async move {
                let mut k: u64 = 0;
                while Instant::now() < deadline {
                    let (path, body, n) = if batch {
                        let body = batch_json(
                            (0..BATCH as u64)
                                .map(|j| event_json(&format!("ib{w}-{}", (k + j) % 100), k + j)),
                        );
                        ("/api/v1/events/batch", body, BATCH as u64)
                    } else {
                        let body = event_json(&format!("is{w}-{}", k % 100), k);
                        ("/api/v1/events", body, 1)
                    };
                    k += n;
                    if self.post(path, body).await {
                        accepted.fetch_add(n, Ordering::Relaxed);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        future::join_all(workers).await;
        Ingested::over(
            started,
            accepted.load(Ordering::Relaxed),
            errors.load(Ordering::Relaxed),
        )
    }

    /// A batch of `n` events to the next `n` users in round-robin order.
    fn user_batch(&self, n: usize) -> String {
        let users = self.users.max(1) as u64;
        let k = self.next_event.fetch_add(n as u64, Ordering::Relaxed);
        batch_json((k..k + n as u64).map(|i| event_json(&format!("s{}", i % users), i)))
    }

    /// A batch of `n` events, each to a user drawn from `zipf` (rank k is user `s<k>`); counts the
    /// events drawn and those to the most frequent user.
    fn zipf_batch(&self, zipf: &Zipf, rng: &mut SplitMix64, n: usize, drawn: &Drawn) -> String {
        let k = self.next_event.fetch_add(n as u64, Ordering::Relaxed);
        let mut top = 0;
        let body = batch_json((k..k + n as u64).map(|i| {
            let rank = zipf.sample(rng);
            top += u64::from(rank == 0);
            event_json(&format!("s{rank}"), i)
        }));
        drawn.all.fetch_add(n as u64, Ordering::Relaxed);
        drawn.top.fetch_add(top, Ordering::Relaxed);
        body
    }

    async fn e2e(&self, warmup: f64, secs: f64, shape: &E2eShape) {
        let E2eShape {
            producers,
            window,
            skew,
            ref apis,
        } = *shape;
        let base = self.shared.received.load(Ordering::Relaxed);
        let sent = AtomicU64::new(0);
        let errors = AtomicU64::new(0);
        let stop = CancellationToken::new();
        let zipf = skew.map(|s| Zipf::new(self.users.max(1), s));
        let drawn = Drawn::default();
        let received = || self.shared.received.load(Ordering::Relaxed) - base;
        let (sent_ref, errors_ref, stop_ref, zipf, drawn_ref) =
            (&sent, &errors, &stop, &zipf, &drawn);
        let producer = move |w: usize| async move {
            let (sent, errors, stop) = (sent_ref, errors_ref, stop_ref);
            let mut rng = SplitMix64::new(0x5eed_0000 + w as u64);
            while !stop.is_cancelled() {
                // Closed loop: wait while `window` events are accepted but not yet pushed.
                while sent.load(Ordering::Relaxed).saturating_sub(received()) >= window {
                    if stop.is_cancelled() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                sent.fetch_add(BATCH as u64, Ordering::Relaxed);
                let body = match zipf {
                    Some(zipf) => self.zipf_batch(zipf, &mut rng, BATCH, drawn_ref),
                    None => self.user_batch(BATCH),
                };
                let api = apis.get(w % apis.len().max(1)).unwrap_or(&self.base);
                if !self.post_to(api, "/api/v1/events/batch", body).await {
                    sent.fetch_sub(BATCH as u64, Ordering::Relaxed);
                    errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        let conductor = async {
            tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
            let (r0, t0) = (received(), Instant::now());
            reply(&E2eStart { mark: Mark::Start });
            tokio::time::sleep(Duration::from_secs_f64(secs)).await;
            let (r1, t1) = (received(), Instant::now());
            let secs = (t1 - t0).as_secs_f64();
            let mut end = E2eEnd {
                mark: Mark::End,
                events: r1 - r0,
                secs,
                rate: (r1 - r0) as f64 / secs,
                top_user_share: None,
                top_user_expected: None,
            };
            if let Some(zipf) = zipf {
                // The sampler's own check: the most frequent user's share of the events drawn.
                let all = drawn.all.load(Ordering::Relaxed).max(1) as f64;
                end.top_user_share = Some(drawn.top.load(Ordering::Relaxed) as f64 / all);
                end.top_user_expected = Some(zipf.probability(0));
            }
            reply(&end);
            stop.cancel();
        };
        future::join(conductor, future::join_all((0..producers).map(producer))).await;
        let drained = self
            .wait_received(base, sent.load(Ordering::Relaxed), 60)
            .await;
        reply(&E2eDone {
            mark: Mark::Done,
            sent: sent.load(Ordering::Relaxed),
            received: received(),
            drained,
            errors: errors.load(Ordering::Relaxed),
            closed: self.shared.closed.load(Ordering::Relaxed),
        });
    }

    /// Waits until `expected` events arrived since `base`, at most `limit_secs`.
    async fn wait_received(&self, base: u64, expected: u64, limit_secs: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(limit_secs);
        while self.shared.received.load(Ordering::Relaxed) - base < expected {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    async fn latency(&self, rate: f64, warmup: f64, secs: f64) -> LatencyReply {
        let base = self.shared.received.load(Ordering::Relaxed);
        if let Ok(mut h) = self.shared.latency.lock() {
            h.reset();
        }
        let lo = now_unix_ms() + (warmup * 1000.0) as i64;
        self.shared.record_lo.store(lo, Ordering::Relaxed);
        self.shared
            .record_hi
            .store(lo + (secs * 1000.0) as i64, Ordering::Relaxed);
        // Open loop: every 10 ms, send what the rate says is due, without waiting for answers; a
        // request that finds no free slot among 256 in flight leaves its events to the next tick.
        let slots = Arc::new(Semaphore::new(256));
        let accepted = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let mut due_sent: u64 = 0;
        let mut late_ticks = 0u64;
        let started = Instant::now();
        let total = Duration::from_secs_f64(warmup + secs);
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            let elapsed = started.elapsed();
            if elapsed >= total {
                break;
            }
            let due = (rate * elapsed.as_secs_f64()) as u64;
            let n = (due - due_sent).min(1000) as usize;
            if n == 0 {
                continue;
            }
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                late_ticks += 1;
                continue;
            };
            due_sent += n as u64;
            let body = self.user_batch(n);
            let request = self
                .http
                .post(format!("{}/api/v1/events/batch", self.base))
                .bearer_auth(&self.key)
                .header("content-type", "application/json")
                .body(body);
            let (accepted, errors) = (Arc::clone(&accepted), Arc::clone(&errors));
            tokio::spawn(async move {
                match request.send().await {
                    Ok(r) if r.status().is_success() => {
                        accepted.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                drop(slot);
            });
        }
        let _all_answered = slots.acquire_many(256).await;
        let expected = accepted.load(Ordering::Relaxed);
        let drained = self.wait_received(base, expected, 30).await;
        self.shared.record_lo.store(i64::MAX, Ordering::Relaxed);
        // Poisoned only by a panic while recording, which leaves the histogram whole.
        let h = self
            .shared
            .latency
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        LatencyReply {
            count: h.len(),
            p50: h.value_at_quantile(0.5),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
            sent: expected,
            drained,
            late_ticks,
            errors: errors.load(Ordering::Relaxed),
            closed: self.shared.closed.load(Ordering::Relaxed),
        }
    }
}

impl Loadgen {
    async fn keepup(&self, warmup: f64, secs: f64, producers: usize, drain: u64) -> KeepupReply {
        let base = self.shared.received.load(Ordering::Relaxed);
        let received = || self.shared.received.load(Ordering::Relaxed) - base;
        let accepted = AtomicU64::new(0);
        let errors = AtomicU64::new(0);
        let stop = CancellationToken::new();
        let producer = || async {
            while !stop.is_cancelled() {
                if self
                    .post("/api/v1/events/batch", self.user_batch(BATCH))
                    .await
                {
                    accepted.fetch_add(BATCH as u64, Ordering::Relaxed);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        let conductor = async {
            tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
            let (a0, r0, t0) = (accepted.load(Ordering::Relaxed), received(), Instant::now());
            tokio::time::sleep(Duration::from_secs_f64(secs)).await;
            let (a1, r1, t1) = (accepted.load(Ordering::Relaxed), received(), Instant::now());
            stop.cancel();
            (
                a1 - a0,
                r1 - r0,
                (t1 - t0).as_secs_f64(),
                a1.saturating_sub(r1),
            )
        };
        let ((accepted_n, pushed_n, window, backlog), _) = future::join(
            conductor,
            future::join_all((0..producers).map(|_| producer())),
        )
        .await;
        let total = accepted.load(Ordering::Relaxed);
        let drain_started = Instant::now();
        let drained = self.wait_received(base, total, drain).await;
        let (accepted_rate, pushed_rate) = (accepted_n as f64 / window, pushed_n as f64 / window);
        KeepupReply {
            secs: window,
            accepted: accepted_n,
            pushed: pushed_n,
            accepted_rate,
            pushed_rate,
            ratio: pushed_rate / accepted_rate.max(f64::MIN_POSITIVE),
            backlog_at_end: backlog,
            drained,
            drain_secs: drain_started.elapsed().as_secs_f64(),
            errors: errors.load(Ordering::Relaxed),
            closed: self.shared.closed.load(Ordering::Relaxed),
        }
    }

    /// Single events at a fixed rate (see [`PacedPlan`]).
    async fn paced(&self, plan: &PacedPlan) -> PacedReply {
        let shared = &self.shared;
        let base = shared.received.load(Ordering::Relaxed);
        let closed = shared.closed.load(Ordering::Relaxed);
        for h in [&shared.paced, &shared.paced_answers] {
            if let Ok(mut h) = h.lock() {
                h.reset();
            }
        }
        let lo = now_unix_us() + (plan.warmup * 1e6) as i64;
        let hi = lo + (plan.secs * 1e6) as i64;
        shared.paced_lo.store(lo, Ordering::Relaxed);
        shared.paced_hi.store(hi, Ordering::Relaxed);
        let producers = plan.producers.max(1);
        let interval = Duration::from_secs_f64(producers as f64 / plan.rate.max(1e-3));
        let started = tokio::time::Instant::now();
        let end = started + Duration::from_secs_f64(plan.warmup + plan.secs);
        let users = self.users.max(1) as u64;
        let (sent, accepted, errors, late) = (
            AtomicU64::new(0),
            AtomicU64::new(0),
            AtomicU64::new(0),
            AtomicU64::new(0),
        );
        let answers = &shared.paced_answers;
        let producer = |w: usize| {
            let (sent, accepted, errors, late) = (&sent, &accepted, &errors, &late);
            async move {
                // A client of its own: one connection, as one backend process would hold.
                let http = reqwest::Client::builder()
                    .pool_max_idle_per_host(1)
                    .build()
                    .unwrap_or_else(|_| self.http.clone());
                let mut slot = started + interval.mul_f64(w as f64 / producers as f64);
                while slot < end {
                    // Late: the previous answer came after this slot (the timer's own ms of
                    // slack is not lateness).
                    if tokio::time::Instant::now() > slot {
                        late.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep_until(slot).await;
                    slot += interval;
                    let i = self.next_event.fetch_add(1, Ordering::Relaxed);
                    let sent_us = now_unix_us();
                    let request = http
                        .post(format!("{}/api/v1/events", self.base))
                        .bearer_auth(&self.key)
                        .header("content-type", "application/json")
                        .body(stamped_event_json(&format!("s{}", i % users), i, sent_us));
                    sent.fetch_add(1, Ordering::Relaxed);
                    match request.send().await {
                        Ok(r) if r.status().is_success() => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            if (lo..=hi).contains(&sent_us)
                                && let Ok(mut h) = answers.lock()
                            {
                                h.saturating_record((now_unix_us() - sent_us).max(1) as u64);
                            }
                        }
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        };
        future::join_all((0..producers).map(producer)).await;
        let drained = self
            .wait_received(base, accepted.load(Ordering::Relaxed), 30)
            .await;
        shared.paced_lo.store(i64::MAX, Ordering::Relaxed);
        let fine = |h: &Mutex<Histogram<u64>>| {
            h.lock()
                .ok()
                .map(|h| FineQuantiles::of_micros(&h))
                .filter(|q| q.count > 0)
        };
        PacedReply {
            rate: plan.rate,
            producers,
            sent: sent.load(Ordering::Relaxed),
            accepted: accepted.load(Ordering::Relaxed),
            errors: errors.load(Ordering::Relaxed),
            late: late.load(Ordering::Relaxed),
            push: fine(&shared.paced),
            answer: fine(answers),
            drained,
            closed: shared.closed.load(Ordering::Relaxed) - closed,
        }
    }

    async fn burst(&self, plan: &BurstPlan) -> BurstReply {
        let others = self.users.saturating_sub(1).max(1) as u64;
        let shared = &self.shared;
        let base = shared.received.load(Ordering::Relaxed);
        let closed = shared.closed.load(Ordering::Relaxed);
        shared.hot_received.store(0, Ordering::Relaxed);
        shared.hot_target.store(plan.events, Ordering::Relaxed);
        shared.hot_max_ms.store(0, Ordering::Relaxed);
        if let Ok(mut done) = shared.hot_done.lock() {
            *done = None;
        }
        shared.hot.store(0, Ordering::Relaxed);
        if let Ok(mut samples) = shared.samples.lock() {
            samples.clear();
        }
        shared.sampling.store(true, Ordering::Relaxed);

        let stop = CancellationToken::new();
        // The others: single events, open loop, every 10 ms what the rate says is due, each its
        // own request (at most 256 in flight), to s1 .. s<n-1> in turn.
        let background = async {
            let slots = Arc::new(Semaphore::new(256));
            let accepted = Arc::new(AtomicU64::new(0));
            let errors = Arc::new(AtomicU64::new(0));
            // (sent at, Unix ms; answered after, ms): where an event's wait is, API or pipeline.
            let answers = Arc::new(Mutex::new(Vec::new()));
            let (mut sent, mut late) = (0u64, 0u64);
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            while !stop.is_cancelled() {
                tick.tick().await;
                let due = (plan.rate * started.elapsed().as_secs_f64()) as u64;
                while sent < due {
                    let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                        late += 1;
                        break;
                    };
                    let user = format!("s{}", 1 + sent % others);
                    let request = self
                        .http
                        .post(format!("{}/api/v1/events", self.base))
                        .bearer_auth(&self.key)
                        .header("content-type", "application/json")
                        .body(event_json(&user, sent));
                    sent += 1;
                    let (accepted, errors) = (Arc::clone(&accepted), Arc::clone(&errors));
                    let answers = Arc::clone(&answers);
                    tokio::spawn(async move {
                        let (at, asked) = (now_unix_ms(), Instant::now());
                        match request.send().await {
                            Ok(r) if r.status().is_success() => {
                                accepted.fetch_add(1, Ordering::Relaxed);
                                if let Ok(mut answers) = answers.lock() {
                                    answers.push((at, asked.elapsed().as_millis() as u64, 0));
                                }
                            }
                            _ => {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        drop(slot);
                    });
                }
            }
            let _all_answered = slots.acquire_many(256).await;
            let answers = answers
                .lock()
                .map(|mut a| std::mem::take(&mut *a))
                .unwrap_or_default();
            (
                accepted.load(Ordering::Relaxed),
                errors.load(Ordering::Relaxed),
                late,
                answers,
            )
        };
        // The hot user: every burst request at once, then wait until its client has them all.
        let hot = async {
            tokio::time::sleep(Duration::from_secs_f64(plan.warmup)).await;
            let (start_ms, t0) = (now_unix_ms(), Instant::now());
            let per_request = plan.events.div_ceil(plan.requests.max(1) as u64);
            let answers = future::join_all((0..plan.requests as u64).map(|r| {
                let first = r * per_request;
                let last = (first + per_request).min(plan.events);
                let body = batch_json((first..last).map(|i| event_json("s0", i)));
                async move {
                    let ok = self.post("/api/v1/events/batch", body).await;
                    (ok, last - first, t0.elapsed().as_secs_f64())
                }
            }))
            .await;
            let deadline = t0 + Duration::from_secs_f64(plan.limit);
            let drained = loop {
                if let Some(done) = shared.hot_done.lock().ok().and_then(|d| *d) {
                    break Some((done - t0).as_secs_f64());
                }
                if Instant::now() > deadline {
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            };
            let window = drained.unwrap_or(plan.limit).max(plan.min_window);
            tokio::time::sleep_until((t0 + Duration::from_secs_f64(window)).into()).await;
            stop.cancel();
            (start_ms, answers, drained, window)
        };
        let ((accepted, errors, late, api), (start_ms, answers, drained, window)) =
            future::join(background, hot).await;
        // Wait for the others' events still on their way (the hot user's count is apart).
        let deadline = Instant::now() + Duration::from_secs(30);
        while shared.received.load(Ordering::Relaxed)
            - base
            - shared.hot_received.load(Ordering::Relaxed)
            < accepted
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        shared.sampling.store(false, Ordering::Relaxed);
        shared.hot.store(u64::MAX, Ordering::Relaxed);
        let samples = shared
            .samples
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default();
        let window_ms = (window * 1000.0) as i64;
        // Before: the same background load over the warm-up's last part (its first half second
        // is the ramp).
        let before_ms = ((plan.warmup - 0.5).max(0.5) * 1000.0) as i64;
        let all = |_: u64| true;
        let during = latency_of(&samples, start_ms, start_ms + window_ms, all);
        let before = latency_of(&samples, start_ms - before_ms, start_ms - 1, all);
        // Where the wait is: the users whose events share the hot user's partition queue, and
        // the rest.
        let partitions = herald::config::QueueSettings::default().partitions;
        let hot_partition = partition_of("s0", partitions);
        let shares = |i: u64| partition_of(&format!("s{i}"), partitions) == hot_partition;
        let during_shared = latency_of(&samples, start_ms, start_ms + window_ms, shares);
        let during_apart = latency_of(&samples, start_ms, start_ms + window_ms, |i| !shares(i));
        let burst_accepted: u64 = answers.iter().filter(|a| a.0).map(|a| a.1).sum();
        BurstReply {
            events: plan.events,
            requests: plan.requests,
            rate: plan.rate,
            others,
            burst_accepted,
            burst_errors: answers.iter().filter(|a| !a.0).count(),
            answered_secs: answers.iter().map(|a| a.2).fold(0.0, f64::max),
            hot_received: shared.hot_received.load(Ordering::Relaxed),
            drain_secs: drained,
            drained: drained.is_some(),
            hot_max_ms: shared.hot_max_ms.load(Ordering::Relaxed),
            window_secs: window,
            during,
            before,
            during_hot_partition: during_shared,
            during_other_partitions: during_apart,
            during_timeline_max_ms: timeline(&samples, start_ms, window_ms),
            during_api: latency_of(&api, start_ms, start_ms + window_ms, all),
            before_api: latency_of(&api, start_ms - before_ms, start_ms - 1, all),
            background: Background {
                accepted,
                errors,
                late_ticks: late,
            },
            closed: shared.closed.load(Ordering::Relaxed) - closed,
        }
    }
}

/// The longest wait of the events enqueued in each 100 ms from `start_ms` on, over `window_ms`:
/// when in the burst the others waited.
fn timeline(samples: &[(i64, u64, u64)], start_ms: i64, window_ms: i64) -> Vec<u64> {
    let mut buckets = vec![0; (window_ms / 100 + 1) as usize];
    for &(at, waited, _) in samples {
        if let Some(b) = usize::try_from((at - start_ms) / 100)
            .ok()
            .filter(|_| at >= start_ms)
            .and_then(|i| buckets.get_mut(i))
        {
            *b = waited.max(*b);
        }
    }
    buckets
}

/// p50 / p99 / max (ms) and count of the samples with `at` in `lo..=hi` (Unix ms) from the
/// sockets `which` picks.
fn latency_of(
    samples: &[(i64, u64, u64)],
    lo: i64,
    hi: i64,
    which: impl Fn(u64) -> bool,
) -> Option<Quantiles> {
    let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000, 3).ok()?;
    for &(at, waited, socket) in samples {
        if (lo..=hi).contains(&at) && which(socket) {
            h.saturating_record(waited);
        }
    }
    Some(Quantiles {
        count: h.len(),
        p50: h.value_at_quantile(0.5),
        p99: h.value_at_quantile(0.99),
        max: h.max(),
        mean: h.mean(),
    })
}

/// Holds one user socket: counts pushes, heartbeats like the JS client, ends when Herald closes it
/// or `close` is cancelled (then it closes it).
async fn serve_socket(ws: Ws, shared: Arc<Shared>, i: u64, close: CancellationToken) {
    let (mut sink, mut stream) = ws.split();
    // Spread heartbeats over the period instead of sending 10,000 at once.
    let offset = Duration::from_millis(i * 7919 % HEARTBEAT.as_millis() as u64);
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + offset, HEARTBEAT);
    loop {
        tokio::select! {
            frame = stream.next() => match frame {
                Some(Ok(Message::Text(text))) => shared.on_frame(&text, i),
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
            () = close.cancelled() => {
                let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(Message::Close(None)))
                    .await;
                return;
            }
            _ = heartbeat.tick() => {
                let beat = Message::Text(r#"[null,"hb","phoenix","heartbeat",{}]"#.into());
                if sink.send(beat).await.is_err() {
                    break;
                }
            }
        }
    }
    shared.closed.fetch_add(1, Ordering::Relaxed);
}

/// Opens the sockets of users `users` with `open`, [`CONNECT_CONCURRENCY`] at a time: the joined
/// ones with their index (which names the socket, `s<i>`), in no order, and how many failed.
pub(crate) async fn join_all_users<F, Fut, T>(
    users: std::ops::Range<usize>,
    open: F,
) -> (Vec<(usize, T)>, usize)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let results: Vec<(usize, Option<T>)> = stream::iter(users)
        .map(|i| {
            let opening = open(i);
            async move { (i, opening.await) }
        })
        .buffer_unordered(CONNECT_CONCURRENCY)
        .collect()
        .await;
    let failed = results.iter().filter(|(_, ws)| ws.is_none()).count();
    let joined = results
        .into_iter()
        .filter_map(|(i, ws)| Some((i, ws?)))
        .collect();
    (joined, failed)
}

/// Connects to the user socket at `url` (its token included) and joins `user:<user>`: the socket,
/// once the join is answered `ok`.
pub(crate) async fn join_user(url: String, user: &UserId) -> Option<Ws> {
    join_user_from(url, user, None).await
}

/// [`join_user`] from the local address `source` when given: one process's sockets to one node
/// share a source address's ephemeral ports (about 28,000), so the scale-out run gives each load
/// generator a loopback address of its own (`127.0.0.<n>`).
pub(crate) async fn join_user_from(
    url: String,
    user: &UserId,
    source: Option<std::net::IpAddr>,
) -> Option<Ws> {
    let mut ws = match source {
        None => tokio_tungstenite::connect_async(url).await.ok()?.0,
        Some(source) => {
            let address = url.split("://").nth(1)?.split('/').next()?;
            let server = tokio::net::lookup_host(address).await.ok()?.next()?;
            let socket = match source {
                std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
                std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
            }
            .ok()?;
            socket.bind(std::net::SocketAddr::new(source, 0)).ok()?;
            let stream = socket.connect(server).await.ok()?;
            tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
                .await
                .ok()?
                .0
        }
    };
    let join = format!(r#"["1","1","user:{user}","phx_join",{{}}]"#);
    ws.send(Message::Text(join.into())).await.ok()?;
    loop {
        if let Message::Text(text) = ws.next().await?.ok()?
            && text.contains("phx_reply")
        {
            return text.contains(r#""status":"ok""#).then_some(ws);
        }
    }
}
