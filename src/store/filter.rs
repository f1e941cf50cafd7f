//! An operator's event filter (admin API, `herald replay`): the text they write, and the typed
//! filter the store's listings, counts and replay claims take. Reading it needs no database, so a
//! bad filter is refused before anything is queried.

use super::Error;
use super::status::EventStatus;
use crate::event::EventId;
use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use serde::Serialize;

/// Which events an operator means: every field narrows the selection; empty means "any".
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EventFilter {
    /// Any of these statuses (see [`EventStatus::STORED`]).
    pub statuses: Vec<EventStatus>,
    /// The producer's name.
    pub producer: Option<String>,
    /// The user.
    pub user_id: Option<String>,
    /// The event name.
    pub event: Option<String>,
    /// Enqueued at or after, Unix ms.
    pub since_ms: Option<i64>,
    /// Enqueued before, Unix ms.
    pub until_ms: Option<i64>,
    /// Only these events.
    pub ids: Vec<EventId>,
}

/// An operator's filter as written (admin API, `herald replay`): statuses and times still text.
/// [`EventFilter::parse`] makes it an [`EventFilter`], the one way both do.
#[derive(Debug, Default)]
pub struct FilterText {
    /// Status names.
    pub statuses: Vec<String>,
    /// The producer's name.
    pub producer: Option<String>,
    /// The user.
    pub user_id: Option<String>,
    /// The event name.
    pub event: Option<String>,
    /// Enqueued at or after: RFC 3339, a date, `now`, or `30m`, `2h`, `7d` ago; blank: no bound.
    pub since: Option<String>,
    /// Enqueued before: same forms.
    pub until: Option<String>,
    /// Only these events.
    pub ids: Vec<EventId>,
}

impl EventFilter {
    /// The filter `text` means: times read (a blank one, as a form left blank sends, sets no
    /// bound, as an empty status list does), statuses parsed, and texts checked for NUL
    /// (PostgreSQL's text cannot hold one, and would fail the query rather than match nothing).
    ///
    /// # Errors
    /// [`Error::Invalid`], naming the field.
    pub fn parse(text: FilterText) -> Result<Self, Error> {
        let now = Timestamp::now();
        let time = |text: Option<String>, key: &str| match text.as_deref().map(str::trim) {
            None | Some("") => Ok(None),
            Some(time) => parse_time(time, now).map(Some).ok_or_else(|| {
                Error::Invalid(format!(
                    "{key}: {time:?} is not a time (RFC 3339, a date, now, or 30m, 2h, 7d ago)"
                ))
            }),
        };
        let filter = Self {
            since_ms: time(text.since, "since")?,
            until_ms: time(text.until, "until")?,
            statuses: (text.statuses.iter())
                .map(|s| EventStatus::parse_stored(s))
                .collect::<Result<_, _>>()
                .map_err(Error::Invalid)?,
            producer: text.producer,
            user_id: text.user_id,
            event: text.event,
            ids: text.ids,
        };
        let texts = [
            ("producer", &filter.producer),
            ("user_id", &filter.user_id),
            ("event", &filter.event),
        ];
        match texts
            .iter()
            .find(|(_, t)| t.as_ref().is_some_and(|t| t.contains('\0')))
        {
            Some((key, _)) => Err(Error::Invalid(format!("{key}: must not contain NUL"))),
            None => Ok(filter),
        }
    }
}

/// The first instant of year 1: nothing was enqueued before it, and PostgreSQL's timestamps end in
/// 4714 BC where jiff's go on to year -9999, so an earlier bound is moved here (it selects the
/// same events) rather than failing the query.
const EARLIEST: Timestamp = Timestamp::constant(-62_135_596_800, 0);

