//! The states the store records as text: an event's status and a replay job's. Each is an enum with
//! one spelling, shared by serde (API answers, recorded filters) and SQL (binds and reads), so a
//! typo is a compile error rather than a filter that matches nothing.

use serde::{Deserialize, Serialize};
use sqlx::Postgres;
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgHasArrayType, PgTypeInfo, PgValueRef};

/// An enum stored as one of a fixed set of lowercase words: `as_str`, `FromStr` and the sqlx
/// mapping to `text` all come from the one list of spellings.
macro_rules! text_enum {
    ($name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $name {
            /// Its spelling, in SQL and JSON alike.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;

            fn from_str(text: &str) -> Result<Self, String> {
                match text {
                    $($text => Ok(Self::$variant),)+
                    other => Err(format!(
                        concat!("unknown ", stringify!($name), " {:?}"),
                        other
                    )),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl sqlx::Type<Postgres> for $name {
            fn type_info() -> PgTypeInfo {
                <&str as sqlx::Type<Postgres>>::type_info()
            }

            fn compatible(ty: &PgTypeInfo) -> bool {
                <&str as sqlx::Type<Postgres>>::compatible(ty)
            }
        }

        impl PgHasArrayType for $name {
            fn array_type_info() -> PgTypeInfo {
                <&str as PgHasArrayType>::array_type_info()
            }
        }

        impl sqlx::Encode<'_, Postgres> for $name {
            fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
                <&str as sqlx::Encode<Postgres>>::encode(self.as_str(), buf)
            }
        }

        impl<'r> sqlx::Decode<'r, Postgres> for $name {
            fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
                let text = <&str as sqlx::Decode<Postgres>>::decode(value)?;
                Ok(text.parse()?)
            }
        }
    };
}

/// How far an event's delivery got (the `events.status` column), or `pruned` for an idempotent
/// retry whose original event retention removed.
///
/// Statements bind it, except where a literal reads better or plans better: the transition table
/// of `record_attempts` (a `CASE` over attempt kinds), and the scans of retention and the sweeper,
/// where PostgreSQL estimates the rows a literal matches from the column's statistics (`delivered`
/// is most of them, `accepted` and `published` few), which a parameter hides once the plan is
/// generic. A test holds those literals and the column's `CHECK` to [`Self::STORED`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EventStatus {
    /// Committed to PostgreSQL, not yet taken by a worker.
    Accepted,
    /// A worker took it from the broker; not delivered yet.
    Published,
    /// Pushed to the user's topic.
    Delivered,
    /// Out of attempts (dead-lettered).
    Failed,
    /// Removed by retention: only an idempotency key's answer says this; no row holds it.
    Pruned,
}

text_enum!(EventStatus {
    Accepted => "accepted",
    Published => "published",
    Delivered => "delivered",
    Failed => "failed",
    Pruned => "pruned",
});

impl EventStatus {
    /// The statuses an event row can have, in lifecycle order.
    pub const STORED: [Self; 4] = [
        Self::Accepted,
        Self::Published,
        Self::Delivered,
        Self::Failed,
    ];

    /// A status an operator filters on (one a row can have).
    ///
    /// # Errors
    /// Not one of [`Self::STORED`], named with the field.
    pub fn parse_stored(text: &str) -> Result<Self, String> {
        Self::STORED
            .into_iter()
            .find(|s| s.as_str() == text)
            .ok_or_else(|| {
                let names: Vec<_> = Self::STORED.iter().map(|s| s.as_str()).collect();
                format!(
                    "status: unknown status {text:?} (one of {})",
                    names.join(", ")
                )
            })
    }
}

/// Where a replay job is (the `replay_jobs.status` column).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReplayJobStatus {
    /// Replaying, on the node that started it.
    Running,
    /// Every matched event was replayed.
    Done,
    /// Stopped by an error (see the job's `error`).
    Failed,
    /// Its node stopped, or stopped reporting: replay is safe to repeat, so start it again.
    Interrupted,
}

text_enum!(ReplayJobStatus {
    Running => "running",
    Done => "done",
    Failed => "failed",
    Interrupted => "interrupted",
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_round_trip_through_text_and_json() {
        for status in EventStatus::STORED.into_iter().chain([EventStatus::Pruned]) {
            assert_eq!(status.as_str().parse(), Ok(status));
            assert_eq!(
                serde_json::to_string(&status).unwrap(),
                format!("\"{status}\"")
            );
        }
        assert!(EventStatus::parse_stored("pruned").is_err());
        assert_eq!(
            EventStatus::parse_stored("lost").unwrap_err(),
            "status: unknown status \"lost\" (one of accepted, published, delivered, failed)"
        );
        assert_eq!("interrupted".parse(), Ok(ReplayJobStatus::Interrupted));
    }

    /// Every `'word'` of lowercase letters in `text` (a lifetime such as `'q` is no word).
    fn quoted_words(text: &str) -> Vec<&str> {
        let mut words = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find('\'') {
            rest = &rest[at + 1..];
            let len = rest.find(|c: char| !c.is_ascii_lowercase()).unwrap_or(0);
            if len > 0 && rest[len..].starts_with('\'') {
                words.push(&rest[..len]);
                rest = &rest[len + 1..];
            }
        }
        words
    }

    #[test]
    fn sql_spells_statuses_as_stored_and_checked() {
        let stored: Vec<_> = EventStatus::STORED.iter().map(|s| s.as_str()).collect();
        // The other words the statements quote: attempt kinds and outcomes.
        let others = ["retrying", "pushed", "offline"];
        for source in [
            include_str!("delivery.rs"),
            include_str!("events.rs"),
            include_str!("outbox.rs"),
            include_str!("sweep.rs"),
        ] {
            for word in quoted_words(source) {
                assert!(
                    stored.contains(&word) || others.contains(&word),
                    "'{word}' in the store's SQL is no EventStatus::STORED spelling"
                );
            }
        }
        let schema = include_str!("../../migrations/20261125000001_initial.sql");
        let check = schema.split("CHECK (status IN (").nth(1).unwrap();
        assert_eq!(quoted_words(&check[..check.find(')').unwrap()]), stored);
    }
}
