//! The nemesis: faults on a schedule drawn from the seed, one at a time, each healed before the
//! next, while the producers stream. The first round has every kind of fault once, in a seeded
//! order, so even a short run meets them all; later ones are drawn at random.

use super::cluster::{Cluster, Role};
use super::rng::Rng;
use crate::chaos::close_broker_connections;
use crate::common::purge_queue;
use herald::config::QueueSettings;
use herald::queue::Topology;
use serde_json::{Value, json};
use std::time::Duration;
use tokio::time::sleep;
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
    const ALL: [Fault; 15] = [
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
        Fault::ReplayFailed,
        Fault::ReplayUserDelivered,
        Fault::PurgeQueue,
    ];
}

/// One fault of the schedule, with its seeded choices.
#[derive(Clone, Debug)]
pub struct Planned {
    /// How long after the previous fault was healed (or the stream started) it strikes: a slow
    /// heal (a restart, rabbitmqctl) delays the rest instead of squeezing them together.
    pub after: Duration,
    pub fault: Fault,
    /// Which node (of the role, or of all six for a cut), drawn once.
    pub pick: u64,
    /// How long the fault lasts (a kill: how long the node stays down).
    pub length: Duration,
    /// The user of a one-user replay.
    pub user: String,
}

/// Draws the schedule for a stream of `run`: a fault every few seconds, more than the run can
/// hold (the run stops it). `lease_ms`: a paused node stays stopped 1.5 to 2 leases.
pub fn plan(seed: u64, run: Duration, lease_ms: u64) -> Vec<Planned> {
    let mut rng = Rng::stream(seed, "nemesis", 0);
    let mut first_round = Fault::ALL.to_vec();
    rng.shuffle(&mut first_round);
    let mut planned = Vec::new();
    // At least one fault every two seconds fits in no run.
    while planned.len() as u64 <= run.as_secs() / 2 {
        let after = Duration::from_millis(if planned.is_empty() {
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
            _ => 0,
        });
        planned.push(Planned {
            after,
            fault,
            pick: rng.next_u64(),
            length,
            // A cold user: its replay stays small.
            user: format!("u{}", rng.between(super::HOT_USERS, super::USERS - 1)),
        });
    }
    planned
}

/// A fault as it happened.
#[derive(Clone, Debug)]
pub struct Done {
    pub at_ms: u64,
    pub fault: Fault,
    pub what: String,
}

/// Runs the schedule against `cluster` until `stop` (the last fault struck is healed first); then
/// heals everything and hands the cluster back with what was done.
pub async fn run(
    mut cluster: Cluster,
    plan: Vec<Planned>,
    admin_key: String,
    queue: QueueSettings,
    started: std::time::Instant,
    stop: CancellationToken,
) -> (Cluster, Vec<Done>) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut done = Vec::new();
    let ms = || started.elapsed().as_millis() as u64;
    for op in plan {
        tokio::select! {
            () = sleep(op.after) => {}
            () = stop.cancelled() => break,
        }
        let at_ms = ms();
        let what = strike(&mut cluster, &op, &http, &admin_key, &queue).await;
        println!(
            "[{:>6.1}s] nemesis: {what} (healed at {:.1}s)",
            at_ms as f64 / 1000.0,
            ms() as f64 / 1000.0
        );
        done.push(Done {
            at_ms,
            fault: op.fault,
            what,
        });
    }
    cluster.heal().await;
    (cluster, done)
}

