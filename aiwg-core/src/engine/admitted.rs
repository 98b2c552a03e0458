//! The projects the policy admitted lately, so that a burst of submits to one project asks the
//! file system once, not once per job.
//!
//! Resolving a project costs system calls (`realpath` for a path or a key's mapping, `statx`
//! for the directory check): on the HTTP trigger path they were about 5 % of a request. A
//! submit only needs the policy's answer to refuse early and precisely; what protects the agent
//! is the check the worker makes before an agent first gets the directory in each attempt
//! ([`ProjectPolicy::recheck`]). So an admission is remembered for [`KEPT_FOR`]: a project
//! removed or swapped for a symlink within that time is still accepted at submit, and its job
//! fails when it starts (`project_rejected`). Refusals are never remembered (a directory
//! created a moment later is accepted at once).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::policy::{PolicyError, ProjectPolicy};

/// How long an admission is remembered.
pub(super) const KEPT_FOR: Duration = Duration::from_secs(1);

/// At most this many admissions of each kind are remembered (past it, they are forgotten
/// together: a burst of submits to many projects costs what it cost before, no more memory).
const MOST: usize = 256;

/// One remembered admission: the canonical directory and until when it stands.
#[derive(Clone)]
struct Admitted {
    path: Arc<str>,
    until: Instant,
}

/// See the module docs. Keyed as [`ProjectPolicy::resolve`] reads its arguments: an explicit
/// path wins, then a key, then neither (the first root).
#[derive(Default)]
pub(super) struct AdmittedProjects {
    inner: RwLock<Kinds>,
}

#[derive(Default)]
struct Kinds {
    by_path: HashMap<String, Admitted>,
    by_key: HashMap<String, Admitted>,
    root: Option<Admitted>,
}

impl Kinds {
    fn get(&self, path: Option<&str>, key: Option<&str>) -> Option<&Admitted> {
        match (path, key) {
            (Some(p), _) => self.by_path.get(p),
            (None, Some(k)) => self.by_key.get(k),
            (None, None) => self.root.as_ref(),
        }
    }
}

impl AdmittedProjects {
    /// The canonical project directory for a job asking for `path` or `key`: remembered, or
    /// the policy's answer (remembered when it admits).
    pub(super) fn resolve(
        &self,
        policy: &ProjectPolicy,
        path: Option<&str>,
        key: Option<&str>,
    ) -> Result<Arc<str>, PolicyError> {
        let now = Instant::now();
        if let Some(a) = self
            .inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(path, key)
            .filter(|a| a.until > now)
        {
            return Ok(Arc::clone(&a.path));
        }
        let resolved: Arc<str> = policy.resolve(path, key)?.display().to_string().into();
        let admitted = Admitted {
            path: Arc::clone(&resolved),
            until: now + KEPT_FOR,
        };
        let mut kinds = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let map = match (path, key) {
            (Some(p), _) => Some((&mut kinds.by_path, p)),
            (None, Some(k)) => Some((&mut kinds.by_key, k)),
            (None, None) => None,
        };
        match map {
            Some((map, at)) => {
                if map.len() >= MOST && !map.contains_key(at) {
                    map.clear();
                }
                map.insert(at.to_owned(), admitted);
            }
            None => kinds.root = Some(admitted),
        }
        Ok(resolved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_admission_is_remembered_and_a_refusal_is_not() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        std::fs::create_dir(root.join("app")).unwrap();
        let policy = ProjectPolicy::builder()
            .root(&root)
            .map("app", "app")
            .build()
            .unwrap();
        let admitted = AdmittedProjects::default();
        let app = root.join("app").display().to_string();
        assert_eq!(&*admitted.resolve(&policy, Some("app"), None).unwrap(), app);
        assert_eq!(&*admitted.resolve(&policy, None, Some("app")).unwrap(), app);
        assert_eq!(
            &*admitted.resolve(&policy, None, None).unwrap(),
            root.display().to_string()
        );

        // Removed: each remembered admission still answers (the worker's recheck refuses the
        // job); a path never admitted is refused at once.
        std::fs::remove_dir(root.join("app")).unwrap();
        assert_eq!(&*admitted.resolve(&policy, Some("app"), None).unwrap(), app);
        assert_eq!(&*admitted.resolve(&policy, None, Some("app")).unwrap(), app);
        assert!(matches!(
            admitted.resolve(&policy, Some("other"), None),
            Err(PolicyError::NotFound(_))
        ));
        // A refusal is not remembered: the directory, once there, is admitted.
        std::fs::create_dir(root.join("other")).unwrap();
        assert_eq!(
            &*admitted.resolve(&policy, Some("other"), None).unwrap(),
            root.join("other").display().to_string()
        );
    }

    #[test]
    fn an_admission_is_forgotten_once_it_is_old() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        std::fs::create_dir(root.join("app")).unwrap();
        let policy = ProjectPolicy::builder().root(&root).build().unwrap();
        let admitted = AdmittedProjects::default();
        admitted.resolve(&policy, Some("app"), None).unwrap();
        std::fs::remove_dir(root.join("app")).unwrap();
        // Aged past KEPT_FOR (the clock is not waited on: the entry is made old).
        for a in admitted.inner.write().unwrap().by_path.values_mut() {
            a.until = Instant::now() - Duration::from_millis(1);
        }
        assert!(matches!(
            admitted.resolve(&policy, Some("app"), None),
            Err(PolicyError::NotFound(_))
        ));
    }

    #[test]
    fn it_remembers_a_bounded_number_of_projects() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let policy = ProjectPolicy::builder().root(&root).build().unwrap();
        let admitted = AdmittedProjects::default();
        for i in 0..MOST * 3 {
            std::fs::create_dir(root.join(format!("p{i}"))).unwrap();
            admitted
                .resolve(&policy, Some(&format!("p{i}")), None)
                .unwrap();
        }
        assert!(admitted.inner.read().unwrap().by_path.len() <= MOST);
    }
}
