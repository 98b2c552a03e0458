//! The audit store conformance suite: every [`AuditStore`] runs it.

use std::future::Future;
use std::sync::Arc;

use chrono::{Duration, Utc};

use crate::audit::{AuditQuery, AuditRecord, AuditStore, Decision, MAX_FIELD_BYTES};
use crate::job::JobId;

/// Runs every check against stores made by `make` (each call must give an empty store).
///
/// # Panics
/// On the first check that fails.
pub async fn audit_store_suite<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn AuditStore>>,
{
    round_trip_and_newest_first(make().await).await;
    filters_and_pages(make().await).await;
    purge_forgets_only_older_entries(make().await).await;
    long_texts_are_bounded(make().await).await;
}

async fn round_trip_and_newest_first(store: Arc<dyn AuditStore>) {
    let job = JobId::new();
    let first = store
        .record(
            AuditRecord::new("api", Decision::Accepted)
                .key_name("ci")
                .actor("ci")
                .delivery_id("idem-1")
                .workflow("review")
                .job(job),
        )
        .await
        .unwrap();
    let second = store
        .record(
            AuditRecord::new("github", Decision::Refused)
                .actor("mallory")
                .repo("o/r")
                .delivery_id("d-2")
                .workflow("review")
                .reason("sender `mallory` is not allowed to trigger workflows"),
        )
        .await
        .unwrap();
    assert!(second > first, "ids grow: {first} then {second}");
    let page = store.list(&AuditQuery::default()).await.unwrap();
    assert_eq!(page.entries.len(), 2);
    assert_eq!(page.next_cursor, None);
    let (newest, oldest) = (&page.entries[0], &page.entries[1]);
    assert_eq!(newest.id, second);
    assert_eq!(newest.source, "github");
    assert_eq!(newest.decision, Decision::Refused);
    assert_eq!(newest.actor.as_deref(), Some("mallory"));
    assert_eq!(newest.repo.as_deref(), Some("o/r"));
    assert_eq!(
        newest.reason.as_deref(),
        Some("sender `mallory` is not allowed to trigger workflows")
    );
    assert_eq!(newest.job_id, None);
    assert_eq!(oldest.id, first);
    assert_eq!(oldest.key_name.as_deref(), Some("ci"));
    assert_eq!(oldest.delivery_id.as_deref(), Some("idem-1"));
    assert_eq!(oldest.workflow.as_deref(), Some("review"));
    assert_eq!(oldest.decision, Decision::Accepted);
    assert_eq!(oldest.job_id, Some(job));
    assert!((Utc::now() - oldest.at).num_seconds().abs() < 60);
}

async fn filters_and_pages(store: Arc<dyn AuditStore>) {
    let now = Utc::now();
    for i in 0..7 {
        let (source, decision) = match i % 3 {
            0 => ("api", Decision::Accepted),
            1 => ("gitlab", Decision::Refused),
            _ => ("slack", Decision::Duplicate),
        };
        store
            .record(
                AuditRecord::new(source, decision)
                    .workflow(format!("w{i}"))
                    .at(now - Duration::minutes(10 - i)),
            )
            .await
            .unwrap();
    }
    // Pages of 3, newest first, each continuing where the last stopped.
    let mut seen = Vec::new();
    let mut query = AuditQuery {
        limit: Some(3),
        ..AuditQuery::default()
    };
    loop {
        let page = store.list(&query).await.unwrap();
        assert!(page.entries.len() <= 3);
        seen.extend(page.entries.iter().map(|e| e.workflow.clone().unwrap()));
        match page.next_cursor {
            Some(c) => query.cursor = Some(c),
            None => break,
        }
    }
    let want: Vec<String> = (0..7).rev().map(|i| format!("w{i}")).collect();
    assert_eq!(seen, want, "every entry once, newest first");

    let only = |source: Option<&str>, decision: Option<Decision>, since| AuditQuery {
        source: source.map(str::to_owned),
        decision,
        since,
        ..AuditQuery::default()
    };
    let page = store.list(&only(Some("gitlab"), None, None)).await.unwrap();
    assert_eq!(
        page.entries
            .iter()
            .map(|e| e.workflow.clone().unwrap())
            .collect::<Vec<_>>(),
        ["w4", "w1"]
    );
    let page = store
        .list(&only(None, Some(Decision::Duplicate), None))
        .await
        .unwrap();
    assert!(page
        .entries
        .iter()
        .all(|e| e.decision == Decision::Duplicate));
    assert_eq!(page.entries.len(), 2);
    let page = store
        .list(&only(Some("api"), Some(Decision::Accepted), None))
        .await
        .unwrap();
    assert_eq!(page.entries.len(), 3);
    // `since` keeps entries at or after the time.
    let page = store
        .list(&only(None, None, Some(now - Duration::minutes(5))))
        .await
        .unwrap();
    assert_eq!(
        page.entries
            .iter()
            .map(|e| e.workflow.clone().unwrap())
            .collect::<Vec<_>>(),
        ["w6", "w5"]
    );
    let page = store
        .list(&only(Some("discord"), None, None))
        .await
        .unwrap();
    assert!(page.entries.is_empty());
    assert_eq!(page.next_cursor, None);
}

async fn purge_forgets_only_older_entries(store: Arc<dyn AuditStore>) {
    let now = Utc::now();
    for (i, hours) in [50_i64, 30, 0].into_iter().enumerate() {
        store
            .record(
                AuditRecord::new("api", Decision::Accepted)
                    .workflow(format!("w{i}"))
                    .at(now - Duration::hours(hours)),
            )
            .await
            .unwrap();
    }
    let gone = store.purge(now - Duration::hours(40)).await.unwrap();
    assert_eq!(gone, 1);
    let page = store.list(&AuditQuery::default()).await.unwrap();
    assert_eq!(
        page.entries
            .iter()
            .map(|e| e.workflow.clone().unwrap())
            .collect::<Vec<_>>(),
        ["w2", "w1"]
    );
    assert_eq!(store.purge(now - Duration::hours(40)).await.unwrap(), 0);
}

async fn long_texts_are_bounded(store: Arc<dyn AuditStore>) {
    store
        .record(
            AuditRecord::new("github", Decision::Refused)
                .workflow("w".repeat(100_000))
                .actor("ä".repeat(10_000))
                .reason("r".repeat(100_000)),
        )
        .await
        .unwrap();
    let page = store.list(&AuditQuery::default()).await.unwrap();
    let e = &page.entries[0];
    assert_eq!(e.workflow.as_ref().unwrap().len(), MAX_FIELD_BYTES);
    assert!(e.actor.as_ref().unwrap().len() <= MAX_FIELD_BYTES);
    assert!(e.actor.as_ref().unwrap().chars().all(|c| c == 'ä'));
    assert_eq!(
        e.reason.as_ref().unwrap().len(),
        crate::audit::MAX_REASON_BYTES
    );
}
