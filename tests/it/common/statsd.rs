//! A UDP listener standing in for StatsD, and sums over what it received.

use super::*;
use std::net::SocketAddr;
use tokio::net::UdpSocket;
use tokio::time::Instant;

/// The sum of the StatsD counter `name` over `lines` (as a `StatsdListener` received them).
pub fn counter_sum(lines: &[String], name: &str) -> i64 {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .filter_map(|rest| rest.split('|').next()?.parse::<i64>().ok())
        .sum()
}

/// A UDP listener standing in for StatsD.
pub struct StatsdListener {
    socket: UdpSocket,
    pub addr: SocketAddr,
}

impl StatsdListener {
    pub async fn bind() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        Self { socket, addr }
    }

    /// Every metric line received until the `count`-th one starting with `until` (inclusive).
    pub async fn lines_until(&self, until: &str, count: usize) -> Vec<String> {
        let mut buf = vec![0u8; 65536];
        let deadline = Instant::now() + PATIENCE;
        let (mut lines, mut seen) = (Vec::new(), 0);
        while seen < count {
            let received = tokio::time::timeout_at(deadline, self.socket.recv(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("fewer than {count} StatsD lines starting with {until}"))
                .unwrap();
            for line in String::from_utf8_lossy(&buf[..received]).lines() {
                seen += usize::from(line.starts_with(until));
                lines.push(line.to_owned());
            }
        }
        lines
    }

    /// Every line received so far (from the listener's start, or its last read), then on until
    /// `count` more lines starting with `until` arrive: with a gauge sent every second as `until`,
    /// everything the node sent before this call, counters included, is in the answer.
    /// (`lines_until` stops at the oldest such lines, which may predate what a test looks for.)
    pub async fn lines_through(&self, until: &str, count: usize) -> Vec<String> {
        let mut buf = vec![0u8; 65536];
        let mut lines = Vec::new();
        while let Ok(received) = self.socket.try_recv(&mut buf) {
            lines.extend(
                String::from_utf8_lossy(&buf[..received])
                    .lines()
                    .map(str::to_owned),
            );
        }
        lines.extend(self.lines_until(until, count).await);
        lines
    }

    /// Waits for a metric line starting with `prefix`; returns the line.
    pub async fn expect_line(&self, prefix: &str) -> String {
        let mut buf = vec![0u8; 65536];
        let deadline = Instant::now() + PATIENCE;
        loop {
            let received = tokio::time::timeout_at(deadline, self.socket.recv(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no StatsD line starting with {prefix}"))
                .unwrap();
            let packet = String::from_utf8_lossy(&buf[..received]).to_string();
            if let Some(line) = packet.lines().find(|l| l.starts_with(prefix)) {
                return line.to_owned();
            }
        }
    }
}
