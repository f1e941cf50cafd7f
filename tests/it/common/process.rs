//! The real `herald` binary as a child process, with every setting passed in its environment.

use super::*;
use herald::config::Settings;
use serde_json::Value;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// The `herald` binary with `args`, on the deployment of `settings`, killed when dropped. Its
/// environment is `node_env`'s alone: the tester's shell has no say.
pub fn herald_command(settings: &Settings, args: &[&str]) -> tokio::process::Command {
    herald_command_of(env!("CARGO_BIN_EXE_herald"), settings, args)
}

/// `herald_command` with the binary at `bin`: the checker can run an older build.
pub fn herald_command_of(bin: &str, settings: &Settings, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(bin);
    command
        .args(args)
        .env_clear()
        .envs(node_env(settings))
        .kill_on_drop(true);
    command
}

/// Every setting of `settings` as its `HERALD_<SECTION>__<KEY>` variable, so a child never differs
/// from an in-process node by a setting nobody thought to pass on (unset ones keep the child's
/// defaults). Logs at info: `Node` reads its address from the log.
fn node_env(settings: &Settings) -> Vec<(String, String)> {
    fn flatten(var: String, value: &Value, env: &mut Vec<(String, String)>) {
        let text = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
        match value {
            Value::Object(map) => {
                for (key, value) in map {
                    flatten(format!("{var}__{}", key.to_uppercase()), value, env);
                }
            }
            Value::Null => {}
            Value::Array(items) => {
                let list: Vec<String> = items.iter().map(text).collect();
                env.push((var, list.join(",")));
            }
            other => env.push((var, text(other))),
        }
    }
    let mut env = vec![("HERALD_LOG".to_owned(), "herald=info,warn".to_owned())];
    let sections = serde_json::to_value(settings).expect("settings serialise");
    for (section, value) in sections.as_object().expect("settings are sections") {
        flatten(
            format!("HERALD_{}", section.to_uppercase()),
            value,
            &mut env,
        );
    }
    env
}

/// The real `herald serve` as a child process, killed when dropped; its log (stderr) is kept for a
/// failing test to show.
pub struct Node {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    reader: JoinHandle<()>,
}

impl Node {
    /// `herald serve` with `flags` on the deployment of `settings` (its `http.addr` port 0 lets the
    /// child pick a free port, which it logs), once it is ready.
    pub async fn serve(settings: &Settings, flags: &[&str]) -> Self {
        Self::serve_of(env!("CARGO_BIN_EXE_herald"), settings, flags).await
    }

    /// `serve` with the binary at `bin`.
    pub async fn serve_of(bin: &str, settings: &Settings, flags: &[&str]) -> Self {
        let mut child = herald_command_of(bin, settings, &["serve"])
            .args(flags)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("herald starts");
        let stderr = child.stderr.take().expect("stderr piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (serving, addr) = oneshot::channel();
        let reader = tokio::spawn(keep_log(stderr, Arc::clone(&log), serving));
        let mut node = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
            reader,
        };
        match timeout(PATIENCE, addr).await {
            Ok(Ok(addr)) => node.addr = addr,
            _ => panic!("herald did not start: {:#?}", node.log_tail()),
        }
        wait_answering(&reqwest::Client::new(), node.addr, "/readyz").await;
        node
    }

    /// The last lines the node logged.
    pub fn log_tail(&self) -> Vec<String> {
        let log = self.log.lock().unwrap();
        log.iter().rev().take(30).rev().cloned().collect()
    }

    /// Stops reading the node's log, leaving its stderr without a reader (a log shipper died).
    pub async fn close_log(&mut self) {
        self.reader.abort();
        let _ = (&mut self.reader).await;
    }
}

/// Keeps the last lines of a child's log, and sends the address it serves on once it says.
async fn keep_log(
    stderr: tokio::process::ChildStderr,
    log: Arc<Mutex<Vec<String>>>,
    serving: oneshot::Sender<SocketAddr>,
) {
    let mut serving = Some(serving);
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.contains("herald serving")
            && let Some(addr) = line
                .split_whitespace()
                .find_map(|field| field.strip_prefix("addr="))
                .and_then(|a| a.parse().ok())
            && let Some(serving) = serving.take()
        {
            let _ = serving.send(addr);
        }
        let mut log = log.lock().unwrap();
        if log.len() > 2_000 {
            log.drain(..1_000);
        }
        log.push(line);
    }
}
