//! What a request holds while it is taken in: its share of the global budget for buffered request
//! bytes, and (once its body is complete) its in-flight slot.
//!
//! The listener makes one `Intake` per request and counts the body's bytes against the budget as
//! they arrive; the surface adds what parsing the JSON will cost before it parses. The bytes are
//! given back when the handler returns, the slot when the answer's last byte is sent.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::OwnedSemaphorePermit;

use super::error::GatewayError;

/// Bytes all requests together may hold (`--max-buffered-request-bytes`).
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
    /// `portcullis_request_buffer_bytes`.
    gauge: Gauge,
}

impl Budget {
    pub fn new(limit: usize, gauge: Gauge) -> Self {
        Budget {
            limit,
            used: AtomicUsize::new(0),
            gauge,
        }
    }

    /// Bytes held right now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn take(&self, n: usize) -> bool {
        let taken = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|after| *after <= self.limit)
            })
            .is_ok();
        if taken {
            self.gauge.inc_by(i64::try_from(n).unwrap_or(i64::MAX));
        }
        taken
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
        self.gauge.dec_by(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

/// One request's holdings.
#[derive(Debug)]
pub struct Intake {
    budget: Arc<Budget>,
    charged: AtomicUsize,
    slot: OnceLock<OwnedSemaphorePermit>,
    /// The body was read to its end.
    read: AtomicBool,
}

impl Intake {
    pub fn new(budget: Arc<Budget>) -> Self {
        Intake {
            budget,
            charged: AtomicUsize::new(0),
            slot: OnceLock::new(),
            read: AtomicBool::new(false),
        }
    }

    /// Counts `n` more bytes against the budget; a 503 when it is spent.
    pub fn charge(&self, n: usize) -> Result<(), GatewayError> {
        if n == 0 {
            return Ok(());
        }
        if !self.budget.take(n) {
            return Err(GatewayError::BuffersFull);
        }
        self.charged.fetch_add(n, Ordering::AcqRel);
        Ok(())
    }

    /// Gives back every byte charged so far (the request's buffers are gone).
    pub fn release(&self) {
        let n = self.charged.swap(0, Ordering::AcqRel);
        if n > 0 {
            self.budget.give(n);
        }
    }

    /// Holds `slot` until this request's answer is finished.
    pub fn hold(&self, slot: OwnedSemaphorePermit) {
        let _ = self.slot.set(slot);
    }

    pub fn holds_slot(&self) -> bool {
        self.slot.get().is_some()
    }

    /// The body reached its end (the listener's reader says so).
    pub fn mark_read(&self) {
        self.read.store(true, Ordering::Release);
    }

    /// Whether the body was read to its end: if not, the connection cannot carry another request.
    pub fn was_read(&self) -> bool {
        self.read.load(Ordering::Acquire)
    }
}

tokio::task_local! {
    /// The request the listener is taking in, for the middleware that hands it to the surface:
    /// a task-local around the router's call costs no allocation, a request extension two.
    static CURRENT: Arc<Intake>;
}

/// Runs `f` (the router's handling of one request) with `intake` as the current request's.
pub fn scope<F: Future>(intake: Arc<Intake>, f: F) -> impl Future<Output = F::Output> {
    CURRENT.scope(intake, f)
}

/// The current request's intake, when served through the listener.
pub fn current() -> Option<Arc<Intake>> {
    CURRENT.try_with(Arc::clone).ok()
}

impl Drop for Intake {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_shared_and_given_back() {
        let gauge = Gauge::default();
        let budget = Arc::new(Budget::new(100, gauge.clone()));
        let a = Intake::new(budget.clone());
        let b = Intake::new(budget.clone());
        assert!(a.charge(60).is_ok());
        assert!(matches!(b.charge(50), Err(GatewayError::BuffersFull)));
        assert!(b.charge(40).is_ok());
        assert_eq!(budget.used(), 100);
        a.release();
        assert_eq!(budget.used(), 40);
        assert_eq!(gauge.get(), 40);
        drop(b);
        assert_eq!(budget.used(), 0);
        assert_eq!(gauge.get(), 0);
    }
}
