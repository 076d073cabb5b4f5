//! The process-wide budget of tag-bearing bodies read whole (`[limits].max_buffered_body_bytes`).
//!
//! A tag change's body is read whole before it is judged; every connection and every HTTP/2
//! stream may be reading one at once, so without a shared bound their sum grows with
//! `max_connections × max_concurrent_streams × max_body_bytes`. Each body read whole holds a
//! [`Reservation`] of its size (its Content-Length up front when it declares one, else as it
//! grows) for as long as its bytes are held; past the budget the tag change is refused with
//! [`ProxyError::BodyBudget`] (503, retryable) and requests streamed through are untouched.
//! Dropping the reservation gives its bytes back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use crate::answer::ProxyError;
use crate::metrics::Metrics;

/// The budget: how many bytes of tag-bearing bodies may be held at once, and how many are.
pub(crate) struct BodyBudget {
    limit: u64,
    in_use: AtomicU64,
    metrics: Arc<Metrics>,
}

impl BodyBudget {
    pub(crate) fn new(limit: u64, metrics: Arc<Metrics>) -> Arc<BodyBudget> {
        metrics.body_budget_limit(limit);
        Arc::new(BodyBudget {
            limit,
            in_use: AtomicU64::new(0),
            metrics,
        })
    }

    /// Reserves `bytes` for a body about to be read, or refuses the tag change.
    pub(crate) fn reserve(self: &Arc<Self>, bytes: u64) -> Result<Reservation, ProxyError> {
        let mut reservation = Reservation {
            budget: Arc::clone(self),
            bytes: 0,
        };
        reservation.grow_to(bytes)?;
        Ok(reservation)
    }

    /// Bytes reserved now.
    #[cfg(test)]
    fn in_use(&self) -> u64 {
        self.in_use.load(Ordering::Relaxed)
    }

    fn take(&self, bytes: u64) -> Result<(), ProxyError> {
        let taken = self
            .in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |in_use| {
                in_use.checked_add(bytes).filter(|&sum| sum <= self.limit)
            });
        match taken {
            Ok(_) => {
                self.metrics.body_budget_used(bytes_i64(bytes));
                Ok(())
            }
            Err(_) => {
                self.metrics.body_budget_refused();
                Err(ProxyError::BodyBudget { limit: self.limit })
            }
        }
    }

    fn give_back(&self, bytes: u64) {
        self.in_use.fetch_sub(bytes, Ordering::AcqRel);
        self.metrics.body_budget_used(-bytes_i64(bytes));
    }
}

fn bytes_i64(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

/// Bytes of the budget held for one body; given back when dropped.
pub(crate) struct Reservation {
    budget: Arc<BodyBudget>,
    bytes: u64,
}

impl Reservation {
    /// Holds `bytes` in all (no change when it already holds as many).
    pub(crate) fn grow_to(&mut self, bytes: u64) -> Result<(), ProxyError> {
        if bytes > self.bytes {
            self.budget.take(bytes - self.bytes)?;
            self.bytes = bytes;
        }
        Ok(())
    }

    /// The bytes it holds.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The body read whole, as `Bytes` that hold this reservation until the last of them is
    /// dropped (wherever they travel: into the request sent to KMS, another task).
    pub(crate) fn attach(self, body: Vec<u8>) -> Bytes {
        Bytes::from_owner(Held {
            body,
            _reservation: self,
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.give_back(self.bytes);
        }
    }
}

/// A body and the reservation that pays for it.
struct Held {
    body: Vec<u8>,
    _reservation: Reservation,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_bounded_and_given_back_when_dropped() {
        let metrics = Arc::new(Metrics::new());
        let budget = BodyBudget::new(100, Arc::clone(&metrics));
        let a = budget.reserve(60).unwrap();
        let mut b = budget.reserve(30).unwrap();
        assert_eq!(
            budget.reserve(11).err(),
            Some(ProxyError::BodyBudget { limit: 100 })
        );
        assert_eq!(
            b.grow_to(41).err(),
            Some(ProxyError::BodyBudget { limit: 100 })
        );
        b.grow_to(40).unwrap();
        b.grow_to(10).unwrap(); // never shrinks while held
        assert_eq!(budget.in_use(), 100);
        drop(a);
        assert_eq!(budget.in_use(), 40);
        let bytes = b.attach(vec![7; 40]);
        let clone = bytes.clone();
        drop(bytes);
        assert_eq!(budget.in_use(), 40, "a clone still holds the body");
        assert_eq!(&clone[..], &[7; 40][..]);
        drop(clone);
        assert_eq!(budget.in_use(), 0);
        let text = metrics.encode();
        assert!(
            text.contains("kms_tag_guard_buffered_body_bytes 0"),
            "{text}"
        );
        assert!(
            text.contains("kms_tag_guard_body_budget_refusals_total 2"),
            "{text}"
        );
        assert!(
            text.contains("kms_tag_guard_buffered_body_bytes_max 100"),
            "{text}"
        );
    }
}
