//! Topic fan-out: a broadcast on a topic reaches every subscriber of that topic.
//!
//! Subscribers are the channels joined on this node's sockets; each is a bounded queue into its
//! connection. The worker calls [`PubSub::broadcast`] without knowing where a user's sockets are; the
//! socket code calls `subscribe`/`unsubscribe`. Both talk only to this type, so a cross-node
//! implementation (riding RabbitMQ, see ARCHITECTURE.md) can fill it in without changing either.
//!
//! A subscriber whose queue is full is not waited for: it is told to disconnect (its client catches up
//! when it reconnects), so one slow client never delays the others.
//!
//! In cluster mode a broadcast goes to a [`Transport`] (RabbitMQ, wired in `crate::cluster`) that
//! reaches every node with subscribers to the topic, and each node hands what it receives to
//! [`PubSub::deliver_local`]. Which topics a node wants is reconciled by one binder task, fed
//! [`BindRequest`]s in order, so a bind and an unbind of one topic can never cross. Depends on
//! nothing else in Herald but the shared types of `crate::event`.

use crate::event::Topic;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// One message to every subscriber of a topic: one or more pushes, in order (a worker broadcasts a
/// user's run of events as one message, so a burst costs one queue slot and one wake-up per run,
/// not per event). Shared (`Arc`) by all subscribers: built once.
#[derive(Debug)]
pub struct Message {
    /// The topic, e.g. `user:42`.
    pub topic: Topic,
    /// What the subscribers push, in order.
    pub pushes: Vec<Push>,
    /// The trace of the run that sent it (a worker's `herald.deliver` span), if sampled: each
    /// node that delivers it records a `herald.push` span under it.
    pub trace: Option<crate::traces::TraceParent>,
    /// Sent by this node's group commit, ahead of the worker's broadcast of the same events
    /// ([`PubSub::deliver_from_commit`]): a channel pushes such an event only when it is the next
    /// one its client needs, and otherwise leaves it to the worker's copy (no gap fill for it).
    pub from_commit: bool,
}

/// One push of a [`Message`].
#[derive(Debug)]
pub struct Push {
    /// The event name the client sees.
    pub event: String,
    /// Ordering key within the topic (the user's seq), if the topic has one.
    pub seq: Option<i64>,
    /// The payload, already JSON.
    pub payload: String,
    /// When the event was accepted, Unix ms, for the end-to-end latency metric.
    pub enqueued_at_ms: Option<i64>,
}

impl From<&crate::event::Envelope> for Push {
    /// The push of a user's event: live from a worker, or read back by a gap fill or catch-up.
    fn from(envelope: &crate::event::Envelope) -> Self {
        Self {
            event: envelope.event.as_str().to_owned(),
            seq: Some(envelope.seq),
            payload: envelope.push_payload(),
            enqueued_at_ms: Some(envelope.at),
        }
    }
}

impl Message {
    /// A message of one push with no seq (control events such as `disconnect`).
    pub fn control(topic: &Topic, event: &str, payload: &str) -> Self {
        Self {
            topic: topic.clone(),
            pushes: vec![Push {
                event: event.to_owned(),
                seq: None,
                payload: payload.to_owned(),
                enqueued_at_ms: None,
            }],
            trace: None,
            from_commit: false,
        }
    }
}

/// A subscriber: a bounded queue into a connection, and the switch that disconnects it when that
/// queue overflows.
#[derive(Clone, Debug)]
pub struct Subscriber {
    /// Where messages go.
    pub queue: mpsc::Sender<Arc<Message>>,
    /// Cancelled when the queue was full: the connection must close.
    pub overflowed: CancellationToken,
}

/// Identifies one subscription, for `unsubscribe`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SubscriptionId(u64);

/// What a broadcast reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reach {
    /// Subscribers whose queue took the message. In cluster mode, where other nodes' sockets are not
    /// counted: 1 when at least one node binds a bucket of the fan-out message that carried it (its
    /// topic's, or another broadcast's sent with it), 0 when none does.
    pub delivered: usize,
    /// Subscribers dropped because their queue was full.
    pub overflowed: usize,
}

