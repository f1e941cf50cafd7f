//! The test fault injector: fails chosen events' delivery attempts, selected by the `faults`
//! setting, which is empty (off) by default. It exists so the retry schedule, the dead-letter path,
//! replay and poison-event isolation can be proven against the real broker and database, including
//! from the real `herald` binary in chaos tests. A node with rules warns loudly at start.

use crate::config::FaultSettings;
use crate::event::{Envelope, EventId};
use std::collections::HashMap;
use std::sync::Mutex;

/// How an injected fault shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultMode {
    /// The attempt returns an error.
    Error,
    /// The attempt panics (the worker must survive it and record a failure).
    Panic,
    /// The attempt never finishes (the attempt timeout must fail it).
    Hang,
    /// The attempt succeeds, [`SLOW_MS`] late: a slow user, whose lane must hold up no one else.
    Slow,
}

/// How late a `slow` rule makes an attempt.
pub const SLOW_MS: u64 = 200;

/// One rule: events named `event` fail, each only for its first `attempts` attempts if given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultRule {
    /// Event name.
    pub event: String,
    /// Failing attempts per event on this node; `None`: every attempt.
    pub attempts: Option<u32>,
    /// How it fails.
    pub mode: FaultMode,
}

impl FaultRule {
    /// Parses `event[:attempts][:mode]`.
    ///
    /// # Errors
    /// A message naming what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = text.split(':');
        let event = parts.next().unwrap_or_default().trim();
        if event.is_empty() {
            return Err(format!("fault rule {text:?}: no event name"));
        }
        let mut rule = Self {
            event: event.to_owned(),
            attempts: None,
            mode: FaultMode::Error,
        };
        for part in parts {
            match part.trim() {
                "error" => rule.mode = FaultMode::Error,
                "panic" => rule.mode = FaultMode::Panic,
                "hang" => rule.mode = FaultMode::Hang,
                "slow" => rule.mode = FaultMode::Slow,
                n => {
                    rule.attempts = Some(n.parse().map_err(|_| {
                        format!(
                            "fault rule {text:?}: {n:?} is neither a count nor error|panic|hang|slow"
                        )
                    })?);
                }
            }
        }
        Ok(rule)
    }
}

/// Most events whose failed attempts are counted; past it the counts start over (test-only code,
/// bounded all the same).
const MAX_COUNTED: usize = 100_000;

/// The injector a worker consults before each attempt.
#[derive(Debug, Default)]
pub struct Faults {
    rules: Vec<FaultRule>,
    // A std Mutex: held only to bump a counter, never across an await.
    counted: Mutex<HashMap<EventId, u32>>,
}

impl Faults {
    /// The injector for `settings`.
    ///
    /// # Errors
    /// A rule that does not parse.
    pub fn new(settings: &FaultSettings) -> Result<Self, String> {
        let rules = settings
            .fail_events
            .iter()
            .map(|r| FaultRule::parse(r))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            rules,
            counted: Mutex::new(HashMap::new()),
        })
    }

    /// True when no rule is set (production).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// True when a rule names `envelope`'s event (whether or not its next attempt fails).
    pub fn names(&self, envelope: &Envelope) -> bool {
        self.rule_for(envelope).is_some()
    }

    fn rule_for(&self, envelope: &Envelope) -> Option<&FaultRule> {
        self.rules
            .iter()
            .find(|r| r.event == envelope.event.as_str())
    }

    /// Fails this attempt of `envelope` if a rule says so: returns the error, panics, never
    /// returns, or returns late, per the rule's mode.
    ///
    /// # Errors
    /// The injected error.
    ///
    /// # Panics
    /// When the matching rule's mode is `panic`: that is the fault.
    pub async fn inject(&self, envelope: &Envelope) -> Result<(), String> {
        let Some(rule) = self.rule_for(envelope) else {
            return Ok(());
        };
        if let Some(limit) = rule.attempts {
            let mut counted = self.counted.lock().unwrap_or_else(|e| e.into_inner());
            if counted.len() >= MAX_COUNTED {
                counted.clear();
            }
            let seen = counted.entry(envelope.id).or_default();
            *seen += 1;
            if *seen > limit {
                return Ok(());
            }
        }
        match rule.mode {
            FaultMode::Error => Err(format!("injected fault for {}", rule.event)),
            FaultMode::Panic => panic!("injected panic for {}", rule.event),
            FaultMode::Hang => std::future::pending().await,
            FaultMode::Slow => {
                tokio::time::sleep(std::time::Duration::from_millis(SLOW_MS)).await;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventName, UserId};
    use serde_json::value::RawValue;

    fn envelope(name: &str) -> Envelope {
        Envelope {
            id: EventId::mint(),
            user_id: UserId::parse("1").unwrap(),
            seq: 1,
            event: EventName::parse(name).unwrap(),
            at: 0,
            data: RawValue::from_string("{}".into()).unwrap(),
            trace: None,
        }
    }

    #[test]
    fn rules_parse() {
        assert_eq!(
            FaultRule::parse("flaky:2:panic").unwrap(),
            FaultRule {
                event: "flaky".into(),
                attempts: Some(2),
                mode: FaultMode::Panic
            }
        );
        assert_eq!(FaultRule::parse("p").unwrap().mode, FaultMode::Error);
        assert!(FaultRule::parse(":2").is_err());
        assert!(FaultRule::parse("x:often").is_err());
    }

    #[tokio::test]
    async fn counts_attempts_per_event_and_spares_other_names() {
        let faults = Faults::new(&FaultSettings {
            fail_events: vec!["flaky:2".into()],
        })
        .unwrap();
        let (flaky, other) = (envelope("flaky"), envelope("push"));
        assert!(faults.inject(&flaky).await.is_err());
        assert!(faults.inject(&flaky).await.is_err());
        assert!(faults.inject(&flaky).await.is_ok());
        assert!(
            faults.inject(&envelope("flaky")).await.is_err(),
            "per event"
        );
        assert!(faults.inject(&other).await.is_ok());
    }
}
