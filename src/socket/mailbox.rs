//! A connection's inbox for broadcasts, made before the WebSocket upgrade completes, so a user's
//! connection is subscribed to its socket id before the client can see its socket open.

use super::SocketState;
use super::connection::Endpoint;
use crate::event::Topic;
use crate::pubsub::{Message as PubSubMessage, PubSub, Subscriber, SubscriptionId};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A connection's inbox for broadcasts, made before the upgrade completes: the connection is
/// subscribed to its user's socket id by then, so a server-side disconnect sent as soon as the
/// client sees its socket open cannot miss it. Dropped unused (the upgrade failed), it unsubscribes.
pub struct Mailbox {
    pub(super) queue: mpsc::Sender<Arc<PubSubMessage>>,
    pub(super) broadcasts: mpsc::Receiver<Arc<PubSubMessage>>,
    pub(super) overflowed: CancellationToken,
    pub(super) socket_id: Option<SocketIdSubscription>,
}

/// The subscription to a user's socket id (`users_socket:<id>`), undone when dropped.
pub(super) struct SocketIdSubscription {
    pubsub: PubSub,
    topic: Topic,
    id: SubscriptionId,
}

impl Drop for SocketIdSubscription {
    fn drop(&mut self) {
        self.pubsub.unsubscribe(&self.topic, self.id);
    }
}

impl Mailbox {
    /// The inbox of a connection on `endpoint`; a user's is subscribed to its socket id, where a
    /// "disconnect" broadcast closes every connection of the user.
    pub async fn open(state: &SocketState, endpoint: &Endpoint) -> Self {
        let (queue, broadcasts) = mpsc::channel(state.settings.outbound_buffer);
        let overflowed = CancellationToken::new();
        let socket_id = match endpoint {
            Endpoint::User(user) => {
                let subscriber = Subscriber {
                    queue: queue.clone(),
                    overflowed: overflowed.clone(),
                };
                let topic = user.socket_id();
                match state.pubsub.subscribe(&topic, subscriber).await {
                    Ok(id) => Some(SocketIdSubscription {
                        pubsub: state.pubsub.clone(),
                        topic,
                        id,
                    }),
                    Err(error) => {
                        // The connection still works; only a server-side disconnect would miss it.
                        tracing::warn!(error = %error, "cannot subscribe to the socket id");
                        None
                    }
                }
            }
            Endpoint::Stats => None,
        };
        Self {
            queue,
            broadcasts,
            overflowed,
            socket_id,
        }
    }
}
