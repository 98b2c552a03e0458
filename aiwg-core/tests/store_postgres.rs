//! The PostgreSQL store: the store conformance suite, connecting and migrating, and the
//! concurrency guarantees (claims, the per-project limit and event numbering across stores).
//!
//! Run with `cargo test -p aiwg-core --features postgres,test-util --test store_postgres`.
#![cfg(all(feature = "postgres", feature = "test-util"))]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use aiwg_core::job::{JobResult, Progress, StatusChange};
use aiwg_core::store::{
    apply, ClaimRequest, Created, Finish, JobStore, NewJob, PgStore, StoreError,
};
use aiwg_core::test_util::{job_store_suite, sample_job, step_names};
use aiwg_core::{JobEventKind, JobStatus};

mod pg_support;
use pg_support::test_db;

/// The store suite; then, in every store it used, the tally of queued jobs (migration 0013)
/// still equals a count of the rows: every way the suite moved a job in or out of `queued`
/// was tallied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_store_passes_the_store_suite() {
    let Some(db) = test_db().await else { return };
    let stores = std::sync::Mutex::new(Vec::new());
    job_store_suite(|| async {
        let store = Arc::new(db.fresh_store().await);
        stores.lock().unwrap().push(store.clone());
        store as Arc<dyn JobStore>
    })
    .await;
    let stores = stores.into_inner().unwrap();
    assert!(stores.len() > 10);
    for store in stores {
        let (tally, rows) = tally_and_rows(&store).await;
        assert_eq!(
            tally, rows,
            "the tally of queued jobs drifted from the rows"
        );
    }
    db.cleanup().await;
}

/// The tally of queued jobs the bounded queue's check reads, and a count of the rows.
async fn tally_and_rows(store: &PgStore) -> (i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT COALESCE(sum(queued), 0)::int8 FROM aiwg_queue_tally), \
                (SELECT count(*) FROM aiwg_jobs WHERE status = 'queued')",
    )
    .fetch_one(store.pool())
    .await
    .unwrap()
}

/// The tally moves once per statement (migration 0031): a claim of four jobs, an `UPDATE` that
/// puts three of them back in the queue and one that cancels two queued jobs each call the
/// tally's trigger once (the row trigger of 0013 was called once a job), and a statement that
/// moves no job in or out of `queued` (a lease renewal) calls it and writes no tally. The tally stays the
/// rows' count throughout, in the transaction and after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tally_is_kept_once_a_statement_whatever_its_rows() {
    let Some(db) = test_db().await else { return };
    let schema = db.schema().await;
    let store = db.store_in(&schema, 2).await;
    for _ in 0..6 {
        store
            .create(NewJob::new(sample_job("w", "/p", 0)))
            .await
            .unwrap();
    }
    let mut tx = db.admin().begin().await.unwrap();
    for set in [
        format!("SET LOCAL search_path = {schema}"),
        "SET LOCAL track_functions = 'pl'".to_owned(),
    ] {
        sqlx::query(&set).execute(&mut *tx).await.unwrap();
    }
    let claimed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM aiwg_claim(now(), 4, 'w', 60000000) WHERE id IS NOT NULL",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert_eq!(claimed, 4);
    assert_eq!(
        tally_calls(&mut tx).await,
        (1, 0, 2, 2),
        "after the claim of 4"
    );
    let tally_writes = "SELECT n_tup_ins + n_tup_upd FROM pg_stat_xact_user_tables \
                        WHERE relid = 'aiwg_queue_tally'::regclass";
    let writes: i64 = sqlx::query_scalar(tally_writes)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(writes, 1, "the claim wrote the tally once");
    sqlx::query(
        "UPDATE aiwg_jobs SET lease_expires_at = lease_expires_at + interval '1 minute' \
         WHERE status = 'running'",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    let after_renewal: i64 = sqlx::query_scalar(tally_writes)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(after_renewal, writes, "the renewal wrote no tally");
    assert_eq!(
        tally_calls(&mut tx).await,
        (2, 0, 2, 2),
        "a lease renewal calls it"
    );
    sqlx::query(
        "UPDATE aiwg_jobs SET status = 'queued', queue_seq = nextval('aiwg_queue_seq'), \
           lease_token = NULL, lease_expires_at = NULL \
         WHERE id IN (SELECT id FROM aiwg_jobs WHERE status = 'running' ORDER BY id LIMIT 3)",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    assert_eq!(
        tally_calls(&mut tx).await,
        (3, 0, 5, 5),
        "three back in the queue"
    );
    sqlx::query(
        "UPDATE aiwg_jobs SET status = 'cancelled', queue_seq = NULL \
         WHERE id IN (SELECT id FROM aiwg_jobs WHERE status = 'queued' ORDER BY id LIMIT 2)",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    assert_eq!(tally_calls(&mut tx).await, (4, 0, 3, 3), "two cancelled");
    tx.commit().await.unwrap();
    assert_eq!(tally_and_rows(&store).await, (3, 3), "committed");
    db.cleanup().await;
}

/// In the transaction's schema: how often the tally's triggers were called in it (0031's
/// statement trigger, 0013's row trigger), the tally, and the queued rows.
async fn tally_calls(tx: &mut sqlx::PgConnection) -> (i64, i64, i64, i64) {
    sqlx::query_as(
        "SELECT \
           COALESCE((SELECT calls FROM pg_stat_xact_user_functions \
                     WHERE schemaname = current_schema() \
                       AND funcname = 'aiwg_tally_updated'), 0), \
           COALESCE((SELECT calls FROM pg_stat_xact_user_functions \
                     WHERE schemaname = current_schema() \
                       AND funcname = 'aiwg_tally_moved'), 0), \
           (SELECT COALESCE(sum(queued), 0)::int8 FROM aiwg_queue_tally), \
           (SELECT count(*) FROM aiwg_jobs WHERE status = 'queued')",
    )
    .fetch_one(tx)
    .await
    .unwrap()
}

/// Rows of `aiwg_jobs` read so far by this backend, as PostgreSQL counts them
/// (`pg_stat_xact_user_tables`, which may hold earlier transactions' reads not yet reported:
/// take the difference of two readings).
async fn rows_read(tx: &mut sqlx::Transaction<'static, sqlx::Postgres>) -> i64 {
    sqlx::query_scalar(
        "SELECT COALESCE(idx_tup_fetch, 0) + COALESCE(seq_tup_read, 0) \
         FROM pg_stat_xact_user_tables WHERE relid = 'aiwg_jobs'::regclass",
    )
    .fetch_one(&mut **tx)
    .await
    .unwrap()
}

/// Pages of the jobs table and of its indexes read (from shared buffers or not) so far in this
/// transaction: a whole index read to find a job by key shows here, not in [`rows_read`].
async fn pages_read(tx: &mut sqlx::Transaction<'static, sqlx::Postgres>) -> i64 {
    sqlx::query_scalar(
        "SELECT sum(pg_stat_get_xact_blocks_fetched(c))::bigint FROM \
         (SELECT 'aiwg_jobs'::regclass::oid AS c \
          UNION ALL SELECT indexrelid FROM pg_index WHERE indrelid = 'aiwg_jobs'::regclass) r",
    )
    .fetch_one(&mut **tx)
    .await
    .unwrap()
}

/// The claim under a per-project limit of one, of up to `max` jobs, as the store sends it
/// (its lock scope is the store's channel).
fn limited_claim(
    store: &PgStore,
    max: i64,
) -> sqlx::query::QueryScalar<'static, sqlx::Postgres, uuid::Uuid, sqlx::postgres::PgArguments> {
    limited_claim_of(store, max, 1)
}

/// The same with `limit` jobs per project.
fn limited_claim_of(
    store: &PgStore,
    max: i64,
    limit: i64,
) -> sqlx::query::QueryScalar<'static, sqlx::Postgres, uuid::Uuid, sqlx::postgres::PgArguments> {
    sqlx::query_scalar("SELECT id FROM aiwg_claim_limited(now(), $1, 'w', 60000000, $3, $2)")
        .bind(max)
        .bind(store.channel().to_owned())
        .bind(limit)
}

/// The claim without a per-project limit, of up to `max` jobs, as the store sends it.
fn plain_claim(
    max: i64,
) -> sqlx::query::QueryScalar<'static, sqlx::Postgres, uuid::Uuid, sqlx::postgres::PgArguments> {
    sqlx::query_scalar("SELECT id FROM aiwg_claim(now(), $1, 'w', 60000000)").bind(max)
}

/// Fresh statistics of the jobs table, as autovacuum would take them.
async fn analyze(store: &PgStore) {
    sqlx::query("ANALYZE aiwg_jobs")
        .execute(store.pool())
        .await
        .unwrap();
}

/// Queues `n` jobs of workflow `w` in `project`, each created as `create_many` creates them.
async fn queue(store: &PgStore, n: usize, project: &str, priority: i32) {
    let jobs: Vec<NewJob> = (0..n)
        .map(|_| NewJob::new(sample_job("w", project, priority)))
        .collect();
    for created in store.create_many(jobs).await {
        created.unwrap();
    }
}

/// A submit into a bounded queue no longer counts the queued rows (migration 0013): it reads
/// the tallies, a row per database backend. The tallies of backends that are gone are folded
/// into one row, and the total is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_submit_reads_the_tally_and_folds_the_tallies_of_gone_backends() {
    let Some(db) = test_db().await else { return };
    let store = db.fresh_store().await;
    queue(&store, 3_000, "/p", 0).await;
    // Gone backends' tallies (process ids no backend has), moved out of row 0 so the total
    // stays right.
    sqlx::query(
        "WITH f AS (INSERT INTO aiwg_queue_tally (pid, queued) \
             SELECT 2000000000 + i, i FROM generate_series(1, 200) i RETURNING queued) \
         UPDATE aiwg_queue_tally SET queued = queued - (SELECT sum(queued) FROM f) WHERE pid = 0",
    )
    .execute(store.pool())
    .await
    .unwrap();
    assert_eq!(tally_and_rows(&store).await, (3_000, 3_000));
    let mut tx = store.pool().begin().await.unwrap();
    let before = rows_read(&mut tx).await;
    let room: bool = sqlx::query_scalar("SELECT aiwg_queue_has_room(1, 3001)")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert!(room, "3 000 queued, room for 3 001");
    let read = rows_read(&mut tx).await - before;
    assert_eq!(read, 0, "the queued jobs were read to count them");
    tx.commit().await.unwrap();
    let tallies: i64 = sqlx::query_scalar("SELECT count(*) FROM aiwg_queue_tally")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert!(
        tallies < 20,
        "{tallies} tallies: the gone backends' were not folded"
    );
    assert_eq!(tally_and_rows(&store).await, (3_000, 3_000));
    let full = store
        .create(NewJob::new(sample_job("w", "/p", 0)).capacity(3_000))
        .await;
    assert!(matches!(
        full,
        Err(StoreError::QueueFull { capacity: 3_000 })
    ));
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_store_with_relaxed_event_commits_passes_the_store_suite() {
    let Some(db) = test_db().await else { return };
    job_store_suite(|| async {
        Arc::new(db.fresh_store().await.with_relaxed_event_commits(true)) as Arc<dyn JobStore>
    })
    .await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_runs_migrations_and_errors_hide_the_password() {
    let Some(db) = test_db().await else { return };
    let schema = db.schema().await;
    let sep = if db.url().contains('?') { '&' } else { '?' };
    let url = format!("{}{sep}options=-c%20search_path%3D{schema}", db.url());
    let store = PgStore::connect(&url).await.expect("connect");
    assert!(store.channel().contains(&schema));
    // Running the migrations again is a no-op.
    store.migrate().await.expect("migrate twice");
    assert!(PgStore::migrator().iter().any(|m| m.version == 1));
    let job = sample_job("w", "/p", 0);
    let id = job.id;
    assert!(matches!(
        store.create(NewJob::new(job)).await.unwrap(),
        Created::New(..)
    ));
    assert_eq!(store.get(id).await.unwrap().unwrap().id, id);
    // The tables landed in the schema named by the URL.
    let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {schema}.aiwg_jobs"))
        .fetch_one(db.admin())
        .await
        .unwrap();
    assert_eq!(n, 1);

    // A store without migrations in an empty schema fails on use, with a backend error.
    let empty = db.schema().await;
    let url = format!("{}{sep}options=-c%20search_path%3D{empty}", db.url());
    let bare = PgStore::connect_without_migrations(&url).await.unwrap();
    assert!(matches!(
        bare.get(id).await,
        Err(StoreError::Backend(e)) if e.to_string().contains("aiwg_jobs")
            && std::error::Error::source(&e).is_some()
    ));

    // The server refuses (no such role or database): the message names neither URL nor password.
    let rest = db.url().split_once("://").unwrap().1;
    let authority = rest.split(['/', '?']).next().unwrap();
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let bad = format!("postgres://aiwg_nobody:s3cret-pw@{host}/aiwg_no_such_database");
    let err = PgStore::connect(&bad).await.unwrap_err();
    assert!(matches!(err, StoreError::Backend(_)));
    assert!(!err.to_string().contains("s3cret-pw"), "{err}");
    let err = PgStore::connect("postgres://aiwg:s3cret-pw@[bad/none")
        .await
        .unwrap_err();
    assert!(!err.to_string().contains("s3cret-pw"), "{err}");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_from_two_stores_take_each_job_once() {
    let Some(db) = test_db().await else { return };
    let schema = db.schema().await;
    let a = Arc::new(db.store_in(&schema, 5).await);
    let b = Arc::new(db.store_in(&schema, 5).await);
    let mut ids = HashSet::new();
    for i in 0..60 {
        let job = sample_job("w", &format!("/p{}", i % 7), i % 3);
        ids.insert(job.id);
        a.create(NewJob::new(job)).await.unwrap();
    }
    let mut tasks = Vec::new();
    for n in 0..8 {
        let store = if n % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            let req = ClaimRequest::new(format!("w{n}"), Duration::from_secs(60));
            while let Some(c) = store.claim(&req).await.unwrap() {
                store
                    .finish(&c.lease, Finish::Completed(JobResult::default()))
                    .await
                    .unwrap();
                mine.push(c.job.id);
            }
            mine
        }));
    }
    let mut claimed = Vec::new();
    for t in tasks {
        claimed.extend(t.await.unwrap());
    }
    assert_eq!(claimed.len(), 60, "every job claimed exactly once");
    assert_eq!(claimed.iter().copied().collect::<HashSet<_>>(), ids);
    let counts = b.counts().await.unwrap();
    assert_eq!((counts.queued, counts.running), (0, 0));
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_project_limit_holds_under_concurrent_claims() {
    let Some(db) = test_db().await else { return };
    let schema = db.schema().await;
    let a = Arc::new(db.store_in(&schema, 5).await);
    let b = Arc::new(db.store_in(&schema, 5).await);
    for _ in 0..20 {
        a.create(NewJob::new(sample_job("w", "/same", 0)))
            .await
            .unwrap();
    }
    let other = sample_job("w", "/other", 0);
    let other_id = other.id;
    a.create(NewJob::new(other)).await.unwrap();
    let mut tasks = Vec::new();
    for n in 0..8 {
        let store = if n % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            let req = ClaimRequest::new(format!("w{n}"), Duration::from_secs(60)).per_project(2);
            let mut mine = Vec::new();
            while let Some(c) = store.claim(&req).await.unwrap() {
                mine.push(c);
            }
            mine
        }));
    }
    let mut claimed = Vec::new();
    for t in tasks {
        claimed.extend(t.await.unwrap());
    }
    let same = claimed
        .iter()
        .filter(|c| &*c.job.project_path == "/same")
        .count();
    assert_eq!(same, 2, "two /same jobs at most, across both stores");
    assert!(claimed.iter().any(|c| c.job.id == other_id));
    assert_eq!(claimed.len(), 3);
    // An expired lease no longer counts against the project.
    let short = ClaimRequest::new("w9", Duration::from_secs(60)).per_project(2);
    assert!(a.claim(&short).await.unwrap().is_none());
    let mut later = short.clone();
    let last_expiry = claimed.iter().map(|c| c.lease.expires_at).max().unwrap();
    later.now = last_expiry + chrono::Duration::seconds(1);
    let c = b
        .claim(&later)
        .await
        .unwrap()
        .expect("a slot freed by expiry");
    assert_eq!(&*c.job.project_path, "/same");
    db.cleanup().await;
}

