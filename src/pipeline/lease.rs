//! A worker node's hold on one partition, as the work done under it sees it.
//!
//! Two fences keep a node that lost a partition from delivering its users' events beside the new
//! owner (a node stalled for longer than its lease by SIGSTOP, a long pause or an overloaded box):
//!
//! - **Before the broadcast**, a lane checks that the lease is still trusted here: renewed within
//!   [`TRUST_FRACTION`] of a lease (measured on this node's monotonic clock from before the renewal
//!   was sent, so never later than PostgreSQL's expiry) and not revoked (the coordinator saw it
//!   taken). An event refused there is not attempted: its message goes back to the queue.
//! - **At the outcome write**, the lease's epoch is the fencing token: PostgreSQL stores an outcome
//!   only while the epoch is still the partition's and the node still its owner
//!   (`Store::record_attempts`). A node that passed the first check and then stalled past its lease
//!   has its outcomes refused, and its messages go back too.
//!
//! What a stall between the first check and the broadcast's arrival can still let through is a
//! copy of a committed event: the socket's order guard drops it if already pushed, or pushes it in
//! seq order after filling what precedes it. It can cost a repair, never a hole.

use crate::store::LeaseToken;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// How much of a lease a renewal is trusted for on this node. The coordinator also stops consuming
/// a partition it could not renew for this long, so a node never competes with a next owner.
pub const TRUST_FRACTION: (u32, u32) = (3, 5);

/// How long a renewal of a lease of `lease` is trusted for.
pub fn trusted_for(lease: Duration) -> Duration {
    lease * TRUST_FRACTION.0 / TRUST_FRACTION.1
}

/// One partition lease held by this node; shared (`Arc`) by the partition's consumer and every
/// event in work under it.
#[derive(Debug)]
pub struct Lease {
    token: LeaseToken,
    trust: Duration,
    // A std Mutex: held only to read or move the instant, never across an await.
    trusted_until: Mutex<Instant>,
    revoked: AtomicBool,
}

impl Lease {
    /// The lease `token`, taken by a renewal sent at `renewed_at`; each renewal is trusted for
    /// `trust`.
    pub fn new(token: LeaseToken, renewed_at: Instant, trust: Duration) -> Self {
        Self {
            token,
            trust,
            trusted_until: Mutex::new(renewed_at + trust),
            revoked: AtomicBool::new(false),
        }
    }

    /// The lease's fencing token.
    pub fn token(&self) -> LeaseToken {
        self.token
    }

    /// A renewal sent at `at` succeeded: the lease is trusted for another `trust` from then.
    pub fn renewed(&self, at: Instant) {
        let mut until = self.trusted_until.lock().unwrap_or_else(|e| e.into_inner());
        *until = (*until).max(at + self.trust);
    }

    /// The lease is gone (another node took it): nothing more may be delivered under it.
    pub fn revoke(&self) {
        self.revoked.store(true, Ordering::Release);
    }

    /// Whether work may still be delivered under this lease now.
    pub fn is_trusted(&self) -> bool {
        self.is_trusted_at(Instant::now())
    }

    fn is_trusted_at(&self, now: Instant) -> bool {
        !self.revoked.load(Ordering::Acquire)
            && now < *self.trusted_until.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: LeaseToken = LeaseToken {
        partition: 3,
        epoch: 7,
    };

    #[test]
    fn a_lease_is_trusted_until_its_renewal_ages_out_or_it_is_revoked() {
        let start = Instant::now();
        let trust = trusted_for(Duration::from_secs(5));
        assert_eq!(trust, Duration::from_secs(3));
        let lease = Lease::new(TOKEN, start, trust);
        assert!(lease.is_trusted_at(start + Duration::from_millis(2_999)));
        assert!(
            !lease.is_trusted_at(start + trust),
            "a stalled node wakes up untrusted"
        );
        lease.renewed(start + Duration::from_secs(2));
        assert!(lease.is_trusted_at(start + Duration::from_millis(4_999)));
        // A late answer to an older renewal never shortens the trust.
        lease.renewed(start);
        assert!(lease.is_trusted_at(start + Duration::from_millis(4_999)));
        lease.revoke();
        assert!(!lease.is_trusted_at(start));
        assert_eq!(lease.token(), TOKEN);
    }
}
