//! Running jobs counted per project: the memory store's count for its per-project limit, and
//! the engine's count of the jobs running on its own instance (`engine/projects.rs`).

use crate::fast_hash::FastMap;

/// How many jobs run in each project. A project's key is copied only for its first job and
/// dropped with its last, so the map holds only projects with running jobs.
#[derive(Debug, Default)]
pub(crate) struct ProjectTally(FastMap<String, usize>);

impl ProjectTally {
    /// One more job running in `project`.
    pub(crate) fn add(&mut self, project: &str) {
        match self.0.get_mut(project) {
            Some(n) => *n += 1,
            None => {
                self.0.insert(project.to_owned(), 1);
            }
        }
    }

    /// One job fewer running in `project` (none counted: nothing to do).
    pub(crate) fn remove(&mut self, project: &str) {
        if let Some(n) = self.0.get_mut(project) {
            *n -= 1;
            if *n == 0 {
                self.0.remove(project);
            }
        }
    }

    /// How many jobs run in `project`.
    pub(crate) fn get(&self, project: &str) -> usize {
        self.0.get(project).copied().unwrap_or(0)
    }

    /// Whether no job runs in any project.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_project_is_kept_while_a_job_runs_in_it() {
        let mut t = ProjectTally::default();
        t.add("/p");
        t.add("/p");
        t.add("/q");
        assert_eq!((t.get("/p"), t.get("/q"), t.get("/r")), (2, 1, 0));
        t.remove("/p");
        t.remove("/q");
        t.remove("/r");
        assert_eq!((t.get("/p"), t.get("/q")), (1, 0));
        t.remove("/p");
        assert!(t.is_empty());
    }
}