/// Batch claims under a per-project limit, from two stores at once, with concurrency groups
/// spread over projects: no project ever runs more than its limit, no group more than one job,
/// and every job that may start does (no claim gives up on a project or a group another
/// claim was only looking at, and none fails on a deadlock between their locks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_claims_under_limits_and_groups_hold_across_stores() {
    let Some(db) = test_db().await else { return };
    let schema = db.schema().await;
    let a = Arc::new(db.store_in(&schema, 6).await);
    let b = Arc::new(db.store_in(&schema, 6).await);
    let mut jobs = Vec::new();
    for i in 0..40 {
        jobs.push(NewJob::new(sample_job("w", &format!("/p{}", i % 4), i % 3)));
    }
    for i in 0..6 {
        let mut j = sample_job("w", &format!("/g{i}"), 1);
        j.concurrency_group = Some("shared".into());
        jobs.push(NewJob::new(j));
    }
    for created in a.create_many(jobs).await {
        created.unwrap();
    }
    let tasks: Vec<_> = (0..8)
        .map(|n| {
            let store = if n % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                let req =
                    ClaimRequest::new(format!("w{n}"), Duration::from_secs(60)).per_project(2);
                let mut mine = Vec::new();
                loop {
                    let got = store.claim_many(&req, 1 + n % 3).await.unwrap();
                    if got.is_empty() {
                        return mine;
                    }
                    mine.extend(got);
                }
            })
        })
        .collect();
    let mut claimed = Vec::new();
    for t in tasks {
        claimed.extend(t.await.unwrap());
    }
    let mut per_project: std::collections::HashMap<String, usize> = Default::default();
    for c in &claimed {
        *per_project
            .entry(c.job.project_path.to_string())
            .or_default() += 1;
    }
    for p in 0..4 {
        assert_eq!(
            per_project.get(&format!("/p{p}")),
            Some(&2),
            "{per_project:?}"
        );
    }
    let grouped = claimed
        .iter()
        .filter(|c| c.job.concurrency_group.is_some())
        .count();
    assert_eq!(grouped, 1, "one job of the group");
    assert_eq!(claimed.len(), 9);
    let counts = a.counts().await.unwrap();
    assert_eq!((counts.queued, counts.running), (37, 9));
    db.cleanup().await;
}

/// Two instances claiming under a per-project limit at the same moment, each finding a job of
/// one concurrency group in a project of its own: one of them starts, never both. The claim
/// that takes the group's lock second must see the job the first started, however close
/// behind it comes (migration 0025: a check made in the snapshot of the lock's own expression
/// missed a job committed just before the lock was let go). Many rounds, as the window is
/// narrow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_never_start_two_jobs_of_one_group_at_once() {
    let Some(db) = test_db().await else { return };
    let schema = db.schema().await;
    let a = Arc::new(db.store_in(&schema, 4).await);
    let b = Arc::new(db.store_in(&schema, 4).await);
    for round in 0..300 {
        let group = format!("g{round}");
        let jobs = ["/x", "/y"].map(|project| {
            let mut j = sample_job("w", &format!("{project}{round}"), 0);
            j.concurrency_group = Some(group.clone());
            NewJob::new(j)
        });
        for created in a.create_many(jobs.into()).await {
            created.unwrap();
        }
        let claim = |store: Arc<PgStore>, owner: &str| {
            let req = ClaimRequest::new(owner, Duration::from_secs(60)).per_project(1);
            tokio::spawn(async move { store.claim_many(&req, 2).await.unwrap() })
        };
        let (x, y) = (claim(a.clone(), "wa"), claim(b.clone(), "wb"));
        let started = x.await.unwrap().len() + y.await.unwrap().len();
        assert_eq!(
            started, 1,
            "round {round}: jobs of group {group} started at once"
        );
    }
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_get_gapless_unique_sequence_numbers() {
    let Some(db) = test_db().await else { return };
    let schema = db.schema().await;
    let a = Arc::new(db.store_in(&schema, 5).await);
    let b = Arc::new(db.store_in(&schema, 5).await);
    let job = sample_job("w", "/p", 0);
    let id = job.id;
    a.create(NewJob::new(job)).await.unwrap();
    let c = a
        .claim(&ClaimRequest::new("w", Duration::from_secs(60)))
        .await
        .unwrap()
        .unwrap();
    let mut tasks = Vec::new();
    for n in 0..4 {
        let store = if n % 2 == 0 { a.clone() } else { b.clone() };
        let lease = c.lease.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..25 {
                // Mix plain events with step events (which also move progress).
                let kind = if i % 5 == 0 {
                    JobEventKind::StepStarted {
                        step: format!("s{n}-{i}").into(),
                        agent: "x".into(),
                        attempt: 1,
                    }
                } else {
                    JobEventKind::Log {
                        level: "info".into(),
                        message: format!("{n}/{i}"),
                    }
                };
                seqs.push(store.append(&lease, kind).await.unwrap().seq);
            }
            seqs
        }));
    }
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.extend(t.await.unwrap());
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (3..=102).collect::<Vec<u64>>());
    let stored: Vec<u64> = a
        .events(id, 0)
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(stored, (1..=102).collect::<Vec<u64>>());
    let (done, ev) = b
        .finish(&c.lease, Finish::Completed(JobResult::default()))
        .await
        .unwrap();
    assert_eq!(ev.seq, 103);
    assert_eq!(done.status, JobStatus::Completed);
    assert_eq!(
        done.progress.in_progress.len(),
        20,
        "every step start was kept"
    );
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_events_and_clock_truncation_round_trip() {
    let Some(db) = test_db().await else { return };
    let store = db.fresh_store().await;
    let job = sample_job("w", "/p", 0);
    let id = job.id;
    store.create(NewJob::new(job)).await.unwrap();
    let c = store
        .claim(&ClaimRequest::new("w", Duration::from_secs(60)))
        .await
        .unwrap()
        .unwrap();
    // Longer than a NOTIFY payload may be: stored whole, announced by reference.
    let big = "x".repeat(20_000);
    let ev = store
        .append(
            &c.lease,
            JobEventKind::Log {
                level: "info".into(),
                message: big.clone(),
            },
        )
        .await
        .unwrap();
    let stored = store.events(id, 2).await.unwrap();
    assert_eq!(
        stored,
        vec![ev.clone()],
        "what append returns is what is stored"
    );
    assert!(matches!(&stored[0].kind, JobEventKind::Log { message, .. } if *message == big));
    assert_eq!(store.events(id, 0).await.unwrap()[1], c.event);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_finished_deletes_only_finished_jobs_and_their_events() {
    let Some(db) = test_db().await else { return };
    let store = db.fresh_store().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let job = sample_job("w", "/p", 0);
        ids.push(job.id);
        store.create(NewJob::new(job)).await.unwrap();
    }
    let req = ClaimRequest::new("w", Duration::from_secs(60));
    let done = store.claim(&req).await.unwrap().unwrap();
    store
        .finish(&done.lease, Finish::Completed(JobResult::default()))
        .await
        .unwrap();
    let running = store.claim(&req).await.unwrap().unwrap();
    let before = chrono::Utc::now() + chrono::Duration::hours(1);
    assert_eq!(store.purge_finished(before).await.unwrap(), 1);
    assert!(store.get(done.job.id).await.unwrap().is_none());
    assert!(matches!(
        store.events(done.job.id, 0).await,
        Err(StoreError::NotFound(_))
    ));
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM aiwg_job_events WHERE job_id = $1")
        .bind(done.job.id.as_uuid())
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(n, 0, "events go with their job");
    assert!(store.get(running.job.id).await.unwrap().is_some());
    assert_eq!(store.counts().await.unwrap().queued, 1);
    // A job that finished just now is kept by a cut-off an hour ago.
    store
        .finish(&running.lease, Finish::Completed(JobResult::default()))
        .await
        .unwrap();
    let long_ago = chrono::Utc::now() - chrono::Duration::hours(1);
    assert_eq!(store.purge_finished(long_ago).await.unwrap(), 0);
    assert!(store.get(running.job.id).await.unwrap().is_some());
    db.cleanup().await;
}

