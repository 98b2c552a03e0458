//! [`MemoryAuditStore`]: the audit trail in memory, bounded by age and count.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{AuditEntry, AuditPage, AuditQuery, AuditRecord, AuditStore};
use crate::store::StoreError;

/// How long and how many audit entries the memory store keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuditRetention {
    /// Entries older than this are forgotten (default 30 days).
    pub keep_for: Duration,
    /// At most this many entries are kept, the oldest forgotten first (default 100 000).
    pub max_entries: usize,
}

impl Default for AuditRetention {
    fn default() -> Self {
        Self {
            keep_for: Duration::from_secs(30 * 24 * 3600),
            max_entries: 100_000,
        }
    }
}

impl AuditRetention {
    /// A retention of `keep_for` and at most `max_entries`.
    #[must_use]
    pub fn new(keep_for: Duration, max_entries: usize) -> Self {
        Self {
            keep_for,
            max_entries,
        }
    }
}

#[derive(Default)]
struct State {
    /// Oldest first; ids strictly increase.
    entries: VecDeque<AuditEntry>,
    next_id: i64,
}

/// An [`AuditStore`] in memory: a ring of the newest entries, so a flood of refused triggers
/// holds memory steady. Nothing survives a restart.
#[derive(Default)]
pub struct MemoryAuditStore {
    state: Mutex<State>,
    retention: AuditRetention,
}

impl std::fmt::Debug for MemoryAuditStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryAuditStore")
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl MemoryAuditStore {
    /// An empty store with the default [`AuditRetention`].
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store that keeps what `retention` says.
    #[must_use]
    pub fn with_retention(retention: AuditRetention) -> Self {
        Self {
            state: Mutex::default(),
            retention,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn horizon(now: DateTime<Utc>, keep_for: Duration) -> DateTime<Utc> {
    crate::util::earlier(now, keep_for)
}

#[async_trait]
impl AuditStore for MemoryAuditStore {
    async fn record(&self, record: AuditRecord) -> Result<i64, StoreError> {
        let oldest = horizon(Utc::now(), self.retention.keep_for);
        let mut state = self.lock();
        state.next_id += 1;
        let id = state.next_id;
        state
            .entries
            .push_back(AuditEntry::from_record(id, record.bounded()));
        while state.entries.len() > self.retention.max_entries.max(1)
            || state.entries.front().is_some_and(|e| e.at < oldest)
        {
            state.entries.pop_front();
        }
        Ok(id)
    }

    async fn list(&self, query: &AuditQuery) -> Result<AuditPage, StoreError> {
        let size = query.page_size();
        // Entries are pruned from the front (the oldest recorded) as new ones arrive; one
        // recorded with an older time than its neighbours is hidden here once expired.
        let oldest = horizon(Utc::now(), self.retention.keep_for);
        let state = self.lock();
        let entries = state
            .entries
            .iter()
            .rev()
            .filter(|e| e.at >= oldest && query.matches(e))
            .take(size + 1)
            .cloned()
            .collect();
        Ok(AuditPage::from_overfetch(entries, size))
    }

    async fn purge(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut state = self.lock();
        let len = state.entries.len();
        state.entries.retain(|e| e.at >= before);
        Ok((len - state.entries.len()) as u64)
    }
}
