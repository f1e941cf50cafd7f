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
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// A broadcast as it travels between nodes: a topic and its pushes, in order.
#[derive(Serialize, Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    topic: Cow<'a, str>,
    #[serde(borrow)]
    pushes: Vec<WirePush<'a>>,
    /// The sending run's trace, if sampled (nodes built before traces ignore it).
    #[serde(
        rename = "tp",
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::traces::lenient"
    )]
    trace: Option<crate::traces::TraceParent>,
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

/// Most broadcasts one fan-out message carries.
const MAX_BATCH_BROADCASTS: usize = 256;
/// About the most bytes one fan-out message carries (a single larger broadcast goes alone).
const MAX_BATCH_BYTES: usize = 256 * 1024;
/// Fan-out messages awaiting their confirm at once. While they are out, the broadcasts that come
/// in wait and go together in the next message: alone, a broadcast is published at once; under
/// load, messages grow by themselves (as the group commit's batches do).
const MESSAGES_IN_FLIGHT: usize = 2;
/// Broadcasts waiting for a message; the worker's lanes already bound how many are made at once.
const PENDING_BROADCASTS: usize = 4096;

/// Broadcasts over RabbitMQ, several to a message: the broadcasts that wait while earlier messages
/// are unconfirmed go together, each message to every bucket its broadcasts fall in.
pub struct RabbitTransport {
    buckets: u16,
    pending: mpsc::Sender<Pending>,
    nodes: BrokerNodes,
}

/// One broadcast waiting for its message: its encoded [`Wire`], and who waits for the confirm.
struct Pending {
    bucket: u16,
    wire: Vec<u8>,
    pushes: usize,
    routed: oneshot::Sender<Result<bool, PubSubError>>,
}

impl RabbitTransport {
    /// A transport publishing with `queue` settings for the node process `origin` (see
    /// [`origin_of`]). Starts its batcher: call within the runtime.
    pub fn new(
        queue: QueueSettings,
        pubsub: &PubSubSettings,
        origin: &str,
        metrics: Metrics,
    ) -> Self {
        let publisher = FanoutPublisher::new(queue, origin.to_owned());
        let nodes = publisher.broker_nodes();
        let (pending, waiting) = mpsc::channel(PENDING_BROADCASTS);
        tokio::spawn(publish_batches(
            Arc::new(publisher),
            waiting,
            pubsub.publish_timeout(),
            metrics,
        ));
        Self {
            buckets: pubsub.buckets,
            pending,
            nodes,
        }
    }

    /// The broker nodes its publisher moves between, and the one it uses.
    pub fn broker_nodes(&self) -> BrokerNodes {
        self.nodes.clone()
    }
}

impl Transport for RabbitTransport {
    fn publish<'a>(&'a self, message: &'a Message) -> BoxFuture<'a, Result<bool, PubSubError>> {
        Box::pin(async move {
            let wire = encode(message)?;
            let (routed, confirmed) = oneshot::channel();
            let gone = || PubSubError::Unavailable("the fan-out publisher stopped".into());
            self.pending
                .send(Pending {
                    bucket: crate::event::stable_bucket(message.topic.as_str(), self.buckets),
                    wire,
                    pushes: message.pushes.len(),
                    routed,
                })
                .await
                .map_err(|_| gone())?;
            confirmed.await.map_err(|_| gone())?
        })
    }
}

/// `message` as it travels: a [`Wire`], JSON.
fn encode(message: &Message) -> Result<Vec<u8>, PubSubError> {
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
        trace: message.trace,
    };
    serde_json::to_vec(&wire).map_err(|e| PubSubError::Unavailable(e.to_string()))
}

