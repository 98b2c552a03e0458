//! Closing the loop: every job started from a platform answers where it was asked for.
//!
//! [`Tracker`] is a [`JobObserver`]; register it on the engine (the example server does). For
//! a job started by a comment or a rule on a forge whose section has an API client
//! (`api_url`/`api_token`, or a GitHub App):
//!
//! 1. when the job is accepted, the triggering comment gets a 👀 reaction (GitHub and Gitea
//!    reactions, a GitLab award emoji) and the pull request or issue gets **one** tracking
//!    comment: the workflow's steps as a checklist and a link to the job;
//! 2. as steps start and finish, that same comment is edited in place — edits coalesced, at
//!    most one per `min_edit_interval` (1 s);
//! 3. when the job ends it shows the status, the summary (cut to the platform's limit), the
//!    duration, the cost, and the error's kind when it failed, timed out or was cancelled.
//!
//! Exactly one comment per job, across retries and instances: the instance that first claims
//! the job in the [`TrackingStore`] makes the comment; every other edits it. Edits are ordered
//! by the job event they show ([`TrackingStore::latest`]): a writer records its text before
//! editing and, after, writes again the newest text any instance recorded when it is newer
//! than its own, so a slow instance's edit of an older state never has the last word. Nothing here ever
//! blocks or fails the job: forge calls run in the background, retried through rate limits and
//! 5xx answers, and given up with a logged reason.
//!
//! Slack and Discord jobs are answered through the same observer: when they end, the Slack
//! `response_url` gets an ephemeral message and the deferred Discord answer is edited
//! ([`PlatformReplies`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aiwg_core::{Job, JobEvent, JobId, JobObserver};
use async_trait::async_trait;
use tokio::sync::Notify;

use crate::event::Platform;
use crate::forge::{CommentTarget, ForgeClient};
use crate::replies::PlatformReplies;

mod render;
mod store;

pub use render::{render, MARKER};
#[cfg(feature = "test-util")]
pub use store::tracking_store_suite;
#[cfg(feature = "postgres")]
pub use store::PgTrackingStore;
pub use store::{MemoryTrackingStore, TrackClaim, TrackingStore};

/// How long another instance's claim on a comment is waited for before it is taken over.
const STALE_CLAIM: Duration = Duration::from_secs(60);

/// How long a writer with nothing to send waits for the job's next event before it ends, by
/// default (see [`TrackerBuilder::idle_writer`]).
const IDLE_WRITER: Duration = Duration::from_secs(120);

/// Builds a [`Tracker`].
#[must_use]
pub struct TrackerBuilder {
    clients: HashMap<Platform, Arc<ForgeClient>>,
    store: Option<Arc<dyn TrackingStore>>,
    status_base: Option<String>,
    min_edit_interval: Duration,
    idle_writer: Duration,
    chat: Option<PlatformReplies>,
    owner: String,
}

