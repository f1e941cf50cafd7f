//! The nemesis: faults on a schedule drawn from the seed while the producers stream, most healed
//! before the next and some striking while the one before is still on (pairs of faults that may
//! meet: see [`Planned::meets`]). The first round has every kind of fault once, in a seeded order,
//! so even a short run meets them all; later ones are drawn at random.

use super::cluster::{Cluster, Role};
use super::rng::Rng;
use crate::chaos::close_broker_connections;
use crate::common::purge_queue;
use herald::config::QueueSettings;
use herald::queue::Topology;
use herald::store::Store;
use serde_json::{Value, json};
use std::time::Duration;
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;

/// A kind of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    /// SIGKILL a node of the role, then start a new one.
    Kill(Role),
    /// SIGSTOP a node of the role for 1.5 to 2 partition leases, then SIGCONT: a worker's
    /// partitions move meanwhile; a socket node's clients wait on a silent socket; an api node
    /// holds its publishes past their window.
    Pause(Role),
    /// Cut one node's PostgreSQL proxy, then restore it.
    CutPostgres,
    /// Cut one node's RabbitMQ proxy, then restore it.
    CutRabbitmq,
    /// Stall one node's PostgreSQL proxy (connections stay open, nothing flows), then resume it:
    /// a partition that only timeouts reveal.
    StallPostgres,
    /// Stall one node's RabbitMQ proxy, then resume it.
    StallRabbitmq,
    /// PostgreSQL's connections are all taken (another client's storm): every node's open
    /// connections go on working, but none can open a new one, for longer than a lease.
    ExhaustPostgres,
    /// The broker closes every connection of the deployment (`rabbitmqctl close_connection`).
    CloseBrokerConnections,
    /// PostgreSQL ends the sessions of the deployment's nodes as they come, every 50 ms for a
    /// while (`pg_terminate_backend`, as a restart or a failover in progress does): statements in
    /// flight fail with SQLSTATE 57P01 rather than a broken socket, and pools reconnect.
    EndPostgresSessions,
    /// An operator replays the failed events (admin API).
    ReplayFailed,
    /// An operator replays one user's events, delivered ones included (admin API).
    ReplayUserDelivered,
    /// A worker node loses RabbitMQ (its link cut), so its partitions' messages pile up ready in
    /// their queues, and meanwhile an operator empties every partition queue behind Herald's back
    /// (`rabbitmqctl purge_queue`): those messages are gone after their confirm, and only the
    /// sweeper brings their events back.
    PurgeQueue,
}

impl Fault {
    const ALL: [Fault; 16] = [
        Fault::Kill(Role::Api),
        Fault::Kill(Role::Worker),
        Fault::Kill(Role::Socket),
        Fault::Pause(Role::Api),
        Fault::Pause(Role::Worker),
        Fault::Pause(Role::Socket),
        Fault::CutPostgres,
        Fault::CutRabbitmq,
        Fault::StallPostgres,
        Fault::StallRabbitmq,
        Fault::ExhaustPostgres,
        Fault::CloseBrokerConnections,
        Fault::EndPostgresSessions,
        Fault::ReplayFailed,
        Fault::ReplayUserDelivered,
        Fault::PurgeQueue,
    ];
}

/// One fault of the schedule, with its seeded choices.
#[derive(Clone, Debug)]
pub struct Planned {
    /// How long after the previous fault was healed (or the stream started) it strikes: a slow
    /// heal (a restart, rabbitmqctl) delays the rest instead of squeezing them together. For a
    /// fault that `overlaps`, how long after the previous one *struck*.
    pub after: Duration,
    /// It strikes while the previous fault is still on (a node killed while another's link is
    /// cut, say): faults that meet are where the races nobody planned live.
    pub overlaps: bool,
    pub fault: Fault,
    /// Which node (of the role, or of all six for a cut), drawn once.
    pub pick: u64,
    /// How long the fault lasts (a kill: how long the node stays down).
    pub length: Duration,
    /// The user of a one-user replay.
    pub user: String,
}

impl Planned {
    /// The slot the fault strikes, if it strikes one node.
    fn slot(&self) -> Option<usize> {
        match self.fault {
            Fault::Kill(role) | Fault::Pause(role) => Some(role.slot(self.pick)),
            Fault::CutPostgres
            | Fault::CutRabbitmq
            | Fault::StallPostgres
            | Fault::StallRabbitmq => Some((self.pick % Role::SLOTS as u64) as usize),
            Fault::PurgeQueue => Some(Role::Worker.slot(self.pick)),
            Fault::ExhaustPostgres
            | Fault::CloseBrokerConnections
            | Fault::EndPostgresSessions
            | Fault::ReplayFailed
            | Fault::ReplayUserDelivered => None,
        }
    }

