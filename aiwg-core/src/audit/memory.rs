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
    /// Accepted and duplicate attempts, oldest first; ids strictly increase.
    kept: VecDeque<AuditEntry>,
    /// Refused attempts, oldest first; ids strictly increase.
    refused: VecDeque<AuditEntry>,
    next_id: i64,
}

impl State {
    fn len(&self) -> usize {
        self.kept.len() + self.refused.len()
    }

    /// Forgets the entry to go first when the store is full: a refused one while refused
    /// entries fill half of it or more (anyone without a key can make those: they must not
    /// push out the record of what ran), else the oldest.
    fn forget_one(&mut self, max: usize) {
        let refused_first = self.refused.len() >= max.div_ceil(2)
            || self.kept.is_empty()
            || self
                .refused
                .front()
                .zip(self.kept.front())
                .is_some_and(|(r, k)| r.id < k.id);
        if refused_first {
            self.refused.pop_front();
        } else {
            self.kept.pop_front();
        }
    }

    /// Newest first, the two rings merged by id.
    fn newest_first(&self) -> impl Iterator<Item = &AuditEntry> {
        let mut kept = self.kept.iter().rev().peekable();
        let mut refused = self.refused.iter().rev().peekable();
        std::iter::from_fn(move || match (kept.peek(), refused.peek()) {
            (Some(k), Some(r)) if k.id > r.id => kept.next(),
            (Some(_), Some(_)) | (None, Some(_)) => refused.next(),
            (Some(_), None) => kept.next(),
            (None, None) => None,
        })
    }
}

/// An [`AuditStore`] in memory: two rings of the newest entries, so a flood of refused
/// triggers holds memory steady and, as refused entries make at most half of a full store,
/// never pushes out the record of the triggers that were accepted. Nothing survives a
/// restart.
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
        let entry = AuditEntry::from_record(id, record.bounded());
        if entry.decision == super::Decision::Refused {
            state.refused.push_back(entry);
        } else {
            state.kept.push_back(entry);
        }
        let state = &mut *state;
        for ring in [&mut state.kept, &mut state.refused] {
            while ring.front().is_some_and(|e| e.at < oldest) {
                ring.pop_front();
            }
        }
        let max = self.retention.max_entries.max(1);
        while state.len() > max {
            state.forget_one(max);
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
            .newest_first()
            .filter(|e| e.at >= oldest && query.matches(e))
            .take(size + 1)
            .cloned()
            .collect();
        Ok(AuditPage::from_overfetch(entries, size))
    }

    async fn purge(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut state = self.lock();
        let len = state.len();
        state.kept.retain(|e| e.at >= before);
        state.refused.retain(|e| e.at >= before);
        Ok((len - state.len()) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Decision;

    /// A flood of refused attempts (anyone without a key can make them) does not push the
    /// accepted ones out of a full store; the store stays at its size, and lists newest first.
    #[tokio::test]
    async fn refused_attempts_never_push_out_the_accepted_ones() {
        let store =
            MemoryAuditStore::with_retention(AuditRetention::new(Duration::from_secs(3600), 10));
        let first = store
            .record(AuditRecord::new("api", Decision::Accepted))
            .await
            .unwrap();
        for _ in 0..20 {
            store
                .record(AuditRecord::new("api", Decision::Refused))
                .await
                .unwrap();
        }
        let last = store
            .record(AuditRecord::new("api", Decision::Duplicate))
            .await
            .unwrap();
        let query = AuditQuery {
            limit: Some(100),
            ..AuditQuery::default()
        };
        let all = store.list(&query).await.unwrap();
        assert_eq!(all.entries.len(), 10);
        let ids: Vec<i64> = all.entries.iter().map(|e| e.id).collect();
        let mut sorted = ids.clone();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        assert_eq!(ids, sorted, "newest first");
        assert_eq!(ids[0], last);
        assert!(
            ids.contains(&first),
            "the accepted attempt is kept: {ids:?}"
        );
        let refused = all
            .entries
            .iter()
            .filter(|e| e.decision == Decision::Refused)
            .count();
        assert_eq!(refused, 8);
        // Without refused entries, the oldest goes first as before.
        let store =
            MemoryAuditStore::with_retention(AuditRetention::new(Duration::from_secs(3600), 2));
        for _ in 0..3 {
            store
                .record(AuditRecord::new("api", Decision::Accepted))
                .await
                .unwrap();
        }
        let ids: Vec<i64> = store
            .list(&AuditQuery::default())
            .await
            .unwrap()
            .entries
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(ids, [3, 2]);
    }
}
