//! Clients: a Phoenix Channels v2 client over tokio-tungstenite that behaves as the official
//! JavaScript client does (heartbeats, a rejoin about a second after `phx_error` with its params
//! evaluated again, a reconnect with backoff when its socket goes), used the way apps use it: join
//! `user:<id>` with `{}` or with the last seq seen, stay a while, leave and rejoin, move to another
//! node, ack what was shown. Every frame is recorded as it is read, per channel instance (one join
//! ref), so nothing sits in a client-side buffer between the wire and the history.

use super::cluster::Registry;
use super::history::{End, Instance, PushTiming, Pushed, Reply, StrayPush};
use super::rng::Rng;
use crate::common::user_token;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, timeout, timeout_at};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The official client's heartbeat is 30 s; a shorter one finds dead sockets sooner in a short run.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// The official client's push (and join) timeout.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// The official client's `rejoinAfterMs`.
const REJOIN_MS: [u64; 4] = [1_000, 2_000, 5_000, 10_000];
/// The official client's `reconnectAfterMs`.
const RECONNECT_MS: [u64; 10] = [10, 50, 100, 150, 200, 250, 500, 1_000, 2_000, 5_000];

/// How a client passes its join params.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// Always `{}`: live events only, from the reply's `last_seq` on.
    Empty,
    /// `{"last_seq": L}`, L the highest seq this client saw of the user (0 at first): an app that
    /// resumes where it left off.
    LastSeq,
}

/// The shared record every client writes to as it reads frames.
pub struct Recorder {
    started: std::time::Instant,
    instances: Mutex<Vec<Instance>>,
    stray: Mutex<Vec<StrayPush>>,
    pub acks: AtomicU64,
}

impl Recorder {
    pub fn new(started: std::time::Instant) -> Arc<Self> {
        Arc::new(Self {
            started,
            instances: Mutex::new(Vec::new()),
            stray: Mutex::new(Vec::new()),
            acks: AtomicU64::new(0),
        })
    }

    fn ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn open(&self, instance: Instance) -> usize {
        let mut all = self.instances.lock().unwrap();
        all.push(instance);
        all.len() - 1
    }

    fn update<R>(&self, i: usize, change: impl FnOnce(&mut Instance) -> R) -> R {
        change(&mut self.instances.lock().unwrap()[i])
    }

    /// Sets `i`'s end unless it already has one.
    fn end(&self, i: usize, end: End) {
        self.update(i, |inst| {
            inst.end.get_or_insert(end);
        });
    }

    /// For each open instance (joined, not ended): its user and the highest seq it has covered
    /// (its baseline, or its highest push).
    pub fn open_reaches(&self) -> Vec<(String, i64)> {
        let all = self.instances.lock().unwrap();
        all.iter()
            .filter(|i| i.end.is_none())
            .filter_map(|i| {
                let reply = i.reply.as_ref().filter(|r| r.ok)?;
                let baseline = i.asked.or(reply.last_seq)?;
                let pushed = i.pushes.iter().filter_map(|p| p.seq).max();
                Some((i.user.clone(), pushed.unwrap_or(baseline).max(baseline)))
            })
            .collect()
    }

    /// Everything recorded, once the clients are done.
    pub fn take(&self) -> (Vec<Instance>, Vec<StrayPush>) {
        (
            std::mem::take(&mut *self.instances.lock().unwrap()),
            std::mem::take(&mut *self.stray.lock().unwrap()),
        )
    }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Why a connection's session ended.
enum Gone {
    /// The run is over.
    Stopped,
    /// The client closed it to move to another node.
    Moved,
    /// It closed or failed under the client: reconnect with backoff.
    Lost,
}

/// The user channel's state on a connection.
enum Channel {
    Joining {
        jr: String,
        idx: usize,
        since: Instant,
    },
    Joined {
        jr: String,
        idx: usize,
        dwell_until: Instant,
    },
    /// Rejoin at `until` (after a `phx_error`, a refusal, a close or a join timeout).
    Waiting { until: Instant },
}

/// One open WebSocket.
struct Conn {
    ws: Ws,
    node: String,
    number: u32,
    next_ref: u64,
    /// Join refs sent on this connection, and the instance each opened.
    joins: HashMap<String, usize>,
    /// Leave refs sent, and the instance each leaves.
    leaves: HashMap<String, usize>,
    /// Instances the server said are over (error reply, `phx_close`, `phx_error`, leave reply):
    /// a push for one of these is a push after its end.
    over: HashSet<usize>,
    channel: Channel,
    heartbeat_due: Instant,
    heartbeat_pending: Option<String>,
    /// The last ids pushed, for acks.
    recent: VecDeque<Uuid>,
}

impl Conn {
    fn next_ref(&mut self) -> String {
        self.next_ref += 1;
        self.next_ref.to_string()
    }