/// Events are written without a foreign-key check on their job (migration 0022); deleting
/// or truncating jobs, by anyone and from any search path, still takes their events along and
/// keeps the tally of queued jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_or_truncating_jobs_takes_their_events_along() {
    let Some(db) = test_db().await else { return };
    let schema = db.schema().await;
    let store = db.store_in(&schema, 4).await;
    let mut jobs = Vec::new();
    for _ in 0..3 {
        let job = sample_job("w", "/p", 0);
        jobs.push(job.id);
        store.create(NewJob::new(job)).await.unwrap();
    }
    let ids: Vec<uuid::Uuid> = jobs.iter().map(|id| *id.as_uuid()).collect();
    let claimed = store
        .claim(&ClaimRequest::new("w", Duration::from_secs(60)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(*claimed.job.id.as_uuid(), ids[0], "first in, first claimed");
    let foreign_keys: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_constraint \
         WHERE conrelid = 'aiwg_job_events'::regclass AND contype = 'f'",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(foreign_keys, 0, "no event is checked against its job");
    let events = |id: uuid::Uuid| {
        let admin = db.admin().clone();
        let sql = format!("SELECT count(*) FROM {schema}.aiwg_job_events WHERE job_id = $1");
        async move {
            sqlx::query_scalar::<_, i64>(&sql)
                .bind(id)
                .fetch_one(&admin)
                .await
                .unwrap()
        }
    };
    assert_eq!(events(ids[0]).await, 2, "queued, running");
    assert_eq!(events(ids[1]).await, 1, "queued");

    // Someone else's SQL, from a session whose search path is not the store's schema, deletes
    // a running job and a queued one: their events go, the third job's stay.
    sqlx::query(&format!(
        "DELETE FROM {schema}.aiwg_jobs WHERE id = ANY($1)"
    ))
    .bind(&ids[..2])
    .execute(db.admin())
    .await
    .unwrap();
    assert_eq!(
        events(ids[0]).await,
        0,
        "the running job's events went with it"
    );
    assert_eq!(
        events(ids[1]).await,
        0,
        "the queued job's events went with it"
    );
    assert_eq!(events(ids[2]).await, 1, "the other job's events stay");
    assert_eq!(store.events(jobs[2], 0).await.unwrap().len(), 1);
    assert_eq!(
        tally_and_rows(&store).await,
        (1, 1),
        "the deleted queued job left the tally"
    );

    sqlx::query(&format!("TRUNCATE {schema}.aiwg_jobs"))
        .execute(db.admin())
        .await
        .unwrap();
    let left: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {schema}.aiwg_job_events"))
        .fetch_one(db.admin())
        .await
        .unwrap();
    assert_eq!(left, 0, "a truncate of the jobs empties their events");
    assert_eq!(
        tally_and_rows(&store).await,
        (0, 0),
        "and the tally of queued jobs"
    );
    store
        .create(NewJob::new(sample_job("w", "/p", 0)))
        .await
        .unwrap();
    assert_eq!(tally_and_rows(&store).await, (1, 1), "counted from there");
    // Both tables in one statement, as a host's reset might do.
    sqlx::query(&format!(
        "TRUNCATE {schema}.aiwg_jobs, {schema}.aiwg_job_events"
    ))
    .execute(db.admin())
    .await
    .unwrap();
    assert_eq!(
        tally_and_rows(&store).await,
        (0, 0),
        "both truncated together"
    );
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_audit_store_passes_the_audit_store_suite() {
    use aiwg_core::audit::{AuditStore, PgAuditStore};
    let Some(db) = test_db().await else { return };
    aiwg_core::test_util::audit_store_suite(|| async {
        let schema = db.schema().await;
        let store = PgAuditStore::new(db.pool(&schema, 2).await);
        store.migrate().await.expect("migrate audit");
        // A second run (another instance starting) is a no-op.
        store.migrate().await.expect("migrate audit twice");
        Arc::new(store) as Arc<dyn AuditStore>
    })
    .await;
    db.cleanup().await;
}

/// How many transactions wrote the rows of `table` in `schema`: the rows one statement
/// inserted share its transaction id (`xmin`).
async fn transactions(db: &pg_support::TestDb, schema: &str, table: &str) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(DISTINCT xmin::text) FROM {schema}.{table}"
    ))
    .fetch_one(db.admin())
    .await
    .unwrap()
}

/// A burst of trigger attempts records its audit entries together (one statement and commit
/// for many, instead of one commit each that waited for the disk): each record still gets the
/// id of its own entry, and every entry is there once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_records_at_once_are_written_together_each_with_its_id() {
    use aiwg_core::audit::{AuditQuery, AuditRecord, AuditStore, Decision, PgAuditStore};
    let Some(db) = test_db().await else { return };
    let schema = db.schema().await;
    let store = Arc::new(PgAuditStore::new(db.pool(&schema, 4).await));
    store.migrate().await.unwrap();
    const RECORDS: usize = 120;
    let tasks: Vec<_> = (0..RECORDS)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut r = AuditRecord::new("api", Decision::Accepted);
                r.delivery_id = Some(format!("d{i}"));
                (i, store.record(r).await.unwrap())
            })
        })
        .collect();
    let mut ids = std::collections::HashMap::new();
    for t in tasks {
        let (i, id) = t.await.unwrap();
        assert!(ids.insert(id, i).is_none(), "id {id} answered twice");
    }
    let mut query = AuditQuery::default();
    query.limit = Some(500);
    let page = store.list(&query).await.unwrap();
    assert_eq!(page.entries.len(), RECORDS);
    for e in &page.entries {
        let i = ids[&e.id];
        assert_eq!(e.delivery_id.as_deref(), Some(format!("d{i}").as_str()));
    }
    let transactions = transactions(&db, &schema, "aiwg_audit").await;
    assert!(
        transactions <= (RECORDS / 4) as i64,
        "{transactions} transactions for {RECORDS} entries: records at once were not batched"
    );
    db.cleanup().await;
}

/// Eight claimers on two stores: one job of a concurrency group runs at a time, whatever the
/// interleaving; jobs outside the group are not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_group_runs_one_job_across_stores() {
    let Some(db) = test_db().await else { return };
    let schema = db.schema().await;
    let a = Arc::new(db.store_in(&schema, 5).await);
    let b = Arc::new(db.store_in(&schema, 5).await);
    for n in 0..20 {
        // Different projects: only the group holds them back.
        let mut job = sample_job("w", &format!("/p{n}"), 0);
        job.concurrency_group = Some("octo/app#7".into());
        a.create(NewJob::new(job)).await.unwrap();
    }
    let free = sample_job("w", "/free", 0);
    let free_id = free.id;
    b.create(NewJob::new(free)).await.unwrap();
    let mut tasks = Vec::new();
    for n in 0..8 {
        let store = if n % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            let req = ClaimRequest::new(format!("w{n}"), Duration::from_secs(60));
            let mut mine = Vec::new();
            while let Some(c) = store.claim(&req).await.unwrap() {
                mine.push(c);
            }
            mine
        }));
    }
    let mut claimed = Vec::new();
    for t in tasks {
        claimed.extend(t.await.unwrap());
    }
    let grouped = claimed
        .iter()
        .filter(|c| c.job.concurrency_group.is_some())
        .count();
    assert_eq!(
        grouped, 1,
        "one job of the group at a time, across both stores"
    );
    assert!(claimed.iter().any(|c| c.job.id == free_id));
    // When it finishes, the next one of the group may start.
    let running = claimed
        .iter()
        .find(|c| c.job.concurrency_group.is_some())
        .unwrap();
    a.finish(&running.lease, Finish::Completed(JobResult::default()))
        .await
        .unwrap();
    let next = b
        .claim(&ClaimRequest::new("w9", Duration::from_secs(60)))
        .await
        .unwrap()
        .expect("the group is free");
    assert_eq!(next.job.concurrency_group.as_deref(), Some("octo/app#7"));
    db.cleanup().await;
}

/// A claim passes over a concurrency group whose lock another claim holds, and takes the next
/// group's job at once: it does not wait for the lock (two claims locking their groups in
/// opposite orders waited for each other until PostgreSQL broke the deadlock by failing one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_passes_over_a_group_another_claim_is_deciding() {
    let Some(db) = test_db().await else { return };
    let store = db.fresh_store().await;
    for (group, project) in [("g1", "/a"), ("g2", "/b")] {
        let mut job = sample_job("w", project, 0);
        job.concurrency_group = Some(group.into());
        store.create(NewJob::new(job)).await.unwrap();
    }
    // Another claim holds the first group's lock, as while it decides for that group.
    let mut other = store.pool().begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(aiwg_lock_key($1, 'concurrency:g1'))")
        .bind(store.channel())
        .execute(&mut *other)
        .await
        .unwrap();
    let req = ClaimRequest::new("w", Duration::from_secs(60));
    let claimed = tokio::time::timeout(Duration::from_secs(10), store.claim_many(&req, 2))
        .await
        .expect("the claim did not wait for the group another claim holds")
        .unwrap();
    let groups: Vec<_> = claimed
        .iter()
        .map(|c| c.job.concurrency_group.clone().unwrap())
        .collect();
    assert_eq!(groups, ["g2"]);
    other.rollback().await.unwrap();
    // Once the lock is gone, the first group's job is claimed.
    let next = store.claim_many(&req, 2).await.unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].job.concurrency_group.as_deref(), Some("g1"));
    db.cleanup().await;
}

/// More writers at once than the completer sends out from their callers: the rest are written
/// in batches (events of many jobs in one statement, outcomes together), and each caller
/// still gets its own answer: gapless numbers per job, `LeaseLost` for a stale lease only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_writers_at_once_are_batched_and_each_fenced() {
    let Some(db) = test_db().await else { return };
    let store = Arc::new(db.fresh_store().await);
    const JOBS: usize = 24;
    const EVENTS: u64 = 10;
    let mut claimed = Vec::new();
    for _ in 0..JOBS {
        store
            .create(NewJob::new(sample_job("w", "/p", 0)))
            .await
            .unwrap();
    }
    for _ in 0..JOBS {
        claimed.push(
            store
                .claim(&ClaimRequest::new("w", Duration::from_secs(60)))
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let mut tasks = Vec::new();
    for (n, c) in claimed.iter().enumerate() {
        let store = store.clone();
        let lease = c.lease.clone();
        tasks.push(tokio::spawn(async move {
            let mut stale = lease.clone();
            stale.token += 1_000_000;
            for i in 0..EVENTS {
                let kind = JobEventKind::Log {
                    level: "info".into(),
                    message: format!("{n}/{i}"),
                };
                if n % 6 == 0 {
                    let refused = store.append(&stale, kind.clone()).await;
                    assert!(
                        matches!(refused, Err(StoreError::LeaseLost(_))),
                        "{refused:?}"
                    );
                }
                let ev = store.append(&lease, kind).await.unwrap();
                assert_eq!(ev.seq, 3 + i, "job {n}");
            }
            if n % 6 == 0 {
                assert_stale_outcome_refused(&store, &stale).await;
            }
            let (job, ev) = store
                .finish(&lease, Finish::Completed(JobResult::default()))
                .await
                .unwrap();
            assert_eq!(job.status, JobStatus::Completed);
            assert_eq!(ev.seq, 3 + EVENTS);
            // A second outcome with the same lease is refused: the job holds no lease now.
            let again = store
                .finish(&lease, Finish::Completed(JobResult::default()))
                .await;
            assert!(matches!(again, Err(StoreError::LeaseLost(_))), "{again:?}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for c in &claimed {
        let seqs: Vec<u64> = store
            .events(c.job.id, 0)
            .await
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, (1..=3 + EVENTS).collect::<Vec<_>>());
        let job = store.get(c.job.id).await.unwrap().unwrap();
        assert_eq!(job.status, JobStatus::Completed);
    }
    db.cleanup().await;
}

/// An empty claim leaves no transaction open. `FOR UPDATE` keeps the lock it took on a row
/// that another instance's claim changed while the statement ran, even though the row is not
/// returned; a transaction that is only dropped stays open ("idle in transaction", with that
/// lock) until the pool rolls it back from a task of its own, and the other instance's writes
/// to that job wait meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_claim_leaves_no_transaction_open() {
    let Some(db) = test_db().await else { return };
    let (store, app) = db.named_store("aiwg-empty-claim", 4).await;
    let open = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name = $1 AND state LIKE 'idle in transaction%'",
        )
        .bind(&app)
        .fetch_one(db.admin())
        .await
        .unwrap()
    };
    let req = ClaimRequest::new("w", Duration::from_secs(60));
    // Batched (no per-project limit), one at a time, and one at a time under a limit.
    assert!(store.claim_many(&req, 8).await.unwrap().is_empty());
    assert_eq!(
        open().await,
        0,
        "an empty batched claim left its transaction open"
    );
    assert!(store.claim(&req).await.unwrap().is_none());
    assert_eq!(open().await, 0, "an empty claim left its transaction open");
    let mut limited = req.clone();
    limited.per_project_limit = Some(1);
    assert!(store.claim_many(&limited, 8).await.unwrap().is_empty());
    assert_eq!(
        open().await,
        0,
        "an empty limited claim left its transaction open"
    );
    db.cleanup().await;
}

/// Submits that arrive together into a bounded queue go in together (`admit`, migration
/// 0011): one lock, one count, one commit for many, instead of one commit after another under
/// the queue's lock. From two stores at once, the bound still holds exactly, each refused
/// submit is told so, and every job admitted is there with its first event. The rows of one
/// statement share a transaction id (`xmin`): far fewer of those than jobs shows the batching.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submits_at_once_enter_a_bounded_queue_together_and_the_bound_holds() {
    let Some(db) = test_db().await else { return };
    let schema = db.schema().await;
    let a = Arc::new(db.store_in(&schema, 5).await);
    let b = Arc::new(db.store_in(&schema, 5).await);
    const SUBMITS: usize = 200;
    const CAPACITY: usize = 150;
    let tasks: Vec<_> = (0..SUBMITS)
        .map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                let job = sample_job("w", "/p", 0);
                let id = job.id;
                let answer = store.create(NewJob::new(job).capacity(CAPACITY)).await;
                (id, answer)
            })
        })
        .collect();
    let mut admitted = HashSet::new();
    for t in tasks {
        match t.await.unwrap() {
            (id, Ok(Created::New(job, ev))) => {
                assert_eq!((job.id, ev.seq), (id, 1));
                admitted.insert(id);
            }
            (_, Err(StoreError::QueueFull { capacity: CAPACITY })) => {}
            (_, other) => panic!("unexpected answer to a submit: {other:?}"),
        }
    }
    assert_eq!(admitted.len(), CAPACITY, "exactly the queue's room got in");
    assert_eq!(a.counts().await.unwrap().queued, CAPACITY);
    for id in &admitted {
        let events = b.events(*id, 0).await.unwrap();
        assert_eq!(events.len(), 1, "job {id}: its `queued` event");
    }
    let transactions = transactions(&db, &schema, "aiwg_jobs").await;
    assert!(
        transactions <= (CAPACITY / 4) as i64,
        "{transactions} transactions for {CAPACITY} jobs: submits at once were not batched"
    );
    db.cleanup().await;
}

