//! The publisher: persistent messages to the partition queues with publisher confirms, pipelined.
//!
//! Awaiting each confirm before the next publish caps near 2.5k msgs/s on our box; here up to
//! `max_inflight_confirms` publishes are outstanding at once and confirms are collected as they come.
//! Order is kept: one channel, publishes issued in the order they were handed in, so each partition
//! queue receives its messages in commit order.
//!
//! A message is an outbox row: what the broker confirmed is reported as
//! [`PublisherEvent::Confirmed`] (the rows are deleted); everything else (nack, timeout, lost
//! connection, unroutable, too old to publish) is reported as unconfirmed and simply left to the
//! outbox relay, because the events are already safe in PostgreSQL. A message is never published
//! after its `publish_by` instant: from then on the relay may republish it, and the two must not
//! both send it.

use super::{
    BrokerNodes, Error, Topology, Unconfirmed, confirmed, declare_topology, enable_confirms,
    open_channel,
};
use crate::backoff::{Backoff, reconnect};
use crate::config::QueueSettings;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Connection, Event};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Who handed a message to the publisher (a metric tag).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A group commit's new events.
    Commit,
    /// The outbox relay, for a message never confirmed.
    Relay,
    /// An operator replay.
    Replay,
}

impl Source {
    /// The metric tag value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Commit => "commit",
            Self::Relay => "relay",
            Self::Replay => "replay",
        }
    }
}

/// A message to publish: an outbox row's events for one partition.
#[derive(Debug)]
pub struct OutgoingMessage {
    /// The outbox row: the message id, and what the confirm reports.
    pub id: Uuid,
    /// The partition queue it goes to.
    pub partition: u16,
    /// How many events it carries.
    pub events: usize,
    /// The events, encoded ([`crate::event::encode_batch`]).
    pub body: Vec<u8>,
    /// Published only before this instant; later it is left to the relay (see the module docs).
    pub publish_by: Instant,
}

/// What happened to published messages, for the pipeline to record and count.
#[derive(Debug)]
pub enum PublisherEvent {
    /// The broker confirmed these messages (persisted to their queues): their outbox rows.
    Confirmed(Vec<Uuid>),
    /// These messages were not confirmed; their outbox rows stay for the relay.
    Unconfirmed {
        /// How many messages.
        count: usize,
        /// Why: `nack`, `timeout`, `unroutable`, `connection_lost` or `stale` (held past its
        /// `publish_by`).
        reason: &'static str,
    },
    /// The connection was lost, or an attempt to make one failed.
    Disconnected,
}

/// The sending side, cheap to clone: enqueue and the outbox relay both publish through it.
#[derive(Clone, Debug)]
pub struct PublisherHandle {
    tx: mpsc::Sender<OutgoingMessage>,
    connected: Arc<AtomicBool>,
    nodes: BrokerNodes,
}

impl PublisherHandle {
    /// Hands a message over, waiting up to `limit` for room in the buffer while the broker is up.
    ///
    /// # Errors
    /// The message, not taken: the broker is down, the buffer stayed full, or the publisher stopped.
    pub async fn publish_within(
        &self,
        message: OutgoingMessage,
        limit: Duration,
    ) -> Result<(), OutgoingMessage> {
        if !self.is_connected() {
            return Err(message);
        }
        self.tx
            .send_timeout(message, limit)
            .await
            .map_err(|e| match e {
                mpsc::error::SendTimeoutError::Timeout(m)
                | mpsc::error::SendTimeoutError::Closed(m) => m,
            })
    }

    /// Hands a message over, waiting for room in the buffer while the broker is up.
    ///
    /// # Errors
    /// The message, not taken: the broker is down or the publisher stopped.
    pub async fn publish(&self, message: OutgoingMessage) -> Result<(), OutgoingMessage> {
        if !self.is_connected() {
            return Err(message);
        }
        self.tx.send(message).await.map_err(|e| e.0)
    }

    /// True while a confirmed channel to the broker is open.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// The flag behind [`Self::is_connected`], for readiness checks.
    pub fn connected_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.connected)
    }

    /// The broker nodes the publisher moves between, and the one it uses.
    pub fn broker_nodes(&self) -> BrokerNodes {
        self.nodes.clone()
    }
}

