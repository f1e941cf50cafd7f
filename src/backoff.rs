//! Backoff between attempts: one growing, jittered delay for everything Herald retries on its own
//! (RabbitMQ reconnects, writes that must survive a short database outage), and the uniform draw
//! the retry policy jitters with. A leaf: depends on no other Herald module.

use std::future::Future;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The first delay.
const FIRST: Duration = Duration::from_millis(100);

/// How far a delay may stray from the schedule, either way: nodes that lost the broker together
/// must not all come back in the same instant.
const JITTER: f64 = 0.2;

/// Exponential backoff: 100 ms doubling up to a cap, each delay jittered by ±20%.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at 100 ms, never above `max` (before jitter).
    pub fn new(max: Duration) -> Self {
        Self { next: FIRST, max }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_at(random_unit())
    }

    /// The delay before the next attempt, placed in the jitter band by `unit` (in [0, 1)).
    fn next_delay_at(&mut self, unit: f64) -> Duration {
        let scheduled = self.next;
        self.next = (self.next * 2).min(self.max);
        scheduled.mul_f64(1.0 - JITTER + 2.0 * JITTER * unit.clamp(0.0, 1.0))
    }

    /// After a success.
    pub fn reset(&mut self) {
        self.next = FIRST;
    }

    /// Sleeps the next delay; false if `stop` was cancelled first.
    pub async fn wait(&mut self, stop: &CancellationToken) -> bool {
        tokio::select! {
            () = tokio::time::sleep(self.next_delay()) => true,
            () = stop.cancelled() => false,
        }
    }
}

/// Opens a link with `open` until it succeeds, backing off after each failure (which is logged as
/// `link`'s and handed to `failed`). The backoff restarts from its first delay once a link opens.
/// `None` once `stop` is cancelled. The one reconnect loop of the broker links.
pub async fn reconnect<T, E, Open, Opened, Failed, Told>(
    link: &'static str,
    backoff: &mut Backoff,
    stop: &CancellationToken,
    mut open: Open,
    mut failed: Failed,
) -> Option<T>
where
    E: std::fmt::Display,
    Open: FnMut() -> Opened,
    Opened: Future<Output = Result<T, E>>,
    Failed: FnMut() -> Told,
    Told: Future<Output = ()>,
{
    while !stop.is_cancelled() {
        let opened = tokio::select! {
            opened = open() => opened,
            () = stop.cancelled() => return None,
        };
        match opened {
            Ok(opened) => {
                backoff.reset();
                return Some(opened);
            }
            Err(error) => {
                tracing::warn!(error = %error, link, "cannot reach RabbitMQ; retrying");
                failed().await;
                if !backoff.wait(stop).await {
                    return None;
                }
            }
        }
    }
    None
}

/// Runs `attempt` until it succeeds or `tries` attempts failed, backing off up to 2 s between them.
/// For writes that must not be lost to a short database outage.
///
/// # Errors
/// The last attempt's error.
pub async fn with_retries<T, E: std::fmt::Debug, F, Fut>(
    what: &str,
    tries: u32,
    mut attempt: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::new(Duration::from_secs(2));
    let mut tried = 1;
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) if tried >= tries => return Err(error),
            Err(error) => {
                tracing::warn!(error = ?error, what, attempt = tried, "write failed; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
                tried += 1;
            }
        }
    }
}

/// A uniform draw from [0, 1) for the jitter; 0.5 (no jitter) if the OS has no randomness to give.
pub fn random_unit() -> f64 {
    getrandom::u64().map_or(0.5, |bits| (bits >> 11) as f64 / (1u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(500));
        let delays: Vec<u128> = (0..5).map(|_| b.next_delay_at(0.5).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next_delay_at(0.5).as_millis(), 100);
    }

    #[test]
    fn jitter_stays_within_its_band() {
        let mut b = Backoff::new(Duration::from_millis(500));
        assert_eq!(b.next_delay_at(0.0).as_millis(), 80);
        assert_eq!(b.next_delay_at(1.0).as_millis(), 240);
        for _ in 0..1_000 {
            let mut b = Backoff::new(Duration::from_millis(500));
            let d = b.next_delay().as_millis();
            assert!((80..=120).contains(&d), "{d}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn reconnect_backs_off_until_a_link_opens_and_stops_when_told() {
        let stop = CancellationToken::new();
        let mut backoff = Backoff::new(Duration::from_millis(500));
        let (mut tries, mut told) = (0, 0);
        let started = tokio::time::Instant::now();
        let opened = reconnect(
            "test",
            &mut backoff,
            &stop,
            || {
                tries += 1;
                std::future::ready(if tries < 4 { Err("down") } else { Ok(tries) })
            },
            || {
                told += 1;
                std::future::ready(())
            },
        )
        .await;
        assert_eq!((opened, told), (Some(4), 3));
        // 100 + 200 + 400 ms, each within ±20%.
        let waited = started.elapsed().as_millis();
        assert!((560..=840).contains(&waited), "{waited}");
        stop.cancel();
        let never = reconnect(
            "test",
            &mut backoff,
            &stop,
            || std::future::ready(Err::<(), _>("down")),
            || std::future::ready(()),
        )
        .await;
        assert_eq!(never, None);
    }
}
