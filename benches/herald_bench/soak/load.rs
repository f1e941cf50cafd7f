//! The soak's load generator: its own process, as the bench's (`loadgen.rs`) is, so the load
//! never shares a runtime or an allocator with the harness that samples. Driven over stdin/stdout,
//! one JSON command per line in, one JSON answer per line out.
//!
//! It holds the joined sockets for the whole run (users `s0..s<sockets>`, spread over the nodes),
//! posts events open loop at a fixed rate, each to a user drawn from a Zipf distribution over
//! `s0..s<users>` (rank k is user `s<k>`, so the hot users are the joined ones and, when `users`
//! exceeds `sockets`, the cold tail is offline), and answers, for each window between two `sample`
//! commands, what was accepted and pushed and the latency of those pushes. Counters only grow;
//! a window is the difference from the last sample, so nothing is reset under the producers' feet.
//! The scale-out run (`scale.rs`) starts several, each with its own users (`--first-user F`: user
//! `s<F + k>` for rank k) and source address, so each counts only its own users' events and pushes.
//!
//! Unlike the bench's sockets, these rejoin a channel Herald closed (`phx_error`, `phx_close`)
//! after a second with the last seq they received, as the official client does: an hour is long
//! enough for a gap to close a channel, and a channel that silently stopped would read as lost
//! pushes instead of the repair it is. Rejoins are counted per window.

use crate::loadgen::{
    BATCH, Ws, batch_json, event_json, field_i64, join_all_users, join_user_from, reply,
};
use crate::protocol::Connected;
use crate::zipf::{SplitMix64, Zipf};
use futures_util::{SinkExt, StreamExt, future};
use hdrhistogram::Histogram;
use herald::event::{UserId, now_unix_ms};
use herald::token::{TokenSigner, now_unix_secs};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Sockets connecting at once.
/// Herald closes sockets silent for 60 s; clients heartbeat every 25 s like the JS client (30 s).
const HEARTBEAT: Duration = Duration::from_secs(25);
/// How long a closed channel waits before it rejoins: the official client's first backoff.
const REJOIN_AFTER: Duration = Duration::from_secs(1);
/// Requests in flight at once; a tick that finds none free leaves its events to the next tick
/// (counted as late), so the offered rate is kept over time without an unbounded queue of tasks.
const MAX_IN_FLIGHT: usize = 256;
/// The open loop's tick: every 10 ms it sends what the rate says is due.
const TICK: Duration = Duration::from_millis(10);

/// How the load generator is started (`herald-bench soak-loadgen ...`).
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// An API base per node, `http://127.0.0.1:<port>`: sockets and requests go round the list.
    #[arg(long = "base", required = true)]
    pub bases: Vec<String>,
    /// Where requests go instead, when given (nodes without the socket role's sockets, or the
    /// other way round): requests go round this list, sockets round `--base`.
    #[arg(long = "api-base")]
    pub api_bases: Vec<String>,
    #[arg(long)]
    pub key: String,
    /// Users events are drawn over (`s<first>..s<first + users>`).
    #[arg(long)]
    pub users: usize,
    /// The first user's number: several load generators share a deployment's users between
    /// them, each drawing events over its own users and holding their sockets.
    #[arg(long, default_value_t = 0)]
    pub first_user: usize,
    /// The local address the sockets connect from (the OS's choice when not given).
    #[arg(long)]
    pub source: Option<std::net::IpAddr>,
    /// Exponent of the Zipf distribution of users.
    #[arg(long)]
    pub skew: f64,
    /// Most events per batch request.
    #[arg(long, default_value_t = BATCH)]
    pub batch: usize,
}

