//! Validation: each section checks its own bounds (in its own file), and one cross-check here
//! relates the sections; `load` runs it, and so does `App::build` for settings built in code.

use super::*;

impl Settings {
    /// The key socket tokens are signed with: `HERALD_SECRET`, or on a development node
    /// (`node.dev`, or the demo) without one, the public development key.
    ///
    /// # Errors
    /// A secret shorter than [`MIN_SECRET_BYTES`] (empty included), or none on a node that is not
    /// a development node.
    pub fn signing_secret(&self) -> Result<&str, Error> {
        match &self.socket.secret {
            Some(secret) if secret.expose().len() >= MIN_SECRET_BYTES => Ok(secret.expose()),
            Some(secret) => Err(Error::Invalid(format!(
                "socket.secret (HERALD_SECRET) is {} bytes; it must be at least {MIN_SECRET_BYTES} \
                 (`herald secret` prints a fresh random one)",
                secret.expose().len()
            ))),
            None if self.node.dev || self.demo.enabled => Ok(crate::token::DEVELOPMENT_SECRET),
            None => Err(Error::Invalid(format!(
                "socket.secret (HERALD_SECRET) is not set: set it to {MIN_SECRET_BYTES}+ random \
                 bytes (`herald secret` prints one), or run a development node with --dev"
            ))),
        }
    }

    /// Checks the bounds and relations of the values: `load` calls it, and so does `App::build`,
    /// for settings built in code.
    ///
    /// # Errors
    /// The first value out of bounds, named by its key.
    pub fn validate(&self) -> Result<(), Error> {
        if self.socket.secret.is_some() {
            self.signing_secret()?;
        }
        self.http.validate()?;
        self.store.validate()?;
        self.queue.validate()?;
        self.pipeline.validate()?;
        self.socket.validate()?;
        self.metrics.validate()?;
        self.retry.validate()?;
        self.replay.validate()?;
        self.webpush.validate(self.node.dev)?;
        self.traces.validate()?;
        self.cross_check()
    }

    /// The rules that relate settings of different sections.
    fn cross_check(&self) -> Result<(), Error> {
        if self.queue.message_max_bytes < self.pipeline.max_data_bytes + 1024 {
            return invalid(
                "queue.message_max_bytes",
                "must exceed pipeline.max_data_bytes by 1024 (one event always fits)",
            );
        }
        if self.pipeline.relay_grace_ms * 9 / 10 <= self.queue.confirm_timeout_ms {
            return invalid(
                "pipeline.relay_grace_ms",
                "must exceed queue.confirm_timeout_ms by a tenth of itself (the relay must never race a publish awaiting its confirm)",
            );
        }
        // A retry expires at its delay queue's head only: one with the longest jitter can hold
        // the shortest behind it for twice the jitter of the delay.
        let longest = self.retry.delays_ms().into_iter().max().unwrap_or(0) as f64;
        let lag = (2.0 * self.retry.jitter * longest) as u64;
        if self.pipeline.sweep_after_ms > 0
            && self.pipeline.sweep_after_ms <= lag.max(self.pipeline.relay_grace_ms)
        {
            return invalid(
                "pipeline.sweep_after_ms",
                "must exceed pipeline.relay_grace_ms and twice retry.jitter of the longest retry delay (or be 0: off)",
            );
        }
        if self.pubsub.buckets == 0 {
            return invalid("pubsub.buckets", "must be at least 1");
        }
        if self.pubsub.mode == PubSubMode::Local && !self.node.roles.all() {
            return invalid(
                "pubsub.mode",
                "a node that does not run every role needs pubsub.mode = cluster",
            );
        }
        if self.pipeline.enqueue_buffer_bytes < self.http.max_body_bytes {
            return invalid(
                "pipeline.enqueue_buffer_bytes",
                "must hold one whole request (http.max_body_bytes) and be below 4 GiB",
            );
        }
        if self.pipeline.commit_streams > usize::from(self.queue.partitions) {
            return invalid(
                "pipeline.commit_streams",
                "must not exceed queue.partitions (each stream owns some partitions)",
            );
        }
        if (self.store.write_connections as usize) < self.pipeline.commit_streams + 2 {
            return invalid(
                "store.write_connections",
                "must be at least pipeline.commit_streams + 2 (a connection per commit stream, the confirm recorder and the outcome writer)",
            );
        }
        if self.http.request_timeout_ms <= self.pipeline.enqueue_timeout_ms {
            return invalid(
                "http.request_timeout_ms",
                "must exceed pipeline.enqueue_timeout_ms (a request waiting for room must hear 503, not 408)",
            );
        }
        Ok(())
    }
}

/// An invalid setting, named by its key.
pub(super) fn invalid<T>(key: &str, why: &str) -> Result<T, Error> {
    Err(Error::Invalid(format!("{key}: {why}")))
}

/// Each of `counts` (sizes, buffers, limits) must be at least 1.
pub(super) fn at_least_one(counts: &[(&str, usize)]) -> Result<(), Error> {
    match counts.iter().find(|(_, value)| *value == 0) {
        Some((key, _)) => invalid(key, "must be at least 1"),
        None => Ok(()),
    }
}
