//! The node's own section (`[node]`): its name, the roles it runs, and the bound on its shutdown.

use serde::{Deserialize, Serialize};

/// Process-wide settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeSettings {
    /// Bound on the whole graceful shutdown; what is left is aborted (and redelivered later).
    pub shutdown_timeout_ms: u64,
    /// The roles this node runs, comma-separated: `api`, `worker`, `socket`.
    pub roles: Roles,
    /// This node's name in /readyz and metric tags; empty means `<hostname>-<pid>`.
    pub name: String,
    /// A development node (`herald serve --dev`): without `HERALD_SECRET` it signs socket tokens
    /// with the public development key, loudly, instead of refusing to start.
    pub dev: bool,
}

impl Default for NodeSettings {
    fn default() -> Self {
        Self {
            shutdown_timeout_ms: 30_000,
            roles: Roles::ALL,
            name: String::new(),
            dev: false,
        }
    }
}

/// The roles a node runs. One box can run all of them; many boxes can split them. Written as
/// their names, comma-separated (`api,worker`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Roles {
    /// HTTP API for producers, group commit, publisher, outbox relay.
    pub api: bool,
    /// Consumes the events queue and broadcasts to users' topics.
    pub worker: bool,
    /// Serves WebSockets (user and stats sockets).
    pub socket: bool,
}

impl Roles {
    /// Every role: one node does everything.
    pub const ALL: Self = Self {
        api: true,
        worker: true,
        socket: true,
    };

    /// True when the node runs every role.
    pub fn all(&self) -> bool {
        self.api && self.worker && self.socket
    }

    /// The roles, comma-separated, for /readyz and logs.
    pub fn names(&self) -> String {
        [
            ("api", self.api),
            ("worker", self.worker),
            ("socket", self.socket),
        ]
        .iter()
        .filter(|(_, on)| *on)
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(",")
    }
}

impl std::str::FromStr for Roles {
    type Err = String;

    /// Parses `api,worker,socket` (any non-empty subset).
    fn from_str(list: &str) -> Result<Self, String> {
        let mut roles = Self {
            api: false,
            worker: false,
            socket: false,
        };
        for role in list.split(',').map(str::trim).filter(|r| !r.is_empty()) {
            match role {
                "api" => roles.api = true,
                "worker" => roles.worker = true,
                "socket" => roles.socket = true,
                other => {
                    return Err(format!(
                        "unknown role {other} (roles are api, worker, socket)"
                    ));
                }
            }
        }
        if !(roles.api || roles.worker || roles.socket) {
            return Err("name at least one role (api, worker, socket)".into());
        }
        Ok(roles)
    }
}

impl TryFrom<String> for Roles {
    type Error = String;

    fn try_from(list: String) -> Result<Self, String> {
        list.parse()
    }
}

impl From<Roles> for String {
    fn from(roles: Roles) -> Self {
        roles.names()
    }
}

durations! {
    NodeSettings {
        shutdown_timeout_ms => shutdown_timeout,
    }
}