/// Makes the fault happen and heals it; says what it did.
async fn strike(
    cluster: &mut Cluster,
    op: &Planned,
    http: &reqwest::Client,
    admin_key: &str,
    queue: &QueueSettings,
) -> String {
    let ms = op.length.as_millis();
    match op.fault {
        Fault::Kill(role) => {
            let slots = cluster.of(role);
            let slot = slots[op.pick as usize % slots.len()];
            let killed = cluster.kill(slot).await;
            sleep(op.length).await;
            let started = cluster.restart(slot).await;
            format!("SIGKILL {killed}, down {ms} ms, restarted as {started}")
        }
        Fault::Pause(role) => {
            let slots = cluster.of(role);
            let slot = slots[op.pick as usize % slots.len()];
            let name = cluster.slots[slot].name();
            cluster.pause(slot);
            sleep(op.length).await;
            cluster.resume(slot);
            format!("SIGSTOP {name} for {ms} ms, then SIGCONT")
        }
        Fault::CutPostgres | Fault::CutRabbitmq => {
            let slot = &cluster.slots[op.pick as usize % cluster.slots.len()];
            let (proxy, what) = if op.fault == Fault::CutPostgres {
                (&slot.postgres, "PostgreSQL")
            } else {
                (&slot.rabbitmq, "RabbitMQ")
            };
            proxy.cut();
            sleep(op.length).await;
            proxy.restore();
            format!("cut {}'s {what} for {ms} ms", slot.name())
        }
        Fault::StallPostgres | Fault::StallRabbitmq => {
            let slot = &cluster.slots[op.pick as usize % cluster.slots.len()];
            let (proxy, what) = if op.fault == Fault::StallPostgres {
                (&slot.postgres, "PostgreSQL")
            } else {
                (&slot.rabbitmq, "RabbitMQ")
            };
            proxy.stall();
            sleep(op.length).await;
            proxy.resume();
            format!("stalled {}'s {what} for {ms} ms", slot.name())
        }
        Fault::ExhaustPostgres => {
            for slot in &cluster.slots {
                slot.postgres.refuse_new();
            }
            sleep(op.length).await;
            for slot in &cluster.slots {
                slot.postgres.accept_new();
            }
            format!("PostgreSQL refused every node's new connections for {ms} ms")
        }
        Fault::CloseBrokerConnections => {
            let prefix = queue.prefix.clone();
            let closed = tokio::task::spawn_blocking(move || close_broker_connections(&prefix))
                .await
                .unwrap_or(0);
            format!("rabbitmqctl closed {closed} connection(s) of the deployment")
        }
        Fault::ReplayFailed => {
            let body = json!({"status": "failed", "rate": 500});
            let answer = replay(cluster, http, admin_key, &body).await;
            format!("replay of failed events: {answer}")
        }
        Fault::PurgeQueue => {
            let workers = cluster.of(Role::Worker);
            let slot = &cluster.slots[workers[op.pick as usize % workers.len()]];
            slot.rabbitmq.cut();
            // Its partitions have no consumer until their leases move: messages wait, ready.
            sleep(op.length).await;
            let names = Topology::new(&queue.prefix, queue.partitions);
            let (mut purged, mut failed) = (0, Vec::new());
            for p in 0..queue.partitions {
                match purge_queue(queue, &names.partition_queue(p)).await {
                    Ok(n) => purged += n,
                    Err(error) => failed.push(error),
                }
            }
            slot.rabbitmq.restore();
            format!(
                "cut {}'s RabbitMQ for {ms} ms and purged {purged} message(s) from the partition \
                 queues meanwhile{}",
                slot.name(),
                if failed.is_empty() {
                    String::new()
                } else {
                    format!(" ({} queue(s) not purged: {})", failed.len(), failed[0])
                }
            )
        }
        Fault::ReplayUserDelivered => {
            let body = json!({"user_id": op.user, "include_delivered": true, "rate": 500});
            let answer = replay(cluster, http, admin_key, &body).await;
            format!(
                "replay of {}'s events, delivered included: {answer}",
                op.user
            )
        }
    }
}

/// Starts a replay job on a live api node (another if one fails); returns its answer.
async fn replay(cluster: &Cluster, http: &reqwest::Client, key: &str, body: &Value) -> String {
    let mut last = String::from("no api node up");
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
                    return format!("{status} {answer} from {name}");
                }
                Ok(r) => last = format!("{} from {name}", r.status()),
                Err(e) => last = format!("{e} from {name}"),
            }
        }
        sleep(Duration::from_millis(200)).await;
    }
    format!("not started: {last}")
}