/// A bounded submit is written before the queue's lock is taken, and counted under it
/// (`aiwg_admit`, migration 0029). Two batches that both found room in the queue as last
/// committed wait for the lock with their jobs inserted: the first to get it keeps its jobs;
/// the second counts them and deletes its own, which no longer fit. The bound holds exactly,
/// and nothing of the refused jobs is left (rows, events, tally).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_submits_written_before_the_lock_are_counted_under_it() {
    let Some(db) = test_db().await else { return };
    let schema = db.schema().await;
    let a = Arc::new(db.store_in(&schema, 3).await);
    let b = Arc::new(db.store_in(&schema, 3).await);
    const CAPACITY: usize = 5;
    let bounded = || NewJob::new(sample_job("w", "/p", 0)).capacity(CAPACITY);
    for created in a.create_many((0..3).map(|_| bounded()).collect()).await {
        created.unwrap();
    }
    // The queue's lock, held by the test while both batches are written.
    let key: i64 = sqlx::query_scalar("SELECT aiwg_lock_key($1, 'queue capacity')")
        .bind(a.channel())
        .fetch_one(a.pool())
        .await
        .unwrap();
    let mut holder = a.pool().acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(key)
        .execute(&mut *holder)
        .await
        .unwrap();
    let batch = |store: Arc<PgStore>| {
        tokio::spawn(async move { store.create_many(vec![bounded(), bounded()]).await })
    };
    let (first, second) = (batch(a.clone()), batch(b.clone()));
    // Both wait for the lock, their jobs inserted: both found room for two.
    let waiting = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
             AND ((classid::int8 << 32) | objid::int8) = $1",
        )
        .bind(key)
        .fetch_one(b.pool())
        .await
        .unwrap()
    };
    tokio::time::timeout(Duration::from_secs(20), async {
        while waiting().await < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("both batches wait for the queue's lock");
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(key)
        .execute(&mut *holder)
        .await
        .unwrap();
    let mut answers = first.await.unwrap();
    answers.extend(second.await.unwrap());
    let admitted = answers.iter().filter(|a| a.is_ok()).count();
    let refused = answers
        .iter()
        .filter(|a| matches!(a, Err(StoreError::QueueFull { capacity: CAPACITY })))
        .count();
    assert_eq!((admitted, refused), (2, 2), "{answers:?}");
    assert_eq!(
        tally_and_rows(&a).await,
        (CAPACITY as i64, CAPACITY as i64),
        "the queue holds exactly its room"
    );
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM aiwg_job_events")
        .fetch_one(a.pool())
        .await
        .unwrap();
    assert_eq!(
        events, CAPACITY as i64,
        "the refused jobs' events went with them"
    );

    // A full queue refuses without writing: nothing is inserted (the queue's sequence does
    // not move).
    let seq = || async {
        sqlx::query_scalar::<_, i64>("SELECT last_value FROM aiwg_queue_seq")
            .fetch_one(a.pool())
            .await
            .unwrap()
    };
    let before = seq().await;
    for refused in b.create_many((0..20).map(|_| bounded()).collect()).await {
        assert!(matches!(
            refused,
            Err(StoreError::QueueFull { capacity: CAPACITY })
        ));
    }
    assert!(matches!(
        a.create(bounded()).await,
        Err(StoreError::QueueFull { capacity: CAPACITY })
    ));
    assert_eq!(seq().await, before, "a refused submit was inserted");
    drop(holder);
    db.cleanup().await;
}

/// Submits at once that carry idempotency keys go in together too (far fewer transactions
/// than jobs): of the submits sharing a key, one creates the job and the others are answered
/// with it (or refused, when their request differs), whichever batch each lands in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submits_at_once_with_idempotency_keys_create_one_job_per_key() {
    let Some(db) = test_db().await else { return };
    let schema = db.schema().await;
    let a = Arc::new(db.store_in(&schema, 5).await);
    let b = Arc::new(db.store_in(&schema, 5).await);
    const KEYS: usize = 20;
    const PER_KEY: usize = 6;
    let tasks: Vec<_> = (0..KEYS * PER_KEY)
        .map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            let key = i % KEYS;
            // One submit in six per key asks for something else under the same key.
            let fingerprint = if i / KEYS == PER_KEY - 1 {
                "other"
            } else {
                "same"
            };
            tokio::spawn(async move {
                let mut job = sample_job("w", "/p", 0);
                job.idempotency_key = Some(format!("key-{key}"));
                let new = NewJob::new(job).fingerprint(fingerprint).capacity(10_000);
                (key, fingerprint, store.create(new).await)
            })
        })
        .collect();
    // Per key: the job made, and the fingerprint of the submit that made it.
    let mut created: Vec<Option<(aiwg_core::job::JobId, &str)>> = vec![None; KEYS];
    let mut answers = Vec::new();
    for t in tasks {
        let (key, fingerprint, answer) = t.await.unwrap();
        if let Ok(Created::New(job, _)) = &answer {
            let first = created[key].replace((job.id, fingerprint));
            assert!(first.is_none(), "key {key} made two jobs");
        }
        answers.push((key, fingerprint, answer));
    }
    for (key, fingerprint, answer) in answers {
        let (id, maker) = created[key].unwrap_or_else(|| panic!("key {key} made no job"));
        match answer {
            Ok(Created::New(job, _)) => assert_eq!(job.id, id),
            // The same request is answered with the key's job, another is refused.
            Ok(Created::Existing(job)) if fingerprint == maker => assert_eq!(job.id, id),
            Err(StoreError::IdempotencyConflict { existing }) if fingerprint != maker => {
                assert_eq!(existing, id, "key {key}");
            }
            other => panic!("key {key}, fingerprint {fingerprint} (made by {maker}): {other:?}"),
        }
    }
    assert_eq!(a.counts().await.unwrap().queued, KEYS);
    let transactions = transactions(&db, &schema, "aiwg_jobs").await;
    assert!(
        transactions <= (KEYS / 2) as i64,
        "{transactions} transactions for {KEYS} jobs: keyed submits at once were not batched"
    );
    db.cleanup().await;
}

/// SQL computes the advisory lock keys as the store's Rust code does (`advisory_lock_key`,
/// whose unit test checks the same values), so a claim in either locks the same project.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_keys_in_sql_match_the_rust_ones() {
    let Some(db) = test_db().await else { return };
    let store = db.fresh_store().await;
    for (name, key) in [
        ("/srv/repo", -3_471_333_599_544_597_417_i64),
        ("/srv/café ☕", -7_271_841_739_584_437_555),
        ("concurrency:octo/app#7", -4_914_039_854_066_763_211),
    ] {
        let got: i64 = sqlx::query_scalar("SELECT aiwg_lock_key('aiwg_test', $1)")
            .bind(name)
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(got, key, "{name}");
    }
    db.cleanup().await;
}

/// The key function is inlined where it is called (migration 0023): a statement that calls it
/// computes its expression, with no SQL function to run (and plan) per statement. An
/// IMMUTABLE declaration over the STABLE `convert_to` is never inlined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_key_function_is_inlined_where_it_is_called() {
    let Some(db) = test_db().await else { return };
    let store = db.fresh_store().await;
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN (VERBOSE, COSTS OFF) SELECT aiwg_lock_key('aiwg_test', n) FROM unnest($1::text[]) AS n",
    )
    .bind(vec!["/srv/a".to_owned(), "/srv/b".to_owned()])
    .fetch_all(store.pool())
    .await
    .unwrap();
    let plan = plan.join("\n");
    assert!(
        plan.contains("sha256"),
        "the expression is computed in place:\n{plan}"
    );
    assert!(
        !plan.contains("aiwg_lock_key"),
        "no call of the function:\n{plan}"
    );
    db.cleanup().await;
}

/// A claim under a per-project limit reads the heads of the projects with room, not the
/// queue: with 2 000 jobs queued in a project at its limit, a claim that finds the one job of
/// another project fetches a handful of rows (the old pick read every queued job ahead of it,
/// and every claim of an idle worker did so to find nothing). Counted by PostgreSQL for the
/// claim's own transaction (`pg_stat_xact_user_tables`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_claim_reads_project_heads_not_the_queue() {
    let Some(db) = test_db().await else { return };
    let store = db.fresh_store().await;
    queue(&store, 2_000, "/busy", 5).await;
    let req = ClaimRequest::new("w", Duration::from_secs(60)).per_project(1);
    let first = store.claim(&req).await.unwrap().expect("a /busy job");
    assert_eq!(&*first.job.project_path, "/busy");
    let other = sample_job("w", "/other", 0);
    let other_id = other.id;
    store.create(NewJob::new(other)).await.unwrap();
    analyze(&store).await;
    let mut tx = store.pool().begin().await.unwrap();
    let before = rows_read(&mut tx).await;
    let claim = |max: i64| limited_claim(&store, max);
    let ids = claim(8).fetch_all(&mut *tx).await.unwrap();
    assert_eq!(
        ids,
        [*other_id.as_uuid()],
        "the other project's job, and only it"
    );
    let read = rows_read(&mut tx).await - before;
    assert!(
        read < 100,
        "{read} rows read to claim past 2 000 jobs of a full project"
    );
    // Nothing left to claim: as cheap.
    assert!(claim(8).fetch_all(&mut *tx).await.unwrap().is_empty());
    let again = rows_read(&mut tx).await - before - read;
    assert!(again < 100, "{again} rows read to find nothing");
    tx.rollback().await.unwrap();
    db.cleanup().await;
}

/// The claim under a per-project limit counts each candidate project's running jobs. Its one
/// generic plan, made while the statistics showed no running job, walked the index of every
/// job by status: every running job of every project, once per project (migration 0015 keeps
/// the count on the index of running jobs by project). 64 projects at their limit: a claim
/// that finds nothing reads about a row per project, not 64 × 64.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_claim_counts_each_projects_running_jobs_alone() {
    let Some(db) = test_db().await else { return };
    let store = db.fresh_store().await;
    let jobs: Vec<NewJob> = (0..6_000)
        .map(|i| NewJob::new(sample_job("w", &format!("/p{}", i % 64), 0)))
        .collect();
    for created in store.create_many(jobs).await {
        created.unwrap();
    }
    // Two thirds finished long ago: the statistics see finished and queued jobs, none running.
    sqlx::query(
        "UPDATE aiwg_jobs SET status = 'completed', queue_seq = NULL \
         WHERE id IN (SELECT id FROM aiwg_jobs ORDER BY id LIMIT 4000)",
    )
    .execute(store.pool())
    .await
    .unwrap();
    analyze(&store).await;
    let mut tx = store.pool().begin().await.unwrap();
    let claim = |max: i64| limited_claim(&store, max);
    let first = claim(64).fetch_all(&mut *tx).await.unwrap();
    assert_eq!(first.len(), 64, "one job per project");
    let before = rows_read(&mut tx).await;
    assert!(
        claim(8).fetch_all(&mut *tx).await.unwrap().is_empty(),
        "every project is at its limit"
    );
    let read = rows_read(&mut tx).await - before;
    assert!(
        read < 400,
        "{read} rows read to find 64 projects at their limit, 64 jobs running"
    );
    tx.rollback().await.unwrap();
    db.cleanup().await;
}

/// A claim under a per-project limit passes over a project whose lock another claim holds
/// while other projects have room (migration 0016): before, it waited for the other claim's
/// commit on the first project in claim order, and two engines' claims always start on the
/// same one. A claim that finds nothing else still waits for that project, and then takes its
/// job: it returns empty only when there is nothing it could have claimed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_claim_passes_over_a_project_another_claim_is_taking() {
    let Some(db) = test_db().await else { return };
    let store = Arc::new(db.fresh_store().await);
    queue(&store, 1, "/first", 5).await;
    queue(&store, 1, "/second", 0).await;
    // Another claim holds the first project's lock, as while it starts that project's job.
    let mut other = store.pool().begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(aiwg_lock_key($1, '/first'))")
        .bind(store.channel())
        .execute(&mut *other)
        .await
        .unwrap();
    let claim_one = || async {
        let mut tx = store.pool().begin().await.unwrap();
        let ids = limited_claim(&store, 2).fetch_all(&mut *tx).await.unwrap();
        tx.commit().await.unwrap();
        let mut projects = Vec::new();
        for id in ids {
            let job = store
                .get(aiwg_core::JobId::from(id))
                .await
                .unwrap()
                .unwrap();
            projects.push(job.project_path.to_string());
        }
        projects
    };
    let projects = tokio::time::timeout(Duration::from_secs(10), claim_one())
        .await
        .expect("the claim waited for the project another claim holds");
    assert_eq!(projects, ["/second"], "the project nobody else is taking");
    // Only the held project has room now: the claim waits for it, then takes its job.
    let waiting = tokio::spawn({
        let store = Arc::clone(&store);
        async move {
            let mut tx = store.pool().begin().await.unwrap();
            let ids = limited_claim(&store, 2).fetch_all(&mut *tx).await.unwrap();
            tx.commit().await.unwrap();
            ids.len()
        }
    });
    let blocked = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
            )
            .fetch_one(store.pool())
            .await
            .unwrap();
            if waiting > 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(
        blocked.is_ok(),
        "the claim did not wait for the held project"
    );
    assert!(
        !waiting.is_finished(),
        "the claim ended while the project was held"
    );
    other.rollback().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the claim went on once the project was free")
        .unwrap();
    assert_eq!(got, 1, "the held project's job, once it was free");
    db.cleanup().await;
}

