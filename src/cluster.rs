//! Cross-node fan-out, glued together: pubsub's [`Transport`] over the RabbitMQ fan-out publisher,
//! and the socket node's loop that receives broadcasts for its topics and keeps its bindings equal to
//! the buckets its clients' topics fall in (see `queue::fanout`): a join whose bucket is bound
//! already is answered without a broker round trip, and a bucket is unbound once its last topic
//! on this node is left.
//!
//! Lives apart from `pubsub` and `queue` so neither leaf depends on the other.
//!
//! After a reconnect the node may have missed broadcasts (its exclusive queue was gone meanwhile), so
//! it rebinds every wanted topic and then tells each local channel to resync from PostgreSQL
//! ([`RESYNC_EVENT`]).

use crate::backoff::{Backoff, reconnect};
use crate::config::{PubSubSettings, QueueSettings};
use crate::event::{RESYNC_EVENT, Topic};
use crate::metrics::Metrics;
use crate::pubsub::{
    BindRequest, BoxFuture, Error as PubSubError, Message, PubSub, Push, Transport,
};
use crate::queue::fanout::{FanoutPublisher, NodeQueue};
use crate::queue::{self, BrokerNodes};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A broadcast as it travels between nodes: a topic and its pushes, in order.
#[derive(Serialize, Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    topic: Cow<'a, str>,
    #[serde(borrow)]
    pushes: Vec<WirePush<'a>>,
}

#[derive(Serialize, Deserialize)]
struct WirePush<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
    seq: Option<i64>,
    at: Option<i64>,
    #[serde(borrow)]
    payload: &'a RawValue,
}

/// What marks this process's broadcasts: the node's name and a fresh id, so that two nodes
/// given one name by mistake still never drop each other's broadcasts as their own.
pub fn origin_of(node: &str) -> String {
    format!("{node}/{}", uuid::Uuid::now_v7().simple())
}

/// Broadcasts over RabbitMQ.
pub struct RabbitTransport {
    publisher: FanoutPublisher,
    timeout: Duration,
}

impl RabbitTransport {
    /// A transport publishing with `queue` settings for the node process `origin` (see
    /// [`origin_of`]).
    pub fn new(queue: QueueSettings, pubsub: &PubSubSettings, origin: &str) -> Self {
        Self {
            publisher: FanoutPublisher::new(queue, pubsub.buckets, origin.to_owned()),
            timeout: pubsub.publish_timeout(),
        }
    }

    /// The broker nodes its publisher moves between, and the one it uses.
    pub fn broker_nodes(&self) -> BrokerNodes {
        self.publisher.broker_nodes()
    }
}

impl Transport for RabbitTransport {
    fn publish<'a>(&'a self, message: &'a Message) -> BoxFuture<'a, Result<bool, PubSubError>> {
        Box::pin(async move {
            let payloads = message
                .pushes
                .iter()
                .map(|push| serde_json::from_str::<&RawValue>(&push.payload))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| PubSubError::Unavailable(format!("payload is not JSON: {e}")))?;
            let wire = Wire {
                topic: Cow::Borrowed(message.topic.as_str()),
                pushes: message
                    .pushes
                    .iter()
                    .zip(payloads)
                    .map(|(push, payload)| WirePush {
                        event: Cow::Borrowed(&push.event),
                        seq: push.seq,
                        at: push.enqueued_at_ms,
                        payload,
                    })
                    .collect(),
            };
            let body =
                serde_json::to_vec(&wire).map_err(|e| PubSubError::Unavailable(e.to_string()))?;
            self.publisher
                .publish(message.topic.as_str(), &body, self.timeout)
                .await
                .map_err(|e| PubSubError::Unavailable(e.to_string()))
        })
    }
}

/// Runs this node's fan-out queue until `stop`: delivers what arrives to local subscribers and
/// serves bind requests. `connected` reports readiness; `nodes` are the broker nodes it moves
/// between.
#[allow(clippy::too_many_arguments)] // one call site, in app.rs; each is a distinct handle
pub async fn run_node_queue(
    settings: QueueSettings,
    buckets: u16,
    node: String,
    origin: String,
    pubsub: PubSub,
    mut binds: mpsc::Receiver<BindRequest>,
    connected: Arc<AtomicBool>,
    nodes: BrokerNodes,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(settings.reconnect_max_backoff());
    let mut reconnected = false;
    loop {
        // Rebinding is part of opening: a link that cannot rebind backs off like one that cannot
        // connect.
        let open = || async {
            let link = NodeQueue::open(&settings, &node, &nodes).await?;
            let mut bound = Bound::new(buckets);
            bound.rebind_all(&link, &pubsub).await?;
            Ok::<_, queue::Error>((link, bound))
        };
        let failed = || {
            metrics.queue_connection_lost("fanout");
            refuse_pending(&mut binds);
            std::future::ready(())
        };
        let Some((mut link, mut bound)) =
            reconnect("fanout", &mut backoff, &stop, open, failed).await
        else {
            return;
        };
        connected.store(true, Ordering::Relaxed);
        tracing::info!(
            queue = %link.queue,
            buckets = bound.topics.len(),
            "fan-out queue ready"
        );
        if reconnected {
            resync_local(&pubsub);
        }
        reconnected = true;
        let lost = serve(&mut link, &origin, &pubsub, &mut binds, &mut bound, &stop).await;
        connected.store(false, Ordering::Relaxed);
        match lost {
            None => {
                let _ = link
                    .connection
                    .close(200, "socket node stopping".into())
                    .await;
                return;
            }
            Some(error) => {
                tracing::warn!(error = %error, "fan-out queue lost RabbitMQ; reconnecting");
                metrics.queue_connection_lost("fanout");
            }
        }
    }
}

