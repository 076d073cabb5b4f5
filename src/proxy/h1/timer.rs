//! A timer armed once per connection and moved only when it fires before the deadline asked for.
//!
//! Every wait on the fast path (for the next head, for KMS's answer) has a deadline, and almost
//! every wait ends long before it. A fresh tokio timer per wait costs an insertion into the timer
//! wheel and a removal from it per request; this one stays armed across waits while their
//! deadlines move later, and re-arms itself when it fires early, so a wait that ends in time
//! costs no timer work.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// The wait took longer than its timeout.
#[derive(Debug)]
pub(super) struct Elapsed;

pub(super) struct LazyTimer {
    sleep: Pin<Box<Sleep>>,
}

impl LazyTimer {
    pub(super) fn new() -> LazyTimer {
        // Not registered with the timer wheel until first awaited; the first wait sets the
        // deadline.
        let unset = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        LazyTimer {
            sleep: Box::pin(tokio::time::sleep_until(unset)),
        }
    }

    /// Completes once `deadline` has passed, never before.
    pub(super) async fn until(&mut self, deadline: Instant) {
        if self.sleep.deadline() > deadline {
            self.sleep.as_mut().reset(deadline);
        }
        loop {
            self.sleep.as_mut().await;
            if Instant::now() >= deadline {
                return;
            }
            self.sleep.as_mut().reset(deadline);
        }
    }

    /// `work`'s output, unless `timeout` passes first.
    pub(super) async fn within<F: Future>(
        &mut self,
        timeout: Duration,
        work: F,
    ) -> Result<F::Output, Elapsed> {
        let deadline = Instant::now() + timeout;
        tokio::select! {
            biased;
            output = work => Ok(output),
            () = self.until(deadline) => Err(Elapsed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn fires_at_each_deadline_whether_it_moved_later_or_earlier() {
        let mut timer = LazyTimer::new();
        let start = Instant::now();
        timer.until(start + Duration::from_secs(5)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        // Later than the armed deadline: fires early, re-arms, fires at the deadline.
        let later = Instant::now() + Duration::from_secs(10);
        timer.until(later).await;
        assert_eq!(Instant::now(), later);
        // Earlier than the armed deadline: moved forward.
        let mut timer = LazyTimer::new();
        timer.until(Instant::now() + Duration::from_secs(30)).await;
        let _ = timer
            .within(Duration::from_secs(60), std::future::ready(()))
            .await;
        let sooner = Instant::now() + Duration::from_secs(2);
        timer.until(sooner).await;
        assert_eq!(Instant::now(), sooner);
    }

    #[tokio::test(start_paused = true)]
    async fn within_gives_the_work_or_elapsed() {
        let mut timer = LazyTimer::new();
        assert_eq!(
            timer
                .within(Duration::from_secs(1), async { 7 })
                .await
                .unwrap(),
            7
        );
        let start = Instant::now();
        let slow = tokio::time::sleep(Duration::from_secs(10));
        assert!(timer.within(Duration::from_secs(3), slow).await.is_err());
        assert_eq!(start.elapsed(), Duration::from_secs(3));
        // A wait that ended in time leaves the timer armed for later, not firing early.
        let quick = tokio::time::sleep(Duration::from_secs(1));
        assert!(timer.within(Duration::from_secs(5), quick).await.is_ok());
        let start = Instant::now();
        let slow = tokio::time::sleep(Duration::from_secs(60));
        assert!(timer.within(Duration::from_secs(4), slow).await.is_err());
        assert_eq!(start.elapsed(), Duration::from_secs(4));
    }
}