impl std::fmt::Debug for TrackerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrackerBuilder")
            .field("platforms", &self.clients.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl TrackerBuilder {
    /// Answers jobs from `client`'s platform through it.
    pub fn forge(mut self, client: Arc<ForgeClient>) -> Self {
        self.clients.insert(client.platform(), client);
        self
    }

    /// Where tracking comments are claimed (default: in memory; use `PgTrackingStore` when
    /// several instances share a database).
    pub fn store(mut self, store: Arc<dyn TrackingStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// The public URL of the API (`https://ci.example.com/aiwg`): comments link to
    /// `{base}/workflows/{id}/status`. Without it they name the job id.
    pub fn status_base(mut self, base: impl Into<String>) -> Self {
        self.status_base = Some(base.into().trim_end_matches('/').to_owned());
        self
    }

    /// The shortest time between two edits of one comment (default 1 s).
    pub fn min_edit_interval(mut self, every: Duration) -> Self {
        self.min_edit_interval = every;
        self
    }

    /// How long a job's comment writer with nothing to send waits for the job's next event
    /// before it ends (default 2 min; the next event starts another). With several instances a
    /// job's later events may all be published on another: a writer waiting for the job's end
    /// would wait for ever, a task and an entry per job.
    pub fn idle_writer(mut self, after: Duration) -> Self {
        self.idle_writer = after;
        self
    }

    /// Answers Slack and Discord jobs too.
    pub fn chat(mut self, replies: PlatformReplies) -> Self {
        self.chat = Some(replies);
        self
    }

    /// This instance's name in comment claims (default: random).
    pub fn instance(mut self, name: impl Into<String>) -> Self {
        self.owner = name.into();
        self
    }

    /// Builds the observer.
    pub fn build(self) -> Tracker {
        Tracker {
            inner: Arc::new(Inner {
                clients: self.clients,
                store: self
                    .store
                    .unwrap_or_else(|| Arc::new(MemoryTrackingStore::new())),
                status_base: self.status_base,
                min_edit_interval: self.min_edit_interval,
                idle_writer: self.idle_writer,
                chat: self.chat,
                owner: self.owner,
                jobs: Mutex::default(),
                idle: Notify::new(),
            }),
        }
    }
}

struct Inner {
    clients: HashMap<Platform, Arc<ForgeClient>>,
    store: Arc<dyn TrackingStore>,
    status_base: Option<String>,
    min_edit_interval: Duration,
    idle_writer: Duration,
    chat: Option<PlatformReplies>,
    owner: String,
    /// Jobs with a comment writer running on this instance.
    jobs: Mutex<HashMap<JobId, Arc<Latest>>>,
    /// Notified whenever a writer finishes (for [`Tracker::idle`]).
    idle: Notify,
}

/// The newest text for one job's comment, and a wake-up for its writer.
#[derive(Default)]
struct Latest {
    text: Mutex<Option<Text>>,
    wake: Notify,
}

/// A job's comment as one of its events left it.
struct Text {
    text: String,
    /// The job had ended.
    terminal: bool,
    /// The event's sequence number: texts of one job are ordered by it across instances.
    seq: u64,
}

/// Answers jobs on the platform that started them; see the [module docs](self).
#[derive(Clone)]
pub struct Tracker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("platforms", &self.inner.clients.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Where a job's comment goes, from its trigger.
fn target_of(job: &Job) -> Option<CommentTarget> {
    let t = &job.trigger;
    let repo = t.repo.clone()?;
    let (number, pull_request) = match (t.pr, t.issue) {
        (Some(n), _) => (n, true),
        (None, Some(n)) => (n, false),
        _ => return None,
    };
    let installation = t.extra.get("installation_id").and_then(|i| i.parse().ok());
    Some(CommentTarget::new(repo, number, pull_request).installation(installation))
}

impl Tracker {
    /// A builder without forges.
    pub fn builder() -> TrackerBuilder {
        TrackerBuilder {
            clients: HashMap::new(),
            store: None,
            status_base: None,
            min_edit_interval: Duration::from_secs(1),
            idle_writer: IDLE_WRITER,
            chat: None,
            owner: format!("aiwg-{}", JobId::new()),
        }
    }

    /// The forge client for `platform`, if one is configured.
    #[must_use]
    pub fn client(&self, platform: Platform) -> Option<&Arc<ForgeClient>> {
        self.inner.clients.get(&platform)
    }

    /// Waits until no comment writer runs on this instance (tests and shutdown), or `timeout`.
    /// Returns whether it is idle.
    pub async fn idle(&self, timeout: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.inner.idle.notified();
                if self.inner.jobs.lock().map(|j| j.is_empty()).unwrap_or(true) {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    fn status_url(&self, job: &Job) -> Option<String> {
        self.inner
            .status_base
            .as_ref()
            .map(|b| format!("{b}/workflows/{}/status", job.id))
    }
}

#[async_trait]
impl JobObserver for Tracker {
    async fn on_event(&self, job: &Job, event: &JobEvent) {
        let source = job.trigger.source.as_str();
        if matches!(source, "slack" | "discord") {
            if let (Some(chat), true) = (&self.inner.chat, job.is_terminal()) {
                let (chat, job, event) = (chat.clone(), job.clone(), event.clone());
                tokio::spawn(async move { chat.on_event(&job, &event).await });
            }
            return;
        }
        let Ok(platform) = source.parse::<Platform>() else {
            return;
        };
        let Some(client) = self.inner.clients.get(&platform).cloned() else {
            return;
        };
        let Some(target) = target_of(job) else {
            return;
        };
        let text = render(job, platform, self.status_url(job).as_deref());
        let terminal = job.is_terminal();
        let seq = event.seq;
        let (latest, fresh) = {
            let mut jobs = self
                .inner
                .jobs
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let (latest, fresh) = match jobs.get(&job.id) {
                Some(l) => (Arc::clone(l), false),
                None => {
                    let l = Arc::new(Latest::default());
                    jobs.insert(job.id, Arc::clone(&l));
                    (l, true)
                }
            };
            // Under the map's lock: a writer that ends for want of work checks for text under
            // it too, so none is left with nobody to write it.
            *latest
                .text
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Text {
                text,
                terminal,
                seq,
            });
            (latest, fresh)
        };
        latest.wake.notify_one();
        if fresh {
            let writer = Writer {
                tracker: self.clone(),
                client,
                target,
                job: job.id,
                created: job.created_at,
                trigger_comment: job.trigger.extra.get("comment_id").cloned(),
                review_comment: job.trigger.extra.get("platform_event").map(String::as_str)
                    == Some("pull_request_review_comment"),
                latest,
            };
            tokio::spawn(writer.run());
        }
    }
}

/// Writes one job's comment on this instance until the job ends.
struct Writer {
    tracker: Tracker,
    client: Arc<ForgeClient>,
    target: CommentTarget,
    job: JobId,
    /// When the job was made: its comment cannot be older.
    created: chrono::DateTime<chrono::Utc>,
    trigger_comment: Option<String>,
    review_comment: bool,
    latest: Arc<Latest>,
}

impl Writer {
    async fn run(self) {
        let inner = &self.tracker.inner;
        let mut comment: Option<String> = None;
        let mut written: Option<String> = None;
        loop {
            if tokio::time::timeout(inner.idle_writer, self.latest.wake.notified())
                .await
                .is_err()
                && self.end_if_idle()
            {
                return;
            }
            let Some(Text {
                text,
                terminal,
                seq,
            }) = self
                .latest
                .text
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take()
            else {
                continue;
            };
            if comment.is_none() {
                match self.comment_id(&text).await {
                    Ok((id, created)) => {
                        if created {
                            written = Some(text.clone());
                        }
                        comment = Some(id);
                    }
                    Err(why) => {
                        tracing::warn!(job = %self.job, platform = %self.client.platform(), reason = %why, "could not make the tracking comment");
                    }
                }
            }
            if let Some(id) = &comment {
                self.edit(id, seq, text, &mut written).await;
            }
            if terminal {
                break;
            }
            tokio::time::sleep(inner.min_edit_interval).await;
        }
        inner
            .jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.job);
        inner.idle.notify_waiters();
    }

    /// Brings the comment to the newest text any instance recorded (this one's, `text` of
    /// event `seq`, unless another recorded a later one). After each edit the newest is asked
    /// again: another instance's later text, recorded while this edit was on its way, may
    /// have been written before this one landed, and is then written again, so the last edit
    /// to land shows the latest state.
    async fn edit(&self, id: &str, mut seq: u64, mut text: String, written: &mut Option<String>) {
        let store = &self.tracker.inner.store;
        for _ in 0..4 {
            let (newest_seq, newest) = match store.latest(self.job, seq, &text).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(job = %self.job, error = %e, "could not compare the tracking comment with other instances'");
                    (seq, text)
                }
            };
            if written.as_deref() != Some(newest.as_str()) {
                match self.client.edit_comment(&self.target, id, &newest).await {
                    Ok(()) => *written = Some(newest.clone()),
                    Err(e) => {
                        tracing::warn!(job = %self.job, error = %e, "could not edit the tracking comment");
                        return;
                    }
                }
            }
            // Asked again with what was just written: a later text recorded meanwhile comes
            // back newer.
            match store.latest(self.job, newest_seq, &newest).await {
                Ok((after, later)) if after > newest_seq => {
                    seq = after;
                    text = later;
                }
                _ => return,
            }
        }
    }

    /// Ends this writer when no text waits for it (checked under the map's lock, where
    /// `on_event` leaves text): `false` when some arrived meanwhile.
    fn end_if_idle(&self) -> bool {
        let inner = &self.tracker.inner;
        {
            let mut jobs = inner
                .jobs
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let waiting = self
                .latest
                .text
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .is_some();
            if waiting {
                return false;
            }
            jobs.remove(&self.job);
        }
        inner.idle.notify_waiters();
        true
    }

    /// The job's comment: made now (`true`) when this instance wins the claim, else the one
    /// another instance made (waited for while it is being made).
    async fn comment_id(&self, text: &str) -> Result<(String, bool), String> {
        let inner = &self.tracker.inner;
        for _ in 0..120 {
            let claim = inner
                .store
                .claim(self.job, &inner.owner, STALE_CLAIM)
                .await
                .map_err(|e| e.to_string())?;
            match claim {
                TrackClaim::Existing(id) => return Ok((id, false)),
                TrackClaim::Pending => tokio::time::sleep(Duration::from_millis(500)).await,
                TrackClaim::TakenOver => {
                    // Whoever held the claim may have made the comment and not recorded it.
                    let found = self
                        .client
                        .find_comment(&self.target, &self.marker(), self.since())
                        .await;
                    match found {
                        Ok(Some(id)) => {
                            inner
                                .store
                                .set(self.job, &id)
                                .await
                                .map_err(|e| e.to_string())?;
                            return Ok((id, false));
                        }
                        Ok(None) => return self.create(text).await,
                        Err(e) => {
                            // Creating blind could make a second comment: give the claim
                            // back, so a later event (or instance) looks again.
                            let _ = inner.store.release(self.job, &inner.owner).await;
                            return Err(e.to_string());
                        }
                    }
                }
                TrackClaim::Mine => return self.create(text).await,
            }
        }
        Err("another instance never finished making the comment".into())
    }

    /// Reacts to the triggering comment and makes the job's comment (this instance holds the
    /// claim), then records its id.
    async fn create(&self, text: &str) -> Result<(String, bool), String> {
        let inner = &self.tracker.inner;
        if let Some(c) = &self.trigger_comment {
            if let Err(e) = self
                .client
                .react(&self.target, c, self.review_comment)
                .await
            {
                tracing::info!(job = %self.job, error = %e, "could not react to the triggering comment");
            }
        }
        let made = self
            .client
            .create_comment_marked(&self.target, text, &self.marker(), self.since())
            .await;
        match made {
            Ok(id) => {
                inner
                    .store
                    .set(self.job, &id)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok((id, true))
            }
            Err(e) => {
                let _ = inner.store.release(self.job, &inner.owner).await;
                Err(e.to_string())
            }
        }
    }

    /// The line that names this job in its comment.
    fn marker(&self) -> String {
        format!("{MARKER}{} -->", self.job)
    }

    /// Comments older than this cannot be the job's (a minute of clock skew allowed).
    fn since(&self) -> chrono::DateTime<chrono::Utc> {
        self.created - chrono::Duration::minutes(1)
    }
}