/// Publishes what waits in `pending`, a message at a time and in order, at most
/// [`MESSAGES_IN_FLIGHT`] unconfirmed, until every sender is gone; tells each broadcast's caller
/// how its message went. Messages are sent here, one after another, so they reach the broker in
/// the order their broadcasts were made; only the confirms are awaited apart.
async fn publish_batches(
    publisher: Arc<FanoutPublisher>,
    mut pending: mpsc::Receiver<Pending>,
    limit: Duration,
    metrics: Metrics,
) {
    let in_flight = Arc::new(Semaphore::new(MESSAGES_IN_FLIGHT));
    let mut held = None;
    loop {
        let first = match held.take() {
            Some(first) => first,
            None => match pending.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        // A slot first: what arrives while none is free joins this message.
        let Ok(slot) = Arc::clone(&in_flight).acquire_owned().await else {
            return;
        };
        // Its caller may have given up meanwhile (or before).
        if abandoned(&first) {
            continue;
        }
        let (mut batch, next) = take_batch(first, &mut pending);
        held = next;
        let (bucket, cc, body) = assemble(&mut batch);
        let deadline = tokio::time::Instant::now() + limit;
        let sent = match publisher.send(bucket, &cc, &body, deadline).await {
            Ok(sent) => sent,
            Err(error) => {
                drop(slot);
                tell(batch, &Err(unavailable(error)));
                continue;
            }
        };
        metrics.fanout_published(batch.len(), batch.iter().map(|p| p.pushes).sum());
        let publisher = Arc::clone(&publisher);
        tokio::spawn(async move {
            let routed = publisher.confirmed(sent).await.map_err(unavailable);
            drop(slot);
            tell(batch, &routed);
        });
    }
}

/// Whether the caller of `broadcast` stopped waiting (its attempt timed out and will be made
/// again): it is not sent late.
fn abandoned(broadcast: &Pending) -> bool {
    broadcast.routed.is_closed()
}

/// A broker failure, as pubsub reports it.
fn unavailable(error: queue::Error) -> PubSubError {
    PubSubError::Unavailable(error.to_string())
}

fn tell(batch: Vec<Pending>, routed: &Result<bool, PubSubError>) {
    for broadcast in batch {
        let _ = broadcast.routed.send(routed.clone());
    }
}

/// The next message's broadcasts: `first` and what else waits, up to a message's bounds, and the
/// broadcast that would have taken it past [`MAX_BATCH_BYTES`], to start the next one (a single
/// broadcast larger than that goes alone).
fn take_batch(
    first: Pending,
    pending: &mut mpsc::Receiver<Pending>,
) -> (Vec<Pending>, Option<Pending>) {
    let mut bytes = first.wire.len();
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH_BROADCASTS {
        let Ok(next) = pending.try_recv() else {
            break;
        };
        if abandoned(&next) {
            continue;
        }
        if bytes + next.wire.len() > MAX_BATCH_BYTES {
            return (batch, Some(next));
        }
        bytes += next.wire.len();
        batch.push(next);
    }
    (batch, None)
}

/// A message's route and body: the first broadcast's bucket, the other distinct buckets (its
/// `CC`), and one broadcast's [`Wire`] (moved out, not copied) or several as a JSON array of them.
fn assemble(batch: &mut [Pending]) -> (u16, Vec<u16>, Vec<u8>) {
    let bucket = batch.first().map_or(0, |first| first.bucket);
    let mut cc: Vec<u16> = Vec::new();
    for broadcast in batch.iter() {
        if broadcast.bucket != bucket && !cc.contains(&broadcast.bucket) {
            cc.push(broadcast.bucket);
        }
    }
    if let [only] = batch {
        return (bucket, cc, std::mem::take(&mut only.wire));
    }
    let mut body = Vec::with_capacity(batch.iter().map(|p| p.wire.len() + 1).sum::<usize>() + 1);
    body.push(b'[');
    for (i, broadcast) in batch.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&broadcast.wire);
    }
    body.push(b']');
    (bucket, cc, body)
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

