//! `herald check`'s view of the broker: each listed node on its own, and whether the user may do
//! on the vhost what a node does under its prefix (declare, publish, bind, consume, delete).

use super::{Error, connect_url, open_channel};
use crate::config::QueueSettings;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ExchangeKind};

/// Connects to the one node at `url` (an entry of `queue.amqp_url`), with the connect timeout.
///
/// # Errors
/// The node is unreachable, refuses the credentials or the vhost, or the timeout.
pub async fn connect_node(url: &str, settings: &QueueSettings) -> Result<Connection, Error> {
    connect_url(url, settings, "check").await
}

/// What the broker refused while trying the node's operations on a scratch exchange and queue
/// named under the prefix (RabbitMQ's permissions are patterns on names).
#[derive(Debug, thiserror::Error)]
#[error("{step} ({permission} permission on {name}): {source}")]
pub struct PermissionError {
    /// What was tried.
    pub step: &'static str,
    /// The permission it needs: configure, write or read.
    pub permission: &'static str,
    /// The resource's name.
    pub name: String,
    /// The broker's answer.
    #[source]
    pub source: lapin::Error,
}

/// Declares an exchange and a queue named `<prefix>.check.<unique>`, binds them, publishes one
/// message through them with a confirm, gets it back, and deletes both: every kind of permission a
/// node needs under its prefix. The queue is exclusive, so nothing is left behind if this dies.
///
/// # Errors
/// The first operation the broker refused, with the permission it needs.
pub async fn check_permissions(
    connection: &Connection,
    prefix: &str,
) -> Result<(), PermissionError> {
    let name = format!("{prefix}.check.{}", uuid::Uuid::now_v7().simple());
    let refused = |step, permission| {
        let name = name.clone();
        move |source| PermissionError {
            step,
            permission,
            name,
            source,
        }
    };
    let channel = connection
        .create_channel()
        .await
        .map_err(refused("open a channel", "any"))?;
    let exchange_options = ExchangeDeclareOptions {
        auto_delete: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            name.as_str().into(),
            ExchangeKind::Fanout,
            exchange_options,
            FieldTable::default(),
        )
        .await
        .map_err(refused("declare an exchange", "configure"))?;
    let queue_options = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    let outcome = async {
        channel
            .queue_declare(name.as_str().into(), queue_options, FieldTable::default())
            .await
            .map_err(refused("declare a queue", "configure"))?;
        channel
            .queue_bind(
                name.as_str().into(),
                name.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(refused(
                "bind a queue to an exchange",
                "write (queue) and read (exchange)",
            ))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(refused("enable publisher confirms", "any"))?;
        channel
            .basic_publish(
                name.as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                b"herald check",
                BasicProperties::default(),
            )
            .await
            .map_err(refused("publish", "write"))?
            .await
            .map_err(refused("publish", "write"))?;
        channel
            .basic_get(name.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .map_err(refused("get a message", "read"))?;
        channel
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await
            .map_err(refused("delete a queue", "configure"))?;
        Ok(())
    }
    .await;
    // A refused operation closed the channel: the scratch exchange goes on a new one.
    let cleanup = match outcome.is_ok() {
        true => Ok(channel),
        false => open_channel(connection).await,
    };
    if let Ok(channel) = cleanup {
        let deleted = channel
            .exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default())
            .await;
        let _ = channel.close(200, "check done".into()).await;
        outcome?;
        deleted.map_err(refused("delete an exchange", "configure"))?;
        return Ok(());
    }
    outcome
}