/// A claim under a per-project limit starts the jobs of each pass together (migration 0019):
/// its loop picks them, one update starts them. A job another transaction holds when that
/// update runs (another claim starting it, a cancel) is skipped, its project's room is given
/// back, and the next pass takes the project's next job; the jobs come back in claim order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_claim_gives_back_the_room_of_a_job_taken_meanwhile() {
    let Some(db) = test_db().await else { return };
    let store = db.fresh_store().await;
    queue(&store, 2, "/a", 9).await;
    queue(&store, 1, "/b", 5).await;
    queue(&store, 1, "/c", 0).await;
    let first_of_a: uuid::Uuid = sqlx::query_scalar(
        "SELECT id FROM aiwg_jobs WHERE project_path = '/a' ORDER BY queue_seq LIMIT 1",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    // Another transaction holds the first job of `/a`, as a claim starting it would.
    let mut other = store.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM aiwg_jobs WHERE id = $1 FOR UPDATE")
        .bind(first_of_a)
        .execute(&mut *other)
        .await
        .unwrap();
    let mut tx = store.pool().begin().await.unwrap();
    let ids = limited_claim(&store, 3).fetch_all(&mut *tx).await.unwrap();
    tx.commit().await.unwrap();
    other.rollback().await.unwrap();
    let mut got = Vec::new();
    for id in &ids {
        let job = store
            .get(aiwg_core::JobId::from(*id))
            .await
            .unwrap()
            .unwrap();
        got.push((job.project_path.to_string(), job.status));
    }
    assert!(!ids.contains(&first_of_a), "the held job was claimed");
    let running = aiwg_core::JobStatus::Running;
    assert_eq!(
        got,
        [
            ("/b".to_owned(), running),
            ("/c".to_owned(), running),
            ("/a".to_owned(), running)
        ],
        "one job of each project: the next of `/a` in the pass after"
    );
    db.cleanup().await;
}

/// A per-project claim walks the queue in claim order first (migration 0026): with many
/// projects waiting, most of them with room (a forge host's many repositories), it reads a
/// handful of rows to start a job, not every project's head (before: 3 probes per project,
/// 11 ms a claim with 2 000 projects).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_project_claim_reads_a_handful_of_rows_however_many_projects_wait() {
    let Some(db) = test_db().await else { return };
    let store = db.fresh_store().await;
    let jobs: Vec<NewJob> = (0..1_200)
        .map(|i| NewJob::new(sample_job("w", &format!("/p{}", i % 600), 0)))
        .collect();
    for created in store.create_many(jobs).await {
        created.unwrap();
    }
    analyze(&store).await;
    for n in [1, 4] {
        let mut tx = store.pool().begin().await.unwrap();
        let before = rows_read(&mut tx).await;
        let claimed = limited_claim(&store, n).fetch_all(&mut *tx).await.unwrap();
        let read = rows_read(&mut tx).await - before;
        assert_eq!(claimed.len() as i64, n);
        assert!(
            read < 100,
            "{read} rows read to start {n} of 1 200 jobs queued in 600 projects"
        );
        tx.rollback().await.unwrap();
    }
    db.cleanup().await;
}

/// With every project but one at its limit (the default limit of one job a project, as many
/// projects as workers, each running its job), a claim walks the queue's first jobs, all but
/// one of full projects, and reads the projects' heads only when the walk was not enough
/// (migration 0027; 0026 read them whenever its loop went past the queue's tenth job, and found
/// the walk's end again to read past it); there a full project costs one probe, not a count of
/// its running jobs too. The one job that may start does, whatever the claim asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_project_claim_reads_the_heads_only_past_its_walk_and_not_of_full_projects() {
    let Some(db) = test_db().await else { return };
    let store = db.fresh_store().await;
    let full = |n: usize| -> Vec<NewJob> {
        (0..n)
            .map(|i| NewJob::new(sample_job("w", &format!("/p{:02}", i % 64), 0)))
            .collect()
    };
    for created in store.create_many(full(64)).await {
        created.unwrap();
    }
    let running = limited_claim(&store, 64)
        .fetch_all(store.pool())
        .await
        .unwrap();
    assert_eq!(running.len(), 64, "one job of each project");
    // The one job that may start is the queue's twentieth.
    for created in store.create_many(full(19)).await {
        created.unwrap();
    }
    queue(&store, 1, "/q", 0).await;
    for created in store.create_many(full(173)).await {
        created.unwrap();
    }
    analyze(&store).await;
    // (asked for, most rows it may read): 0026 read 276 and 336, this 106 and 202.
    for (n, most) in [(1, 120), (32, 250)] {
        let mut tx = store.pool().begin().await.unwrap();
        let before = rows_read(&mut tx).await;
        let claimed = limited_claim(&store, n).fetch_all(&mut *tx).await.unwrap();
        let read = rows_read(&mut tx).await - before;
        assert_eq!(claimed.len(), 1, "only the one project with room");
        let project: String =
            sqlx::query_scalar("SELECT project_path FROM aiwg_jobs WHERE id = $1")
                .bind(claimed[0])
                .fetch_one(&mut *tx)
                .await
                .unwrap();
        assert_eq!(project, "/q");
        assert!(
            read <= most,
            "{read} rows read to start the one job of 193 queued, {n} asked for"
        );
        tx.rollback().await.unwrap();
    }
    db.cleanup().await;
}

/// When the first jobs in claim order all belong to projects at their limit, the claim reads
/// on through the heads of the projects with room: a job queued behind a long queue of a busy
/// project starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_project_claim_finds_a_job_behind_a_busy_projects_long_queue() {
    let Some(db) = test_db().await else { return };
    let store = db.fresh_store().await;
    queue(&store, 100, "/busy", 0).await;
    let first = limited_claim(&store, 1)
        .fetch_all(store.pool())
        .await
        .unwrap();
    assert_eq!(first.len(), 1, "the busy project's first job");
    queue(&store, 1, "/idle", 0).await;
    for n in [1, 4] {
        let mut tx = store.pool().begin().await.unwrap();
        let claimed = limited_claim(&store, n).fetch_all(&mut *tx).await.unwrap();
        assert_eq!(claimed.len(), 1, "only the idle project's job may start");
        let project: String =
            sqlx::query_scalar("SELECT project_path FROM aiwg_jobs WHERE id = $1")
                .bind(claimed[0])
                .fetch_one(&mut *tx)
                .await
                .unwrap();
        assert_eq!(project, "/idle");
        tx.rollback().await.unwrap();
    }
    db.cleanup().await;
}

/// Both claims keep one generic plan per connection for each of their statements, made from
/// the statistics of the first call. The HTTP load on PostgreSQL (a queue grown from empty in
/// seconds, never analyzed meanwhile) showed what a plan made while the table held a few jobs
/// does: sequential scans, and whole indexes read to find a job by key (2 757 pages to start
/// one job). Neither claim may scan the table (migration 0019); the per-project claim starts
/// eight jobs or more with a statement planned on each call, for them and the table as it is,
/// and fewer each with a statement planned once that names it by key alone (migrations 0025,
/// 0026): started
/// after the queue grew from 8 jobs to 6 008, in two projects, each claim still reads a
/// handful of rows, whether its plans were made on a table just analyzed or never analyzed.
/// (Without 0019, the per-project claim read 12 015 of 3 004; with only the scans priced out,
/// 3 006.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_read_only_the_jobs_they_start_however_the_table_grew() {
    let Some(db) = test_db().await else { return };
    for analyzed in [true, false] {
        let schema = db.schema().await;
        let store = db.store_in(&schema, 4).await;
        // One connection, so that the claims run in the same session and share its plans.
        let claimer = db.pool(&schema, 1).await;
        queue(&store, 4, "/p", 0).await;
        queue(&store, 4, "/q", 0).await;
        if analyzed {
            analyze(&store).await;
        }
        // The plain claim; the per-project claim of one job and of two, one of each project
        // (its static statement, once per job), and of eight, four of each (its dynamic one).
        let claims = || {
            [
                ("aiwg_claim", plain_claim(1), 1),
                ("aiwg_claim_limited, one job", limited_claim(&store, 1), 1),
                ("aiwg_claim_limited, two jobs", limited_claim(&store, 2), 2),
                (
                    "aiwg_claim_limited, eight jobs",
                    limited_claim_of(&store, 8, 4),
                    8,
                ),
            ]
        };
        for (name, claim, n) in claims() {
            let mut tx = claimer.begin().await.unwrap();
            let first = claim.fetch_all(&mut *tx).await.unwrap();
            assert_eq!(
                first.len(),
                n,
                "{name}: a first claim, made while the table is small"
            );
            tx.rollback().await.unwrap();
        }
        queue(&store, 3_000, "/p", 0).await;
        queue(&store, 3_000, "/q", 0).await;
        for (name, claim, n) in claims() {
            let mut tx = claimer.begin().await.unwrap();
            let before = rows_read(&mut tx).await;
            let pages_before = pages_read(&mut tx).await;
            let claimed = claim.fetch_all(&mut *tx).await.unwrap();
            assert_eq!(claimed.len(), n, "{name}: {n} jobs claimed");
            let read = rows_read(&mut tx).await - before;
            let pages = pages_read(&mut tx).await - pages_before;
            let table = if analyzed { "" } else { "never " };
            assert!(
                // About 25 pages and 24 a job (the indexes each started job enters): 50 for one
                // job, 218 for eight; a plan that walks an index reads thousands.
                read < 100 && pages < 100 + 40 * n as i64,
                "{name} (first plans made on a table {table}analyzed): {read} rows and {pages} \
                 pages read to start {n} of 6 008 queued"
            );
            tx.rollback().await.unwrap();
        }
    }
    db.cleanup().await;
}

/// The claim keeps one generic plan (migration 0010), which takes a claim for a tenth of the
/// queued jobs whatever it asks for. With a few thousand jobs in the table, its update then
/// joined the picked rows to the table by hashing all of it: every claim read every job.
/// It names the picked rows by key now (migration 0014).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_reads_the_jobs_it_picks_not_the_table() {
    let Some(db) = test_db().await else { return };
    let store = db.fresh_store().await;
    queue(&store, 6_000, "/p", 0).await;
    analyze(&store).await;
    let mut tx = store.pool().begin().await.unwrap();
    let before = rows_read(&mut tx).await;
    let claimed = plain_claim(1).fetch_all(&mut *tx).await.unwrap();
    assert_eq!(claimed.len(), 1, "one job claimed");
    let read = rows_read(&mut tx).await - before;
    assert!(
        read < 100,
        "{read} rows read to claim one job of 6 000 queued"
    );
    tx.rollback().await.unwrap();
    db.cleanup().await;
}

/// Each claim keeps one generic plan per connection, made from the statistics of its moment.
/// In `pg_queue`, made while they showed few queued jobs, the plan of `aiwg_claim` read every
/// queued job as a bitmap and sorted them all to take the first few: every claim read the
/// whole queue. Both claims now price sorts out and allow index scans whatever the session
/// says (migration 0017), so they walk the queue in claim order and stop. The statistics that
/// led PostgreSQL there are hard to make on purpose; a session that turns index scans off
/// leads it to the same plan, so that stands in for them here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_walk_the_queue_whatever_the_planner_would_prefer() {
    let Some(db) = test_db().await else { return };
    let store = db.fresh_store().await;
    queue(&store, 3_000, "/p", 0).await;
    analyze(&store).await;
    let claims = [plain_claim(1), limited_claim(&store, 1)];
    for (name, claim) in ["aiwg_claim", "aiwg_claim_limited"].into_iter().zip(claims) {
        let mut tx = store.pool().begin().await.unwrap();
        sqlx::query("SET LOCAL enable_indexscan = off")
            .execute(&mut *tx)
            .await
            .unwrap();
        let before = rows_read(&mut tx).await;
        let claimed = claim.fetch_all(&mut *tx).await.unwrap();
        assert_eq!(claimed.len(), 1, "{name}: one job claimed");
        let read = rows_read(&mut tx).await - before;
        assert!(
            read < 100,
            "{name}: {read} rows read to claim one job of 3 000 queued"
        );
        tx.rollback().await.unwrap();
    }
    // Nor do they read an index as a bitmap: a bitmap scan never marks the entries of finished
    // jobs dead, so each count of a project's running jobs visited every job of the project
    // that had run since the last vacuum (`pg_queue`, per project after the wide burn-down:
    // 6 300 pages per claim, 850 with plain index scans).
    let settings: Vec<Vec<String>> = sqlx::query_scalar(
        "SELECT p.proconfig FROM pg_proc p \
         WHERE p.proname IN ('aiwg_claim', 'aiwg_claim_limited') \
           AND p.pronamespace = to_regnamespace(current_schema())::oid",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert_eq!(settings.len(), 2, "both claims");
    for config in settings {
        for wanted in [
            "enable_sort=off",
            "enable_bitmapscan=off",
            "enable_indexscan=on",
            "enable_seqscan=off",
        ] {
            assert!(config.iter().any(|c| c == wanted), "{wanted} in {config:?}");
        }
    }
    db.cleanup().await;
}

