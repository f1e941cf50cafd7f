//! The analysis: a pure function of the recorded history and the final snapshot, so every rule is
//! unit-tested below on hand-made histories, each with one violation planted.
//!
//! Herald's promise, as checked here: an event answered 2xx reaches each of its user's joined
//! channel instances in seq order, with no hole and no duplicate (or the instance is closed with
//! `phx_error` before the hole, so the client rejoins), or it is visibly failed and replayable; and
//! nothing stays stuck in PostgreSQL, the outbox or the queues.

use super::history::{End, History, Instance, PushTiming, Snapshot, StoredEvent};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use uuid::Uuid;

/// What went wrong. Each is a broken promise (or a broken protocol rule), never a mere slowness.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Joined without `last_seq`: a seq after the reply's `last_seq` was skipped (never pushed
    /// before a later one).
    HoleAfterJoin,
    /// Joined with `last_seq`: a seq after it was skipped that retention did not prune, or that
    /// the reply did not report (`missed: false`).
    HoleAfterCatchUp,
    /// A push at or below the instance's baseline: the reply's `last_seq` (joined with `{}`) or
    /// the asked `last_seq`.
    PushAtOrBelowBaseline,
    /// The same seq pushed twice to one instance.
    DuplicatePush,
    /// A seq pushed after a higher one (a repeat is a duplicate; this one was never pushed before).
    OutOfOrder,
    /// A push whose topic, id or seq is not its user's stored (or answered) event of that seq.
    PushMismatch,
    /// An ok join reply without a numeric `last_seq`.
    BadReply,
    /// A push for a join ref before that join's reply.
    PushBeforeReply,
    /// A push for an instance that had already ended (closed, errored, refused).
    PushAfterEnd,
    /// A push carrying a join ref its connection never sent.
    StrayPush,
    /// Still joined at the end, but the user's last delivered event never reached it.
    TailMissing,
    /// One idempotency key answered with two different events.
    KeyTwoIds,
    /// A producer never got a 2xx for a key, retrying to the end of the run.
    KeyNeverAnswered,
    /// A producer's valid request answered neither 2xx nor "retry later" (503 or 429), or an
    /// operator's replay request answered a 5xx other than 503: a 500, say, under a fault the
    /// deployment should have reported as unavailable.
    Unretryable,
    /// An event answered 2xx is not in PostgreSQL, and retention did not prune it.
    AcceptedMissing,
    /// An event answered 2xx is stored under another user or seq than answered.
    AcceptedMismatch,
    /// An event still `accepted` or `published` after the quiet period.
    Unsettled,
    /// A `failed` event without `failed_at` (which a replay of failed events matches).
    FailedWithoutFailedAt,
    /// A poison event (never deliverable) gone from the store: retention prunes only delivered
    /// events.
    PrunedUndeliverable,
    /// A stored event no producer was answered for.
    StoredUnanswered,
    /// Outbox rows left after the quiet period.
    OutboxNotEmpty,
    /// Messages left in a partition or delay queue after the quiet period.
    QueueNotEmpty,
    /// The quiet period's deadline passed with events unsettled or the outbox or queues non-empty.
    Stuck,
}

/// One violation: its kind, where, and what was seen.
#[derive(Clone, Debug)]
pub struct Violation {
    pub kind: Kind,
    /// Index into `History::instances`, for violations of a channel instance.
    pub instance: Option<usize>,
    /// Index into `History::keys`, for violations of a producer's key.
    pub key: Option<usize>,
    pub user: Option<String>,
    pub seq: Option<i64>,
    pub detail: String,
}