/// One command from the harness.
#[derive(Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Connect the sockets of users `s<first>..s<first + n>` (socket of user i to node i mod
    /// nodes) and join each user's channel.
    Connect { n: usize },
    /// Closed loop, the bench's way (`producers` posting batches as answered, at most `window`
    /// events to joined users accepted but not yet pushed): the sustained rate of this deployment
    /// under this user mix, accepted events per second over `secs` after `warmup`; then waits
    /// (at most `drain` s) for the pushes still on their way.
    Measure {
        warmup: f64,
        secs: f64,
        producers: usize,
        window: u64,
        drain: u64,
    },
    /// Start the open loop at `rate` events/s (answers at once; the load runs until `stop`).
    Start { rate: f64 },
    /// The window since the last sample (or the start).
    Sample,
    /// Stop the open loop and wait until every request is answered; answers the totals and the
    /// backlog (events to joined users accepted but not yet pushed) at that moment.
    Stop,
    /// Wait until every accepted event to a joined user is pushed, at most `limit` s.
    Drain { limit: f64 },
    /// Close every socket.
    Disconnect,
}

/// The sustained rate, measured the bench's way (`measure`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Measured {
    pub secs: f64,
    pub accepted: u64,
    pub pushed: u64,
    pub rate: f64,
    pub errors: u64,
    pub drained: bool,
}

/// The open loop runs (`start`).
#[derive(Serialize, Deserialize)]
pub struct Started {
    pub started: bool,
}

/// A window since the last sample (`sample`): its counts, and the latency of its pushes as
/// (value, count) pairs, so the harness can merge windows into the spans its verdicts compare
/// (quantiles of windows do not combine).
#[derive(Serialize, Deserialize)]
pub struct Window {
    #[serde(flatten)]
    pub counts: WindowCounts,
    pub latency: Vec<[u64; 2]>,
}

/// What a window counted.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WindowCounts {
    pub secs: f64,
    pub accepted: u64,
    pub accepted_joined: u64,
    pub pushed: u64,
    pub request_errors: u64,
    pub failed_events: u64,
    pub late_ticks: u64,
    pub rejoins: u64,
    pub sockets_closed: u64,
    pub latency_count: u64,
}

/// The totals when the open loop stopped (`stop`), and the backlog: events to joined users
/// accepted but not yet pushed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stopped {
    pub accepted: u64,
    pub accepted_joined: u64,
    pub pushed: u64,
    pub backlog: u64,
    pub request_errors: u64,
    pub sockets_closed: u64,
}

/// Whether every accepted event to a joined user was pushed (`drain`), and what was left.
#[derive(Serialize, Deserialize)]
pub struct Drained {
    pub drained: bool,
    pub secs: f64,
    pub left: u64,
}

/// The sockets are closed (`disconnect`).
#[derive(Serialize, Deserialize)]
pub struct Disconnected {
    pub disconnected: usize,
}

/// Counters since the start; they only grow.
#[derive(Default)]
struct Counters {
    /// Events the API answered 2xx for, and those of them to a joined user (the ones a socket
    /// should receive).
    accepted: AtomicU64,
    accepted_joined: AtomicU64,
    /// Requests not answered 2xx (the open loop does not retry them), and their events.
    request_errors: AtomicU64,
    failed_events: AtomicU64,
    /// Ticks that found no free request slot.
    late_ticks: AtomicU64,
    /// Benchmark events pushed to the sockets.
    pushed: AtomicU64,
    /// Channels Herald closed (`phx_error` or `phx_close`) and joins refused, each followed by a
    /// rejoin.
    rejoins: AtomicU64,
    /// Sockets that ended while they should have been held.
    closed: AtomicU64,
}

/// What every socket task shares: the counters and the window's latency histogram.
struct Shared {
    counters: Counters,
    /// Receive time minus the event's `at`, ms, of the pushes received since the last sample.
    latency: Mutex<Histogram<u64>>,
}

fn histogram() -> Histogram<u64> {
    // Values are clamped into the bounds (saturating_record), so an hour is only the top bucket.
    Histogram::new_with_bounds(1, 3_600_000, 3)
        .expect("1 ms to an hour at 3 significant figures are valid bounds")
}

