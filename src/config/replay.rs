//! Operator replay's section (`[replay]`): its default rate, page size and concurrent jobs.

use super::Error;
use super::validate::invalid;
use serde::{Deserialize, Serialize};

/// Operator replay.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplaySettings {
    /// Events per second a replay publishes unless told otherwise (`--rate`, `"rate"`).
    pub default_rate: u32,
    /// Events claimed per step (one UPDATE each).
    pub page: i64,
    /// Replay jobs one node runs at once through the admin API; more are refused (429).
    pub max_jobs: usize,
}

impl Default for ReplaySettings {
    fn default() -> Self {
        Self {
            default_rate: 1_000,
            page: 500,
            max_jobs: 2,
        }
    }
}

impl ReplaySettings {
    pub(super) fn validate(&self) -> Result<(), Error> {
        if self.page <= 0 || self.default_rate == 0 || self.max_jobs == 0 {
            return invalid(
                "replay",
                "page, default_rate and max_jobs must be at least 1",
            );
        }
        Ok(())
    }
}
