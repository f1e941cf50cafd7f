//! Reading queue depths from the broker: the sweeper's idle check, legacy cleanup, the console.

use super::{Error, Topology, connect, open_channel};
use crate::config::QueueSettings;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use std::time::Duration;

fn is_not_found(error: &lapin::Error) -> bool {
    matches!(
        error.kind(),
        lapin::ErrorKind::ProtocolError(e) if e.get_id() == 404
    )
}

/// How many messages wait (ready, not handed to a consumer) in `queue`; `None` when it does not
/// exist. Each probe uses a channel of its own, since a missing queue closes the channel.
///
/// # Errors
/// The broker is unreachable.
pub async fn ready_messages(connection: &Connection, queue: &str) -> Result<Option<u32>, Error> {
    let counts = ready_counts(connection, &[queue.to_owned()]).await?;
    Ok(counts.into_iter().next().flatten())
}

/// How many messages wait (ready) in each of `queues`, in order; `None` for one that does not
/// exist. One channel serves every probe until a missing queue closes it (then a new one is
/// opened), so sampling all partitions costs a round trip each, not a channel each.
///
/// # Errors
/// The broker is unreachable.
pub async fn ready_counts(
    connection: &Connection,
    queues: &[String],
) -> Result<Vec<Option<u32>>, Error> {
    let mut counts = Vec::with_capacity(queues.len());
    let mut channel: Option<Channel> = None;
    for queue in queues {
        let probe = match &channel {
            Some(open) => open,
            None => channel.insert(open_channel(connection).await?),
        };
        let probed = probe
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match probed {
            Ok(declared) => counts.push(Some(declared.message_count())),
            Err(error) if is_not_found(&error) => {
                counts.push(None);
                channel = None;
            }
            Err(source) => return Err(Error::channel("probe a queue")(source)),
        }
    }
    if let Some(open) = channel {
        let _ = open.close(200, "probe done".into()).await;
    }
    Ok(counts)
}

/// Ready messages per partition queue for operators (the console), read from the broker on a
/// connection of its own, opened on first use: a node whose console is never opened never opens
/// it. One probe runs at a time and its answer serves every caller for [`DepthProbe::FRESH`], so
/// any number of open consoles cost one round of probes per second.
pub struct DepthProbe {
    settings: QueueSettings,
    state: tokio::sync::Mutex<ProbeState>,
}

#[derive(Default)]
struct ProbeState {
    connection: Option<Connection>,
    last: Option<(tokio::time::Instant, Vec<Option<u32>>)>,
}

impl DepthProbe {
    /// How long one reading is served again.
    pub const FRESH: Duration = Duration::from_secs(1);

    /// A probe of the partition queues of `settings`.
    pub fn new(settings: QueueSettings) -> Self {
        Self {
            settings,
            state: tokio::sync::Mutex::new(ProbeState::default()),
        }
    }

    /// Ready messages in each partition queue, by partition (`None`: the queue does not exist).
    ///
    /// # Errors
    /// The broker is unreachable (the connection is opened again next time).
    pub async fn partitions(&self) -> Result<Vec<Option<u32>>, Error> {
        // Held across the probe on purpose: callers meanwhile wait for its answer instead of
        // probing again.
        let mut state = self.state.lock().await;
        if let Some((at, counts)) = &state.last
            && at.elapsed() < Self::FRESH
        {
            return Ok(counts.clone());
        }
        let connection = match state.connection.take() {
            Some(open) if open.status().connected() => open,
            _ => connect(&self.settings, "probe").await?,
        };
        let names = Topology::new(&self.settings.prefix, self.settings.partitions);
        let queues: Vec<String> = (0..self.settings.partitions)
            .map(|p| names.partition_queue(p))
            .collect();
        let limit = self.settings.connect_timeout();
        let counts = match tokio::time::timeout(limit, ready_counts(&connection, &queues)).await {
            Ok(counts) => counts?,
            Err(_) => return Err(Error::ConnectTimeout),
        };
        state.connection = Some(connection);
        state.last = Some((tokio::time::Instant::now(), counts.clone()));
        Ok(counts)
    }

    /// Closes the probe's connection, if it opened one.
    pub async fn close(&self) {
        if let Some(connection) = self.state.lock().await.connection.take() {
            let _ = connection.close(200, "node stopping".into()).await;
        }
    }
}
