//! The triggers that many jobs have in common, shared.
//!
//! A job's trigger never changes after the submit, and its copies share it (`Job::trigger` is
//! an `Arc`). Most triggers say little: every request of the HTTP API names only its source
//! (`api`) and the key that made it (`actor`), and a request built with `JobRequest::new` only
//! its source. Such a trigger is one allocation of about 200 bytes per job; the jobs that have
//! the same one now share it (a queued job is kept small: BENCHMARKS.md, Memory). A trigger
//! that says more (a forge's delivery, repository, pull request) stays the job's own.

use std::sync::{Arc, RwLock};

use crate::fast_hash::FastMap;
use crate::job::TriggerInfo;

/// At most this many actors of one source are kept, and this many sources; past either, the
/// level is forgotten and fills again (the triggers are shared, never needed: a trigger not
/// found is made).
const MOST: usize = 256;

/// The shared triggers of one source, by actor.
type ByActor = FastMap<Option<String>, Arc<TriggerInfo>>;

/// Shared triggers by source, then actor.
pub(super) struct SharedTriggers {
    /// The API's trigger that names nothing else (`JobRequest::new`'s), found without a lock.
    api: Arc<TriggerInfo>,
    by_source: RwLock<FastMap<String, ByActor>>,
}

impl Default for SharedTriggers {
    fn default() -> Self {
        Self {
            api: Arc::new(TriggerInfo::new("api")),
            by_source: RwLock::default(),
        }
    }
}

impl SharedTriggers {
    /// `trigger`, shared with the jobs that had the same one when it names only a source and
    /// an actor. A trigger without a source is the API's.
    pub(super) fn share(&self, trigger: TriggerInfo) -> Arc<TriggerInfo> {
        if trigger.source.is_empty() || trigger == *self.api {
            return Arc::clone(&self.api);
        }
        let simple = trigger.delivery_id.is_none()
            && trigger.repo.is_none()
            && trigger.pr.is_none()
            && trigger.issue.is_none()
            && trigger.extra.is_empty();
        if !simple {
            return Arc::new(trigger);
        }
        if let Some(shared) = self
            .by_source
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(trigger.source.as_str())
            .and_then(|actors| actors.get(&trigger.actor))
        {
            return Arc::clone(shared);
        }
        let mut by_source = self.by_source.write().unwrap_or_else(|e| e.into_inner());
        if by_source.len() >= MOST && !by_source.contains_key(trigger.source.as_str()) {
            by_source.clear();
        }
        let actors = by_source.entry(trigger.source.clone()).or_default();
        if actors.len() >= MOST && !actors.contains_key(&trigger.actor) {
            actors.clear();
        }
        Arc::clone(
            actors
                .entry(trigger.actor.clone())
                .or_insert_with(|| Arc::new(trigger)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(actor: Option<&str>) -> TriggerInfo {
        TriggerInfo {
            actor: actor.map(str::to_owned),
            ..TriggerInfo::new("api")
        }
    }

    #[test]
    fn the_same_simple_trigger_is_shared_and_another_is_not() {
        let shared = SharedTriggers::default();
        let a = shared.share(api(Some("ci")));
        let b = shared.share(api(Some("ci")));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(*a, api(Some("ci")));
        let other = shared.share(api(Some("bot")));
        assert!(!Arc::ptr_eq(&a, &other));
        assert_eq!(other.actor.as_deref(), Some("bot"));
        let none = shared.share(api(None));
        assert!(Arc::ptr_eq(&none, &shared.share(api(None))));
        assert!(!Arc::ptr_eq(&none, &a));
        // A trigger without a source is the API's.
        let unnamed = shared.share(TriggerInfo::default());
        assert!(Arc::ptr_eq(&unnamed, &none));
        assert_eq!(unnamed.source, "api");
        // The same actor from another source is another trigger.
        let hook = shared.share(TriggerInfo {
            actor: Some("ci".into()),
            ..TriggerInfo::new("slack")
        });
        assert_eq!(hook.source, "slack");
        assert!(!Arc::ptr_eq(&hook, &a));
    }

    #[test]
    fn a_trigger_that_says_more_is_the_jobs_own() {
        let shared = SharedTriggers::default();
        let forge = TriggerInfo {
            delivery_id: Some("d-1".into()),
            repo: Some("o/r".into()),
            pr: Some(7),
            ..TriggerInfo::new("github")
        };
        let a = shared.share(forge.clone());
        let b = shared.share(forge.clone());
        assert!(!Arc::ptr_eq(&a, &b));
        assert_eq!(*a, forge);
        let mut extra = TriggerInfo::new("api");
        extra.extra.insert("k".into(), "v".into());
        let c = shared.share(extra.clone());
        assert!(!Arc::ptr_eq(&c, &shared.share(extra)));
    }

    #[test]
    fn the_kept_triggers_are_bounded() {
        let shared = SharedTriggers::default();
        for i in 0..(MOST * 3) {
            shared.share(api(Some(&format!("key-{i}"))));
        }
        for i in 0..(MOST * 3) {
            shared.share(TriggerInfo::new(format!("source-{i}")));
        }
        let by_source = shared.by_source.read().unwrap();
        assert!(by_source.len() <= MOST);
        assert!(by_source.values().all(|actors| actors.len() <= MOST));
    }
}
