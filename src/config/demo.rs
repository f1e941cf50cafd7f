//! The demo page's section (`[demo]`), off by default.

use serde::{Deserialize, Serialize};

/// The demo page (`/demo`): a person picks a user, watches pushes arrive and sends test events.
/// Development only: it mints tokens for any user and enqueues without an API key.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DemoSettings {
    /// Serve the page and its dev-only endpoints. Never in production.
    pub enabled: bool,
    /// Folder with the page and its npm install (`npm ci` there brings the phoenix client).
    pub assets_dir: String,
}

impl Default for DemoSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            assets_dir: "demo".into(),
        }
    }
}