/// The completer's statements (a step's event, an outcome's read and write) name their rows
/// by key and fence them by lease token. They used to say `status = 'running'` too, and a
/// generic plan made while the statistics showed few running jobs then read every running
/// job through an index of running jobs, as a bitmap that never marks finished jobs' entries
/// dead, on every batch (`pg_queue` after its narrow burn-downs: 2 200 pages for 22 rows).
/// The table's `CHECK` makes a row with a lease token a running one, so the token fences it
/// alone, and the statements' plans can only read the rows they name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_completers_statements_read_only_the_rows_they_name() {
    let Some(db) = test_db().await else { return };
    let store = one_connection_store(&db).await;
    // The statistics are taken while few jobs run among many finished ones...
    queue(&store, 3_000, "/p", 0).await;
    sqlx::query("UPDATE aiwg_jobs SET status = 'completed', queue_seq = NULL")
        .execute(store.pool())
        .await
        .unwrap();
    queue(&store, 6, "/p", 0).await;
    let req = ClaimRequest::new("w", Duration::from_secs(600));
    assert_eq!(store.claim_many(&req, 6).await.unwrap().len(), 6);
    analyze(&store).await;
    // ...then many run.
    queue(&store, 1_000, "/p", 0).await;
    let running = claim_at_least(&store, 964).await;
    step_and_finish(&store, &running[0].lease).await;
    assert_the_completer_reads_by_key(&store).await;
    db.cleanup().await;
}

/// The same when the completer's plans are made while the table holds a handful of jobs (a
/// fresh database, the first jobs of a connection) and the queue grows before the table is
/// analyzed again: a plan made from those statistics must not read the table whole, or
/// through an index other than the one of its key, however many jobs came since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_completers_statements_read_only_the_rows_they_name_however_the_table_grew() {
    let Some(db) = test_db().await else { return };
    let store = one_connection_store(&db).await;
    queue(&store, 4, "/p", 0).await;
    analyze(&store).await;
    let first = claim_at_least(&store, 4).await;
    step_and_finish(&store, &first[0].lease).await;
    queue(&store, 3_000, "/p", 0).await;
    let running = claim_at_least(&store, 2_000).await;
    step_and_finish(&store, &running[0].lease).await;
    assert_the_completer_reads_by_key(&store).await;
    db.cleanup().await;
}

/// A job's outcome after its step event needs no read: the completer holds the job as that
/// event's statement left it, with the row's version, and applies the outcome to it. Shown by
/// removing the read (`aiwg_leased_jobs`) before the outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_after_a_step_event_reads_no_row() {
    let Some(db) = test_db().await else { return };
    let store = db.fresh_store().await;
    queue(&store, 1, "/p", 0).await;
    let claimed = claim_at_least(&store, 1).await.remove(0);
    let started = JobEventKind::StepStarted {
        step: "s".into(),
        agent: "a".into(),
        attempt: 1,
    };
    store.append(&claimed.lease, started).await.unwrap();
    sqlx::query("DROP FUNCTION aiwg_leased_jobs(uuid[], bigint[], timestamptz[])")
        .execute(store.pool())
        .await
        .unwrap();
    let last = JobEventKind::StepFinished {
        step: "s".into(),
        ok: true,
        duration_ms: 1,
        error: None,
    };
    let done = store
        .finish_after(
            &claimed.lease,
            last,
            Finish::Completed(JobResult::default()),
        )
        .await
        .unwrap();
    let (job, _) = &done.ended;
    assert_eq!(job.status, JobStatus::Completed);
    assert_eq!(
        step_names(&job.progress.completed),
        ["s"],
        "{:?}",
        job.progress
    );
    let stored = store.get(claimed.job.id).await.unwrap().unwrap();
    assert_eq!(stored.status, JobStatus::Completed);
    assert_eq!(stored.progress, job.progress);
    db.cleanup().await;
}

/// A job's outcome straight after its claim (a pause for an approval before the first step, a
/// job that fails before it) needs no read either: the claims hand the completer the jobs as
/// they left their rows, with the rows' version. Every way a job is claimed: the claim without
/// a per-project limit, the per-project claim starting one job and starting several, and the
/// claim of a concurrency group's job. Shown by removing the read (`aiwg_leased_jobs`) before
/// the outcomes; a wrong version would make an outcome read its row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_after_a_claim_reads_no_row() {
    let Some(db) = test_db().await else { return };
    let store = db.fresh_store().await;
    let ttl = Duration::from_secs(600);
    let mut claimed = Vec::new();
    queue(&store, 1, "/a", 0).await;
    claimed.extend(
        store
            .claim_many(&ClaimRequest::new("w", ttl), 8)
            .await
            .unwrap(),
    );
    queue(&store, 1, "/b", 0).await;
    let one = ClaimRequest::new("w", ttl).per_project(1);
    claimed.extend(store.claim_many(&one, 8).await.unwrap());
    queue(&store, 2, "/c", 0).await;
    let two = ClaimRequest::new("w", ttl).per_project(2);
    claimed.extend(store.claim_many(&two, 8).await.unwrap());
    let mut grouped = sample_job("w", "/d", 0);
    grouped.concurrency_group = Some("g".into());
    store.create(NewJob::new(grouped)).await.unwrap();
    claimed.extend(
        store
            .claim_many(&ClaimRequest::new("w", ttl), 8)
            .await
            .unwrap(),
    );
    let projects: Vec<&str> = claimed.iter().map(|c| &*c.job.project_path).collect();
    assert_eq!(projects, ["/a", "/b", "/c", "/c", "/d"]);
    sqlx::query("DROP FUNCTION aiwg_leased_jobs(uuid[], bigint[], timestamptz[])")
        .execute(store.pool())
        .await
        .unwrap();
    let now = chrono::Utc::now();
    for (i, c) in claimed.iter().enumerate() {
        let finish = if i % 2 == 0 {
            Finish::AwaitingApproval {
                result: JobResult::default(),
                approval: aiwg_core::job::Approval::new("s", now, now + chrono::Duration::hours(1)),
            }
        } else {
            Finish::Completed(JobResult::default())
        };
        let want = finish.status();
        let (job, _) = store.finish(&c.lease, finish).await.unwrap();
        assert_eq!(job.status, want);
        let stored = store.get(c.job.id).await.unwrap().unwrap();
        assert_eq!(stored, job, "the job written is the one answered");
    }
    db.cleanup().await;
}

/// When the row changed after the step event (here its job, by another writer), the
/// outcome's statement finds another version than the one the completer holds, and the
/// outcome reads the row and is applied to what it holds now: nothing written meanwhile is
/// lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_after_its_row_changed_is_applied_to_the_row_read_again() {
    let Some(db) = test_db().await else { return };
    let store = db.fresh_store().await;
    queue(&store, 1, "/p", 0).await;
    let claimed = claim_at_least(&store, 1).await.remove(0);
    let started = JobEventKind::StepStarted {
        step: "s".into(),
        agent: "a".into(),
        attempt: 1,
    };
    store.append(&claimed.lease, started).await.unwrap();
    sqlx::query(
        "UPDATE aiwg_jobs SET job = jsonb_set(job, '{guidance}', '\"changed meanwhile\"') \
         WHERE id = $1",
    )
    .bind(claimed.job.id.as_uuid())
    .execute(store.pool())
    .await
    .unwrap();
    let (job, _) = store
        .finish(&claimed.lease, Finish::Completed(JobResult::default()))
        .await
        .unwrap();
    assert_eq!(job.status, JobStatus::Completed);
    assert_eq!(job.guidance.as_deref(), Some("changed meanwhile"));
    assert_eq!(
        step_names(&job.progress.in_progress),
        ["s"],
        "{:?}",
        job.progress
    );
    let stored = store.get(claimed.job.id).await.unwrap().unwrap();
    assert_eq!(stored.guidance.as_deref(), Some("changed meanwhile"));
    assert_eq!(stored.status, JobStatus::Completed);
    db.cleanup().await;
}

/// A store in a fresh schema on one connection (so a test reads the completer's own prepared
/// statements), whose statements use their generic plan from the first call, as a busy
/// store's do.
async fn one_connection_store(db: &pg_support::TestDb) -> PgStore {
    let schema = db.schema().await;
    let options = <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(db.url())
        .unwrap()
        .options([
            ("search_path", schema.as_str()),
            ("synchronous_commit", "off"),
            ("plan_cache_mode", "force_generic_plan"),
        ]);
    let pool = PgStore::pool_options()
        .max_connections(1)
        .connect_with(options)
        .await
        .unwrap();
    let store = PgStore::from_pool(pool).await.unwrap();
    store.migrate().await.unwrap();
    // Statistics change only when a test analyzes: an autovacuum's analyze at an unknown
    // moment would re-plan the statements with whatever the table held then.
    sqlx::query("ALTER TABLE aiwg_jobs SET (autovacuum_enabled = off)")
        .execute(store.pool())
        .await
        .unwrap();
    store
}

/// Claims (64 at a time) until at least `n` jobs run.
async fn claim_at_least(store: &PgStore, n: usize) -> Vec<aiwg_core::store::Claimed> {
    let req = ClaimRequest::new("w", Duration::from_secs(600));
    let mut running = Vec::new();
    while running.len() < n {
        let got = store.claim_many(&req, 64).await.unwrap();
        assert!(!got.is_empty(), "the queue ran dry after {}", running.len());
        running.extend(got);
    }
    running
}

/// A step's start and the job's outcome, through the completer.
async fn step_and_finish(store: &PgStore, lease: &aiwg_core::store::Lease) {
    let started = JobEventKind::StepStarted {
        step: "s".into(),
        agent: "a".into(),
        attempt: 1,
    };
    store.append(lease, started).await.unwrap();
    store
        .finish(lease, Finish::Completed(JobResult::default()))
        .await
        .unwrap();
}