/// The publishing task's state; [`Publisher::run`] drives it.
pub struct Publisher {
    settings: QueueSettings,
    rx: mpsc::Receiver<OutgoingMessage>,
    events: mpsc::Sender<PublisherEvent>,
    connected: Arc<AtomicBool>,
    names: Topology,
    nodes: BrokerNodes,
}

enum PumpEnd {
    /// Intake closed and every confirm settled.
    Drained,
    /// The connection or channel failed.
    Lost(lapin::Error),
}

impl Publisher {
    /// A publisher, its handle, and the stream of what became of publishes.
    pub fn new(settings: QueueSettings) -> (Self, PublisherHandle, mpsc::Receiver<PublisherEvent>) {
        let (tx, rx) = mpsc::channel(settings.publish_buffer);
        let (events, events_rx) = mpsc::channel(1024);
        let connected = Arc::new(AtomicBool::new(false));
        let names = Topology::new(&settings.prefix, settings.partitions);
        let nodes = BrokerNodes::new(&settings);
        let handle = PublisherHandle {
            tx,
            connected: Arc::clone(&connected),
            nodes: nodes.clone(),
        };
        let publisher = Self {
            settings,
            rx,
            events,
            connected,
            names,
            nodes,
        };
        (publisher, handle, events_rx)
    }

