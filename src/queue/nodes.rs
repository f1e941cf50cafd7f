//! The broker nodes Herald may connect to: `queue.amqp_url` (`HERALD_AMQP_URL`) is one AMQP URL
//! or a comma-separated list of a cluster's nodes, and each long-lived connection (publisher,
//! worker consumers, cluster fan-out) goes to the next node of the list when its node fails.
//!
//! An entry is a full URL (`amqp://user:pass@host:5672/%2f`) or just `host:port`, which takes the
//! scheme, credentials and vhost of the first entry:
//! `amqp://guest:guest@10.0.0.1:5672/%2f,10.0.0.2:5672,10.0.0.3:5672`.
//!
//! Each role keeps its own [`BrokerNodes`]: a connect tries the nodes in turn, once each, from the
//! one after the node it last connected to (a role reconnects only after its connection failed,
//! so the node that just failed is tried last), and remembers which node it is on for readiness
//! and metrics, named by `host:port` only: the credentials never leave this module.

use super::{Error, connect_url};
use crate::config::QueueSettings;
use lapin::Connection;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Parses `queue.amqp_url` into the URL of each node.
///
/// # Errors
/// A message naming what is wrong: no entry, a first entry that is not a full URL, an empty one.
pub fn parse_node_list(text: &str) -> Result<Vec<String>, String> {
    let mut urls: Vec<String> = Vec::new();
    for entry in text.split(',').map(str::trim) {
        if entry.is_empty() {
            return Err("an entry of the node list is empty".into());
        }
        if entry.contains("://") {
            if !(entry.starts_with("amqp://") || entry.starts_with("amqps://")) {
                return Err(format!(
                    "{} is not an amqp:// or amqps:// URL",
                    label(entry)
                ));
            }
            urls.push(entry.to_owned());
            continue;
        }
        let Some(first) = urls.first() else {
            return Err("the first node must be a full amqp:// URL".into());
        };
        let (scheme, rest) = first.split_once("://").unwrap_or(("amqp", first));
        let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
        let userinfo = authority
            .rsplit_once('@')
            .map_or(String::new(), |(u, _)| format!("{u}@"));
        let path = if path.is_empty() {
            String::new()
        } else {
            format!("/{path}")
        };
        urls.push(format!("{scheme}://{userinfo}{entry}{path}"));
    }
    if urls.is_empty() {
        return Err("no node".into());
    }
    Ok(urls)
}

/// `host:port` of an AMQP URL (no scheme, credentials, vhost or query).
pub fn label(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host)
        .to_owned()
}

/// One role's view of the broker nodes: which to try next, which is in use. Cheap to clone.
#[derive(Clone, Debug)]
pub struct BrokerNodes {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    urls: Vec<String>,
    /// Where the next connect starts.
    next: AtomicUsize,
    /// The node of the last successful connect (a std Mutex: never held across an await).
    in_use: Mutex<Option<usize>>,
}

impl BrokerNodes {
    /// The nodes of `settings.amqp_url` (validated at load; an unparsable value is taken as one
    /// URL, and its connect fails with the broker's error).
    pub fn new(settings: &QueueSettings) -> Self {
        let text = settings.amqp_url.expose();
        let urls = parse_node_list(text).unwrap_or_else(|_| vec![text.to_owned()]);
        Self {
            inner: Arc::new(Inner {
                urls,
                next: AtomicUsize::new(0),
                in_use: Mutex::new(None),
            }),
        }
    }

    /// How many nodes the list holds.
    pub fn len(&self) -> usize {
        self.inner.urls.len()
    }

    /// Always false: the list holds at least one node.
    pub fn is_empty(&self) -> bool {
        self.inner.urls.is_empty()
    }

    /// `host:port` of the node the last successful connect went to.
    pub fn in_use(&self) -> Option<String> {
        let in_use = *self.inner.in_use.lock().unwrap_or_else(|e| e.into_inner());
        in_use
            .and_then(|i| self.inner.urls.get(i))
            .map(|u| label(u))
    }

