//! The stats socket's channel (Real-Time Phoenix's `StatsChannel`): a measurement demo, and a lesson in where
//! channel work should run.
//!
//! Each joined stats channel is its own task with its own inbox, like a Phoenix channel process: it
//! handles one client push at a time. `slow_ping` is handled inline and holds the channel for
//! `socket.stats_slow_ping_ms`, so a `ping` sent after it waits behind it (the pitfall, kept visible).
//! `parallel_slow_ping` runs in a task of its own and answers later through a handle to the channel,
//! so a later `ping` overtakes it; such tasks are capped per channel. Neither ever blocks the
//! connection: heartbeats and other channels carry on.

use super::channel::ToConnection;
use super::protocol::{self, Frame, Reply, TOO_MANY_REQUESTS, UNKNOWN_EVENT, Vsn};
use crate::config::SocketSettings;
use crate::event::Topic;
use crate::metrics::Metrics;
use serde_json::value::RawValue;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

const PONG: &str = r#"{"ping":"pong"}"#;

/// The connection's handle to a running stats channel task. Dropping it stops the task and its
/// parallel work.
pub struct StatsChannel {
    inbox: mpsc::Sender<Frame>,
    stop: CancellationToken,
}

impl Drop for StatsChannel {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A handle through which channel work answers: not a copy of the channel's state, but a way back
/// to its connection, tagged with the channel's topic and join ref.
#[derive(Clone)]
struct ChannelHandle {
    vsn: Vsn,
    topic: Topic,
    join_ref: Arc<RawValue>,
    connection: mpsc::Sender<ToConnection>,
    stop: CancellationToken,
}

impl ChannelHandle {
    async fn reply(&self, msg_ref: &RawValue, reply: Reply) {
        let text = protocol::encode_reply(
            self.vsn,
            &self.join_ref,
            msg_ref,
            self.topic.as_str(),
            &reply,
        );
        self.send(ToConnection::Frame(text)).await;
    }

    async fn send(&self, message: ToConnection) {
        tokio::select! {
            _ = self.connection.send(message) => {}
            () = self.stop.cancelled() => {}
        }
    }
}

impl StatsChannel {
    /// Starts the task of a stats channel joined on `topic`.
    pub fn spawn(
        vsn: Vsn,
        topic: &Topic,
        join_ref: &RawValue,
        connection: mpsc::Sender<ToConnection>,
        settings: &SocketSettings,
        metrics: Metrics,
    ) -> Self {
        let (inbox, frames) = mpsc::channel(settings.channel_inbox);
        let stop = CancellationToken::new();
        let handle = ChannelHandle {
            vsn,
            topic: topic.clone(),
            join_ref: Arc::from(join_ref.to_owned()),
            connection,
            stop: stop.clone(),
        };
        let slow = settings.stats_slow_ping();
        let permits = Arc::new(Semaphore::new(settings.stats_max_parallel));
        tokio::spawn(run(handle, frames, slow, permits, metrics));
        Self { inbox, stop }
    }

    /// Queues a client push for the channel; gives it back when the channel's inbox is full.
    ///
    /// # Errors
    /// The frame, when the inbox is full (or the task has ended).
    pub fn push(&self, frame: Frame) -> Result<(), Frame> {
        self.inbox.try_send(frame).map_err(|e| e.into_inner())
    }
}

async fn run(
    handle: ChannelHandle,
    mut frames: mpsc::Receiver<Frame>,
    slow: Duration,
    permits: Arc<Semaphore>,
    metrics: Metrics,
) {
    loop {
        let frame = tokio::select! {
            frame = frames.recv() => match frame {
                Some(frame) => frame,
                None => return,
            },
            () = handle.stop.cancelled() => return,
        };
        match frame.event.as_str() {
            "ping" => {
                let started = Instant::now();
                handle.reply(&frame.msg_ref, Reply::ok_with(PONG)).await;
                metrics.stats_ping(started.elapsed());
            }
            "slow_ping" => {
                // Inline on purpose: this channel handles nothing else until it is done.
                tokio::select! {
                    () = tokio::time::sleep(slow) => {}
                    () = handle.stop.cancelled() => return,
                }
                handle.reply(&frame.msg_ref, Reply::ok_with(PONG)).await;
            }
            "parallel_slow_ping" => match Arc::clone(&permits).try_acquire_owned() {
                Ok(permit) => {
                    let handle = handle.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            () = tokio::time::sleep(slow) => {
                                handle.reply(&frame.msg_ref, Reply::ok_with(PONG)).await;
                            }
                            () = handle.stop.cancelled() => {}
                        }
                        drop(permit);
                    });
                }
                Err(_) => {
                    let refused = Reply::error(TOO_MANY_REQUESTS);
                    handle.reply(&frame.msg_ref, refused).await;
                }
            },
            // The server closes the channel: shows clients what a server-side close looks like.
            "close" => {
                handle.reply(&frame.msg_ref, Reply::ok()).await;
                let close = ToConnection::Close {
                    topic: handle.topic.clone(),
                    join_ref: (*handle.join_ref).to_owned(),
                };
                handle.send(close).await;
                return;
            }
            _ => {
                let refused = Reply::error(UNKNOWN_EVENT);
                handle.reply(&frame.msg_ref, refused).await;
            }
        }
    }
}