/// Why a broadcast or a subscription failed. The in-memory fan-out cannot fail; a cross-node one can.
#[derive(Clone, Debug, thiserror::Error)]
pub enum Error {
    /// The fan-out transport is unavailable.
    #[error("pubsub transport unavailable: {0}")]
    Unavailable(String),
}

/// A boxed future, as trait objects need.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Carries broadcasts to every node subscribed to a topic.
pub trait Transport: Send + Sync + 'static {
    /// Publishes `message`; resolves to whether any node subscribes to its topic.
    fn publish<'a>(&'a self, message: &'a Message) -> BoxFuture<'a, Result<bool, Error>>;
}

/// Asks the binder to make this node's subscription to `topic` match its local subscribers.
#[derive(Debug)]
pub struct BindRequest {
    /// The topic to reconcile.
    pub topic: Topic,
    /// Told when done (for a join that must not miss events), or None (an unbind).
    pub done: Option<oneshot::Sender<Result<(), Error>>>,
}

/// The topic registry; a cheap `Clone`.
#[derive(Clone, Default)]
pub struct PubSub {
    inner: Arc<Registry>,
    cluster: Option<Arc<Cluster>>,
}

struct Cluster {
    transport: Arc<dyn Transport>,
    binder: mpsc::Sender<BindRequest>,
    bind_timeout: Duration,
}

type Subscribers = Vec<(SubscriptionId, Subscriber)>;

#[derive(Default)]
struct Registry {
    // A std RwLock: held only to copy senders or edit the map, never across an await.
    topics: RwLock<HashMap<Topic, Subscribers>>,
    next_id: AtomicU64,
}

impl PubSub {
    /// A registry with no topics, fanning out on this node only.
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry whose broadcasts ride `transport` to every subscribed node. The receiver carries
    /// the binder's requests: whoever runs this node's fan-out queue must serve them.
    pub fn cluster(
        transport: Arc<dyn Transport>,
        bind_timeout: Duration,
    ) -> (Self, mpsc::Receiver<BindRequest>) {
        let (binder, requests) = mpsc::channel(1024);
        let cluster = Cluster {
            transport,
            binder,
            bind_timeout,
        };
        let pubsub = Self {
            inner: Arc::default(),
            cluster: Some(Arc::new(cluster)),
        };
        (pubsub, requests)
    }

    /// Subscribes `subscriber` to `topic`. In cluster mode, returns once this node receives the
    /// topic's broadcasts, so a join never misses an event published after its reply.
    ///
    /// # Errors
    /// The node's fan-out queue could not be bound in time (the subscription is undone).
    pub async fn subscribe(
        &self,
        topic: &Topic,
        subscriber: Subscriber,
    ) -> Result<SubscriptionId, Error> {
        let id = SubscriptionId(self.inner.next_id.fetch_add(1, Ordering::Relaxed));
        {
            let mut topics = self.inner.topics.write().unwrap_or_else(|e| e.into_inner());
            // Room for one: a topic is a user's, and most users have one socket. A Vec's first
            // push would make room for four (96 bytes, two topics per socket); a second
            // subscriber grows it as usual.
            topics
                .entry(topic.clone())
                .or_insert_with(|| Vec::with_capacity(1))
                .push((id, subscriber));
        }
        let Some(cluster) = &self.cluster else {
            return Ok(id);
        };
        let (done, bound) = oneshot::channel();
        let request = BindRequest {
            topic: topic.clone(),
            done: Some(done),
        };
        let outcome = async {
            cluster
                .binder
                .send(request)
                .await
                .map_err(|_| Error::Unavailable("the fan-out binder stopped".into()))?;
            bound
                .await
                .map_err(|_| Error::Unavailable("the fan-out binder stopped".into()))?
        };
        match tokio::time::timeout(cluster.bind_timeout, outcome).await {
            Ok(Ok(())) => Ok(id),
            Ok(Err(error)) => {
                self.unsubscribe(topic, id);
                Err(error)
            }
            Err(_) => {
                self.unsubscribe(topic, id);
                Err(Error::Unavailable("binding the topic timed out".into()))
            }
        }
    }

