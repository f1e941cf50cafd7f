//! The socket baseline: a bare tokio-tungstenite echo server with Herald's per-connection buffer
//! settings, in its own process so its resident memory can be read alone.

use futures_util::{SinkExt, StreamExt};
use herald::config::SocketSettings;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// The same limits `socket::routes` gives axum's upgrade, from Herald's default settings.
fn config() -> WebSocketConfig {
    let s = SocketSettings::default();
    WebSocketConfig::default()
        .read_buffer_size(s.read_buffer_bytes)
        .write_buffer_size(s.write_buffer_bytes)
        .max_write_buffer_size(s.write_buffer_bytes + 2 * s.max_frame_bytes + 1024 * 1024)
        .max_message_size(Some(s.max_frame_bytes))
        .max_frame_size(Some(s.max_frame_bytes))
}

/// Serves until killed; prints the port it listens on as its first line.
pub async fn run() -> anyhow::Result<()> {
    crate::sys::raise_nofile_limit();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?.port());
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(_) => {
                // Out of descriptors or similar: back off instead of spinning.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let Ok(mut ws) =
                tokio_tungstenite::accept_async_with_config(stream, Some(config())).await
            else {
                return;
            };
            while let Some(Ok(message)) = ws.next().await {
                let echo = match message {
                    Message::Close(_) => return,
                    Message::Text(_) | Message::Binary(_) => message,
                    _ => continue,
                };
                if ws.send(echo).await.is_err() {
                    return;
                }
            }
        });
    }
}