    async fn send(&mut self, frame: Value) -> Result<(), String> {
        match timeout(
            Duration::from_secs(5),
            self.ws.send(Message::Text(frame.to_string().into())),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("send failed: {e}")),
            Err(_) => Err("send timed out".into()),
        }
    }

    fn wake(&self) -> Instant {
        let channel = match &self.channel {
            Channel::Joining { since, .. } => *since + JOIN_TIMEOUT,
            Channel::Joined { dwell_until, .. } => *dwell_until,
            Channel::Waiting { until } => *until,
        };
        channel.min(self.heartbeat_due)
    }
}

/// One client: a task of its own until `stop`.
pub struct Client {
    pub index: usize,
    pub rng: Rng,
    pub style: Style,
    pub sockets: Registry,
    pub recorder: Arc<Recorder>,
    /// Set for the quiet period: no more leaving or moving (a client still rejoins after an error
    /// and reconnects after a close, as the official one does).
    pub settle: CancellationToken,
    pub stop: CancellationToken,
}

/// What a client carries across its connections.
struct State {
    user: String,
    /// The highest seq seen per user (what a `LastSeq` client asks for).
    seen: HashMap<String, i64>,
    connections: u32,
    rejoin_attempt: usize,
}

impl Client {
    pub async fn run(mut self) {
        let mut state = State {
            user: super::pick_user(&mut self.rng),
            seen: HashMap::new(),
            connections: 0,
            rejoin_attempt: 0,
        };
        let mut attempt = 0usize;
        while !self.stop.is_cancelled() {
            let nodes = self.sockets.borrow().clone();
            if !nodes.is_empty() {
                let (node, addr) = self.rng.pick(&nodes).clone();
                if let Some(ws) = connect(addr, &state.user).await {
                    attempt = 0;
                    state.connections += 1;
                    let conn = Conn {
                        ws,
                        node,
                        number: state.connections,
                        next_ref: 0,
                        joins: HashMap::new(),
                        leaves: HashMap::new(),
                        over: HashSet::new(),
                        channel: Channel::Waiting {
                            until: Instant::now(),
                        },
                        heartbeat_due: Instant::now() + HEARTBEAT,
                        heartbeat_pending: None,
                        recent: VecDeque::new(),
                    };
                    match self.session(&mut state, conn).await {
                        Gone::Stopped => return,
                        Gone::Moved => {
                            if self.rng.chance(0.2) {
                                state.user = super::pick_user(&mut self.rng);
                            }
                            continue;
                        }
                        Gone::Lost => {}
                    }
                }
            }
            let wait = RECONNECT_MS[attempt.min(RECONNECT_MS.len() - 1)];
            attempt += 1;
            tokio::select! {
                () = sleep(Duration::from_millis(wait)) => {}
                () = self.stop.cancelled() => return,
            }
        }
    }

    /// Runs one connection until it is gone; every instance it opened has an end by then (or is
    /// still joined, at the stop).
    async fn session(&mut self, state: &mut State, mut conn: Conn) -> Gone {
        loop {
            let next = tokio::select! {
                biased;
                () = self.stop.cancelled() => {
                    self.finish(&conn);
                    let _ = timeout(Duration::from_secs(2), conn.ws.close(None)).await;
                    return Gone::Stopped;
                }
                next = timeout_at(conn.wake(), conn.ws.next()) => next,
            };
            let step = match next {
                Err(_) => self.on_timer(state, &mut conn).await,
                Ok(Some(Ok(Message::Text(text)))) => self.on_frame(state, &mut conn, &text).await,
                Ok(Some(Ok(Message::Close(frame)))) => Err(Step::Lost(match frame {
                    Some(f) => format!("closed by the server: {} {}", u16::from(f.code), f.reason),
                    None => "closed by the server without a code".into(),
                })),
                Ok(Some(Ok(_))) => Ok(()),
                Ok(Some(Err(e))) => Err(Step::Lost(format!("read failed: {e}"))),
                Ok(None) => Err(Step::Lost("connection ended".into())),
            };
            match step {
                Ok(()) => {}
                Err(Step::Lost(why)) => {
                    self.end_all(&conn, &End::SocketClosed(why));
                    return Gone::Lost;
                }
                Err(Step::Leave(why, gone)) => {
                    self.end_all(&conn, &End::Disconnected(why));
                    let _ = timeout(Duration::from_secs(2), conn.ws.close(None)).await;
                    return gone;
                }
            }
        }
    }

    /// Ends every instance of `conn` that has no end yet.
    fn end_all(&self, conn: &Conn, end: &End) {
        for &idx in conn.joins.values() {
            self.recorder.end(idx, end.clone());
        }
    }