    /// Removes a subscription; the topic goes when its last subscriber does (and, in cluster mode,
    /// the node stops receiving it).
    pub fn unsubscribe(&self, topic: &Topic, id: SubscriptionId) {
        let emptied = {
            let mut topics = self.inner.topics.write().unwrap_or_else(|e| e.into_inner());
            match topics.get_mut(topic.as_str()) {
                Some(subs) => {
                    subs.retain(|(sid, _)| *sid != id);
                    if subs.is_empty() {
                        topics.remove(topic.as_str());
                        true
                    } else {
                        false
                    }
                }
                None => false,
            }
        };
        if let (true, Some(cluster)) = (emptied, &self.cluster) {
            // A lost unbind only costs traffic this node drops; the binder reconciles on reconnect.
            let _ = cluster.binder.try_send(BindRequest {
                topic: topic.clone(),
                done: None,
            });
        }
    }

    /// Sends `message` to every current subscriber of its topic, on this node or (cluster mode) on
    /// every node. In cluster mode this node's own subscribers get it at once, without the broker
    /// round trip, and the transport carries it to the others (the node drops its own copy when
    /// the broker hands it back): a node running the worker and socket roles pushes to its own
    /// sockets as fast as a local one.
    ///
    /// # Errors
    /// Only a cross-node transport can fail; the local fan-out always succeeds. A failed broadcast
    /// may have reached this node's subscribers already: it is retried, and they drop the copy.
    pub async fn broadcast(&self, message: Message) -> Result<Reach, Error> {
        let message = Arc::new(message);
        let local = self.deliver_local(Arc::clone(&message));
        match &self.cluster {
            Some(cluster) => {
                let routed = cluster.transport.publish(&message).await?;
                Ok(Reach {
                    delivered: local.delivered.max(usize::from(routed)),
                    overflowed: local.overflowed,
                })
            }
            None => Ok(local),
        }
    }

    /// True when this node has subscribers to `topic`.
    pub fn has_subscribers(&self, topic: &str) -> bool {
        self.inner
            .topics
            .read()
            .map(|t| t.contains_key(topic))
            .unwrap_or(false)
    }

