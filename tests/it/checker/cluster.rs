//! The deployment under test: `herald serve` children in split roles, each reaching PostgreSQL and
//! RabbitMQ through TCP proxies of its own, so the nemesis can cut one node's links and leave the
//! others' alone; and the registry of live addresses that producers and clients read, since a
//! restarted node comes back on another port.

use crate::common::{Node, TcpProxy};
use herald::config::Settings;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::watch;

/// What a node does; the deployment runs two of each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Api,
    Worker,
    Socket,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Api, Role::Worker, Role::Socket];
    /// Nodes of each role.
    pub const NODES: usize = 2;
    /// Nodes in all: `Cluster::slots` holds them by role, in `ALL`'s order.
    pub const SLOTS: usize = Self::ALL.len() * Self::NODES;

    /// The slot (an index into `Cluster::slots`) of the role's node `n % NODES`: fixed for a
    /// run, so the nemesis can tell which faults touch the same node while it plans.
    pub fn slot(self, n: u64) -> usize {
        let role = Self::ALL.iter().position(|&r| r == self).unwrap_or(0);
        role * Self::NODES + (n % Self::NODES as u64) as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Api => "api",
            Role::Worker => "worker",
            Role::Socket => "socket",
        }
    }
}

/// Live nodes of one role, by name and address.
pub type Registry = watch::Receiver<Vec<(String, SocketAddr)>>;

/// One node's place in the deployment: its settings (pointing at its proxies), its proxies, and the
/// process currently filling it. A restart is a new process, with a new port and a new name (the
/// generation), as a replacement machine would be.
pub struct Slot {
    pub role: Role,
    pub index: usize,
    /// What `--roles` the node runs: its role's name, or more (see [`Cluster::start`]).
    roles: &'static str,
    generation: u32,
    settings: Settings,
    pub postgres: Arc<TcpProxy>,
    pub rabbitmq: Arc<TcpProxy>,
    node: Option<Node>,
    /// SIGSTOPped: it must get SIGCONT before it is killed or dropped.
    stopped: bool,
}

impl Slot {
    /// The name of the process filling the slot now (`worker-2.g3`: the third process of worker 2).
    pub fn name(&self) -> String {
        format!(
            "{}-{}.g{}",
            self.role.name(),
            self.index + 1,
            self.generation
        )
    }

    fn pid(&self) -> Option<i32> {
        self.node
            .as_ref()
            .and_then(|n| n.child.id())
            .and_then(|pid| i32::try_from(pid).ok())
    }

    fn signal(&self, signal: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on our own child's pid; no memory is involved.
            unsafe { libc::kill(pid, signal) };
        }
    }

    async fn start(&mut self, bin: &str) {
        self.generation += 1;
        self.settings.node.name = self.name();
        self.node = Some(Node::serve_of(bin, &self.settings, &["--roles", self.roles]).await);
    }

    /// True when clients connect to the node: a socket node, or the api node that serves sockets.
    fn serves(&self, role: Role) -> bool {
        self.role == role || self.roles.split(',').any(|r| r == role.name())
    }

    /// The last lines the process logged, for a report.
    pub fn log_tail(&self) -> Vec<String> {
        self.node.as_ref().map(Node::log_tail).unwrap_or_default()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // The node (killed on drop) must not stay stopped: a stopped process is killed all the
        // same, but only a continued one closes its connections as any killed node does.
        if self.stopped {
            self.signal(libc::SIGCONT);
        }
    }
}

/// Six nodes (two per role, the second api node serving sockets too) and the registry of the live
/// api and socket nodes.
pub struct Cluster {
    bin: String,
    pub slots: Vec<Slot>,
    api: watch::Sender<Vec<(String, SocketAddr)>>,
    socket: watch::Sender<Vec<(String, SocketAddr)>>,
}

