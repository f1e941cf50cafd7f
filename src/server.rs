//! The HTTP listener: accepts connections and serves the router on each with hyper, so that hyper's
//! own header-read timeout applies (`axum::serve` sets no timer, so a client sending its headers a
//! byte at a time held a connection forever).
//!
//! hyper starts that timer whenever it waits for a request's head: on a new connection and between
//! the requests of a kept-alive one. So `http.header_read_timeout_ms` is also the idle timeout of
//! every HTTP connection. Bodies and whole requests are bounded by the router's layers (see
//! [`crate::api::routes`] and `app`); upgraded WebSockets leave hyper and have their own idle timeout.
//!
//! Shutdown is axum's, with a bound: on `shutdown` the listener closes, every connection is told to
//! finish its request in flight and close, and the drain waits for them until a deadline fixed
//! when the signal came (`node.shutdown_timeout_ms` from then), which the rest of the node's drain
//! shares.

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long to pause after a failed accept (too many open files, say) before the next one: the
/// failure is about the process, not the client, and retrying at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `router` on `listener` until `shutdown` is cancelled, then drains the connections until
/// `drain_timeout` after the signal. Returns that deadline, for the rest of the node's drain.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    header_read_timeout: Duration,
    drain_timeout: Duration,
    shutdown: CancellationToken,
) -> Instant {
    // hyper's HTTP/1 builder itself: hyper-util's auto builder first waits, untimed, for bytes to
    // tell HTTP/1 from HTTP/2, so a connection that sends nothing would never be cut.
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    // Told to finish their request in flight and close when the node drains; cut at the deadline.
    let (draining, cut) = (CancellationToken::new(), CancellationToken::new());
    let connections = TaskTracker::new();
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _peer)) => tcp,
                Err(error) => {
                    tracing::warn!(error = %error, "cannot accept a connection");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        // Small frames go out at once: with Nagle on, a second small write (a reply, then
        // phx_close; one push after another) waits ~40 ms for the client's delayed ACK.
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(error = %error, "cannot set TCP_NODELAY");
        }
        let service = TowerToHyperService::new(router.clone());
        let builder = builder.clone();
        let (draining, cut) = (draining.clone(), cut.clone());
        connections.spawn(async move {
            let connection = builder
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades();
            let mut connection = std::pin::pin!(connection);
            let served = async {
                tokio::select! {
                    result = connection.as_mut() => result,
                    () = draining.cancelled() => {
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
                }
            };
            // Cut: the connection is dropped, closing it without an answer.
            let Some(result) = cut.run_until_cancelled(served).await else {
                return;
            };
            if let Err(error) = result {
                // Timeouts and clients that went away: theirs, not ours.
                tracing::debug!(error = %error, "HTTP connection ended with an error");
            }
        });
    }
    let deadline = Instant::now() + drain_timeout;
    drop(listener);
    draining.cancel();
    connections.close();
    if tokio::time::timeout_at(deadline, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = connections.len(),
            "shutdown timeout reached with HTTP requests in flight; they are cut"
        );
        cut.cancel();
    }
    deadline
}