    /// Whether `other` may strike while this fault is on: never the same node twice (a cut
    /// node's restart would wait on its own proxy), and no restart while PostgreSQL takes no
    /// new connection or ends them (it could not start).
    fn meets(&self, other: &Planned) -> bool {
        let same_node = self.slot().is_some() && self.slot() == other.slot();
        let no_postgres = |f| matches!(f, Fault::ExhaustPostgres | Fault::EndPostgresSessions);
        let restart_without_postgres = matches!(
            (self.fault, other.fault),
            (Fault::Kill(_), f) | (f, Fault::Kill(_)) if no_postgres(f)
        );
        !same_node && !restart_without_postgres
    }
}

/// Draws the schedule for a stream of `run`: a fault every few seconds, more than the run can
/// hold (the run stops it). `lease_ms`: a paused node stays stopped 1.5 to 2 leases. About half
/// of the faults that may strike while the one before is on do (pairs, never three).
pub fn plan(seed: u64, run: Duration, lease_ms: u64) -> Vec<Planned> {
    let mut rng = Rng::stream(seed, "nemesis", 0);
    let mut first_round = Fault::ALL.to_vec();
    rng.shuffle(&mut first_round);
    let mut planned: Vec<Planned> = Vec::new();
    // At least one fault every two seconds fits in no run.
    while planned.len() as u64 <= run.as_secs() / 2 {
        let mut after = Duration::from_millis(if planned.is_empty() {
            rng.between(3_000, 5_000)
        } else {
            rng.between(2_000, 4_000)
        });
        let fault = if planned.len() < first_round.len() {
            first_round[planned.len()]
        } else {
            *rng.pick(&Fault::ALL)
        };
        let length = Duration::from_millis(match fault {
            Fault::Kill(_) => rng.between(200, 2_000),
            Fault::Pause(_) => rng.between(lease_ms * 3 / 2, lease_ms * 2),
            Fault::CutPostgres | Fault::CutRabbitmq => rng.between(1_000, 3_000),
            Fault::PurgeQueue => rng.between(1_000, 2_500),
            Fault::StallPostgres | Fault::StallRabbitmq => rng.between(1_000, 4_000),
            Fault::ExhaustPostgres => rng.between(5_000, 40_000),
            Fault::EndPostgresSessions => rng.between(500, 2_000),
            _ => 0,
        });
        let mut op = Planned {
            after,
            overlaps: false,
            fault,
            pick: rng.next_u64(),
            length,
            // A cold user: its replay stays small.
            user: format!("u{}", rng.between(super::HOT_USERS, super::USERS - 1)),
        };
        let chance = rng.chance(0.5);
        if let Some(before) = planned.last()
            && !before.overlaps
            && before.length >= Duration::from_millis(500)
            && before.meets(&op)
            && chance
        {
            // Somewhere in the first three quarters of the fault before.
            let on = before.length.as_millis() as u64;
            after = Duration::from_millis(rng.between(100, on * 3 / 4));
            op.after = after;
            op.overlaps = true;
        }
        planned.push(op);
    }
    planned
}

/// A fault as it happened.
#[derive(Clone, Debug)]
pub struct Done {
    pub at_ms: u64,
    pub fault: Fault,
    /// It struck while another fault was on.
    pub overlapped: bool,
    /// An answer to the fault's request that no client could act on (a replay's 500), if any.
    pub unretryable: Option<String>,
    pub what: String,
}

/// What the nemesis reaches the deployment with, besides its nodes.
struct Deployment {
    http: reqwest::Client,
    admin_key: String,
    queue: QueueSettings,
    /// The checker's own connections (sessions named plain `herald`).
    store: Store,
}

/// A fault struck and not healed yet.
struct Active {
    op: Planned,
    at_ms: u64,
    heal_at: Instant,
    struck: Struck,
}