struct Load {
    args: Args,
    signer: TokenSigner,
    http: reqwest::Client,
    shared: Arc<Shared>,
    zipf: Arc<Zipf>,
    /// This load generator's first `joined` users have a socket.
    joined: usize,
    sockets: TaskTracker,
    close_sockets: CancellationToken,
    /// The open loop, while it runs.
    producer: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
    /// The counters at the last sample, and when it was taken.
    last: Snapshot,
    last_at: Instant,
    /// Events numbered across the run (each event's `data.i`).
    next_event: Arc<AtomicU64>,
}

/// The counters at one moment.
#[derive(Clone, Copy, Default)]
struct Snapshot {
    accepted: u64,
    accepted_joined: u64,
    request_errors: u64,
    failed_events: u64,
    late_ticks: u64,
    pushed: u64,
    rejoins: u64,
    closed: u64,
}

impl Counters {
    fn snapshot(&self) -> Snapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Snapshot {
            accepted: get(&self.accepted),
            accepted_joined: get(&self.accepted_joined),
            request_errors: get(&self.request_errors),
            failed_events: get(&self.failed_events),
            late_ticks: get(&self.late_ticks),
            pushed: get(&self.pushed),
            rejoins: get(&self.rejoins),
            closed: get(&self.closed),
        }
    }
}

/// Runs commands from stdin until it closes.
pub async fn run(args: Args) -> anyhow::Result<()> {
    crate::sys::raise_nofile_limit();
    let mut load = Load {
        signer: TokenSigner::new(crate::node::SECRET),
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(MAX_IN_FLIGHT)
            .build()?,
        shared: Arc::new(Shared {
            counters: Counters::default(),
            latency: Mutex::new(histogram()),
        }),
        zipf: Arc::new(Zipf::new(args.users.max(1), args.skew)),
        joined: 0,
        sockets: TaskTracker::new(),
        close_sockets: CancellationToken::new(),
        producer: None,
        last: Snapshot::default(),
        last_at: Instant::now(),
        next_event: Arc::new(AtomicU64::new(0)),
        args,
    };
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let command: Command = serde_json::from_str(&line)?;
        match command {
            Command::Connect { n } => reply(&load.connect(n).await),
            Command::Measure {
                warmup,
                secs,
                producers,
                window,
                drain,
            } => reply(&load.measure(warmup, secs, producers, window, drain).await),
            Command::Start { rate } => reply(&load.start(rate)),
            Command::Sample => reply(&load.sample()),
            Command::Stop => reply(&load.stop().await),
            Command::Drain { limit } => reply(&load.drain(limit).await),
            Command::Disconnect => reply(&load.disconnect().await),
        }
    }
    Ok(())
}

impl Load {
    fn users(&self) -> Users {
        Users {
            first: self.args.first_user,
            joined: self.joined,
        }
    }

    fn base(&self, i: usize) -> &str {
        &self.args.bases[i % self.args.bases.len()]
    }

    async fn connect(&mut self, n: usize) -> Connected {
        let started = Instant::now();
        let this = &*self;
        let first = this.args.first_user;
        // Each socket is held (heartbeats, pushes counted) from its join on: joining 100,000
        // takes minutes, and Herald closes a socket silent for 60 s.
        let hold = |i: usize| async move {
            let ws = this.connect_user(i).await?;
            this.sockets.spawn(hold_socket(
                ws,
                format!("s{i}"),
                Arc::clone(&this.shared),
                i as u64,
                this.close_sockets.clone(),
            ));
            Some(())
        };
        let (_, failed) = join_all_users(first..first + n, hold).await;
        self.joined = n;
        Connected {
            connected: n - failed,
            failed,
            secs: started.elapsed().as_secs_f64(),
        }
    }

    async fn connect_user(&self, i: usize) -> Option<Ws> {
        let user = UserId::parse(format!("s{i}")).ok()?;
        let token = self.signer.sign(&user, now_unix_secs() + 7 * 24 * 3600);
        let ws_base = self.base(i).replacen("http", "ws", 1);
        let url = format!("{ws_base}/socket/websocket?vsn=2.0.0&token={token}");
        join_user_from(url, &user, self.args.source).await
    }

