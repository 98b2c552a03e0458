//! A job's `queued` event goes out before its `running` one.
//!
//! A submit stores the job, then publishes its `queued` event. Between the two, the job is
//! already claimable: a worker polling, or finishing another job, may claim it and publish
//! `running` (and, for a quick job, every event up to `completed`) before the submitter
//! publishes `queued`, and a follower of the engine's feed (`GET /events`) would see the job
//! complete, then queue. So a submit marks its jobs as not yet announced until their `queued`
//! event is published (or the submit ends otherwise), and a worker that claimed such a job
//! waits for that before it publishes anything of the job.

use std::sync::Mutex;

use tokio::sync::Notify;

use crate::fast_hash::FastSet;
use crate::job::JobId;

/// The jobs submitted here whose `queued` event is not published yet.
#[derive(Default)]
pub(super) struct Unannounced {
    jobs: Mutex<FastSet<JobId>>,
    announced: Notify,
}

impl Unannounced {
    fn lock(&self) -> std::sync::MutexGuard<'_, FastSet<JobId>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `id` as not announced until the guard is dropped.
    pub(super) fn mark(&self, id: JobId) -> Pending<'_> {
        self.lock().insert(id);
        Pending { set: self, id }
    }

    /// Waits until `id` is announced (at once when it was, or was not submitted here).
    pub(super) async fn wait(&self, id: JobId) {
        loop {
            let announced = self.announced.notified();
            tokio::pin!(announced);
            // Registered before the check, so an announcement between the two is not missed.
            announced.as_mut().enable();
            if !self.lock().contains(&id) {
                return;
            }
            announced.await;
        }
    }
}

/// A job marked as not announced; announced when dropped (after its `queued` event was
/// published, or when the submit failed or was dropped midway).
pub(super) struct Pending<'a> {
    set: &'a Unannounced,
    id: JobId,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.set.lock().remove(&self.id);
        self.set.announced.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn a_worker_waits_for_the_announcement_and_no_longer() {
        let set = Arc::new(Unannounced::default());
        let id = JobId::new();
        // Never marked: no wait.
        tokio::time::timeout(Duration::from_secs(5), set.wait(id))
            .await
            .expect("an unmarked job is announced");
        let pending = set.mark(id);
        let waiter = tokio::spawn({
            let set = Arc::clone(&set);
            async move { set.wait(id).await }
        });
        tokio::task::yield_now().await;
        assert!(
            !waiter.is_finished(),
            "the worker waits while the job is marked"
        );
        drop(pending);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the announcement wakes the worker")
            .unwrap();
    }
}