/// What striking a fault left to undo.
enum Struck {
    /// The node of `slot`, killed: its name.
    Killed { slot: usize, name: String },
    /// The node of `slot`, stopped: its name.
    Paused { slot: usize, name: String },
    /// The proxy to PostgreSQL (or RabbitMQ) of `slot`, cut or stalled.
    Link {
        slot: usize,
        postgres: bool,
        cut: bool,
    },
    /// Every node's PostgreSQL proxy, refusing new connections.
    Exhausted,
    /// A worker cut off from RabbitMQ until its partition queues are purged.
    Purging { slot: usize },
    /// PostgreSQL ending the nodes' sessions until `stop`; `ending` counts them.
    EndingSessions {
        stop: CancellationToken,
        ending: tokio::task::JoinHandle<(i64, Option<String>)>,
    },
    /// An operator's replay request, answered: what was asked and answered, and an answer
    /// before it no client could act on (a 5xx other than 503), if any.
    Replayed {
        what: String,
        unretryable: Option<String>,
    },
    /// Nothing left to undo: what was done.
    Over(String),
}

/// Runs the schedule against `cluster` until `stop` (the faults on then are healed first, each
/// at its time); then heals everything and hands the cluster back with what was done, in the
/// order the faults struck.
pub async fn run(
    mut cluster: Cluster,
    plan: Vec<Planned>,
    admin_key: String,
    queue: QueueSettings,
    store: Store,
    started: std::time::Instant,
    stop: CancellationToken,
) -> (Cluster, Vec<Done>) {
    let at = Deployment {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap(),
        admin_key,
        queue,
        store,
    };
    let queue = &at.queue;
    let mut done = Vec::new();
    let mut active: Vec<Active> = Vec::new();
    let mut last_strike = Instant::now();
    for op in plan {
        let when = if op.overlaps {
            last_strike + op.after
        } else {
            heal_until(&mut cluster, &mut active, None, queue, started, &mut done).await;
            Instant::now() + op.after
        };
        heal_until(
            &mut cluster,
            &mut active,
            Some(when),
            queue,
            started,
            &mut done,
        )
        .await;
        tokio::select! {
            () = sleep_until(when) => {}
            () = stop.cancelled() => break,
        }
        last_strike = Instant::now();
        let at_ms = started.elapsed().as_millis() as u64;
        let struck = strike(&mut cluster, &op, &at).await;
        active.push(Active {
            heal_at: last_strike + op.length,
            op,
            at_ms,
            struck,
        });
    }
    heal_until(&mut cluster, &mut active, None, queue, started, &mut done).await;
    cluster.heal().await;
    done.sort_by_key(|d| d.at_ms);
    (cluster, done)
}

/// Heals the faults on whose time comes before `until` (all of them, with `None`), each at its
/// time, in that order.
async fn heal_until(
    cluster: &mut Cluster,
    active: &mut Vec<Active>,
    until: Option<Instant>,
    queue: &QueueSettings,
    started: std::time::Instant,
    done: &mut Vec<Done>,
) {
    active.sort_by_key(|a| a.heal_at);
    while let Some(next) = active.first()
        && until.is_none_or(|until| next.heal_at <= until)
    {
        let next = active.remove(0);
        sleep_until(next.heal_at).await;
        let unretryable = match &next.struck {
            Struck::Replayed { unretryable, .. } => unretryable.clone(),
            _ => None,
        };
        let what = heal(cluster, next.struck, next.op.length, queue).await;
        let what = if next.op.overlaps {
            format!("{what} (struck while the fault before was on)")
        } else {
            what
        };
        println!(
            "[{:>6.1}s] nemesis: {what} (healed at {:.1}s)",
            next.at_ms as f64 / 1000.0,
            started.elapsed().as_secs_f64()
        );
        done.push(Done {
            at_ms: next.at_ms,
            fault: next.op.fault,
            overlapped: next.op.overlaps,
            unretryable,
            what,
        });
    }
}