    /// At the stop: the joined instance is still joined; one being left was left.
    fn finish(&self, conn: &Conn) {
        if let Channel::Joined { idx, .. } = conn.channel {
            self.recorder.end(idx, End::StillJoined);
        }
        for &idx in conn.leaves.values() {
            self.recorder.end(idx, End::Left);
        }
    }

    async fn join(&mut self, state: &State, conn: &mut Conn) -> Result<(), Step> {
        let jr = conn.next_ref();
        let asked = match self.style {
            Style::Empty => None,
            Style::LastSeq => Some(state.seen.get(&state.user).copied().unwrap_or(0)),
        };
        let params = asked.map_or_else(|| json!({}), |l| json!({ "last_seq": l }));
        let idx = self.recorder.open(Instance {
            client: self.index,
            connection: conn.number,
            node: conn.node.clone(),
            user: state.user.clone(),
            join_ref: jr.clone(),
            asked,
            joined_at_ms: self.recorder.ms(),
            reply: None,
            pushes: Vec::new(),
            end: None,
        });
        conn.joins.insert(jr.clone(), idx);
        let topic = format!("user:{}", state.user);
        conn.send(json!([jr, jr, topic, "phx_join", params]))
            .await
            .map_err(Step::Lost)?;
        conn.channel = Channel::Joining {
            jr,
            idx,
            since: Instant::now(),
        };
        Ok(())
    }

    fn rejoin_later(&mut self, state: &mut State, conn: &mut Conn) {
        let wait = REJOIN_MS[state.rejoin_attempt.min(REJOIN_MS.len() - 1)];
        state.rejoin_attempt += 1;
        conn.channel = Channel::Waiting {
            until: Instant::now() + Duration::from_millis(wait),
        };
    }

    fn dwell(&mut self) -> Instant {
        Instant::now() + Duration::from_millis(self.rng.between(1_000, 8_000))
    }