/// Each of the completer's statements (`aiwg_append_events`, `aiwg_leased_jobs`,
/// `aiwg_record_outcomes`, migrations 0020, 0028 and 0034), run with the plans the store's
/// connection keeps for them, reads only the row it names, whatever the table holds now: each
/// is called for one running job in a transaction that is rolled back, and the rows of
/// `aiwg_jobs` it read are counted.
async fn assert_the_completer_reads_by_key(store: &PgStore) {
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM aiwg_jobs")
        .fetch_one(store.pool())
        .await
        .unwrap();
    let mut tx = store.pool().begin().await.unwrap();
    let (id, token): (uuid::Uuid, i64) = sqlx::query_as(
        "SELECT id, lease_token FROM aiwg_jobs WHERE lease_token IS NOT NULL LIMIT 1",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    let mut read = Vec::new();
    let before = rows_read(&mut tx).await;
    let appended: Vec<i64> = sqlx::query_scalar(
        "SELECT last_seq FROM aiwg_append_events(ARRAY[$1::uuid], ARRAY[$2::int8], \
             ARRAY[now()], ARRAY[2], ARRAY[0::int2], ARRAY[''], ARRAY[1, 1], ARRAY[1, 2], \
             ARRAY[now(), now()], ARRAY['{}', '{}'], false)",
    )
    .bind(id)
    .bind(token)
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    assert_eq!(appended.len(), 1, "the write of two events is answered");
    read.push(("aiwg_append_events", rows_read(&mut tx).await - before));
    let before = rows_read(&mut tx).await;
    let leased: Vec<(String, String)> = sqlx::query_as(
        "SELECT state::text, version FROM aiwg_leased_jobs(ARRAY[$1::uuid], ARRAY[$2::int8], \
             ARRAY[now()])",
    )
    .bind(id)
    .bind(token)
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    assert_eq!(leased.len(), 1, "the leased job is read");
    read.push(("aiwg_leased_jobs", rows_read(&mut tx).await - before));
    let (job, version) = &leased[0];
    let before = rows_read(&mut tx).await;
    let recorded: Vec<uuid::Uuid> = sqlx::query_scalar(
        "SELECT id FROM aiwg_record_outcomes(ARRAY[$1::uuid], ARRAY[$2::int8], ARRAY[now()], \
             ARRAY[$3], ARRAY['completed'], ARRAY[NULL::timestamptz], ARRAY[$4], \
             ARRAY[NULL::timestamptz], ARRAY[now()], ARRAY['{}'], ARRAY[NULL::timestamptz], \
             ARRAY[NULL::text], ARRAY[NULL::timestamptz], ARRAY[NULL::text])",
    )
    .bind(id)
    .bind(token)
    .bind(version)
    .bind(job)
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    assert_eq!(recorded, [id], "the outcome is written");
    read.push(("aiwg_record_outcomes", rows_read(&mut tx).await - before));
    tx.rollback().await.unwrap();
    for (statement, rows) in read {
        assert!(
            rows < 10,
            "{statement} read {rows} rows of aiwg_jobs to write one of {jobs}"
        );
    }
}

/// A claim is one statement that moves the job in SQL (`aiwg_claimed_state`, migration 0030):
/// it must make the job and the event that `apply::claim` makes, for a first claim, a retry
/// (progress reset, `retry_at` cleared), a job resuming after an approval (same attempt,
/// progress kept) and an attempt counter at its ceiling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_in_sql_matches_apply_claim() {
    let Some(db) = test_db().await else { return };
    let schema = db.schema().await;
    let store = db.store_in(&schema, 4).await;
    let past = chrono::Utc::now() - chrono::Duration::seconds(5);
    let progress = || Progress {
        completed: vec!["a".into()],
        in_progress: vec!["b".into()],
        pending: vec!["c".into()],
    };
    let first = sample_job("w", "/p", 3);
    let mut retry = sample_job("w", "/p", 2);
    retry.attempt = 1;
    retry.retry_at = Some(past);
    retry.progress = progress();
    retry.history.push(StatusChange {
        status: JobStatus::Queued,
        at: past,
        attempt: 1,
        reason: Some("retry after boom: it broke".to_owned()),
    });
    let mut resuming = sample_job("w", "/p", 1);
    resuming.attempt = 2;
    resuming.resume_after_approval = true;
    resuming.started_at = Some(past);
    resuming.progress = progress();
    let mut ceiling = sample_job("w", "/p", 0);
    ceiling.attempt = u32::MAX;
    let mut before = std::collections::HashMap::new();
    for job in [first, retry, resuming, ceiling] {
        let id = job.id;
        store.create(NewJob::new(job)).await.unwrap();
        before.insert(id, store.get(id).await.unwrap().unwrap());
    }
    let req = ClaimRequest::new("w", Duration::from_secs(60));
    let at = chrono::SubsecRound::trunc_subsecs(req.now, 6);
    let claimed = store.claim_many(&req, 8).await.unwrap();
    let priorities: Vec<i32> = claimed.iter().map(|c| c.job.priority).collect();
    assert_eq!(priorities, [3, 2, 1, 0], "claimed in priority order");
    for c in claimed {
        let mut expected = before.remove(&c.job.id).unwrap();
        let kind = apply::claim(&mut expected, at).unwrap();
        let expected_json = serde_json::to_value(&expected).unwrap();
        assert_eq!(
            serde_json::to_value(&c.job).unwrap(),
            expected_json,
            "the claimed job, priority {}",
            c.job.priority
        );
        let stored = store.get(c.job.id).await.unwrap().unwrap();
        assert_eq!(serde_json::to_value(&stored).unwrap(), expected_json);
        assert_eq!(c.event.kind, kind, "the claim's event");
        assert_eq!(c.lease.attempt, expected.attempt);
        let events = store.events(c.job.id, 0).await.unwrap();
        assert_eq!(events.last(), Some(&c.event), "the recorded event");
    }
    // The claim never compiles itself (a long queue made its estimated cost pass
    // `jit_above_cost`, and each claim spent tens of milliseconds in LLVM), and keeps one plan
    // (the plan cache planned it anew on every call, which cost more than running it), made
    // to walk the queue in claim order whatever the statistics say (no sort, no bitmap, no
    // sequential scan, index scans on).
    let settings: Vec<Option<Vec<String>>> = sqlx::query_scalar(
        "SELECT p.proconfig FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
         WHERE p.proname = 'aiwg_claim' AND n.nspname = $1",
    )
    .bind(&schema)
    .fetch_all(db.admin())
    .await
    .unwrap();
    assert_eq!(
        settings,
        [Some(vec![
            "jit=off".to_owned(),
            "plan_cache_mode=force_generic_plan".to_owned(),
            "enable_sort=off".to_owned(),
            "enable_bitmapscan=off".to_owned(),
            "enable_indexscan=on".to_owned(),
            "enable_seqscan=off".to_owned(),
        ])]
    );
    // (The claims above, and the store suite's, ran on that generic plan from the first call.)
    db.cleanup().await;
}

/// The store's pool checks a connection before handing it out only when it has been idle a
/// while (`PgStore::pool_options`; a check on every hand-out was one round trip in two). So a
/// connection the server closed under a busy store is found out by the statement that uses
/// it: that statement fails with a backend error, the pool drops the connection, and the
/// store goes on working on new ones. Nothing is lost: every job created is there, claimed
/// once.
///
/// The pool here checks only connections idle for an hour, so that how long the machine
/// takes between the first writes and the next does not decide whether a check runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_goes_on_after_the_server_closed_its_connections() {
    let options = PgStore::pool_options_checking_after(Duration::from_secs(3600));
    let Some((failed, closed)) = write_through_closed_connections(options).await else {
        return;
    };
    assert!(
        failed <= closed,
        "{failed} statements failed for {closed} closed connections"
    );
    // Recently used connections are not checked before they are handed out.
    assert!(failed >= 1, "no statement found a closed connection");
}

/// A pool that checks every connection it hands out (idle time zero, sqlx's default) finds
/// the closed ones before any statement uses them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_that_checks_every_connection_fails_no_statement() {
    let options = PgStore::pool_options_checking_after(Duration::ZERO);
    let Some((failed, _)) = write_through_closed_connections(options).await else {
        return;
    };
    assert_eq!(failed, 0, "statements failed on checked connections");
}

/// Opens every connection of a store's pool, has the server close them all, then creates jobs
/// until `MAX + 5` exist, and checks that every one of them is claimed once. Returns how many
/// creates failed and how many connections the server closed (`None`: no database here).
async fn write_through_closed_connections(
    options: sqlx::postgres::PgPoolOptions,
) -> Option<(i64, i64)> {
    let db = test_db().await?;
    const MAX: u32 = 3;
    let (store, app) = db.named_store_with("aiwg-closed", MAX, options).await;
    let mut announcements = sqlx::postgres::PgListener::connect_with(db.admin())
        .await
        .unwrap();
    announcements.listen(store.channel()).await.unwrap();
    let mut created = Vec::new();
    let warm = futures_util::future::join_all(
        (0..MAX).map(|_| store.create(NewJob::new(sample_job("w", "/p", 0)))),
    )
    .await;
    for c in warm {
        created.push(new_id(c.unwrap()));
    }
    // The store announces its jobs from its own connections: once it has, nothing but this
    // test's statements uses them, so the first one after they are closed meets a closed one.
    let mut announced = HashSet::new();
    while announced.len() < created.len() {
        let note = tokio::time::timeout(Duration::from_secs(30), announcements.recv())
            .await
            .expect("the store announces its jobs")
            .unwrap();
        for id in &created {
            if note.payload().contains(&id.to_string()) {
                announced.insert(*id);
            }
        }
    }
    let closed: i64 = sqlx::query_scalar(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = $1",
    )
    .bind(&app)
    .fetch_one(db.admin())
    .await
    .unwrap();
    assert!(closed >= 1, "the server closed the store's connections");
    let mut failed = 0;
    while created.len() < MAX as usize + 5 {
        match store.create(NewJob::new(sample_job("w", "/p", 0))).await {
            Ok(c) => created.push(new_id(c)),
            Err(StoreError::Backend(_)) => {
                failed += 1;
                assert!(failed <= closed + 1, "{failed} statements failed");
            }
            Err(e) => panic!("a closed connection answered {e:?}"),
        }
    }
    let req = ClaimRequest::new("w", Duration::from_secs(60));
    let claimed: HashSet<_> = store
        .claim_many(&req, 64)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.job.id)
        .collect();
    assert_eq!(claimed, created.iter().copied().collect::<HashSet<_>>());
    db.cleanup().await;
    Some((failed, closed))
}

fn new_id(created: Created) -> aiwg_core::JobId {
    match created {
        Created::New(job, _) => job.id,
        Created::Existing(job) => panic!("job {} existed", job.id),
    }
}

/// Migration 0009 leaves room on each page of `aiwg_jobs`, so that a step's event (which
/// changes no indexed column) can be written without touching the table's indexes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jobs_table_keeps_room_for_heap_only_updates() {
    let Some(db) = test_db().await else { return };
    let store = db.fresh_store().await;
    let options: Vec<String> = sqlx::query_scalar(
        "SELECT unnest(reloptions) FROM pg_class WHERE oid = 'aiwg_jobs'::regclass",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert!(
        options.iter().any(|o| o == "fillfactor=70"),
        "aiwg_jobs options: {options:?}"
    );
    db.cleanup().await;
}

/// Two instances submitting batches of the same idempotency keys at once, one in ascending
/// order and the other in descending order (two instances firing the same schedules' ticks,
/// or a client retrying a batch against another instance), round after round: every submit is
/// answered, and each key makes exactly one job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_of_the_same_idempotency_keys_in_opposite_orders_never_deadlock() {
    let Some(db) = test_db().await else { return };
    let schema = db.schema().await;
    let a = Arc::new(db.store_in(&schema, 4).await);
    let b = Arc::new(db.store_in(&schema, 4).await);
    const KEYS: usize = 30;
    for round in 0..20 {
        let batch = |reverse: bool| {
            let mut keys: Vec<usize> = (0..KEYS).collect();
            if reverse {
                keys.reverse();
            }
            keys.into_iter()
                .map(|i| {
                    let mut job = sample_job("w", "/p", 0);
                    job.idempotency_key = Some(format!("k:{round}:{i}"));
                    NewJob::new(job)
                })
                .collect::<Vec<_>>()
        };
        let (up, down) = tokio::join!(a.create_many(batch(false)), b.create_many(batch(true)));
        let mut made = HashSet::new();
        for created in up.into_iter().chain(down) {
            match created {
                Ok(Created::New(job, _)) => {
                    assert!(made.insert(job.idempotency_key.unwrap()), "made twice");
                }
                Ok(Created::Existing(_)) => {}
                Err(e) => panic!("round {round}: {e:?}"),
            }
        }
        assert_eq!(made.len(), KEYS, "round {round}: one job per key");
    }
    db.cleanup().await;
}

/// A kept connection is one nobody else can have: a writer keeps its connection only while
/// the pool has another to spare (one idle, or room to open one), and gives it back at once
/// when it has none, so that the writers that keep theirs (up to eight on the example
/// server's one pool) never leave the pool's other users waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_kept_only_while_the_pool_has_another_to_spare() {
    let Some(db) = test_db().await else { return };
    let schema = db.schema().await;
    let pool = db.pool(&schema, 2).await;
    let kept = aiwg_core::coalesce::KeptConnection::new(pool.clone());
    let conn = kept.take().await.unwrap();
    kept.keep(conn);
    assert!(
        format!("{kept:?}").contains("kept: true"),
        "room for another: kept"
    );
    let other = pool.acquire().await.unwrap();
    let conn = kept.take().await.unwrap();
    assert_eq!((pool.size(), pool.num_idle()), (2, 0));
    kept.keep(conn);
    assert!(
        format!("{kept:?}").contains("kept: false"),
        "none to spare: given back"
    );
    tokio::time::timeout(Duration::from_secs(10), async {
        while pool.num_idle() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the connection given back is idle in the pool");
    drop(other);
    db.cleanup().await;
}

/// The store's admitter and completer keep a connection between their batches while writes
/// keep coming (sqlx tests every connection handed back to the pool with a round trip;
/// `aiwg_core::coalesce::KeptConnection`), and hand it back once none waits: after a burst of
/// submits, events and outcomes from many tasks at once, the pool closes, which it does only
/// once every connection is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_kept_through_a_burst_go_back_to_the_pool() {
    let Some(db) = test_db().await else { return };
    let schema = db.schema().await;
    let store = Arc::new(db.store_in(&schema, 6).await);
    let submits: Vec<_> = (0..200)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .create(NewJob::new(sample_job("w", &format!("/p{}", i % 5), 0)))
                    .await
                    .unwrap()
            })
        })
        .collect();
    for s in submits {
        s.await.unwrap();
    }
    let workers: Vec<_> = (0..8)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move {
                let req = ClaimRequest::new(format!("w{n}"), Duration::from_secs(60));
                let mut done = 0;
                while let Some(c) = store.claim(&req).await.unwrap() {
                    let kind = JobEventKind::Log {
                        level: "info".into(),
                        message: format!("{n}"),
                    };
                    store.append(&c.lease, kind).await.unwrap();
                    store
                        .finish(&c.lease, Finish::Completed(JobResult::default()))
                        .await
                        .unwrap();
                    done += 1;
                }
                done
            })
        })
        .collect();
    let mut done = 0;
    for w in workers {
        done += w.await.unwrap();
    }
    assert_eq!(done, 200, "every job ran once");
    let counts = store.counts().await.unwrap();
    assert_eq!((counts.queued, counts.running), (0, 0));
    tokio::time::timeout(Duration::from_secs(10), store.pool().close())
        .await
        .expect("every connection back in the pool: the pool closed");
    db.cleanup().await;
}

/// An outcome under `stale` (a lease the job does not hold) is refused as `LeaseLost`.
async fn assert_stale_outcome_refused(store: &PgStore, stale: &aiwg_core::store::Lease) {
    let refused = store
        .finish(stale, Finish::Completed(JobResult::default()))
        .await;
    assert!(
        matches!(refused, Err(StoreError::LeaseLost(_))),
        "{refused:?}"
    );
}

