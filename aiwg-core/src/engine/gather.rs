//! Gathering a claim: while the jobs of the last claim still run, the worker about to claim
//! waits a moment for them, so that one claim brings work for all of them.
//!
//! Workers claim one at a time, for themselves and every idle worker (see `worker::run`). On a
//! store whose claim is a round trip (PostgreSQL: about a millisecond), the worker whose job
//! of a claim ended first used to claim at once, for the one or two workers idle then; the
//! others ended while that claim was on its way and waited for it, then for the next. With
//! quick jobs the claims so alternated between one and three jobs on four workers, and every
//! job waited for a round trip or two. Now the worker about to claim (it holds the claiming
//! turn, and nothing waits to be handed over) waits while other workers' jobs run, until they
//! have all ended or half an average claim's round trip (at most 5 ms) has passed since the
//! last claim was answered, then claims for every worker idle by then. Jobs that run longer
//! than that are not waited for again, so a long job costs its neighbours that moment once,
//! and a store that answers at once (the memory store, a few microseconds) is never waited
//! for.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Claims that take less than this on average are not waited for (the memory store's take a
/// few microseconds; a timer would cost more than it could save).
const SHORTEST: Duration = Duration::from_micros(200);
/// The longest a worker waits after a claim was answered, whatever the claims take.
const LONGEST: Duration = Duration::from_millis(5);

/// What the claiming worker knows of the claims so far: kept with the claiming turn (the
/// engine's `claiming` lock), which only one worker holds at a time.
#[derive(Default)]
pub(super) struct ClaimTimes {
    /// The claims' average round trip, weighted toward the latest ones.
    average: Duration,
    /// When the last claim was answered (none yet: `None`).
    answered: Option<Instant>,
}

impl ClaimTimes {
    /// Notes that a claim sent at `sent` was answered now.
    pub(super) fn claimed(&mut self, sent: Instant) {
        let now = Instant::now();
        let took = now.saturating_duration_since(sent);
        self.average = match self.answered {
            None => took,
            Some(_) => (self.average * 3 + took) / 4,
        };
        self.answered = Some(now);
    }

    /// Until when the claiming worker may wait for the jobs of the last claim: none when
    /// claims answer at once.
    fn deadline(&self) -> Option<Instant> {
        let answered = self.answered?;
        (self.average >= SHORTEST).then(|| answered + (self.average / 2).min(LONGEST))
    }
}

/// How the claiming worker hears of the jobs that end while it waits.
#[derive(Default)]
pub(super) struct Gather {
    /// Workers waiting in [`Gather::wait`]: a job's end wakes them only then.
    waiting: AtomicUsize,
    /// Woken when a job's work ends while a worker waits.
    ended: Notify,
}

impl Gather {
    /// Notes that a job's work ended (after `busy` was counted down for it).
    pub(super) fn job_ended(&self) {
        // Sequentially consistent with `wait`'s count and its read of `busy`: either this sees
        // the waiter, or the waiter sees `busy` without this job.
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.ended.notify_waiters();
        }
    }

    /// Waits, with the claiming turn (and its `times`), until no job runs beside this worker
    /// (`busy` is 0), the engine stops claiming, or the deadline after the last claim passes.
    /// Answers whether it waited at all.
    pub(super) async fn wait(
        &self,
        times: &ClaimTimes,
        busy: &AtomicUsize,
        stop: &CancellationToken,
    ) -> bool {
        let Some(deadline) = times.deadline() else {
            return false;
        };
        if Instant::now() >= deadline || busy.load(Ordering::SeqCst) == 0 {
            return false;
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if busy.load(Ordering::SeqCst) == 0 || stop.is_cancelled() {
                break;
            }
            tokio::select! {
                () = ended => {}
                () = tokio::time::sleep_until(deadline) => break,
                () = stop.cancelled() => break,
            }
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Claim times whose last claim took `took` and was answered now.
    fn after_a_claim_of(took: Duration) -> ClaimTimes {
        let mut t = ClaimTimes::default();
        t.claimed(Instant::now() - took);
        t
    }

    #[tokio::test(start_paused = true)]
    async fn quick_claims_are_not_waited_for_and_slow_ones_for_half_their_round_trip() {
        assert_eq!(
            ClaimTimes::default().deadline(),
            None,
            "no claim answered yet"
        );
        assert_eq!(after_a_claim_of(Duration::from_micros(20)).deadline(), None);
        let now = Instant::now();
        let mut t = after_a_claim_of(Duration::from_millis(1));
        assert_eq!(t.deadline(), Some(now + Duration::from_micros(500)));
        // Weighted toward the latest: 1 ms then 3 ms → 1.5 ms.
        t.claimed(Instant::now() - Duration::from_millis(3));
        assert_eq!(t.deadline(), Some(now + Duration::from_micros(750)));
        let t = after_a_claim_of(Duration::from_secs(1));
        assert_eq!(t.deadline(), Some(now + LONGEST));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_worker_goes_on_when_the_last_job_beside_it_ends() {
        let g = Arc::new(Gather::default());
        let times = after_a_claim_of(Duration::from_secs(1));
        let busy = Arc::new(AtomicUsize::new(2));
        let stop = CancellationToken::new();
        let waiter = {
            let (g, busy, stop) = (g.clone(), busy.clone(), stop.clone());
            tokio::spawn(async move {
                let start = Instant::now();
                assert!(g.wait(&times, &busy, &stop).await);
                start.elapsed()
            })
        };
        // Until it waits.
        while g.waiting.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        busy.fetch_sub(1, Ordering::SeqCst);
        g.job_ended();
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "one job still runs beside it");
        busy.fetch_sub(1, Ordering::SeqCst);
        g.job_ended();
        let waited = waiter.await.unwrap();
        assert_eq!(waited, Duration::ZERO, "it went on when the last job ended");
        assert_eq!(g.waiting.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_waits_no_longer_than_the_deadline_nor_while_the_engine_stops() {
        let g = Gather::default();
        let times = after_a_claim_of(Duration::from_millis(1));
        let busy = AtomicUsize::new(1);
        let stop = CancellationToken::new();
        let start = Instant::now();
        assert!(g.wait(&times, &busy, &stop).await);
        // The deadline, rounded up to the timer's millisecond.
        let waited = start.elapsed();
        assert!(
            (Duration::from_micros(500)..=Duration::from_millis(1)).contains(&waited),
            "{waited:?}"
        );
        // Past the deadline the job beside it is not a quick one: no wait.
        let start = Instant::now();
        assert!(!g.wait(&times, &busy, &stop).await);
        let times = after_a_claim_of(Duration::from_millis(1));
        stop.cancel();
        assert!(g.wait(&times, &busy, &stop).await);
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "a stopping engine claims nothing more"
        );
        busy.store(0, Ordering::SeqCst);
        assert!(
            !g.wait(&times, &busy, &stop).await,
            "nothing runs beside it"
        );
    }
}
