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
}
