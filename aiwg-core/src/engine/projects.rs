//! How many jobs this instance runs in each project, under a per-project limit
//! (`engine.per_project_concurrency`).
//!
//! A job submitted to a project whose limit this instance's own running jobs already fill
//! cannot start until one of them ends, here or anywhere: a claim made for it finds nothing.
//! So its submit wakes no worker (the end of a job running here wakes one, see
//! `worker::after_job`), and on PostgreSQL the other instances are told not to wake for it
//! either ([`ClusterListener::promise_claim`](crate::store::ClusterListener::promise_claim)).
//! With the configuration's default of one job per project, every submit to a busy project
//! used to cost a claim that found nothing: three claims in four under the HTTP load on
//! PostgreSQL (BENCHMARKS.md, session 17).

use std::sync::Mutex;

use crate::tally::ProjectTally;

/// Jobs running here per project; empty and never locked without a per-project limit.
pub(super) struct LocalProjects {
    limit: Option<usize>,
    running: Mutex<ProjectTally>,
}

impl LocalProjects {
    pub(super) fn new(limit: Option<usize>) -> Self {
        Self {
            limit,
            running: Mutex::default(),
        }
    }

    /// Counts a job running here in `project` until the returned guard drops.
    pub(super) fn start<'a>(&'a self, project: &'a str) -> Running<'a> {
        if self.limit.is_some() {
            self.running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .add(project);
        }
        Running {
            projects: self,
            project,
        }
    }

    /// Whether the jobs running here fill `project`'s limit.
    pub(super) fn full(&self, project: &str) -> bool {
        let Some(limit) = self.limit else {
            return false;
        };
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(project)
            >= limit
    }
}

/// One job counted as running in its project; dropping it ends the count.
pub(super) struct Running<'a> {
    projects: &'a LocalProjects,
    project: &'a str,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if self.projects.limit.is_none() {
            return;
        }
        self.projects
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(self.project);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_project_is_full_while_its_limit_of_jobs_runs_here() {
        let projects = LocalProjects::new(Some(2));
        assert!(!projects.full("/p"));
        let first = projects.start("/p");
        assert!(!projects.full("/p"), "one of two");
        let second = projects.start("/p");
        assert!(projects.full("/p"));
        assert!(!projects.full("/q"), "another project has room");
        drop(first);
        assert!(!projects.full("/p"), "one ended");
        drop(second);
        assert!(projects.running.lock().unwrap().is_empty(), "no key kept");
    }

    #[test]
    fn without_a_limit_nothing_is_counted() {
        let projects = LocalProjects::new(None);
        let _a = projects.start("/p");
        let _b = projects.start("/p");
        assert!(!projects.full("/p"));
        assert!(projects.running.lock().unwrap().is_empty());
    }
}
