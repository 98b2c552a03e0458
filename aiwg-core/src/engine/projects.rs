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
//!
//! A job counts from the answer of the claim that took it (before the claiming turn passes
//! on), not from when a worker starts it. And a submit made while a claim is on its way waits
//! for that claim's answer before it decides: the claim may be taking the project's last
//! slot, which only its answer tells. Such submits are noted; when the claim answers, one
//! worker is woken if any of their projects still has room (the claim may have missed their
//! jobs). Deciding at the submit instead cost a claim for nothing after most of them under the
//! HTTP load on PostgreSQL (about 520 per 5 000 requests; BENCHMARKS.md, session 18).

use std::sync::Mutex;

use crate::tally::ProjectTally;

/// The most projects of submits noted during one claim; past it, the claim's answer wakes a
/// worker whatever their projects.
const MOST_NOTED: usize = 64;

/// Jobs running here per project, and the submits made during a claim; empty and never
/// locked without a per-project limit.
pub(super) struct LocalProjects {
    limit: Option<usize>,
    running: Mutex<ProjectTally>,
    claim: Mutex<ClaimWindow>,
}

/// What happened while a claim was on its way.
#[derive(Default)]
struct ClaimWindow {
    /// A claim is on its way.
    open: bool,
    /// The projects of the jobs submitted meanwhile (each once).
    submitted: Vec<String>,
    /// More than [`MOST_NOTED`] projects were.
    overflow: bool,
}

impl LocalProjects {
    pub(super) fn new(limit: Option<usize>) -> Self {
        Self {
            limit,
            running: Mutex::default(),
            claim: Mutex::default(),
        }
    }

    /// A claim is about to be sent (under the claiming turn).
    pub(super) fn claim_sent(&self) {
        if self.limit.is_some() {
            self.claim.lock().unwrap_or_else(|e| e.into_inner()).open = true;
        }
    }

    /// The claim answered with jobs in `claimed` (their projects), still under the claiming
    /// turn: each counts as running here (the caller makes a [`Running`] for it with
    /// [`started`](Self::started) when it runs it). Answers whether a worker should be woken
    /// for the submits made while the claim was on its way.
    pub(super) fn claim_answered<'j>(&self, claimed: impl IntoIterator<Item = &'j str>) -> bool {
        if self.limit.is_none() {
            return false;
        }
        {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            for project in claimed {
                running.add(project);
            }
        }
        let window = std::mem::take(&mut *self.claim.lock().unwrap_or_else(|e| e.into_inner()));
        window.overflow || window.submitted.iter().any(|p| !self.full(p))
    }

    /// A job was submitted to `project` (and stored): whether a worker should be woken for it
    /// now. Not if the jobs running here fill the project; not yet if a claim is on its way
    /// (its answer decides, see [`claim_answered`](Self::claim_answered)).
    pub(super) fn submitted(&self, project: &str) -> bool {
        if self.limit.is_none() {
            return true;
        }
        {
            let mut window = self.claim.lock().unwrap_or_else(|e| e.into_inner());
            if window.open {
                if !window.overflow && !window.submitted.iter().any(|p| p == project) {
                    if window.submitted.len() < MOST_NOTED {
                        window.submitted.push(project.to_owned());
                    } else {
                        window.overflow = true;
                    }
                }
                return false;
            }
        }
        !self.full(project)
    }

    /// A job counted by [`claim_answered`](Self::claim_answered) runs: it stays counted in
    /// `project` until the returned guard drops.
    pub(super) fn started<'a>(&'a self, project: &'a str) -> Running<'a> {
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

impl Running<'_> {
    /// Lets go of this guard without ending the count: a guard made again for the job with
    /// [`LocalProjects::started`] (where its outcome is written) ends it.
    pub(super) fn hand_over(self) {
        std::mem::forget(self);
    }
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
    fn a_project_is_full_from_its_jobs_claim_until_they_end() {
        let projects = LocalProjects::new(Some(2));
        assert!(!projects.full("/p"));
        projects.claim_sent();
        assert!(!projects.claim_answered(["/p"]));
        let first = projects.started("/p");
        assert!(!projects.full("/p"), "one of two");
        projects.claim_sent();
        assert!(!projects.claim_answered(["/p"]));
        assert!(projects.full("/p"), "counted from the claim's answer");
        let second = projects.started("/p");
        assert!(!projects.full("/q"), "another project has room");
        drop(first);
        assert!(!projects.full("/p"), "one ended");
        drop(second);
        assert!(projects.running.lock().unwrap().is_empty(), "no key kept");
    }

    #[test]
    fn a_submit_during_a_claim_is_decided_by_its_answer() {
        let projects = LocalProjects::new(Some(1));
        assert!(projects.submitted("/p"), "no claim on its way: p has room");

        // The claim takes p's only slot: a submit to p meanwhile wakes nobody.
        projects.claim_sent();
        assert!(!projects.submitted("/p"), "decided by the claim's answer");
        assert!(!projects.claim_answered(["/p"]), "p is full now");
        let _p = projects.started("/p");
        assert!(!projects.submitted("/p"), "p is full");

        // The claim takes nothing in q: a submit to q meanwhile wakes a worker once it answers.
        projects.claim_sent();
        assert!(!projects.submitted("/q"));
        assert!(!projects.submitted("/p"));
        assert!(projects.claim_answered([]), "q has room");
        assert!(projects.submitted("/q"), "no claim on its way");

        // Past MOST_NOTED projects, the answer wakes a worker.
        projects.claim_sent();
        for i in 0..=MOST_NOTED {
            assert!(!projects.submitted(&format!("/r{i}")));
        }
        assert!(projects.claim_answered(["/r0"]));
    }

    #[test]
    fn without_a_limit_nothing_is_counted_and_every_submit_wakes() {
        let projects = LocalProjects::new(None);
        projects.claim_sent();
        assert!(projects.submitted("/p"));
        assert!(!projects.claim_answered(["/p", "/p"]));
        let _a = projects.started("/p");
        assert!(!projects.full("/p"));
        assert!(projects.running.lock().unwrap().is_empty());
    }
}
