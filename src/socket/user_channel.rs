//! The user channel's reads and writes of PostgreSQL, apart from the protocol loop: what a join
//! answers (`last_seq`, `missed`) and whether it catches up, and the client's acks. The connection
//! (`connection`) owns the socket and calls these; nothing here sends a frame.

use super::SocketState;
use super::protocol::{Frame, reason};
use crate::event::UserId;
use crate::store::ReadMark;
use serde_json::value::RawValue;
use std::time::Duration;
use tokio::time::timeout;

/// How long one page of a gap fill or catch-up may take to read: the connection waits for it, and
/// a stalled read must end (the channel is closed with `phx_error` and the client rejoins) well
/// before the client's 30 s heartbeat would give the whole connection up.
pub(super) const GAP_PAGE_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads what a user channel join needs to say and do: the user's current last seq, and whether
/// retention removed any event after the requested `last_seq` (the user's retention watermark,
/// raised by the statement that prunes, is past it). `None` (logged) when PostgreSQL cannot be
/// read in time: the join is refused and the client retries.
pub(super) async fn catch_up_plan(
    state: &SocketState,
    user: &UserId,
    params: &RawValue,
) -> Option<CatchUp> {
    let requested = serde_json::from_str::<UserJoinParams>(params.get())
        .ok()
        .and_then(|p| p.last_seq)
        .filter(|seq| *seq >= 0);
    let read = timeout(GAP_PAGE_TIMEOUT, state.store.user_seq_bounds(user.as_str())).await;
    let (pruned_through, last) = match read {
        Ok(Ok(bounds)) => bounds,
        Ok(Err(error)) => {
            tracing::warn!(error = ?error, "join refused: cannot read the user's seqs");
            return None;
        }
        Err(_) => {
            tracing::warn!("join refused: reading the user's seqs timed out");
            return None;
        }
    };
    Some(CatchUp {
        from: requested,
        last_seq: last.unwrap_or(0),
        // Retention removed events the client has not seen.
        missed: matches!((requested, pruned_through), (Some(r), Some(p)) if p > r),
    })
}

/// `ack {"ids": [...]}`: the client showed these events. Answers `{"acked": n}` (newly recorded).
pub(super) async fn record_acks(
    state: &SocketState,
    user: &UserId,
    frame: &Frame,
) -> (&'static str, String) {
    let ids = match serde_json::from_str::<AckParams>(frame.payload.get()) {
        Ok(params) if params.ids.len() <= MAX_ACK_IDS => params.ids,
        _ => {
            return (
                "error",
                reason("ack takes {\"ids\": [event ids]}, at most 1000"),
            );
        }
    };
    match state
        .store
        .record_acks(user.as_str(), ReadMark::Ids(&ids))
        .await
    {
        Ok(acked) => {
            state.metrics.client_acked(acked);
            ("ok", format!(r#"{{"acked":{acked}}}"#))
        }
        Err(error) => {
            tracing::warn!(error = ?error, "cannot record client acks");
            ("error", reason("acks could not be recorded; retry"))
        }
    }
}

/// The user channel event by which a client acknowledges events it has shown.
pub(super) const ACK_EVENT: &str = "ack";
/// Most ids in one ack.
const MAX_ACK_IDS: usize = 1_000;

/// Payload of an ack.
#[derive(serde::Deserialize)]
struct AckParams {
    ids: Vec<uuid::Uuid>,
}

/// Join params of a user channel; other params are the client's business and ignored.
#[derive(serde::Deserialize)]
struct UserJoinParams {
    last_seq: Option<i64>,
}

/// What a user channel join answers and whether it catches up.
#[derive(Default)]
pub(super) struct CatchUp {
    /// Catch up after this seq (the client's `last_seq`).
    pub(super) from: Option<i64>,
    /// The user's latest seq now.
    pub(super) last_seq: i64,
    /// Events after `from` were already removed by retention: the client missed them.
    pub(super) missed: bool,
}

impl CatchUp {
    pub(super) fn response(&self) -> String {
        format!(
            r#"{{"last_seq":{},"missed":{}}}"#,
            self.last_seq, self.missed
        )
    }
}
