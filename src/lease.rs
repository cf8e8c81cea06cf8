//! A held task's lease as this process knows it, and writes that keep
//! trying while the lease lasts.
//!
//! The database holds the lease (`lease_expires_at`, set from its clock);
//! the process keeps a conservative copy: the moment the claim or the last
//! renewal was *sent*, plus the lease. The database set its expiry later
//! than that, so while this copy has not run out, no other worker can have
//! taken the task. That is what lets a write of the task's outcome or
//! checkpoint keep trying through a database outage: until then, the task
//! is still ours to finish.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::db::is_transient;

/// The local deadline of one held run's lease, shared by the heartbeat
/// (which moves it on) and whatever writes for the run.
#[derive(Debug, Clone)]
pub(crate) struct Lease(Arc<Mutex<Instant>>);

impl Lease {
    /// A lease of `length` asked for at `sent_at`.
    pub(crate) fn new(sent_at: Instant, length: Duration) -> Self {
        Lease(Arc::new(Mutex::new(sent_at + length)))
    }

    /// The renewal sent at `sent_at` landed.
    pub(crate) fn renewed(&self, sent_at: Instant, length: Duration) {
        let mut until = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        *until = (*until).max(sent_at + length);
    }

    /// When the lease runs out at the latest, as far as this process knows.
    pub(crate) fn until(&self) -> Instant {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether it may have run out.
    pub(crate) fn expired(&self) -> bool {
        Instant::now() >= self.until()
    }
}

/// First pause between two tries of a write that failed.
const FIRST_PAUSE: Duration = Duration::from_millis(100);
/// Longest pause between two tries.
const LONGEST_PAUSE: Duration = Duration::from_secs(2);

/// Runs `write` until it succeeds, fails for a reason trying again cannot
/// mend (a data error, a constraint), or the lease runs out: then the last
/// error is returned. The last try is made at the lease's end, so an outage
/// that ends just in time still lets the write land.
pub(crate) async fn while_held<T, E, F, Fut>(lease: &Lease, mut write: F) -> Result<T, E>
where
    E: Failure,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut pause = FIRST_PAUSE;
    loop {
        // A try that hangs (a pool waiting for a connection that will not
        // come) must not outlive the lease either.
        let left = lease.until().saturating_duration_since(Instant::now());
        let tried = match tokio::time::timeout(left.max(FIRST_PAUSE), write()).await {
            Ok(result) => result,
            Err(_) => Err(E::timed_out()),
        };
        match tried {
            Ok(value) => return Ok(value),
            Err(e) if !e.is_transient() || lease.expired() => return Err(e),
            Err(e) => {
                tracing::debug!(error = %e, retry_in = ?pause, "write failed; trying again while the lease lasts");
                let wake = (Instant::now() + pause).min(lease.until());
                tokio::time::sleep_until(wake).await;
                pause = (pause * 2).min(LONGEST_PAUSE);
            }
        }
    }
}

/// A failed write, as [`while_held`] needs to know it.
pub(crate) trait Failure: std::fmt::Display {
    /// Whether trying again may work.
    fn is_transient(&self) -> bool;
    /// A try that took too long.
    fn timed_out() -> Self;
}

impl Failure for sqlx::Error {
    fn is_transient(&self) -> bool {
        is_transient(self)
    }

    fn timed_out() -> Self {
        sqlx::Error::PoolTimedOut
    }
}