    /// A batch request to node `k mod nodes`, for [`draw`]'s body.
    fn request(&self, k: u64, body: String) -> reqwest::RequestBuilder {
        batch_request(&self.http, &self.args, k, body)
    }

    async fn measure(
        &self,
        warmup: f64,
        secs: f64,
        producers: usize,
        window: u64,
        drain: u64,
    ) -> Measured {
        let counters = &self.shared.counters;
        let base = counters.snapshot();
        let stop = CancellationToken::new();
        let in_flight = || {
            let now = counters.snapshot();
            // Events to joined users sent and not yet pushed, counted from the answers: a request
            // in flight is counted by `sent_joined` below instead.
            (now.accepted_joined - base.accepted_joined).saturating_sub(now.pushed - base.pushed)
        };
        let sent_joined = AtomicU64::new(0);
        let producer = |w: usize| {
            let (stop, sent_joined) = (&stop, &sent_joined);
            async move {
                let mut rng = SplitMix64::new(0x50a4_0000 + w as u64);
                let mut k = w as u64;
                while !stop.is_cancelled() {
                    if in_flight() + sent_joined.load(Ordering::Relaxed) >= window {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    }
                    let n = self.args.batch.max(1) as u64;
                    let (body, joined) =
                        draw(&self.zipf, self.users(), &mut rng, &self.next_event, n);
                    sent_joined.fetch_add(joined, Ordering::Relaxed);
                    let answered = self.request(k, body).send().await;
                    k += producers as u64;
                    if matches!(answered, Ok(ref r) if r.status().is_success()) {
                        counters.accepted.fetch_add(n, Ordering::Relaxed);
                        counters
                            .accepted_joined
                            .fetch_add(joined, Ordering::Relaxed);
                    } else {
                        counters.request_errors.fetch_add(1, Ordering::Relaxed);
                        counters.failed_events.fetch_add(n, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    sent_joined.fetch_sub(joined, Ordering::Relaxed);
                }
            }
        };
        let conductor = async {
            tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
            let (a0, t0) = (counters.snapshot(), Instant::now());
            tokio::time::sleep(Duration::from_secs_f64(secs)).await;
            let (a1, t1) = (counters.snapshot(), Instant::now());
            stop.cancel();
            (a0, a1, (t1 - t0).as_secs_f64())
        };
        let ((a0, a1, window_secs), _) = future::join(
            conductor,
            future::join_all((0..producers.max(1)).map(producer)),
        )
        .await;
        let drained = self.wait_pushed(drain as f64).await;
        let accepted = a1.accepted - a0.accepted;
        Measured {
            secs: window_secs,
            accepted,
            pushed: a1.pushed - a0.pushed,
            rate: accepted as f64 / window_secs.max(0.001),
            errors: a1.request_errors - base.request_errors,
            drained,
        }
    }

    fn start(&mut self, rate: f64) -> Started {
        self.last = self.shared.counters.snapshot();
        self.last_at = Instant::now();
        if let Ok(mut h) = self.shared.latency.lock() {
            h.reset();
        }
        let stop = CancellationToken::new();
        let task = tokio::spawn(open_loop(self.share(), rate, stop.clone()));
        self.producer = Some((stop, task));
        Started { started: true }
    }

    /// What the open loop needs, apart from `self` (which stays with the command loop).
    fn share(&self) -> Producer {
        Producer {
            args: self.args.clone(),
            http: self.http.clone(),
            shared: Arc::clone(&self.shared),
            zipf: Arc::clone(&self.zipf),
            joined: self.joined,
            next_event: Arc::clone(&self.next_event),
        }
    }

    fn sample(&mut self) -> Window {
        let now = self.shared.counters.snapshot();
        let secs = self.last_at.elapsed().as_secs_f64();
        let window = match self.shared.latency.lock() {
            Ok(mut h) => std::mem::replace(&mut *h, histogram()),
            Err(_) => histogram(),
        };
        let last = std::mem::replace(&mut self.last, now);
        self.last_at = Instant::now();
        Window {
            counts: WindowCounts {
                secs,
                accepted: now.accepted - last.accepted,
                accepted_joined: now.accepted_joined - last.accepted_joined,
                pushed: now.pushed - last.pushed,
                request_errors: now.request_errors - last.request_errors,
                failed_events: now.failed_events - last.failed_events,
                late_ticks: now.late_ticks - last.late_ticks,
                rejoins: now.rejoins - last.rejoins,
                sockets_closed: now.closed - last.closed,
                latency_count: window.len(),
            },
            latency: window
                .iter_recorded()
                .map(|v| [v.value_iterated_to(), v.count_at_value()])
                .collect(),
        }
    }

    async fn stop(&mut self) -> Stopped {
        if let Some((stop, task)) = self.producer.take() {
            stop.cancel();
            let _ = task.await;
        }
        let now = self.shared.counters.snapshot();
        Stopped {
            accepted: now.accepted,
            accepted_joined: now.accepted_joined,
            pushed: now.pushed,
            backlog: now.accepted_joined.saturating_sub(now.pushed),
            request_errors: now.request_errors,
            sockets_closed: now.closed,
        }
    }

    /// Waits until the pushes received cover every accepted event to a joined user, at most
    /// `limit` s.
    async fn wait_pushed(&self, limit: f64) -> bool {
        let deadline = Instant::now() + Duration::from_secs_f64(limit);
        loop {
            let now = self.shared.counters.snapshot();
            if now.pushed >= now.accepted_joined {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn drain(&self, limit: f64) -> Drained {
        let started = Instant::now();
        let drained = self.wait_pushed(limit).await;
        let now = self.shared.counters.snapshot();
        Drained {
            drained,
            secs: started.elapsed().as_secs_f64(),
            left: now.accepted_joined.saturating_sub(now.pushed),
        }
    }

    async fn disconnect(&mut self) -> Disconnected {
        self.close_sockets.cancel();
        self.sockets.close();
        self.sockets.wait().await;
        Disconnected {
            disconnected: self.joined,
        }
    }
}

/// This load generator's users: rank k of its Zipf distribution is user `s<first + k>`, and the
/// ranks below `joined` have a socket.
#[derive(Clone, Copy)]
struct Users {
    first: usize,
    joined: usize,
}

/// A batch request's body of `n` events numbered from `next_event` on, each to a user drawn from
/// `zipf` over `users`; returns it with how many of its events go to a joined user.
fn draw(
    zipf: &Zipf,
    users: Users,
    rng: &mut SplitMix64,
    next_event: &AtomicU64,
    n: u64,
) -> (String, u64) {
    let first = next_event.fetch_add(n, Ordering::Relaxed);
    let mut to_joined = 0;
    let body = batch_json((first..first + n).map(|i| {
        let rank = zipf.sample(rng);
        to_joined += u64::from(rank < users.joined);
        event_json(&format!("s{}", users.first + rank), i)
    }));
    (body, to_joined)
}

/// The `k`-th batch request: to the nodes in turn.
fn batch_request(
    http: &reqwest::Client,
    args: &Args,
    k: u64,
    body: String,
) -> reqwest::RequestBuilder {
    let bases = if args.api_bases.is_empty() {
        &args.bases
    } else {
        &args.api_bases
    };
    let base = &bases[k as usize % bases.len()];
    http.post(format!("{base}/api/v1/events/batch"))
        .bearer_auth(&args.key)
        .header("content-type", "application/json")
        .body(body)
}

/// The open loop's own handles.
struct Producer {
    args: Args,
    http: reqwest::Client,
    shared: Arc<Shared>,
    zipf: Arc<Zipf>,
    joined: usize,
    next_event: Arc<AtomicU64>,
}

/// Every tick, sends what `rate` says is due since the start, in batch requests of at most
/// `args.batch` events, without waiting for answers (at most [`MAX_IN_FLIGHT`] in flight), until
/// `stop`; then waits for every answer.
async fn open_loop(p: Producer, rate: f64, stop: CancellationToken) {
    let counters = &p.shared.counters;
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut rng = SplitMix64::new(0x50a4_5eed);
    let (mut sent, mut requests) = (0u64, 0u64);
    let started = Instant::now();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break,
        }
        let due = (rate * started.elapsed().as_secs_f64()) as u64;
        while sent < due {
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                counters.late_ticks.fetch_add(1, Ordering::Relaxed);
                break;
            };
            let n = (due - sent).min(p.args.batch.max(1) as u64);
            sent += n;
            let users = Users {
                first: p.args.first_user,
                joined: p.joined,
            };
            let (body, joined) = draw(&p.zipf, users, &mut rng, &p.next_event, n);
            let request = batch_request(&p.http, &p.args, requests, body);
            requests += 1;
            let shared = Arc::clone(&p.shared);
            tokio::spawn(async move {
                let c = &shared.counters;
                match request.send().await {
                    Ok(r) if r.status().is_success() => {
                        c.accepted.fetch_add(n, Ordering::Relaxed);
                        c.accepted_joined.fetch_add(joined, Ordering::Relaxed);
                    }
                    _ => {
                        c.request_errors.fetch_add(1, Ordering::Relaxed);
                        c.failed_events.fetch_add(n, Ordering::Relaxed);
                    }
                }
                drop(slot);
            });
        }
    }
    let _all_answered = slots.acquire_many(MAX_IN_FLIGHT as u32).await;
}

/// Holds one user socket: counts pushes and their latency, heartbeats like the JS client, rejoins
/// a channel Herald closed from the last seq it received, and ends when Herald closes the socket
/// or `close` is cancelled (then it closes it).
async fn hold_socket(ws: Ws, user: String, shared: Arc<Shared>, i: u64, close: CancellationToken) {
    let (mut sink, mut stream) = ws.split();
    // Spread heartbeats over the period instead of sending thousands at once.
    let offset = Duration::from_millis(i * 7919 % HEARTBEAT.as_millis() as u64);
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + offset, HEARTBEAT);
    let topic = format!(r#""user:{user}""#);
    let mut last_seq: i64 = 0;
    let mut join_ref: u64 = 1;
    // Armed when the channel was closed: the rejoin's moment.
    let rejoin = tokio::time::sleep(Duration::MAX);
    tokio::pin!(rejoin);
    let mut rejoin_armed = false;
    loop {
        tokio::select! {
            frame = stream.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    if text.contains(r#","bench","#) {
                        shared.counters.pushed.fetch_add(1, Ordering::Relaxed);
                        if let Some(seq) = field_i64(&text, r#""seq":"#) {
                            last_seq = last_seq.max(seq);
                        }
                        if let Some(at) = field_i64(&text, r#""at":"#)
                            && let Ok(mut h) = shared.latency.lock()
                        {
                            h.saturating_record((now_unix_ms() - at).max(0) as u64);
                        }
                    } else if !rejoin_armed && text.contains(&topic) && channel_closed(&text, join_ref) {
                        shared.counters.rejoins.fetch_add(1, Ordering::Relaxed);
                        rejoin.as_mut().reset(tokio::time::Instant::now() + REJOIN_AFTER);
                        rejoin_armed = true;
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
            () = &mut rejoin, if rejoin_armed => {
                rejoin_armed = false;
                join_ref += 1;
                let join = format!(
                    r#"["{join_ref}","{join_ref}","user:{user}","phx_join",{{"last_seq":{last_seq}}}]"#
                );
                if sink.send(Message::Text(join.into())).await.is_err() {
                    break;
                }
            }
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
    shared.counters.closed.fetch_add(1, Ordering::Relaxed);
}

/// True when `text`, a frame on the user's topic, ends the channel joined under `join_ref`: a
/// `phx_error` or `phx_close` from Herald, or a refused (re)join.
fn channel_closed(text: &str, join_ref: u64) -> bool {
    let ours = text.starts_with(&format!(r#"["{join_ref}""#));
    ours && (text.contains(r#""phx_error""#)
        || text.contains(r#""phx_close""#)
        || (text.contains(r#""phx_reply""#) && text.contains(r#""status":"error""#)))
}