    /// The topics this node has subscribers to.
    pub fn topics(&self) -> Vec<Topic> {
        self.inner
            .topics
            .read()
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Hands `message` to this node's subscribers of its topic (what a node does with a broadcast
    /// it receives from another).
    pub fn deliver_local(&self, message: Arc<Message>) -> Reach {
        // A node with no subscriber of the topic (a worker node's own copy) records nothing.
        let traced = message
            .trace
            .filter(|_| self.has_subscribers(message.topic.as_str()));
        let mut trace = traced.as_ref().and_then(|tp| {
            crate::traces::continue_traces(
                "herald.push",
                opentelemetry::trace::SpanKind::Consumer,
                [tp],
                || {
                    vec![opentelemetry::KeyValue::new(
                        "herald.topic",
                        message.topic.as_str().to_owned(),
                    )]
                },
            )
        });
        let reach = self.deliver_to_subscribers(message);
        if let Some(span) = &mut trace {
            use crate::traces::Span as _;
            span.set_attribute(opentelemetry::KeyValue::new(
                "herald.sockets",
                reach.delivered as i64,
            ));
        }
        reach
    }

    /// Hands `message`, a group commit's events of one user, to this node's subscribers of its
    /// topic ahead of the worker's broadcast of them (`pipeline.push_from_commit`). It is only a
    /// head start: a subscriber whose queue is half full or more is skipped, never flagged as
    /// overflowing, so it keeps its room for what it must receive; the worker's copy follows.
    /// Returns the subscribers it reached.
    pub fn deliver_from_commit(&self, message: Message) -> usize {
        debug_assert!(message.from_commit);
        let topics = self.inner.topics.read().unwrap_or_else(|e| e.into_inner());
        let Some(subs) = topics.get(message.topic.as_str()) else {
            return 0;
        };
        let message = Arc::new(message);
        subs.iter()
            .filter(|(_, sub)| sub.queue.capacity() * 2 > sub.queue.max_capacity())
            .filter(|(_, sub)| sub.queue.try_send(Arc::clone(&message)).is_ok())
            .count()
    }

    fn deliver_to_subscribers(&self, message: Arc<Message>) -> Reach {
        let mut reach = Reach::default();
        let topics = self.inner.topics.read().unwrap_or_else(|e| e.into_inner());
        let Some(subs) = topics.get(message.topic.as_str()) else {
            return reach;
        };
        for (_, sub) in subs {
            match sub.queue.try_send(Arc::clone(&message)) {
                Ok(()) => reach.delivered += 1,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    sub.overflowed.cancel();
                    reach.overflowed += 1;
                }
                // The connection is closing and will unsubscribe; it was not reached.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        reach
    }

    /// Subscriptions on this node to topics starting with `prefix` (each subscriber counted: two
    /// sockets of a user joined to its channel are two).
    pub fn subscriptions_under(&self, prefix: &str) -> usize {
        self.inner
            .topics
            .read()
            .map(|t| {
                t.iter()
                    .filter(|(topic, _)| topic.as_str().starts_with(prefix))
                    .map(|(_, subscribers)| subscribers.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Topics with at least one subscriber on this node.
    pub fn topic_count(&self) -> usize {
        self.inner.topics.read().map(|t| t.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(topic: &str) -> Message {
        Message::control(&Topic::from(topic), "push", "{}")
    }

    fn subscriber(capacity: usize) -> (Subscriber, mpsc::Receiver<Arc<Message>>) {
        let (queue, rx) = mpsc::channel(capacity);
        let sub = Subscriber {
            queue,
            overflowed: CancellationToken::new(),
        };
        (sub, rx)
    }

    #[tokio::test]
    async fn broadcast_reaches_only_the_topic() {
        let pubsub = PubSub::new();
        let (a, mut rx_a) = subscriber(4);
        let (b, mut rx_b) = subscriber(4);
        pubsub.subscribe(&Topic::from("user:1"), a).await.unwrap();
        pubsub.subscribe(&Topic::from("user:2"), b).await.unwrap();
        let reach = pubsub.broadcast(message("user:1")).await.unwrap();
        assert_eq!(reach.delivered, 1);
        assert_eq!(rx_a.recv().await.unwrap().topic.as_str(), "user:1");
        assert!(rx_b.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_full_queue_flags_its_subscriber_and_spares_others() {
        let pubsub = PubSub::new();
        let (slow, _rx_slow) = subscriber(1);
        let (fast, mut rx_fast) = subscriber(8);
        let flag = slow.overflowed.clone();
        pubsub
            .subscribe(&Topic::from("user:1"), slow)
            .await
            .unwrap();
        pubsub
            .subscribe(&Topic::from("user:1"), fast)
            .await
            .unwrap();
        pubsub.broadcast(message("user:1")).await.unwrap();
        let reach = pubsub.broadcast(message("user:1")).await.unwrap();
        assert_eq!(
            reach,
            Reach {
                delivered: 1,
                overflowed: 1
            }
        );
        assert!(flag.is_cancelled());
        assert!(rx_fast.recv().await.is_some() && rx_fast.recv().await.is_some());
    }

    #[tokio::test]
    async fn a_commits_head_start_skips_half_full_queues_and_flags_nobody() {
        let pubsub = PubSub::new();
        let (roomy, mut rx_roomy) = subscriber(4);
        let (busy, _rx_busy) = subscriber(4);
        let busy_flag = busy.overflowed.clone();
        let topic = Topic::from("user:1");
        for sub in [roomy, busy.clone()] {
            pubsub.subscribe(&topic, sub).await.unwrap();
        }
        for _ in 0..2 {
            busy.queue.try_send(Arc::new(message("user:1"))).unwrap();
        }
        let early = |topic: &str| Message {
            from_commit: true,
            ..message(topic)
        };
        assert_eq!(pubsub.deliver_from_commit(early("user:1")), 1);
        assert_eq!(pubsub.deliver_from_commit(early("user:2")), 0);
        assert!(rx_roomy.recv().await.unwrap().from_commit);
        assert!(!busy_flag.is_cancelled());
    }

    #[tokio::test]
    async fn unsubscribe_removes_the_topic() {
        let pubsub = PubSub::new();
        let (a, _rx) = subscriber(1);
        let id = pubsub.subscribe(&Topic::from("user:1"), a).await.unwrap();
        assert_eq!(pubsub.topic_count(), 1);
        pubsub.unsubscribe(&Topic::from("user:1"), id);
        assert_eq!(pubsub.topic_count(), 0);
        assert_eq!(
            pubsub.broadcast(message("user:1")).await.unwrap().delivered,
            0
        );
    }
}
