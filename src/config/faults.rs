//! Fault injection's section (`[faults]`), for tests only.

use serde::{Deserialize, Serialize};

/// Test-only fault injection, off by default: makes chosen events' delivery attempts fail, so tests
/// (and a curious operator on a test node) can watch retries, dead letters and replay. A node with
/// rules logs a warning at start. Never set it in production.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultSettings {
    /// Rules `event[:attempts][:mode]` (`HERALD_FAULTS__FAIL_EVENTS=poison,flaky:2,slow:hang`):
    /// attempts of events with that name fail; with `attempts`, only each event's first that many
    /// attempts on this node fail. `mode` is `error` (default), `panic` (the attempt panics) or
    /// `hang` (it never finishes, so the attempt timeout fails it).
    pub fail_events: Vec<String>,
}