/// Makes the fault happen; what is left to undo (an instant fault is over at once).
async fn strike(cluster: &mut Cluster, op: &Planned, at: &Deployment) -> Struck {
    let Deployment {
        http,
        admin_key,
        queue,
        store,
    } = at;
    let slot = op.slot().unwrap_or(0);
    match op.fault {
        Fault::Kill(_) => {
            let name = cluster.kill(slot).await;
            Struck::Killed { slot, name }
        }
        Fault::Pause(_) => {
            let name = cluster.slots[slot].name();
            cluster.pause(slot);
            Struck::Paused { slot, name }
        }
        Fault::CutPostgres | Fault::CutRabbitmq | Fault::StallPostgres | Fault::StallRabbitmq => {
            let postgres = matches!(op.fault, Fault::CutPostgres | Fault::StallPostgres);
            let cut = matches!(op.fault, Fault::CutPostgres | Fault::CutRabbitmq);
            let proxy = link(cluster, slot, postgres);
            if cut {
                proxy.cut()
            } else {
                proxy.stall()
            }
            Struck::Link {
                slot,
                postgres,
                cut,
            }
        }
        Fault::ExhaustPostgres => {
            for slot in &cluster.slots {
                slot.postgres.refuse_new();
            }
            Struck::Exhausted
        }
        Fault::PurgeQueue => {
            // Its partitions have no consumer until their leases move: messages wait, ready.
            cluster.slots[slot].rabbitmq.cut();
            Struck::Purging { slot }
        }
        Fault::CloseBrokerConnections => {
            let prefix = queue.prefix.clone();
            let closed = tokio::task::spawn_blocking(move || close_broker_connections(&prefix))
                .await
                .unwrap_or(0);
            Struck::Over(format!(
                "rabbitmqctl closed {closed} connection(s) of the deployment"
            ))
        }
        Fault::EndPostgresSessions => {
            let (stop, store) = (CancellationToken::new(), store.clone());
            let ending = tokio::spawn(end_sessions(store, stop.clone()));
            Struck::EndingSessions { stop, ending }
        }
        Fault::ReplayFailed => {
            let body = json!({"status": "failed", "rate": 500});
            let replayed = replay(cluster, http, admin_key, &body).await;
            Struck::Replayed {
                what: format!("replay of failed events: {}", replayed.answer),
                unretryable: replayed.unretryable,
            }
        }
        Fault::ReplayUserDelivered => {
            let body = json!({"user_id": op.user, "include_delivered": true, "rate": 500});
            let replayed = replay(cluster, http, admin_key, &body).await;
            Struck::Replayed {
                what: format!(
                    "replay of {}'s events, delivered included: {}",
                    op.user, replayed.answer
                ),
                unretryable: replayed.unretryable,
            }
        }
    }
}

/// The proxy of `slot` to PostgreSQL, or to RabbitMQ.
fn link(cluster: &Cluster, slot: usize, postgres: bool) -> &crate::common::TcpProxy {
    let slot = &cluster.slots[slot];
    if postgres {
        &slot.postgres
    } else {
        &slot.rabbitmq
    }
}

/// Undoes what a strike left, `length` after it; says what the fault was.
async fn heal(
    cluster: &mut Cluster,
    struck: Struck,
    length: Duration,
    queue: &QueueSettings,
) -> String {
    let ms = length.as_millis();
    match struck {
        Struck::Killed { slot, name } => {
            let down = Instant::now();
            let started = cluster.restart(slot).await;
            format!(
                "SIGKILL {name}, down {ms} ms, restarted as {started} ({} ms to ready)",
                down.elapsed().as_millis()
            )
        }
        Struck::Paused { slot, name } => {
            cluster.resume(slot);
            format!("SIGSTOP {name} for {ms} ms, then SIGCONT")
        }
        Struck::Link {
            slot,
            postgres,
            cut,
        } => {
            let proxy = link(cluster, slot, postgres);
            if cut {
                proxy.restore()
            } else {
                proxy.resume()
            }
            format!(
                "{} {}'s {} for {ms} ms",
                if cut { "cut" } else { "stalled" },
                cluster.slots[slot].name(),
                if postgres { "PostgreSQL" } else { "RabbitMQ" }
            )
        }
        Struck::Exhausted => {
            for slot in &cluster.slots {
                slot.postgres.accept_new();
            }
            format!("PostgreSQL refused every node's new connections for {ms} ms")
        }
        Struck::Purging { slot } => {
            let names = Topology::new(&queue.prefix, queue.partitions);
            let (mut purged, mut failed) = (0, Vec::new());
            for p in 0..queue.partitions {
                match purge_queue(queue, &names.partition_queue(p)).await {
                    Ok(n) => purged += n,
                    Err(error) => failed.push(error),
                }
            }
            cluster.slots[slot].rabbitmq.restore();
            format!(
                "cut {}'s RabbitMQ for {ms} ms and purged {purged} message(s) from the partition \
                 queues meanwhile{}",
                cluster.slots[slot].name(),
                if failed.is_empty() {
                    String::new()
                } else {
                    format!(" ({} queue(s) not purged: {})", failed.len(), failed[0])
                }
            )
        }
        Struck::EndingSessions { stop, ending } => {
            stop.cancel();
            let (ended, error) = ending.await.unwrap_or((0, None));
            format!(
                "PostgreSQL ended {ended} session(s) of the nodes as they came for {ms} ms{}",
                error
                    .map(|e| format!(" (a round failed: {e})"))
                    .unwrap_or_default()
            )
        }
        Struck::Over(what) | Struck::Replayed { what, .. } => what,
    }
}