    async fn on_timer(&mut self, state: &mut State, conn: &mut Conn) -> Result<(), Step> {
        let now = Instant::now();
        if now >= conn.heartbeat_due {
            if conn.heartbeat_pending.is_some() {
                return Err(Step::Leave("heartbeat timeout".into(), Gone::Lost));
            }
            let r = conn.next_ref();
            conn.send(json!([null, r, "phoenix", "heartbeat", {}]))
                .await
                .map_err(Step::Lost)?;
            conn.heartbeat_pending = Some(r);
            conn.heartbeat_due = now + HEARTBEAT;
        }
        let topic = format!("user:{}", state.user);
        match &conn.channel {
            Channel::Joining { jr, idx, since } if now >= *since + JOIN_TIMEOUT => {
                // As the official client: leave the timed-out join and rejoin later.
                let (jr, idx) = (jr.clone(), *idx);
                let r = conn.next_ref();
                conn.leaves.insert(r.clone(), idx);
                self.recorder.end(idx, End::JoinTimeout);
                conn.send(json!([jr, r, topic, "phx_leave", {}]))
                    .await
                    .map_err(Step::Lost)?;
                self.rejoin_later(state, conn);
            }
            Channel::Waiting { until } if now >= *until => self.join(state, conn).await?,
            Channel::Joined {
                jr,
                idx,
                dwell_until,
            } if now >= *dwell_until => {
                let (jr, idx) = (jr.clone(), *idx);
                if self.settle.is_cancelled() {
                    let until = self.dwell();
                    conn.channel = Channel::Joined {
                        jr,
                        idx,
                        dwell_until: until,
                    };
                    return Ok(());
                }
                match self.rng.below(100) {
                    0..20 => {
                        // Leave, and join again at once on the same socket.
                        let r = conn.next_ref();
                        conn.leaves.insert(r.clone(), idx);
                        conn.send(json!([jr, r, topic, "phx_leave", {}]))
                            .await
                            .map_err(Step::Lost)?;
                        self.join(state, conn).await?;
                    }
                    20..50 => return Err(Step::Leave("moving".into(), Gone::Moved)),
                    r => {
                        if r < 70 && !conn.recent.is_empty() {
                            let ids: Vec<String> =
                                conn.recent.iter().map(ToString::to_string).collect();
                            let r = conn.next_ref();
                            conn.send(json!([jr, r, topic, "ack", {"ids": ids}]))
                                .await
                                .map_err(Step::Lost)?;
                        }
                        let until = self.dwell();
                        conn.channel = Channel::Joined {
                            jr,
                            idx,
                            dwell_until: until,
                        };
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    async fn on_frame(
        &mut self,
        state: &mut State,
        conn: &mut Conn,
        text: &str,
    ) -> Result<(), Step> {
        let frame: Value = serde_json::from_str(text).unwrap_or(Value::Null);
        let client = self.index;
        let stray = |conn: &Conn| StrayPush {
            client,
            connection: conn.number,
            node: conn.node.clone(),
            frame: text.to_owned(),
        };
        let Some([jr, msg_ref, topic, event, payload]) = frame
            .as_array()
            .and_then(|a| <&[Value; 5]>::try_from(a.get(..5)?).ok())
        else {
            self.recorder.stray.lock().unwrap().push(stray(conn));
            return Ok(());
        };
        let (jr, msg_ref) = (jr.as_str(), msg_ref.as_str());
        let instance = jr.and_then(|jr| conn.joins.get(jr).copied());
        let current = match &conn.channel {
            Channel::Joining { idx, .. } | Channel::Joined { idx, .. } => Some(*idx),
            Channel::Waiting { .. } => None,
        };
        match event.as_str().unwrap_or_default() {
            "phx_reply" if topic == "phoenix" => {
                if msg_ref.is_some() && msg_ref == conn.heartbeat_pending.as_deref() {
                    conn.heartbeat_pending = None;
                }
            }
            "phx_reply" => {
                if let Some(idx) = instance
                    && msg_ref == jr
                {
                    self.on_join_reply(state, conn, idx, payload, current == Some(idx));
                } else if let Some(&idx) = msg_ref.and_then(|r| conn.leaves.get(r)) {
                    conn.over.insert(idx);
                    self.recorder.end(idx, End::Left);
                } else if payload["status"] == "ok" {
                    self.recorder.acks.fetch_add(1, Ordering::Relaxed);
                }
            }
            "phx_close" | "phx_error" => {
                let Some(idx) = instance else {
                    self.recorder.stray.lock().unwrap().push(stray(conn));
                    return Ok(());
                };
                conn.over.insert(idx);
                let end = if event == "phx_error" {
                    End::Errored(payload.to_string())
                } else if conn.leaves.values().any(|&l| l == idx) {
                    End::Left
                } else {
                    End::Closed
                };
                self.recorder.end(idx, end);
                if current == Some(idx) {
                    self.rejoin_later(state, conn);
                }
            }
            name => {
                let Some(idx) = instance else {
                    self.recorder.stray.lock().unwrap().push(stray(conn));
                    return Ok(());
                };
                let seq = payload["seq"].as_i64();
                let id = payload["id"].as_str().and_then(|s| s.parse().ok());
                let at_ms = self.recorder.ms();
                let over = conn.over.contains(&idx);
                let user = self.recorder.update(idx, |inst| {
                    let when = if over {
                        PushTiming::AfterEnd
                    } else if inst.reply.is_none() {
                        PushTiming::BeforeReply
                    } else {
                        PushTiming::Live
                    };
                    inst.pushes.push(Pushed {
                        topic: topic.as_str().unwrap_or_default().to_owned(),
                        event: name.to_owned(),
                        seq,
                        id,
                        at_ms,
                        when,
                    });
                    (!over).then(|| inst.user.clone())
                });
                if let (Some(user), Some(seq)) = (user, seq) {
                    let seen = state.seen.entry(user).or_insert(0);
                    *seen = (*seen).max(seq);
                }
                if let Some(id) = id {
                    conn.recent.push_back(id);
                    if conn.recent.len() > 5 {
                        conn.recent.pop_front();
                    }
                }
            }
        }
        Ok(())
    }

    fn on_join_reply(
        &mut self,
        state: &mut State,
        conn: &mut Conn,
        idx: usize,
        payload: &Value,
        current: bool,
    ) {
        let response = &payload["response"];
        let ok = payload["status"] == "ok";
        let at_ms = self.recorder.ms();
        self.recorder.update(idx, |inst| {
            inst.reply = Some(Reply {
                ok,
                last_seq: response["last_seq"].as_i64(),
                missed: response["missed"].as_bool().unwrap_or(false),
                raw: response.to_string(),
                at_ms,
            });
        });
        if !ok {
            conn.over.insert(idx);
            self.recorder.end(idx, End::Refused);
        }
        if !current {
            return;
        }
        if let (true, Channel::Joining { jr, .. }) = (ok, &conn.channel) {
            let jr = jr.clone();
            state.rejoin_attempt = 0;
            let until = self.dwell();
            conn.channel = Channel::Joined {
                jr,
                idx,
                dwell_until: until,
            };
        } else if !ok {
            self.rejoin_later(state, conn);
        }
    }
}

/// Why a step ended the session.
enum Step {
    /// The connection failed under the client.
    Lost(String),
    /// The client closes it itself (why, and what follows).
    Leave(String, Gone),
}

async fn connect(addr: SocketAddr, user: &str) -> Option<Ws> {
    let url = format!(
        "ws://{addr}/socket/websocket?token={}&vsn=2.0.0",
        user_token(user)
    );
    match timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(url),
    )
    .await
    {
        Ok(Ok((ws, _))) => Some(ws),
        _ => None,
    }
}