    /// The order the next connect tries the nodes in.
    fn order(&self) -> impl Iterator<Item = usize> + '_ {
        let n = self.inner.urls.len();
        let start = self.inner.next.load(Ordering::Relaxed) % n.max(1);
        (0..n).map(move |k| (start + k) % n)
    }

    /// Connects to the first node that answers, trying each once from the one after the node
    /// last used. Each attempt is bounded by `queue.connect_timeout_ms`.
    ///
    /// # Errors
    /// Every node failed: the last node's error.
    pub async fn connect(&self, settings: &QueueSettings, role: &str) -> Result<Connection, Error> {
        let mut last = Error::ConnectTimeout;
        let order: Vec<usize> = self.order().collect();
        for i in order {
            let url = &self.inner.urls[i];
            match connect_url(url, settings, role).await {
                Ok(connection) => {
                    *self.inner.in_use.lock().unwrap_or_else(|e| e.into_inner()) = Some(i);
                    // A reconnect means this node failed us: start after it then.
                    self.inner
                        .next
                        .store((i + 1) % self.inner.urls.len(), Ordering::Relaxed);
                    if self.inner.urls.len() > 1 {
                        tracing::info!(role, node = %label(url), "connected to RabbitMQ");
                    }
                    return Ok(connection);
                }
                Err(error) => {
                    if self.inner.urls.len() > 1 {
                        tracing::warn!(role, node = %label(url), error = %error, "RabbitMQ node unreachable; trying the next");
                    }
                    last = error;
                }
            }
        }
        *self.inner.in_use.lock().unwrap_or_else(|e| e.into_inner()) = None;
        Err(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn one_url_is_a_list_of_one() {
        let urls = parse_node_list("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(urls, ["amqp://guest:guest@127.0.0.1:5672/%2f"]);
    }

    #[test]
    fn short_entries_take_the_first_entrys_scheme_credentials_and_vhost() {
        let urls =
            parse_node_list("amqps://u:p@a:5671/prod, b:5671 ,amqp://x:y@c:5672/other").unwrap();
        assert_eq!(
            urls,
            [
                "amqps://u:p@a:5671/prod",
                "amqps://u:p@b:5671/prod",
                "amqp://x:y@c:5672/other"
            ]
        );
        assert_eq!(parse_node_list("amqp://a, b").unwrap()[1], "amqp://b");
    }

    #[test]
    fn bad_lists_are_refused() {
        assert!(parse_node_list("").is_err());
        assert!(
            parse_node_list("a:5672,amqp://b").is_err(),
            "first must be a URL"
        );
        assert!(parse_node_list("amqp://a,,amqp://b").is_err());
        assert!(parse_node_list("http://a").is_err());
    }

    #[test]
    fn labels_hide_credentials_and_vhost() {
        assert_eq!(
            label("amqp://guest:s3cret@10.0.0.2:5673/%2f?heartbeat=5"),
            "10.0.0.2:5673"
        );
        assert_eq!(label("amqp://h"), "h");
    }

    #[test]
    fn a_connect_starts_after_the_node_last_used() {
        let settings = QueueSettings {
            amqp_url: Secret::new("amqp://a,b,c"),
            ..QueueSettings::default()
        };
        let nodes = BrokerNodes::new(&settings);
        assert_eq!(nodes.len(), 3);
        assert_eq!(nodes.order().collect::<Vec<_>>(), [0, 1, 2]);
        // As after a connect to b: the next (a reconnect, so b failed) tries c, a, then b.
        nodes.inner.next.store(2, Ordering::Relaxed);
        assert_eq!(nodes.order().collect::<Vec<_>>(), [2, 0, 1]);
        nodes.inner.next.store(0, Ordering::Relaxed);
        assert_eq!(nodes.order().collect::<Vec<_>>(), [0, 1, 2]);
    }
}