/// A store of `schema` whose outcomes of jobs claimed together wait `wait` for each other.
async fn gathering_store(db: &pg_support::TestDb, schema: &str, wait: Duration) -> PgStore {
    db.store_in(schema, 4).await.with_outcome_gathering(wait)
}

/// `n` new jobs, claimed together in one claim.
async fn claim_together(store: &PgStore, n: usize) -> Vec<aiwg_core::store::Claimed> {
    for _ in 0..n {
        store
            .create(NewJob::new(sample_job("w", "/p", 0)))
            .await
            .unwrap();
    }
    let claimed = store
        .claim_many(&ClaimRequest::new("w", Duration::from_secs(60)), n)
        .await
        .unwrap();
    assert_eq!(claimed.len(), n);
    claimed
}

/// Four jobs claimed together, `finish`ed at once: the store's completer writes their outcomes.
async fn claim_four_and_finish_them(store: &PgStore) {
    let claimed = claim_together(store, 4).await;
    let done = |i: usize| store.finish(&claimed[i].lease, Finish::Completed(JobResult::default()));
    let (a, b, c, d) = tokio::join!(done(0), done(1), done(2), done(3));
    for ended in [a, b, c, d] {
        assert_eq!(ended.unwrap().0.status, JobStatus::Completed);
    }
}

/// The outcomes of jobs one claim started, coming while their mates' are still to come, are
/// written together: one statement and one commit (`xmin`) for the four, where the first used
/// to go out alone. With the gathering off, it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_of_jobs_claimed_together_are_written_together() {
    let Some(db) = test_db().await else { return };
    // A schema each: the four jobs are all its rows (`transactions`).
    let schema = db.schema().await;
    // A wait far longer than the test needs: a loaded machine must not make it flaky.
    let store = gathering_store(&db, &schema, Duration::from_secs(60)).await;
    claim_four_and_finish_them(&store).await;
    assert_eq!(
        transactions(&db, &schema, "aiwg_jobs").await,
        1,
        "one commit for the four"
    );

    let schema = db.schema().await;
    let store = gathering_store(&db, &schema, Duration::ZERO).await;
    claim_four_and_finish_them(&store).await;
    assert!(
        transactions(&db, &schema, "aiwg_jobs").await > 1,
        "without the gathering the first outcome goes out alone"
    );
    db.cleanup().await;
}

/// An outcome waits for its claim's mates only while they may still come: a mate that runs on
/// does not hold it past the wait, and the ones written are every bit as fenced and whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_does_not_wait_for_a_mate_that_runs_on() {
    let Some(db) = test_db().await else { return };
    let schema = db.schema().await;
    let store = gathering_store(&db, &schema, Duration::from_millis(20)).await;
    let claimed = claim_together(&store, 2).await;
    // Bounded by the test's own timeout, not by a duration it asserts.
    let (job, ev) = tokio::time::timeout(
        Duration::from_secs(30),
        store.finish(&claimed[0].lease, Finish::Completed(JobResult::default())),
    )
    .await
    .expect("the outcome is written without its mate's")
    .unwrap();
    assert_eq!(job.status, JobStatus::Completed);
    assert_eq!(
        store.events(job.id, 0).await.unwrap().last().unwrap().seq,
        ev.seq
    );
    let mate = store.get(claimed[1].job.id).await.unwrap().unwrap();
    assert_eq!(mate.status, JobStatus::Running, "its mate runs on");
    // The mate's own outcome later goes out on its own, fenced as ever.
    let mut stale = claimed[1].lease.clone();
    stale.token += 1_000_000;
    assert_stale_outcome_refused(&store, &stale).await;
    let (job, _) = store
        .finish(&claimed[1].lease, Finish::Completed(JobResult::default()))
        .await
        .unwrap();
    assert_eq!(job.status, JobStatus::Completed);
    db.cleanup().await;
}

/// Migration 0030 moves each job's changing part out of its document into columns of their
/// own: the jobs already in the table when it runs (queued, running, awaiting an approval,
/// finished) read back whole, as they were written before it, and their documents keep only
/// what never changes. Each then goes on as a job written after it: the running one's outcome
/// is recorded, the queued one is claimed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_written_before_their_state_had_columns_read_back_whole_after() {
    use aiwg_core::job::{Approval, ApprovalDecision, JobError};
    use chrono::SubsecRound;

    let Some(db) = test_db().await else { return };
    let schema = db.schema().await;
    let pool = db.pool(&schema, 2).await;
    // The migrations before 0030, from a directory of their own.
    let dir = tempfile::tempdir().unwrap();
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/jobs");
    for entry in std::fs::read_dir(&source).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if name.as_str() < "0030" {
            std::fs::copy(&path, dir.path().join(&name)).unwrap();
        }
    }
    sqlx::migrate::Migrator::new(dir.path())
        .await
        .unwrap()
        .run(&pool)
        .await
        .unwrap();

    let at = chrono::Utc::now().trunc_subsecs(6);
    let change = |status, attempt| StatusChange {
        status,
        at,
        attempt,
        reason: None,
    };
    let queued = sample_job("w", "/p", 0);
    let mut running = sample_job("w", "/p", 1);
    running.status = JobStatus::Running;
    running.attempt = 2;
    running.started_at = Some(at);
    running.progress.start("a");
    running.history.push(change(JobStatus::Running, 2));
    running.error = Some(JobError::new("agent_failed", "the first attempt broke"));
    let mut waiting = sample_job("w", "/p", 2);
    waiting.status = JobStatus::AwaitingApproval;
    waiting.attempt = 1;
    waiting.started_at = Some(at);
    waiting.progress.start("a");
    waiting.progress.finish("a");
    waiting.resume_after_approval = true;
    let mut first = Approval::new("a", at, at);
    first.decision = Some(ApprovalDecision::new(true, "octo", "github"));
    waiting.approvals = vec![
        first,
        Approval::new("b", at, at + chrono::Duration::hours(1)),
    ];
    let mut failed = sample_job("w", "/p", 3);
    failed.status = JobStatus::Failed;
    failed.attempt = 2;
    failed.started_at = Some(at);
    failed.finished_at = Some(at);
    failed.dead_letter = true;
    failed.cancel_requested = false;
    failed.error = Some(JobError::new("agent_failed", "boom"));
    failed.result = Some(Arc::new(JobResult {
        summary: "half".to_owned(),
        ..JobResult::default()
    }));
    failed.history.push(change(JobStatus::Failed, 2));
    let jobs = [&queued, &running, &waiting, &failed];
    for (n, job) in jobs.iter().enumerate() {
        let is = |s| job.status == s;
        sqlx::query(
            "INSERT INTO aiwg_jobs (id, status, priority, project_path, workflow, queue_seq, \
                 retry_at, created_at, lease_owner, lease_token, lease_expires_at, last_seq, \
                 approval_expires_at, job) \
             VALUES ($1, $2, $3, '/p', 'w', $4, NULL, $5, $6, $7, $8, 1, $9, $10)",
        )
        .bind(job.id.as_uuid())
        .bind(job.status.as_str())
        .bind(job.priority)
        .bind(is(JobStatus::Queued).then_some(i64::try_from(n).unwrap()))
        .bind(job.created_at)
        .bind(is(JobStatus::Running).then_some("w"))
        .bind(is(JobStatus::Running).then_some(7_i64))
        .bind(is(JobStatus::Running).then_some(at + chrono::Duration::hours(1)))
        .bind(job.pending_approval().map(|a| a.expires_at))
        .bind(sqlx::types::Json(job))
        .execute(&pool)
        .await
        .unwrap();
    }

    PgStore::migrator().run(&pool).await.unwrap();
    let store = db.store_in(&schema, 4).await;
    for job in jobs {
        let read = store.get(job.id).await.unwrap().unwrap();
        assert_eq!(&read, job, "the {} job read back", job.status);
    }
    let whole: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM aiwg_jobs WHERE job ?| '{status, attempt, progress, history}'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(whole, 0, "the documents keep only what never changes");
    // The table made anew: what never changes first, the document last of it; the
    // constraints, indexes and triggers of before; the queued tally still the rows'.
    let columns: Vec<String> = sqlx::query_scalar(
        "SELECT attname::text FROM pg_attribute WHERE attrelid = 'aiwg_jobs'::regclass \
         AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        columns[..9],
        [
            "id",
            "priority",
            "project_path",
            "workflow",
            "created_at",
            "idempotency_key",
            "fingerprint",
            "job",
            "status"
        ]
    );
    let catalog: [(&str, &[&str]); 3] = [
        (
            "SELECT indexname::text FROM pg_indexes WHERE tablename = 'aiwg_jobs' \
             AND schemaname = current_schema() ORDER BY 1",
            &[
                "aiwg_jobs_approval_idx",
                "aiwg_jobs_claim_idx",
                "aiwg_jobs_idempotency_key_key",
                "aiwg_jobs_lease_idx",
                "aiwg_jobs_pkey",
                "aiwg_jobs_queued_project_idx",
                "aiwg_jobs_running_project_idx",
                "aiwg_jobs_status_id_idx",
                "aiwg_jobs_workflow_id_idx",
            ],
        ),
        (
            "SELECT conname::text FROM pg_constraint WHERE conrelid = 'aiwg_jobs'::regclass \
             ORDER BY 1",
            &[
                "aiwg_jobs_approval_check",
                "aiwg_jobs_check",
                "aiwg_jobs_check1",
                "aiwg_jobs_pkey",
                "aiwg_jobs_status_check",
            ],
        ),
        (
            "SELECT tgname::text FROM pg_trigger WHERE tgrelid = 'aiwg_jobs'::regclass \
             AND NOT tgisinternal ORDER BY 1",
            &[
                "aiwg_jobs_events_deleted",
                "aiwg_jobs_events_truncated",
                "aiwg_jobs_tally_deleted",
                "aiwg_jobs_tally_inserted",
                "aiwg_jobs_tally_updated",
            ],
        ),
    ];
    for (sql, expected) in catalog {
        let found: Vec<String> = sqlx::query_scalar(sql).fetch_all(&pool).await.unwrap();
        assert_eq!(found, expected, "{sql}");
    }
    assert_eq!(
        tally_and_rows(&store).await,
        (1, 1),
        "the one queued job, tallied"
    );

    // They go on: the running job's outcome (its lease as it was) and a claim of the queued.
    let lease = aiwg_core::store::Lease {
        job_id: running.id,
        owner: "w".to_owned(),
        attempt: 2,
        token: 7,
        expires_at: at + chrono::Duration::hours(1),
    };
    let (done, _) = store
        .finish(&lease, Finish::Completed(JobResult::default()))
        .await
        .unwrap();
    assert_eq!(done.status, JobStatus::Completed);
    assert!(
        done.history.starts_with(&running.history),
        "the history from before the migration goes on"
    );
    assert_eq!(
        done.started_at,
        Some(at),
        "its start, from before the migration"
    );
    assert_eq!(
        step_names(&done.progress.in_progress),
        ["a"],
        "its step, from before the migration"
    );
    assert_eq!(store.get(running.id).await.unwrap().unwrap(), done);
    let claimed = store
        .claim(&ClaimRequest::new("w", Duration::from_secs(60)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.job.id, queued.id);
    assert_eq!(
        (claimed.job.status, claimed.job.attempt),
        (JobStatus::Running, 1)
    );
    assert_eq!(store.get(queued.id).await.unwrap().unwrap(), claimed.job);
    db.cleanup().await;
}

/// Migration 0034 keeps 0030's event function beside its own: an instance of the release
/// before, still running during a rolling upgrade, writes a running job's event through it,
/// numbered after the job's events as this release numbers them; and this release's next write
/// numbers on after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_of_the_release_before_still_writes_events_after_the_upgrade() {
    let Some(db) = test_db().await else { return };
    let schema = db.schema().await;
    let store = db.store_in(&schema, 2).await;
    let job = sample_job("w", "/p", 0);
    let id = job.id;
    store.create(NewJob::new(job)).await.unwrap();
    let c = store
        .claim(&ClaimRequest::new("w", Duration::from_secs(60)))
        .await
        .unwrap()
        .unwrap();
    let log = |m: &str| JobEventKind::Log {
        level: "info".into(),
        message: m.into(),
    };
    let kinds = vec![log("one"), log("two")];
    let written = store.append_many(&c.lease, kinds).await.unwrap();
    assert_eq!(written.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4]);
    let kind = serde_json::to_string(&log("from the release before")).unwrap();
    let old: Vec<i64> = sqlx::query_scalar(
        "SELECT last_seq FROM aiwg_append_events(ARRAY[$1::uuid], ARRAY[$2::int8], \
             ARRAY[now()], ARRAY[$3], ARRAY[0::int2], ARRAY[''], false)",
    )
    .bind(id.as_uuid())
    .bind(i64::try_from(c.lease.token).unwrap())
    .bind(&kind)
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert_eq!(old, [5]);
    assert_eq!(store.append(&c.lease, log("three")).await.unwrap().seq, 6);
    let messages: Vec<String> = store
        .events(id, 2)
        .await
        .unwrap()
        .into_iter()
        .map(|e| match e.kind {
            JobEventKind::Log { message, .. } => message,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        messages,
        ["one", "two", "from the release before", "three"].map(String::from)
    );
}