/// `text` (trimmed) in Unix ms, when it is one of the forms the admin API and `herald replay`
/// document: an RFC 3339 timestamp (`2026-11-30T12:00:00Z`, or with an offset, or a space for the
/// `T`), a date (its midnight UTC), `now`, or `<n>s|m|h|d`, that long before `now`. A time without
/// an offset is refused: the zone it would be read in is a guess.
fn parse_time(text: &str, now: Timestamp) -> Option<i64> {
    let (at, unit) = text.char_indices().last()?;
    let (count, unit) = match unit {
        's' => (&text[..at], 1),
        'm' => (&text[..at], 60),
        'h' => (&text[..at], 3_600),
        'd' => (&text[..at], 86_400),
        _ => ("", 0),
    };
    let time = if text.eq_ignore_ascii_case("now") {
        now
    } else if !count.is_empty() && count.bytes().all(|b| b.is_ascii_digit()) {
        let ago = count.parse::<i64>().ok()?.checked_mul(unit)?;
        now.checked_sub(SignedDuration::from_secs(ago)).ok()?
    } else if let Ok(time) = text.parse::<Timestamp>() {
        time
    } else {
        let date = Date::strptime("%Y-%m-%d", text).ok()?;
        date.to_zoned_datetime(TimeZone::UTC).ok()?.timestamp()
    };
    Some(time.max(EARLIEST).as_millisecond())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Timestamp = Timestamp::constant(1_796_040_000, 0); // 2026-11-30T12:00:00Z
    const NOW_MS: i64 = 1_796_040_000_000;

    #[test]
    fn documented_forms_read_as_unix_ms() {
        for (text, ms) in [
            ("2026-11-30T12:00:00Z", NOW_MS),
            ("2026-11-30T12:00:00.250Z", NOW_MS + 250),
            ("2026-11-30t12:00:00z", NOW_MS),
            ("2026-11-30 12:00:00Z", NOW_MS),
            ("2026-11-30T14:00:00+02:00", NOW_MS),
            ("2026-11-30", NOW_MS - 12 * 3_600_000),
            ("now", NOW_MS),
            ("NOW", NOW_MS),
            ("30s", NOW_MS - 30_000),
            ("30m", NOW_MS - 1_800_000),
            ("2h", NOW_MS - 7_200_000),
            ("7d", NOW_MS - 7 * 86_400_000),
            ("0d", NOW_MS),
            ("-005000-01-01T00:00:00Z", EARLIEST.as_millisecond()),
            ("3000000d", EARLIEST.as_millisecond()),
        ] {
            assert_eq!(parse_time(text, NOW), Some(ms), "{text}");
        }
    }

    #[test]
    fn other_text_is_no_time() {
        for text in [
            "someday",
            "Infinity",
            "-infinity",
            "epoch",
            "yesterday",
            "2026-11-30T12:00:00",
            "2026-11-30 12:00",
            "2026-13-01",
            "2026-11-30x",
            "-5m",
            "+5m",
            "5 m",
            "5w",
            "1.5h",
            "5é",
            "m",
            "99999999999999999999d",
            "9223372036854775807d",
            "",
        ] {
            assert_eq!(parse_time(text, NOW), None, "{text}");
        }
    }

    #[test]
    fn an_invalid_field_is_named() {
        let error = |text: FilterText| EventFilter::parse(text).unwrap_err().to_string();
        let since = error(FilterText {
            since: Some("someday".into()),
            ..FilterText::default()
        });
        assert!(
            since.starts_with("since: \"someday\" is not a time"),
            "{since}"
        );
        let until = error(FilterText {
            until: Some(" Infinity ".into()),
            ..FilterText::default()
        });
        assert!(
            until.starts_with("until: \"Infinity\" is not a time"),
            "{until}"
        );
        let status = error(FilterText {
            statuses: vec!["lost".into()],
            ..FilterText::default()
        });
        assert!(status.starts_with("status: "), "{status}");
        let nul = error(FilterText {
            user_id: Some("a\0b".into()),
            ..FilterText::default()
        });
        assert_eq!(nul, "user_id: must not contain NUL");
    }

    #[test]
    fn blank_times_set_no_bound() {
        let filter = EventFilter::parse(FilterText {
            since: Some(" ".into()),
            until: Some(String::new()),
            statuses: vec!["failed".into()],
            ..FilterText::default()
        })
        .unwrap();
        assert_eq!((filter.since_ms, filter.until_ms), (None, None));
        assert_eq!(filter.statuses, vec![EventStatus::Failed]);
    }
}
