//! Web Push's section (`[webpush]`): the VAPID key, the bounds on outbound requests, and per event
//! name whether and when an event falls back to Web Push.

use super::validate::{at_least_one, invalid};
use super::{Error, Secret};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Web Push (RFC 8030, 8291, 8292): off until a VAPID key is set and some event name falls back.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebPushSettings {
    /// The VAPID private key, a P-256 scalar in unpadded base64url (`herald vapid-key` makes one).
    /// Unset: Web Push is off (subscriptions are refused, nothing falls back).
    pub vapid_private_key: Option<Secret>,
    /// Who push services contact about this sender (RFC 8292 `sub`): `mailto:` or `https:`.
    pub subject: String,
    /// Seconds a push service keeps a message for a browser that is offline, unless the event
    /// name's policy says otherwise (push services cap it, typically at 28 days).
    pub ttl_secs: u64,
    /// Subscriptions kept per user; registering one more removes that user's oldest.
    pub max_subscriptions_per_user: u32,
    /// Bound on one request to a push service, connecting included.
    pub request_timeout_ms: u64,
    /// Requests to push services in flight on this node at once.
    pub max_in_flight: usize,
    /// Of those, in flight to one push service (one origin) at once: one slow or hanging service
    /// leaves the rest for the others.
    pub max_in_flight_per_origin: usize,
    /// How often a worker node looks for pushes that are due.
    pub poll_interval_ms: u64,
    /// How often a socket node records which events its sockets pushed (the receipts a fallback
    /// checks before it sends).
    pub receipt_flush_ms: u64,
    /// Hosts a subscription's endpoint may name: each entry matches the host or any host under
    /// it (`push.apple.com` takes `web.push.apple.com`). Empty: any public host. The default
    /// lists the push services of Chrome, Firefox, Edge and Safari.
    pub endpoint_hosts: Vec<String>,
    /// Development only (needs `node.dev`): endpoints may be `http:` and resolve to loopback or
    /// private addresses, so a push service of one's own on localhost can be used.
    pub allow_private_endpoints: bool,
    /// Per event name, whether it falls back to Web Push and when (settings file only:
    /// `[webpush.events.chat_message]` with `after_ms`). Names not listed never do.
    pub events: BTreeMap<String, EventWebPushSettings>,
}

impl Default for WebPushSettings {
    fn default() -> Self {
        Self {
            vapid_private_key: None,
            subject: String::new(),
            ttl_secs: 24 * 3600,
            max_subscriptions_per_user: 10,
            request_timeout_ms: 10_000,
            max_in_flight: 64,
            max_in_flight_per_origin: 16,
            poll_interval_ms: 500,
            receipt_flush_ms: 500,
            endpoint_hosts: [
                "fcm.googleapis.com",
                "push.services.mozilla.com",
                "notify.windows.com",
                "push.apple.com",
            ]
            .map(String::from)
            .to_vec(),
            allow_private_endpoints: false,
            events: BTreeMap::new(),
        }
    }
}

/// What settles an event before its fallback is due, so that no push is sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FallbackUnless {
    /// A joined client's socket was sent the event (live, gap fill or catch-up).
    #[default]
    Received,
    /// A client acknowledged it (a channel `ack` or the inbox's read mark): stricter, for events
    /// the user must see, at the cost of a push to a user who saw it on a page that does not ack.
    Acked,
}

/// One event name's fallback.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventWebPushSettings {
    /// How long after the event was accepted its push is sent, unless `unless` happened first.
    pub after_ms: u64,
    /// What makes the push unnecessary.
    pub unless: FallbackUnless,
    /// RFC 8030 `Urgency`: `very-low`, `low`, `normal` or `high`.
    pub urgency: String,
    /// This event's TTL at the push service, seconds (default `webpush.ttl_secs`).
    pub ttl_secs: Option<u64>,
}

impl Default for EventWebPushSettings {
    fn default() -> Self {
        Self {
            after_ms: 30_000,
            unless: FallbackUnless::Received,
            urgency: "normal".into(),
            ttl_secs: None,
        }
    }
}

durations! {
    WebPushSettings {
        request_timeout_ms => request_timeout,
        poll_interval_ms => poll_interval,
        receipt_flush_ms => receipt_flush,
    }
}

/// RFC 8030's urgencies.
pub const URGENCIES: [&str; 4] = ["very-low", "low", "normal", "high"];

impl WebPushSettings {
    /// Web Push is on: a VAPID key is set.
    pub fn enabled(&self) -> bool {
        self.vapid_private_key.is_some()
    }

    /// The fallback of `event`, if it has one and Web Push is on.
    pub fn fallback(&self, event: &str) -> Option<&EventWebPushSettings> {
        if self.enabled() {
            self.events.get(event)
        } else {
            None
        }
    }

    pub(super) fn validate(&self, dev: bool) -> Result<(), Error> {
        at_least_one(&[
            (
                "webpush.max_subscriptions_per_user",
                self.max_subscriptions_per_user as usize,
            ),
            (
                "webpush.request_timeout_ms",
                self.request_timeout_ms as usize,
            ),
            ("webpush.max_in_flight", self.max_in_flight),
            (
                "webpush.max_in_flight_per_origin",
                self.max_in_flight_per_origin,
            ),
            ("webpush.poll_interval_ms", self.poll_interval_ms as usize),
            ("webpush.receipt_flush_ms", self.receipt_flush_ms as usize),
        ])?;
        if self.allow_private_endpoints && !dev {
            return invalid(
                "webpush.allow_private_endpoints",
                "lets any subscription make this node send requests into its own network; it is \
                 for a development node only (node.dev / --dev)",
            );
        }
        for (name, policy) in &self.events {
            if !URGENCIES.contains(&policy.urgency.as_str()) {
                return invalid(
                    &format!("webpush.events.{name}.urgency"),
                    "must be very-low, low, normal or high",
                );
            }
        }
        let Some(key) = &self.vapid_private_key else {
            return Ok(());
        };
        if let Err(why) = crate::webpush::VapidKey::from_base64(key.expose()) {
            return invalid(
                "webpush.vapid_private_key",
                &format!("{why} (`herald vapid-key` prints a fresh pair)"),
            );
        }
        let subject = self.subject.as_str();
        let contact = subject
            .strip_prefix("mailto:")
            .or_else(|| subject.strip_prefix("https://"));
        if contact.is_none_or(str::is_empty) {
            return invalid(
                "webpush.subject",
                "must be a mailto: or https: URL push services can reach the sender at (RFC 8292)",
            );
        }
        Ok(())
    }
}