/// Lookups over the snapshot and the producers' answers.
struct Index<'a> {
    by_id: HashMap<Uuid, &'a StoredEvent>,
    by_user_seq: HashMap<(&'a str, i64), &'a StoredEvent>,
    answered_by_user_seq: HashMap<(&'a str, i64), Uuid>,
    answered_ids: HashSet<Uuid>,
    max_delivered: HashMap<&'a str, i64>,
    watermarks: &'a HashMap<String, i64>,
}

impl<'a> Index<'a> {
    fn new(history: &'a History, snapshot: &'a Snapshot) -> Self {
        let mut ix = Index {
            by_id: HashMap::new(),
            by_user_seq: HashMap::new(),
            answered_by_user_seq: HashMap::new(),
            answered_ids: HashSet::new(),
            max_delivered: HashMap::new(),
            watermarks: &snapshot.watermarks,
        };
        for e in &snapshot.events {
            ix.by_id.insert(e.id, e);
            ix.by_user_seq.insert((e.user.as_str(), e.seq), e);
            if e.status == "delivered" {
                let max = ix.max_delivered.entry(e.user.as_str()).or_insert(0);
                *max = (*max).max(e.seq);
            }
        }
        for k in &history.keys {
            for a in &k.answers {
                ix.answered_ids.insert(a.id);
                ix.answered_by_user_seq
                    .entry((k.user.as_str(), a.seq))
                    .or_insert(a.id);
            }
        }
        ix
    }

    fn watermark(&self, user: &str) -> i64 {
        self.watermarks.get(user).copied().unwrap_or(0)
    }

    /// Retention removed `seq` of `user`: at or below its watermark and absent.
    fn pruned(&self, user: &str, seq: i64) -> bool {
        seq <= self.watermark(user) && !self.by_user_seq.contains_key(&(user, seq))
    }

    /// The id of `user`'s event `seq`: stored, or (pruned) as a producer was answered.
    fn id_of(&self, user: &str, seq: i64) -> Option<Uuid> {
        self.by_user_seq
            .get(&(user, seq))
            .map(|e| e.id)
            .or_else(|| self.answered_by_user_seq.get(&(user, seq)).copied())
    }
}

/// Collects an instance's findings, one violation per kind, counting repeats.
struct Findings {
    first: BTreeMap<Kind, (Option<i64>, String, usize)>,
}

impl Findings {
    fn new() -> Self {
        Self {
            first: BTreeMap::new(),
        }
    }

    fn add(&mut self, kind: Kind, seq: Option<i64>, detail: String) {
        self.first
            .entry(kind)
            .and_modify(|(_, _, n)| *n += 1)
            .or_insert((seq, detail, 1));
    }
}

/// Every violation in `history` against `snapshot`: channel instances first (in join order), then
/// producers' keys, then the store, outbox and queues.
pub fn check(history: &History, snapshot: &Snapshot) -> Vec<Violation> {
    let ix = Index::new(history, snapshot);
    let mut out = Vec::new();
    for (i, instance) in history.instances.iter().enumerate() {
        let mut found = Findings::new();
        check_instance(instance, &ix, &mut found);
        for (kind, (seq, detail, n)) in found.first {
            let times = if n > 1 {
                format!(" ({n} times in this instance)")
            } else {
                String::new()
            };
            out.push(Violation {
                kind,
                instance: Some(i),
                key: None,
                user: Some(instance.user.clone()),
                seq,
                detail: format!("{detail}{times}"),
            });
        }
    }
    for stray in &history.stray {
        out.push(Violation {
            kind: Kind::StrayPush,
            instance: None,
            key: None,
            user: None,
            seq: None,
            detail: format!(
                "client {} connection {} on {}: {}",
                stray.client, stray.connection, stray.node, stray.frame
            ),
        });
    }
    check_keys(history, snapshot, &ix, &mut out);
    check_store(snapshot, &ix, &mut out);
    out
}

fn check_instance(instance: &Instance, ix: &Index<'_>, found: &mut Findings) {
    for p in &instance.pushes {
        match p.when {
            PushTiming::BeforeReply => found.add(
                Kind::PushBeforeReply,
                p.seq,
                format!("seq {:?} pushed before the join's reply", p.seq),
            ),
            PushTiming::AfterEnd => found.add(
                Kind::PushAfterEnd,
                p.seq,
                format!(
                    "seq {:?} pushed after the instance ended ({:?})",
                    p.seq, instance.end
                ),
            ),
            PushTiming::Live => {}
        }
    }
    let Some(reply) = instance.reply.as_ref().filter(|r| r.ok) else {
        return;
    };
    let Some(baseline) = instance.asked.or(reply.last_seq) else {
        found.add(
            Kind::BadReply,
            None,
            format!("ok reply without last_seq: {}", reply.raw),
        );
        return;
    };
    let user = instance.user.as_str();
    let topic = format!("user:{user}");
    // Skips are allowed only where the client was told (`missed`) and retention did prune.
    let told = instance.asked.is_some() && reply.missed;
    let hole = if instance.asked.is_some() {
        Kind::HoleAfterCatchUp
    } else {
        Kind::HoleAfterJoin
    };
    let mut next = baseline + 1;
    let mut seen = HashSet::new();
    for p in instance
        .pushes
        .iter()
        .filter(|p| p.when != PushTiming::AfterEnd)
    {
        let Some(seq) = p.seq else {
            found.add(
                Kind::PushMismatch,
                None,
                format!("a push without a seq: {} on {}", p.event, p.topic),
            );
            continue;
        };
        if p.topic != topic {
            found.add(
                Kind::PushMismatch,
                Some(seq),
                format!("seq {seq} pushed on {} to a channel of {topic}", p.topic),
            );
        }
        match (ix.id_of(user, seq), p.id) {
            (Some(expected), Some(got)) if expected == got => {}
            (expected, got) => found.add(
                Kind::PushMismatch,
                Some(seq),
                format!("seq {seq} pushed with id {got:?}; the user's event {seq} is {expected:?}"),
            ),
        }
        if !seen.insert(seq) {
            found.add(
                Kind::DuplicatePush,
                Some(seq),
                format!("seq {seq} pushed again"),
            );
            continue;
        }
        if seq <= baseline {
            let of = if instance.asked.is_some() {
                "the asked last_seq"
            } else {
                "the reply's last_seq"
            };
            found.add(
                Kind::PushAtOrBelowBaseline,
                Some(seq),
                format!("seq {seq} pushed, at or below {of} {baseline}"),
            );
            continue;
        }
        if seq < next {
            found.add(
                Kind::OutOfOrder,
                Some(seq),
                format!("seq {seq} pushed after seq {}", next - 1),
            );
            continue;
        }
        if seq > next {
            let unexplained = unexplained_skips(ix, user, next, seq, told);
            if let Some(first) = unexplained.first() {
                found.add(
                    hole,
                    Some(*first),
                    format!(
                        "expected seq {next}, got {seq}: {} seq(s) skipped that retention did not \
                         prune{} (first {first})",
                        unexplained.len(),
                        if told {
                            ""
                        } else {
                            " or the reply did not report"
                        },
                    ),
                );
            }
        }
        next = seq + 1;
    }
    if instance.end == Some(End::StillJoined)
        && let Some(&last) = ix.max_delivered.get(user)
        && last >= next
    {
        let unexplained = unexplained_skips(ix, user, next, last + 1, told);
        if let Some(first) = unexplained.first() {
            found.add(
                Kind::TailMissing,
                Some(*first),
                format!(
                    "still joined at the end, pushed through seq {}, but the user's last delivered \
                     event is seq {last} ({} seq(s) never pushed, first {first})",
                    next - 1,
                    unexplained.len()
                ),
            );
        }
    }
}

/// The seqs in `from..to` a channel skipped without an excuse: all of them, unless the client
/// was told it missed events (`told`), then those retention did not prune.
fn unexplained_skips(ix: &Index<'_>, user: &str, from: i64, to: i64, told: bool) -> Vec<i64> {
    // A bound against a wild seq: more than this many skipped is as bad as any.
    let to = to.min(from.saturating_add(1_000_000));
    (from..to)
        .filter(|&s| !(told && ix.pruned(user, s)))
        .collect()
}

fn check_keys(history: &History, snapshot: &Snapshot, ix: &Index<'_>, out: &mut Vec<Violation>) {
    for (k, key) in history.keys.iter().enumerate() {
        let mut push = |kind, seq, detail| {
            out.push(Violation {
                kind,
                instance: None,
                key: Some(k),
                user: Some(key.user.clone()),
                seq,
                detail,
            });
        };
        if let Some((http, body)) = key.refused.first() {
            push(
                Kind::Unretryable,
                None,
                format!(
                    "key {} answered {http} {body} ({} such answers)",
                    key.key,
                    key.refused.len()
                ),
            );
        }
        let Some(first) = key.answers.first() else {
            if key.gave_up {
                push(
                    Kind::KeyNeverAnswered,
                    None,
                    format!("key {} never answered 2xx", key.key),
                );
            }
            continue;
        };
        let ids: HashSet<(Uuid, i64)> = key.answers.iter().map(|a| (a.id, a.seq)).collect();
        if ids.len() > 1 {
            push(
                Kind::KeyTwoIds,
                Some(first.seq),
                format!("key {} answered as {ids:?}", key.key),
            );
        }
        if let Some(held) = snapshot.keys.get(&key.key)
            && *held != first.id
        {
            push(
                Kind::KeyTwoIds,
                Some(first.seq),
                format!(
                    "key {} answered as {}, but idempotency_keys holds {held}",
                    key.key, first.id
                ),
            );
        }
        match ix.by_id.get(&first.id) {
            Some(stored) if stored.user != key.user || stored.seq != first.seq => push(
                Kind::AcceptedMismatch,
                Some(first.seq),
                format!(
                    "key {} answered as {} (user {}, seq {}); stored as user {}, seq {}",
                    key.key, first.id, key.user, first.seq, stored.user, stored.seq
                ),
            ),
            Some(_) => {}
            None if ix.pruned(&key.user, first.seq) => {
                if key.poison {
                    push(
                        Kind::PrunedUndeliverable,
                        Some(first.seq),
                        format!(
                            "poison event {} (key {}, seq {}) is gone: retention prunes only \
                             delivered events, and a poison event never is",
                            first.id, key.key, first.seq
                        ),
                    );
                }
            }
            None => push(
                Kind::AcceptedMissing,
                Some(first.seq),
                format!(
                    "key {} answered as {} (seq {}), not stored; the user's retention watermark is \
                     {}",
                    key.key,
                    first.id,
                    first.seq,
                    ix.watermark(&key.user)
                ),
            ),
        }
    }
}

fn check_store(snapshot: &Snapshot, ix: &Index<'_>, out: &mut Vec<Violation>) {
    let mut push = |kind, user: Option<&str>, seq, detail| {
        out.push(Violation {
            kind,
            instance: None,
            key: None,
            user: user.map(str::to_owned),
            seq,
            detail,
        });
    };
    if let Some(stuck) = &snapshot.stuck {
        push(Kind::Stuck, None, None, stuck.clone());
    }
    for e in &snapshot.events {
        let at = format!(
            "event {} (user {}, seq {}, {})",
            e.id, e.user, e.seq, e.event
        );
        match e.status.as_str() {
            "delivered" => {}
            "failed" if e.failed_at => {}
            "failed" => push(
                Kind::FailedWithoutFailedAt,
                Some(&e.user),
                Some(e.seq),
                format!("{at} is failed without failed_at"),
            ),
            other => push(
                Kind::Unsettled,
                Some(&e.user),
                Some(e.seq),
                format!(
                    "{at} is still {other}: attempts {}, sweeps {}, last_error {:?}",
                    e.attempts, e.sweeps, e.last_error
                ),
            ),
        }
        if !ix.answered_ids.contains(&e.id) {
            push(
                Kind::StoredUnanswered,
                Some(&e.user),
                Some(e.seq),
                format!("{at}, key {:?}: no producer was answered with it", e.key),
            );
        }
    }
    if let Some(row) = snapshot.outbox.first() {
        push(
            Kind::OutboxNotEmpty,
            None,
            None,
            format!(
                "{} outbox row(s) left; first {} (relayed: {}) with events {:?}",
                snapshot.outbox.len(),
                row.id,
                row.relayed,
                row.event_ids
            ),
        );
    }
    for (queue, ready) in &snapshot.queues {
        if let Some(n) = ready.filter(|n| *n > 0) {
            push(
                Kind::QueueNotEmpty,
                None,
                None,
                format!("{queue} holds {n} ready message(s)"),
            );
        }
    }
}

/// Counts by kind, for the report's last lines.
pub fn counts(violations: &[Violation]) -> BTreeMap<Kind, usize> {
    let mut counts = BTreeMap::new();
    for v in violations {
        *counts.entry(v.kind).or_insert(0) += 1;
    }
    counts
}

/// The history behind `violation`, in full: the channel instance (node, params, reply, every push,
/// its end) or the key (every answer), and the user's stored seqs around the problem.
pub fn explain(violation: &Violation, history: &History, snapshot: &Snapshot) -> String {
    let mut text = format!("{:?}: {}\n", violation.kind, violation.detail);
    if let Some(i) = violation.instance {
        let inst = &history.instances[i];
        let _ = writeln!(
            text,
            "channel instance #{i}: client {} connection {} on node {}, topic user:{}, join_ref {}, \
             joined at +{} ms\n  params: {}\n  reply: {}\n  end: {:?}\n  {} push(es) (seq id @ms, \
             * before reply, ! after end):",
            inst.client,
            inst.connection,
            inst.node,
            inst.user,
            inst.join_ref,
            inst.joined_at_ms,
            inst.asked
                .map_or_else(|| "{}".to_owned(), |l| format!("{{\"last_seq\": {l}}}")),
            inst.reply.as_ref().map_or_else(
                || "none".to_owned(),
                |r| format!(
                    "{} {} at +{} ms",
                    if r.ok { "ok" } else { "error" },
                    r.raw,
                    r.at_ms
                )
            ),
            inst.end,
            inst.pushes.len()
        );
        for chunk in inst.pushes.chunks(4) {
            let line: Vec<String> = chunk
                .iter()
                .map(|p| {
                    let mark = match p.when {
                        PushTiming::Live => "",
                        PushTiming::BeforeReply => "*",
                        PushTiming::AfterEnd => "!",
                    };
                    let seq = p.seq.map_or_else(|| "-".to_owned(), |s| s.to_string());
                    let id = p.id.map_or_else(|| "-".to_owned(), |id| id.to_string());
                    format!("{mark}{seq} {id} @{}", p.at_ms)
                })
                .collect();
            let _ = writeln!(text, "    {}", line.join(" | "));
        }
    }
    if let Some(k) = violation.key {
        let key = &history.keys[k];
        let _ = writeln!(
            text,
            "key {} (user {}, poison {}, gave up {}): answers {:?}",
            key.key, key.user, key.poison, key.gave_up, key.answers
        );
    }
    if let (Some(user), Some(seq)) = (&violation.user, violation.seq) {
        around(&mut text, user, seq, history, snapshot);
    }
    text
}

/// The user's seqs around `seq`: each one's stored status (or pruned), when it was enqueued (its
/// UUID v7 says, for a pruned one too) and delivered, and which channel instances of the user got
/// it when: enough to tell, say, a missed broadcast from an event enqueued after a join.
fn around(text: &mut String, user: &str, seq: i64, history: &History, snapshot: &Snapshot) {
    let _ = writeln!(
        text,
        "user {user}: last seq {:?}, retention watermark {:?}; its seqs around {seq} (times from \
         the run's start):",
        snapshot.user_seqs.get(user),
        snapshot.watermarks.get(user)
    );
    let since = |unix_ms: i64| unix_ms - snapshot.started_unix_ms;
    for s in seq - 5..=seq + 5 {
        let stored = snapshot
            .events
            .iter()
            .find(|e| e.user == user && e.seq == s);
        let answered = history
            .keys
            .iter()
            .filter(|k| k.user == user)
            .find_map(|k| k.answers.iter().find(|a| a.seq == s).map(|a| a.id));
        let Some(id) = stored.map(|e| e.id).or(answered) else {
            continue;
        };
        // A UUID v7 starts with its Unix ms: when the api node made the event.
        let made = since((id.as_u128() >> 80) as i64);
        let state = stored.map_or_else(
            || "pruned".to_owned(),
            |e| {
                format!(
                    "{} {}: attempts {}, sweeps {}, push_count {:?}, delivered at {}, last_error {:?}",
                    e.event,
                    e.status,
                    e.attempts,
                    e.sweeps,
                    e.push_count,
                    e.delivered_ms
                        .map_or_else(|| "-".to_owned(), |d| format!("+{} ms", since(d))),
                    e.last_error
                )
            },
        );
        let got: Vec<String> = history
            .instances
            .iter()
            .enumerate()
            .filter(|(_, i)| i.user == user)
            .filter_map(|(n, i)| {
                let p = i.pushes.iter().find(|p| p.seq == Some(s))?;
                Some(format!("#{n}@{}", p.at_ms))
            })
            .take(8)
            .collect();
        let _ = writeln!(
            text,
            "    seq {s} {id} made at +{made} ms, {state}; pushed to {}",
            if got.is_empty() {
                "none".to_owned()
            } else {
                got.join(" ")
            }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::history::{Answer, KeyRecord, OutboxRow, Pushed, Reply};
    use super::*;

    fn id(user: &str, seq: i64) -> Uuid {
        let n = user.bytes().fold(0u128, |h, b| h * 131 + u128::from(b));
        Uuid::from_u128((n << 64) | seq as u128)
    }

    fn stored(user: &str, seq: i64, status: &str) -> StoredEvent {
        StoredEvent {
            id: id(user, seq),
            user: user.into(),
            seq,
            event: "push".into(),
            status: status.into(),
            attempts: 1,
            failed_at: status == "failed",
            sweeps: 0,
            last_error: None,
            key: Some(format!("{user}-{seq}")),
            push_count: Some(1),
            enqueued_ms: 0,
            delivered_ms: None,
        }
    }

    fn key(user: &str, seq: i64) -> KeyRecord {
        KeyRecord {
            key: format!("{user}-{seq}"),
            user: user.into(),
            poison: false,
            answers: vec![Answer {
                http: 202,
                id: id(user, seq),
                seq,
                status: "accepted".into(),
            }],
            gave_up: false,
            refused: Vec::new(),
        }
    }

    fn push(user: &str, seq: i64) -> Pushed {
        Pushed {
            topic: format!("user:{user}"),
            event: "push".into(),
            seq: Some(seq),
            id: Some(id(user, seq)),
            at_ms: 0,
            when: PushTiming::Live,
        }
    }

    fn instance(
        asked: Option<i64>,
        last_seq: i64,
        missed: bool,
        seqs: &[i64],
        end: End,
    ) -> Instance {
        Instance {
            client: 0,
            connection: 1,
            node: "socket-1".into(),
            user: "a".into(),
            join_ref: "1".into(),
            asked,
            joined_at_ms: 0,
            reply: Some(Reply {
                ok: true,
                last_seq: Some(last_seq),
                missed,
                raw: format!("{{\"last_seq\":{last_seq},\"missed\":{missed}}}"),
                at_ms: 0,
            }),
            pushes: seqs.iter().map(|&s| push("a", s)).collect(),
            end: Some(end),
        }
    }

    /// User `a` with events 1..=6 delivered, every one answered; one instance joined with `{}` at
    /// seq 2 that got 3..=6 and is still joined, one that caught up from 0 and left.
    fn clean() -> (History, Snapshot) {
        let history = History {
            keys: (1..=6).map(|s| key("a", s)).collect(),
            instances: vec![
                instance(None, 2, false, &[3, 4, 5, 6], End::StillJoined),
                instance(Some(0), 4, false, &[1, 2, 3, 4, 5], End::Left),
            ],
            stray: Vec::new(),
        };
        let snapshot = Snapshot {
            events: (1..=6).map(|s| stored("a", s, "delivered")).collect(),
            user_seqs: [("a".to_owned(), 6)].into(),
            keys: (1..=6).map(|s| (format!("a-{s}"), id("a", s))).collect(),
            queues: vec![("p.events.0".into(), Some(0))],
            ..Snapshot::default()
        };
        (history, snapshot)
    }

    fn kinds(history: &History, snapshot: &Snapshot) -> Vec<Kind> {
        let mut kinds: Vec<Kind> = check(history, snapshot).iter().map(|v| v.kind).collect();
        kinds.dedup();
        kinds
    }

    #[test]
    fn a_clean_history_passes() {
        let (history, snapshot) = clean();
        let violations = check(&history, &snapshot);
        assert!(violations.is_empty(), "{violations:#?}");
    }

    #[test]
    fn a_hole_after_a_join_without_last_seq() {
        let (mut history, snapshot) = clean();
        history.instances[0] = instance(None, 2, false, &[3, 5, 6], End::StillJoined);
        assert_eq!(kinds(&history, &snapshot), [Kind::HoleAfterJoin]);
        // The first push itself may skip: nothing fills from the reply's last_seq otherwise.
        history.instances[0] = instance(None, 2, false, &[4, 5, 6], End::StillJoined);
        let violations = check(&history, &snapshot);
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].kind, Kind::HoleAfterJoin);
        assert_eq!(violations[0].seq, Some(3));
    }

    #[test]
    fn a_push_at_or_below_the_replys_last_seq() {
        let (mut history, snapshot) = clean();
        history.instances[0] = instance(None, 2, false, &[2, 3, 4, 5, 6], End::StillJoined);
        assert_eq!(kinds(&history, &snapshot), [Kind::PushAtOrBelowBaseline]);
        // With last_seq, the asked one is the baseline.
        history.instances[0] = instance(Some(3), 6, false, &[3, 4, 5, 6], End::StillJoined);
        assert_eq!(kinds(&history, &snapshot), [Kind::PushAtOrBelowBaseline]);
    }

    #[test]
    fn a_duplicate_seq_to_one_instance() {
        let (mut history, snapshot) = clean();
        history.instances[0] = instance(None, 2, false, &[3, 4, 4, 5, 6], End::StillJoined);
        assert_eq!(kinds(&history, &snapshot), [Kind::DuplicatePush]);
    }

    #[test]
    fn a_push_after_a_later_one_is_out_of_order() {
        let (mut history, snapshot) = clean();
        history.instances[0] = instance(None, 2, false, &[3, 5, 4, 6], End::StillJoined);
        assert_eq!(
            kinds(&history, &snapshot),
            [Kind::HoleAfterJoin, Kind::OutOfOrder]
        );
    }

    #[test]
    fn a_hole_after_a_join_with_last_seq() {
        let (mut history, snapshot) = clean();
        history.instances[1] = instance(Some(1), 6, false, &[2, 4, 5, 6], End::Left);
        assert_eq!(kinds(&history, &snapshot), [Kind::HoleAfterCatchUp]);
    }

    #[test]
    fn a_skip_is_excused_only_where_retention_pruned_and_the_reply_said_missed() {
        let (mut history, mut snapshot) = clean();
        // Retention pruned 1..=3.
        snapshot.events.retain(|e| e.seq > 3);
        snapshot.watermarks.insert("a".into(), 3);
        history.instances[1] = instance(Some(0), 6, true, &[4, 5, 6], End::Left);
        assert_eq!(kinds(&history, &snapshot), []);
        // Not told: a hole.
        history.instances[1] = instance(Some(0), 6, false, &[4, 5, 6], End::Left);
        assert_eq!(kinds(&history, &snapshot), [Kind::HoleAfterCatchUp]);
        // Told, but seq 5 was not pruned.
        history.instances[1] = instance(Some(0), 6, true, &[4, 6], End::Left);
        assert_eq!(kinds(&history, &snapshot), [Kind::HoleAfterCatchUp]);
    }

    #[test]
    fn an_instance_that_ended_with_phx_error_owes_nothing_after_its_pushes() {
        let (mut history, snapshot) = clean();
        let error = End::Errored(r#"{"reason":"gap_unfilled"}"#.into());
        history.instances[0] = instance(None, 2, false, &[3], error.clone());
        assert_eq!(kinds(&history, &snapshot), []);
        // ... but what it pushed before must hold.
        history.instances[0] = instance(None, 2, false, &[4], error);
        assert_eq!(kinds(&history, &snapshot), [Kind::HoleAfterJoin]);
    }

    #[test]
    fn only_an_instance_still_joined_at_the_end_owes_the_tail() {
        let (mut history, snapshot) = clean();
        for end in [
            End::Left,
            End::Closed,
            End::Refused,
            End::JoinTimeout,
            End::Disconnected("moving".into()),
            End::SocketClosed("connection reset".into()),
        ] {
            history.instances[0] = instance(None, 2, false, &[3, 4], end);
            assert_eq!(kinds(&history, &snapshot), []);
        }
        history.instances[0] = instance(None, 2, false, &[3, 4], End::StillJoined);
        assert_eq!(kinds(&history, &snapshot), [Kind::TailMissing]);
    }

    #[test]
    fn a_joined_channel_that_never_got_the_last_delivered_event() {
        let (mut history, mut snapshot) = clean();
        history.instances[0] = instance(None, 2, false, &[3, 4, 5], End::StillJoined);
        assert_eq!(kinds(&history, &snapshot), [Kind::TailMissing]);
        // A failed event at the very tail is not pushed live: nothing is owed for it.
        snapshot.events[5] = stored("a", 6, "failed");
        assert_eq!(kinds(&history, &snapshot), []);
    }

    #[test]
    fn a_push_with_another_events_id() {
        let (mut history, snapshot) = clean();
        history.instances[0].pushes[1].id = Some(id("b", 4));
        assert_eq!(kinds(&history, &snapshot), [Kind::PushMismatch]);
    }

    #[test]
    fn pushes_before_the_reply_after_the_end_or_with_an_unknown_join_ref() {
        let (mut history, snapshot) = clean();
        history.instances[1].pushes[4].when = PushTiming::AfterEnd;
        history.instances[0].pushes[0].when = PushTiming::BeforeReply;
        history.stray.push(super::super::history::StrayPush {
            client: 0,
            connection: 1,
            node: "socket-1".into(),
            frame: "[\"99\",null,\"user:a\",\"push\",{}]".into(),
        });
        assert_eq!(
            kinds(&history, &snapshot),
            [Kind::PushBeforeReply, Kind::PushAfterEnd, Kind::StrayPush]
        );
    }

    #[test]
    fn an_accepted_event_left_published() {
        let (history, mut snapshot) = clean();
        snapshot.events[2].status = "published".into();
        assert_eq!(kinds(&history, &snapshot), [Kind::Unsettled]);
    }

    #[test]
    fn a_failed_event_without_failed_at() {
        let (history, mut snapshot) = clean();
        snapshot.events[2].status = "failed".into();
        assert_eq!(kinds(&history, &snapshot), [Kind::FailedWithoutFailedAt]);
    }

    #[test]
    fn an_accepted_id_missing_from_the_store() {
        let (history, mut snapshot) = clean();
        snapshot.events.remove(2);
        snapshot.events.remove(1);
        // Seq 2 was pruned (at or below the watermark): fine. Seq 3 is above it: lost.
        snapshot.watermarks.insert("a".into(), 2);
        let found = check(&history, &snapshot);
        let missing: Vec<_> = found
            .iter()
            .filter(|v| v.kind == Kind::AcceptedMissing)
            .collect();
        assert_eq!(missing.len(), 1, "{found:#?}");
        assert_eq!(missing[0].seq, Some(3));
    }

    #[test]
    fn a_pruned_poison_event() {
        let (mut history, mut snapshot) = clean();
        history.keys[0].poison = true;
        snapshot.events.remove(0);
        snapshot.watermarks.insert("a".into(), 1);
        // The instance that caught up from 0 was told it missed seq 1.
        history.instances[1] = instance(Some(0), 6, true, &[2, 3, 4, 5], End::Left);
        assert_eq!(kinds(&history, &snapshot), [Kind::PrunedUndeliverable]);
    }

    #[test]
    fn a_key_answered_with_two_ids() {
        let (mut history, snapshot) = clean();
        let mut other = history.keys[2].answers[0].clone();
        other.id = Uuid::from_u128(7);
        history.keys[2].answers.push(other);
        assert_eq!(kinds(&history, &snapshot), [Kind::KeyTwoIds]);
        // Or the store holds another id for it.
        let (mut history, mut snapshot) = clean();
        history.keys[2].answers.truncate(1);
        snapshot.keys.insert("a-3".into(), Uuid::from_u128(7));
        assert_eq!(kinds(&history, &snapshot), [Kind::KeyTwoIds]);
    }

    #[test]
    fn a_stored_event_nobody_was_answered_for_and_a_key_never_answered() {
        let (mut history, snapshot) = clean();
        history.keys[5].answers.clear();
        history.keys[5].gave_up = true;
        // The pushes of seq 6 still match the stored event.
        assert_eq!(
            kinds(&history, &snapshot),
            [Kind::KeyNeverAnswered, Kind::StoredUnanswered]
        );
    }

    #[test]
    fn a_valid_request_answered_500() {
        let (mut history, snapshot) = clean();
        history.keys[3]
            .refused
            .push((500, r#"{"error":{"code":"internal"}}"#.into()));
        assert_eq!(kinds(&history, &snapshot), [Kind::Unretryable]);
    }

    #[test]
    fn an_accepted_event_stored_under_another_seq() {
        let (mut history, snapshot) = clean();
        history.keys[2].answers[0].seq = 9;
        assert_eq!(kinds(&history, &snapshot), [Kind::AcceptedMismatch]);
    }

    #[test]
    fn a_non_empty_outbox_or_queue_and_a_stuck_run() {
        let (history, mut snapshot) = clean();
        snapshot.outbox.push(OutboxRow {
            id: Uuid::from_u128(1),
            event_ids: vec![id("a", 6)],
            relayed: true,
        });
        snapshot.queues.push(("p.delay.300ms".into(), Some(2)));
        snapshot.stuck = Some("1 event still published".into());
        assert_eq!(
            kinds(&history, &snapshot),
            [Kind::Stuck, Kind::OutboxNotEmpty, Kind::QueueNotEmpty]
        );
        snapshot.queues.push(("p.events.3".into(), Some(1)));
        let by_kind = counts(&check(&history, &snapshot));
        assert_eq!(by_kind[&Kind::QueueNotEmpty], 2);
        assert_eq!(by_kind[&Kind::Stuck], 1);
    }

    #[test]
    fn the_explanation_shows_the_instance_and_the_stored_seqs_around() {
        let (mut history, snapshot) = clean();
        history.instances[0] = instance(None, 2, false, &[3, 5, 6], End::StillJoined);
        let violations = check(&history, &snapshot);
        let text = explain(&violations[0], &history, &snapshot);
        assert!(text.contains("HoleAfterJoin"), "{text}");
        assert!(text.contains("node socket-1"), "{text}");
        assert!(text.contains(&format!("seq 4 {}", id("a", 4))), "{text}");
        assert!(text.contains("pushed to #1@0"), "{text}");
        assert!(text.contains(&format!("5 {} @0", id("a", 5))), "{text}");
    }
}
