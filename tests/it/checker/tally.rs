//! What the head start did in a run, from the StatsD lines of the api node that serves sockets
//! (`socket.push.from_commit` by outcome): the summary says how many events reached clients from a
//! commit, so a run that never exercised it would show. Every process of that slot sends here.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::UdpSocket;

const METRIC: &str = "socket.push.from_commit:";

/// A StatsD stand-in that sums `socket.push.from_commit` by outcome, read as it arrives (a socket
/// left unread would drop lines once its buffer filled).
pub struct HeadStartTally {
    pub addr: SocketAddr,
    counts: Arc<Mutex<BTreeMap<String, i64>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl HeadStartTally {
    pub async fn bind() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("UDP bound");
        let addr = socket.local_addr().expect("UDP address");
        let counts = Arc::new(Mutex::new(BTreeMap::new()));
        let reader = tokio::spawn({
            let counts = Arc::clone(&counts);
            async move {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = socket.recv(&mut buf).await {
                    let text = String::from_utf8_lossy(&buf[..n]);
                    let mut counts = counts.lock().unwrap_or_else(|e| e.into_inner());
                    for (outcome, count) in text.lines().filter_map(parse) {
                        *counts.entry(outcome).or_insert(0) += count;
                    }
                }
            }
        });
        Self {
            addr,
            counts,
            reader,
        }
    }

    /// `head start: 812 pushed, 40 behind, 95 ahead` (outcomes as the node names them).
    pub fn summary(&self) -> String {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if counts.is_empty() {
            return "head start: no event pushed from a commit".into();
        }
        let parts: Vec<String> = counts.iter().map(|(o, n)| format!("{n} {o}")).collect();
        format!("head start: {}", parts.join(", "))
    }
}

impl Drop for HeadStartTally {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// `socket.push.from_commit:3|c|#outcome:pushed,node:...` as (`pushed`, 3).
fn parse(line: &str) -> Option<(String, i64)> {
    let rest = line.strip_prefix(METRIC)?;
    let value = rest.split('|').next()?;
    let (_, tags) = rest.split_once("|#")?;
    let outcome = tags
        .split(',')
        .find_map(|tag| tag.strip_prefix("outcome:"))?;
    Some((outcome.to_owned(), value.parse().ok()?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_counter_line_with_its_outcome_tag() {
        assert_eq!(
            super::parse("socket.push.from_commit:3|c|#outcome:pushed,node:api-2.g1"),
            Some(("pushed".into(), 3))
        );
        assert_eq!(super::parse("socket.push.duplicate:3|c"), None);
    }
}