/// Whether the process `origin` published `delivery`.
fn sent_by(delivery: &lapin::message::Delivery, origin: &str) -> bool {
    delivery
        .properties
        .app_id()
        .as_ref()
        .is_some_and(|sender| sender.as_str() == origin)
}

/// Serves one connection's life; returns the error that ended it, or None when stopped.
async fn serve(
    link: &mut NodeQueue,
    origin: &str,
    pubsub: &PubSub,
    binds: &mut mpsc::Receiver<BindRequest>,
    bound: &mut Bound,
    stop: &CancellationToken,
) -> Option<String> {
    loop {
        tokio::select! {
            () = stop.cancelled() => return None,
            delivery = link.consumer.next() => match delivery {
                // This node's own broadcasts reached its subscribers when made (see `PubSub::broadcast`).
                Some(Ok(delivery)) if sent_by(&delivery, origin) => {}
                Some(Ok(delivery)) => deliver(pubsub, &delivery.data),
                Some(Err(error)) => return Some(error.to_string()),
                None => return Some("the consumer stream ended".into()),
            },
            request = binds.recv() => {
                let request = request?;
                let result = bound.reconcile(link, pubsub, &request.topic).await;
                let failed = result.as_ref().err().map(ToString::to_string);
                if let Some(done) = request.done {
                    let _ = done.send(result);
                }
                if failed.is_some() {
                    return failed;
                }
            }
        }
    }
}

/// The buckets this node's queue is bound to, each with the topics joined on this node that fall
/// in it: a bucket is bound while it has at least one.
struct Bound {
    buckets: u16,
    topics: HashMap<u16, HashSet<Topic>>,
}

impl Bound {
    fn new(buckets: u16) -> Self {
        Self {
            buckets,
            topics: HashMap::new(),
        }
    }

    /// Binds or unbinds `topic`'s bucket so the node receives the topic exactly while it has local
    /// subscribers: the first topic of a bucket binds it, the last one to go unbinds it, and any
    /// other join or leave is bookkeeping only.
    async fn reconcile(
        &mut self,
        link: &NodeQueue,
        pubsub: &PubSub,
        topic: &Topic,
    ) -> Result<(), PubSubError> {
        let unavailable = |e: queue::Error| PubSubError::Unavailable(e.to_string());
        let bucket = crate::event::stable_bucket(topic.as_str(), self.buckets);
        if pubsub.has_subscribers(topic.as_str()) {
            let topics = self.topics.entry(bucket).or_default();
            if topics.is_empty() {
                link.bind(bucket).await.map_err(unavailable)?;
            }
            topics.insert(topic.clone());
        } else if let Some(topics) = self.topics.get_mut(&bucket)
            && topics.remove(topic)
            && topics.is_empty()
        {
            // Forgotten first: if the unbind fails the link is rebuilt, and with it the bindings.
            self.topics.remove(&bucket);
            link.unbind(bucket).await.map_err(unavailable)?;
        }
        Ok(())
    }

    /// Binds the buckets of every topic joined on this node (a new link's first step).
    async fn rebind_all(&mut self, link: &NodeQueue, pubsub: &PubSub) -> Result<(), queue::Error> {
        for topic in pubsub.topics() {
            let bucket = crate::event::stable_bucket(topic.as_str(), self.buckets);
            let topics = self.topics.entry(bucket).or_default();
            if topics.is_empty() {
                link.bind(bucket).await?;
            }
            topics.insert(topic);
        }
        Ok(())
    }
}

/// Joins waiting on a bind while the broker is away are told at once rather than left to time out.
fn refuse_pending(binds: &mut mpsc::Receiver<BindRequest>) {
    while let Ok(request) = binds.try_recv() {
        if let Some(done) = request.done {
            let _ = done.send(Err(PubSubError::Unavailable("RabbitMQ unreachable".into())));
        }
    }
}

fn deliver(pubsub: &PubSub, body: &[u8]) {
    let Ok(wire) = serde_json::from_slice::<Wire>(body) else {
        tracing::warn!("undecodable broadcast dropped");
        return;
    };
    pubsub.deliver_local(Arc::new(Message {
        topic: Topic::from(wire.topic.as_ref()),
        pushes: wire
            .pushes
            .into_iter()
            .map(|push| Push {
                event: push.event.into_owned(),
                seq: push.seq,
                payload: push.payload.get().to_owned(),
                enqueued_at_ms: push.at,
            })
            .collect(),
    }));
}

fn resync_local(pubsub: &PubSub) {
    for topic in pubsub.topics() {
        pubsub.deliver_local(Arc::new(Message::control(&topic, RESYNC_EVENT, "{}")));
    }
}