/// Hands a received message's broadcasts to this node's subscribers: a message carries one
/// [`Wire`] or an array of them, and topics nobody joined here (their bucket is bound for others)
/// are skipped before anything is copied.
fn deliver(pubsub: &PubSub, body: &[u8]) {
    let wires = if body.first() == Some(&b'[') {
        serde_json::from_slice::<Vec<Wire>>(body)
    } else {
        serde_json::from_slice::<Wire>(body).map(|wire| vec![wire])
    };
    let Ok(wires) = wires else {
        tracing::warn!("undecodable broadcast dropped");
        return;
    };
    for wire in wires {
        if !pubsub.has_subscribers(&wire.topic) {
            continue;
        }
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
            trace: wire.trace,
            from_commit: false,
        }));
    }
}

fn resync_local(pubsub: &PubSub) {
    for topic in pubsub.topics() {
        pubsub.deliver_local(Arc::new(Message::control(&topic, RESYNC_EVENT, "{}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(
        bucket: u16,
        bytes: usize,
    ) -> (Pending, oneshot::Receiver<Result<bool, PubSubError>>) {
        let (routed, confirmed) = oneshot::channel();
        let wire = format!(
            "{{\"topic\":\"user:{bucket}\",\"pad\":\"{}\"}}",
            "x".repeat(bytes)
        );
        let broadcast = Pending {
            bucket,
            wire: wire.into_bytes(),
            pushes: 1,
            routed,
        };
        (broadcast, confirmed)
    }

    #[test]
    fn a_message_takes_what_waits_up_to_its_byte_bound_and_the_next_one_starts_with_the_rest() {
        let (tx, mut rx) = mpsc::channel(16);
        let (first, _a) = pending(1, 10);
        let (small, _b) = pending(2, 10);
        let (big, _c) = pending(3, MAX_BATCH_BYTES);
        let (after, _d) = pending(4, 10);
        for p in [small, big, after] {
            tx.try_send(p).ok().unwrap();
        }
        let (batch, held) = take_batch(first, &mut rx);
        assert_eq!(batch.iter().map(|p| p.bucket).collect::<Vec<_>>(), [1, 2]);
        let held = held.expect("the broadcast past the bound is held for the next message");
        assert_eq!(held.bucket, 3);
        // Alone it goes, however large; then the rest.
        let (batch, held) = take_batch(held, &mut rx);
        assert_eq!(batch.iter().map(|p| p.bucket).collect::<Vec<_>>(), [3]);
        assert_eq!(held.map(|p| p.bucket), Some(4));
    }

    #[test]
    fn a_broadcast_whose_caller_gave_up_is_not_sent() {
        let (tx, mut rx) = mpsc::channel(16);
        let (first, _a) = pending(1, 10);
        let (gone, caller) = pending(2, 10);
        drop(caller);
        let (kept, _c) = pending(3, 10);
        for p in [gone, kept] {
            tx.try_send(p).ok().unwrap();
        }
        let (batch, held) = take_batch(first, &mut rx);
        assert_eq!(batch.iter().map(|p| p.bucket).collect::<Vec<_>>(), [1, 3]);
        assert!(held.is_none());
    }

    #[test]
    fn a_message_is_routed_to_its_first_bucket_with_each_other_bucket_once_in_cc() {
        let receivers: Vec<_> = [7, 3, 7, 9, 3].map(|b| pending(b, 1)).into_iter().collect();
        let (mut batch, _callers): (Vec<Pending>, Vec<_>) = receivers.into_iter().unzip();
        let (bucket, cc, body) = assemble(&mut batch);
        assert_eq!((bucket, cc), (7, vec![3, 9]));
        let wires: Vec<serde_json::Value> = serde_json::from_slice(&body).expect("a JSON array");
        assert_eq!(wires.len(), 5);
        let (one, _caller) = pending(5, 1);
        let wire = one.wire.clone();
        let (bucket, cc, body) = assemble(&mut [one]);
        assert_eq!((bucket, cc.len()), (5, 0));
        assert_eq!(
            body, wire,
            "alone, a broadcast travels as itself (older nodes read it)"
        );
    }
}