/// Ends the nodes' PostgreSQL sessions every 50 ms until `stop`: how many, and the first error.
/// The nodes' pools name their sessions `herald <node> <pool>`; the checker's own are plain
/// `herald`.
async fn end_sessions(store: Store, stop: CancellationToken) -> (i64, Option<String>) {
    let (mut ended, mut error) = (0, None);
    while !stop.is_cancelled() {
        let round: Result<i64, _> = sqlx::query_scalar(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name LIKE 'herald %'",
        )
        .fetch_one(store.pool())
        .await;
        match round {
            Ok(n) => ended += n,
            Err(e) => error = error.or(Some(e.to_string())),
        }
        tokio::select! {
            () = sleep(Duration::from_millis(50)) => {}
            () = stop.cancelled() => {}
        }
    }
    (ended, error)
}

/// An operator's replay request, as the nemesis made it.
struct Replayed {
    /// The answer that started it, or why none did.
    answer: String,
    /// The first answer that was a 5xx other than 503 (an operator could not tell to retry).
    unretryable: Option<String>,
}

/// Starts a replay job on a live api node (another if one fails).
async fn replay(cluster: &Cluster, http: &reqwest::Client, key: &str, body: &Value) -> Replayed {
    let mut last = String::from("no api node up");
    let mut unretryable = None;
    for _ in 0..5 {
        let nodes = cluster.registry(Role::Api).borrow().clone();
        for (name, addr) in nodes {
            let sent = http
                .post(format!("http://{addr}/api/v1/admin/replays"))
                .bearer_auth(key)
                .json(body)
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    let status = r.status().as_u16();
                    let answer = r.json::<Value>().await.unwrap_or(Value::Null);
                    return Replayed {
                        answer: format!("{status} {answer} from {name}"),
                        unretryable,
                    };
                }
                Ok(r) => {
                    let status = r.status();
                    last = format!(
                        "{status} {} from {name}",
                        r.text().await.unwrap_or_default()
                    );
                    if status.is_server_error() && status.as_u16() != 503 {
                        unretryable = unretryable.or(Some(last.clone()));
                    }
                }
                Err(e) => last = format!("{e} from {name}"),
            }
        }
        sleep(Duration::from_millis(200)).await;
    }
    Replayed {
        answer: format!("not started: {last}"),
        unretryable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn a_schedule_meets_every_fault_first_and_overlaps_only_faults_that_may_meet() {
        let (mut pairs, mut faults) = (0, 0);
        for seed in 0..100 {
            let plan = plan(seed, Duration::from_secs(300), 2_000);
            let first: BTreeSet<Fault> = plan[..Fault::ALL.len()].iter().map(|p| p.fault).collect();
            assert_eq!(first.len(), Fault::ALL.len(), "seed {seed}: {plan:?}");
            assert!(!plan[0].overlaps);
            for two in plan.windows(2) {
                let (before, op) = (&two[0], &two[1]);
                if op.overlaps {
                    pairs += 1;
                    assert!(!before.overlaps, "seed {seed}: three faults at once");
                    assert!(
                        before.meets(op),
                        "seed {seed}: {before:?} and {op:?} may not meet"
                    );
                    assert!(
                        op.after < before.length,
                        "seed {seed}: {op:?} after {before:?}"
                    );
                }
            }
            faults += plan.len();
        }
        // About half of the faults that may overlap do: a schedule without pairs is a bug.
        assert!(pairs * 10 > faults, "{pairs} pairs in {faults} faults");
        let on = |fault, pick| Planned {
            after: Duration::ZERO,
            overlaps: false,
            fault,
            pick,
            length: Duration::from_secs(1),
            user: String::new(),
        };
        assert!(!on(Fault::Kill(Role::Worker), 0).meets(&on(Fault::PurgeQueue, 2)));
        assert!(on(Fault::Kill(Role::Worker), 0).meets(&on(Fault::PurgeQueue, 1)));
        assert!(!on(Fault::CutPostgres, 3).meets(&on(Fault::Pause(Role::Worker), 1)));
        assert!(!on(Fault::ExhaustPostgres, 0).meets(&on(Fault::Kill(Role::Api), 0)));
        assert!(on(Fault::ExhaustPostgres, 0).meets(&on(Fault::Pause(Role::Api), 0)));
        assert!(!on(Fault::Kill(Role::Socket), 0).meets(&on(Fault::EndPostgresSessions, 0)));
    }
}