    /// Connects (and reconnects, with backoff) and publishes until `stop` is cancelled; then publishes
    /// what is buffered, settles outstanding confirms, and returns. While the broker is down, buffered
    /// messages wait; new ones are refused by the handle and left to the relay.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut backoff = Backoff::new(self.settings.reconnect_max_backoff());
        loop {
            let this = &self;
            let Some((connection, channel)) = reconnect(
                "publisher",
                &mut backoff,
                &stop,
                || this.open(),
                || this.report(PublisherEvent::Disconnected),
            )
            .await
            else {
                break;
            };
            tracing::info!(partitions = self.names.partitions, "publisher connected");
            self.connected.store(true, Ordering::Relaxed);
            let end = self.pump(&connection, &channel, &stop).await;
            self.connected.store(false, Ordering::Relaxed);
            match end {
                PumpEnd::Drained => {
                    let _ = connection.close(200, "herald shutting down".into()).await;
                    return;
                }
                PumpEnd::Lost(error) => {
                    tracing::warn!(error = %error, "publisher lost RabbitMQ; reconnecting");
                    self.report(PublisherEvent::Disconnected).await;
                }
            }
        }
        // Stopped while disconnected: whatever is still buffered stays 'accepted' in PostgreSQL.
        self.rx.close();
        let mut left = 0;
        while self.rx.try_recv().is_ok() {
            left += 1;
        }
        if left > 0 {
            self.report(PublisherEvent::Unconfirmed {
                count: left,
                reason: "connection_lost",
            })
            .await;
        }
    }

    async fn open(&self) -> Result<(Connection, Channel), Error> {
        let connection = self.nodes.connect(&self.settings, "publisher").await?;
        let channel = open_channel(&connection).await?;
        declare_topology(&channel, &self.settings).await?;
        enable_confirms(&channel).await?;
        Ok((connection, channel))
    }

    async fn pump(
        &mut self,
        connection: &Connection,
        channel: &Channel,
        stop: &CancellationToken,
    ) -> PumpEnd {
        // Without this an idle publisher would notice a dead connection only at its next publish,
        // and readiness would lie until then.
        let mut connection_events = connection.events_listener();
        let confirm_timeout = self.settings.confirm_timeout();
        let max_inflight = self.settings.max_inflight_confirms;
        let mut pending = FuturesUnordered::new();
        let mut confirmed: Vec<Uuid> = Vec::new();
        let mut stopping = false;
        let mut intake_open = true;
        loop {
            if !intake_open && pending.is_empty() {
                self.flush_confirmed(&mut confirmed).await;
                return PumpEnd::Drained;
            }
            tokio::select! {
                biased;
                Some((id, result)) = pending.next(), if !pending.is_empty() => {
                    match settle(result) {
                        Ok(()) => confirmed.push(id),
                        Err(Settled::Unconfirmed(reason)) => {
                            self.report(PublisherEvent::Unconfirmed { count: 1, reason }).await;
                        }
                        Err(Settled::Lost(error)) => {
                            return self.lost(&mut confirmed, 1 + pending.len(), error).await;
                        }
                    }
                }
                Some(event) = connection_events.next() => match event {
                    Event::Error(error) => {
                        return self.lost(&mut confirmed, pending.len(), error).await;
                    }
                    // A blocked connection (broker memory or disk alarm) would stall publishes:
                    // refuse new ones meanwhile, so they wait in the outbox instead.
                    Event::ConnectionBlocked(reason) => {
                        tracing::warn!(reason, "RabbitMQ blocked the publisher");
                        self.connected.store(false, Ordering::Relaxed);
                    }
                    Event::ConnectionUnblocked => self.connected.store(true, Ordering::Relaxed),
                    _ => {}
                },
                () = stop.cancelled(), if !stopping => {
                    // Stop taking new messages; publish those already buffered, then drain.
                    stopping = true;
                    self.rx.close();
                }
                message = self.rx.recv(), if intake_open && pending.len() < max_inflight => {
                    let Some(message) = message else {
                        intake_open = false;
                        continue;
                    };
                    if Instant::now() > message.publish_by {
                        self.report(PublisherEvent::Unconfirmed { count: 1, reason: "stale" }).await;
                        continue;
                    }
                    match self.publish_one(channel, &message).await {
                        Ok(confirm) => pending.push(confirmation(message.id, confirm, confirm_timeout)),
                        Err(error) => {
                            return self.lost(&mut confirmed, 1 + pending.len(), error).await;
                        }
                    }
                }
            }
            if pending.is_empty() || confirmed.len() >= 512 {
                self.flush_confirmed(&mut confirmed).await;
            }
        }
    }

    async fn publish_one(
        &self,
        channel: &Channel,
        message: &OutgoingMessage,
    ) -> Result<lapin::PublisherConfirm, lapin::Error> {
        let properties = BasicProperties::default()
            .with_delivery_mode(2) // persistent: survives a broker restart
            .with_content_type("application/json".into())
            .with_message_id(message.id.to_string().into());
        let queue = self.names.partition_queue(message.partition);
        channel
            .basic_publish(
                "".into(), // the default exchange routes by queue name
                queue.as_str().into(),
                // mandatory: an unroutable message (queue deleted) comes back instead of vanishing
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &message.body,
                properties,
            )
            .await
    }

    /// The connection went: what was confirmed is reported, the `unsettled` publishes are counted
    /// as unconfirmed (they stay in the outbox), and the pump ends.
    async fn lost(
        &self,
        confirmed: &mut Vec<Uuid>,
        unsettled: usize,
        error: lapin::Error,
    ) -> PumpEnd {
        self.flush_confirmed(confirmed).await;
        if unsettled > 0 {
            let reason = "connection_lost";
            self.report(PublisherEvent::Unconfirmed {
                count: unsettled,
                reason,
            })
            .await;
        }
        PumpEnd::Lost(error)
    }

    async fn flush_confirmed(&self, confirmed: &mut Vec<Uuid>) {
        if !confirmed.is_empty() {
            self.report(PublisherEvent::Confirmed(std::mem::take(confirmed)))
                .await;
        }
    }

    async fn report(&self, event: PublisherEvent) {
        // The receiver lives as long as the node; if it is gone we are shutting down anyway.
        let _ = self.events.send(event).await;
    }
}

async fn confirmation(
    id: Uuid,
    confirm: lapin::PublisherConfirm,
    limit: Duration,
) -> (Uuid, Result<bool, Unconfirmed>) {
    (id, confirmed(confirm, limit).await)
}

enum Settled {
    Unconfirmed(&'static str),
    Lost(lapin::Error),
}

fn settle(result: Result<bool, Unconfirmed>) -> Result<(), Settled> {
    match result {
        Ok(true) => Ok(()),
        Ok(false) => Err(Settled::Unconfirmed("unroutable")),
        Err(Unconfirmed::Nacked) => Err(Settled::Unconfirmed("nack")),
        Err(Unconfirmed::Timeout) => Err(Settled::Unconfirmed("timeout")),
        Err(Unconfirmed::Lost(error)) => Err(Settled::Lost(error)),
    }
}
