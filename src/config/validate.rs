//! Validation: each section checks its own bounds, and one cross-check relates the sections;
//! `load` runs it, and so does `App::build` for settings built in code.

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
fn invalid<T>(key: &str, why: &str) -> Result<T, Error> {
    Err(Error::Invalid(format!("{key}: {why}")))
}

/// Each of `counts` (sizes, buffers, limits) must be at least 1.
fn at_least_one(counts: &[(&str, usize)]) -> Result<(), Error> {
    match counts.iter().find(|(_, value)| *value == 0) {
        Some((key, _)) => invalid(key, "must be at least 1"),
        None => Ok(()),
    }
}

impl HttpSettings {
    fn validate(&self) -> Result<(), Error> {
        at_least_one(&[("http.max_concurrent_requests", self.max_concurrent_requests)])
    }
}

impl StoreSettings {
    fn validate(&self) -> Result<(), Error> {
        at_least_one(&[
            ("store.max_connections", self.max_connections as usize),
            ("store.write_connections", self.write_connections as usize),
            ("store.read_connections", self.read_connections as usize),
        ])
    }
}

impl QueueSettings {
    fn validate(&self) -> Result<(), Error> {
        crate::queue::nodes::parse_node_list(self.amqp_url.expose())
            .map_err(|why| Error::Invalid(format!("queue.amqp_url: {why}")))?;
        if self.prefetch == 0 {
            return invalid("queue.prefetch", "must be at least 1");
        }
        if !(1..=1024).contains(&self.partitions) {
            return invalid("queue.partitions", "must be 1 to 1024");
        }
        if self.partition_check_ms == 0 || self.partition_lease_ms < 3 * self.partition_check_ms {
            return invalid(
                "queue.partition_lease_ms",
                "must be at least 3 x queue.partition_check_ms (a lease outlives two missed renewals)",
            );
        }
        at_least_one(&[
            ("queue.message_max_events", self.message_max_events),
            ("queue.publish_buffer", self.publish_buffer),
            ("queue.max_inflight_confirms", self.max_inflight_confirms),
        ])
    }
}

impl PipelineSettings {
    fn validate(&self) -> Result<(), Error> {
        if self.sweep_interval_ms == 0 {
            return invalid("pipeline.sweep_interval_ms", "must be at least 1");
        }
        at_least_one(&[
            ("pipeline.enqueue_buffer", self.enqueue_buffer),
            ("pipeline.max_commit_batch", self.max_commit_batch),
            ("pipeline.commit_streams", self.commit_streams),
            ("pipeline.max_batch_events", self.max_batch_events),
            ("pipeline.max_status_batch", self.max_status_batch),
            ("pipeline.max_run_events", self.max_run_events),
        ])?;
        if u32::try_from(self.enqueue_buffer_bytes).is_err() {
            return invalid(
                "pipeline.enqueue_buffer_bytes",
                "must hold one whole request (http.max_body_bytes) and be below 4 GiB",
            );
        }
        if self.max_batch_events > self.enqueue_buffer {
            return invalid(
                "pipeline.max_batch_events",
                "must not exceed pipeline.enqueue_buffer",
            );
        }
        Ok(())
    }
}

impl SocketSettings {
    fn validate(&self) -> Result<(), Error> {
        at_least_one(&[
            ("socket.outbound_buffer", self.outbound_buffer),
            ("socket.max_channels", self.max_channels),
            ("socket.channel_inbox", self.channel_inbox),
            ("socket.max_connections", self.max_connections),
            ("socket.stats_max_connections", self.stats_max_connections),
        ])?;
        for pattern in &self.check_origin {
            crate::socket::origin::OriginPattern::parse(pattern)
                .map_err(|why| Error::Invalid(format!("socket.check_origin: {why}")))?;
        }
        if self.max_gap_fill < 1 || self.max_gap_fill_total < self.max_gap_fill {
            return invalid(
                "socket.max_gap_fill",
                "must be at least 1, and socket.max_gap_fill_total at least as much",
            );
        }
        if self.max_catch_up_per_minute < self.max_gap_fill {
            return invalid(
                "socket.max_catch_up_per_minute",
                "must be at least socket.max_gap_fill (one page)",
            );
        }
        Ok(())
    }
}

impl MetricsSettings {
    fn validate(&self) -> Result<(), Error> {
        if !self.prometheus_addr.is_empty() && self.prometheus_addr.parse::<SocketAddr>().is_err() {
            return invalid(
                "metrics.prometheus_addr",
                "must be host:port with an IP address (e.g. 127.0.0.1:9464), or empty",
            );
        }
        at_least_one(&[("metrics.packet_bytes", self.packet_bytes)])
    }
}

impl RetrySettings {
    fn validate(&self) -> Result<(), Error> {
        if self.max_attempts == 0 {
            return invalid("retry.max_attempts", "must be at least 1");
        }
        if !(0.0..1.0).contains(&self.jitter) {
            return invalid("retry.jitter", "must be at least 0 and below 1");
        }
        if self.max_attempts > 1 && self.schedule_ms.is_empty() {
            return invalid(
                "retry.schedule_ms",
                "must list a delay when retries are allowed",
            );
        }
        for (name, policy) in &self.events {
            if policy.max_attempts == Some(0) {
                return invalid(
                    &format!("retry.events.{name}.max_attempts"),
                    "must be at least 1",
                );
            }
            if policy.schedule_ms.as_ref().is_some_and(Vec::is_empty) {
                return invalid(
                    &format!("retry.events.{name}.schedule_ms"),
                    "must not be empty",
                );
            }
        }
        if self.delays_ms().contains(&0) {
            return invalid("retry.schedule_ms", "delays must be at least 1 ms");
        }
        Ok(())
    }
}

impl ReplaySettings {
    fn validate(&self) -> Result<(), Error> {
        if self.page <= 0 || self.default_rate == 0 || self.max_jobs == 0 {
            return invalid(
                "replay",
                "page, default_rate and max_jobs must be at least 1",
            );
        }
        Ok(())
    }
}