impl Cluster {
    /// Starts two nodes of each role on the deployment of `base` (its database and prefix), the
    /// binary at `bin`, each behind proxies of its own; returns once every node is ready. The api
    /// node that serves sockets sends its StatsD lines to `head_start_statsd`.
    pub async fn start(base: &Settings, bin: &str, head_start_statsd: &str) -> Self {
        let mut slots = Vec::new();
        for role in Role::ALL {
            for index in 0..Role::NODES {
                let (postgres, pg_url) =
                    TcpProxy::in_front_of(base.store.database_url.expose()).await;
                let (rabbitmq, amqp_url) =
                    TcpProxy::in_front_of(base.queue.amqp_url.expose()).await;
                let mut roles = role.name();
                let mut settings = base.clone();
                settings.http.addr = "127.0.0.1:0".parse().unwrap();
                settings.store.database_url = pg_url;
                settings.queue.amqp_url = amqp_url;
                if role == Role::Api && index == 1 {
                    // The second api node commits in three streams (joint commits for batches
                    // across them), the first in one: both paths run under the nemesis.
                    settings.pipeline.commit_streams = 3;
                    settings.store.write_connections = 5;
                    // It serves sockets as well: its commits push to its own clients ahead of the
                    // workers (`pipeline.push_from_commit`, every commit), racing their broadcasts
                    // and the other api node's commits of the same users.
                    roles = "api,socket";
                    settings.pipeline.push_from_commit = 1_000;
                    settings.metrics.statsd_addr = head_start_statsd.to_owned();
                }
                settings.node.roles = roles.parse().unwrap();
                debug_assert_eq!(slots.len(), role.slot(index as u64));
                slots.push(Slot {
                    role,
                    index,
                    roles,
                    generation: 0,
                    settings,
                    postgres,
                    rabbitmq,
                    node: None,
                    stopped: false,
                });
            }
        }
        let (api, _) = watch::channel(Vec::new());
        let (socket, _) = watch::channel(Vec::new());
        let mut cluster = Self {
            bin: bin.to_owned(),
            slots,
            api,
            socket,
        };
        // One at a time: the first node sets the deployment up (topology, partition layout).
        for slot in &mut cluster.slots {
            slot.start(&cluster.bin).await;
        }
        cluster.publish();
        cluster
    }

    pub fn registry(&self, role: Role) -> Registry {
        match role {
            Role::Api => self.api.subscribe(),
            Role::Socket => self.socket.subscribe(),
            Role::Worker => panic!("nobody connects to worker nodes"),
        }
    }

    /// Tells producers and clients which nodes are up now.
    fn publish(&self) {
        for (role, registry) in [(Role::Api, &self.api), (Role::Socket, &self.socket)] {
            let live = self
                .slots
                .iter()
                .filter(|s| s.serves(role))
                .filter_map(|s| Some((s.name(), s.node.as_ref()?.addr)))
                .collect();
            registry.send_replace(live);
        }
    }

    /// SIGKILLs the node in `slot` (taken out of the registry first); returns its name.
    pub async fn kill(&mut self, slot: usize) -> String {
        let name = self.slots[slot].name();
        self.resume(slot);
        let Some(mut node) = self.slots[slot].node.take() else {
            return name;
        };
        self.publish();
        node.child.kill().await.expect("SIGKILL");
        name
    }

    /// Starts a new process in `slot` (if it has none); returns its name once it is ready.
    pub async fn restart(&mut self, slot: usize) -> String {
        if self.slots[slot].node.is_none() {
            let bin = self.bin.clone();
            self.slots[slot].start(&bin).await;
            self.publish();
        }
        self.slots[slot].name()
    }

    /// SIGSTOPs the node in `slot`: it keeps its sockets (and a worker its leases, until they
    /// expire), and answers nothing.
    pub fn pause(&mut self, slot: usize) {
        self.slots[slot].stopped = true;
        self.slots[slot].signal(libc::SIGSTOP);
    }

    /// SIGCONTs the node in `slot`.
    pub fn resume(&mut self, slot: usize) {
        if self.slots[slot].stopped {
            self.slots[slot].signal(libc::SIGCONT);
            self.slots[slot].stopped = false;
        }
    }

    /// Undoes every fault: proxies restored, stopped nodes continued, dead ones restarted.
    pub async fn heal(&mut self) {
        for slot in 0..self.slots.len() {
            for proxy in [&self.slots[slot].postgres, &self.slots[slot].rabbitmq] {
                proxy.restore();
                proxy.resume();
                proxy.accept_new();
            }
            self.resume(slot);
            self.restart(slot).await;
        }
    }
}
