//! Inbound de-duplication in PostgreSQL (feature `postgres`): the shared dedup-store suite, and
//! two stores on one database claiming the same keys.
#![cfg(all(feature = "postgres", feature = "test-util"))]

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use aiwg_core::JobId;
use aiwg_webhook::dedupe::{dedup_store_suite, Claim, DeliveryStore};
use aiwg_webhook::PgDeliveryStore;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

/// A pool on a fresh schema of the test database, or `None` (after saying why) outside CI.
async fn fresh_pool() -> Option<(PgPool, PgPool, String)> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let url = std::env::var("AIWG_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".into());
    let options = PgConnectOptions::from_str(&url).expect("a PostgreSQL URL");
    let admin = match PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options.clone())
        .await
    {
        Ok(p) => p,
        Err(e) if ci => panic!("PostgreSQL is required in CI: {e}"),
        Err(e) => {
            eprintln!("skipping: no PostgreSQL ({e}); set AIWG_TEST_DATABASE_URL");
            return None;
        }
    };
    let schema = format!("aiwg_test_{}", uuid_suffix());
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&admin)
        .await
        .expect("create schema");
    let pool = PgPoolOptions::new()
        .max_connections(5)
        .connect_with(options.options([("search_path", schema.as_str())]))
        .await
        .expect("connect");
    Some((admin, pool, schema))
}

fn uuid_suffix() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

async fn drop_schema(admin: &PgPool, schema: &str) {
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .execute(admin)
        .await
        .expect("drop schema");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_delivery_store_passes_the_dedup_store_suite() {
    let Some((admin, pool, schema)) = fresh_pool().await else {
        return;
    };
    let store = PgDeliveryStore::new(pool);
    store.migrate().await.expect("migrate");
    store.migrate().await.expect("migrations are idempotent");
    dedup_store_suite(Arc::new(store), "suite:").await;
    drop_schema(&admin, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_on_one_database_claim_once() {
    let Some((admin, pool, schema)) = fresh_pool().await else {
        return;
    };
    let a = Arc::new(PgDeliveryStore::new(pool.clone()));
    a.migrate().await.expect("migrate");
    let b = Arc::new(PgDeliveryStore::new(pool));
    let lease = Duration::from_secs(30);
    let ttl = Duration::from_secs(3600);

    assert_eq!(a.claim("gh:1", lease, ttl).await.unwrap(), Claim::Fresh);
    assert_eq!(
        b.claim("gh:1", lease, ttl).await.unwrap(),
        Claim::Pending,
        "pending elsewhere"
    );
    assert_eq!(b.get("gh:1").await.unwrap(), None);
    let job = JobId::new();
    a.complete("gh:1", job, ttl).await.unwrap();
    assert_eq!(b.claim("gh:1", lease, ttl).await.unwrap(), Claim::Done(job));
    assert_eq!(b.get("gh:1").await.unwrap(), Some(job));
    // Releasing a done key keeps it.
    b.release("gh:1").await.unwrap();
    assert_eq!(a.get("gh:1").await.unwrap(), Some(job));

    // A released claim may be taken again; a lapsed one is taken over.
    assert_eq!(a.claim("gh:2", lease, ttl).await.unwrap(), Claim::Fresh);
    a.release("gh:2").await.unwrap();
    assert_eq!(
        b.claim("gh:2", Duration::ZERO, ttl).await.unwrap(),
        Claim::Fresh
    );
    assert_eq!(
        a.claim("gh:2", lease, ttl).await.unwrap(),
        Claim::Fresh,
        "the first claim's lease lapsed"
    );
    // A key remembered for no time is forgotten, and purged.
    a.complete("gh:3", JobId::new(), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(a.get("gh:3").await.unwrap(), None);
    assert!(a.purge().await.unwrap() >= 1);
    assert_eq!(a.claim("gh:3", lease, ttl).await.unwrap(), Claim::Fresh);

    // Many concurrent claims of one key from two stores: exactly one wins.
    let mut tasks = Vec::new();
    for n in 0..16 {
        let store = if n % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            store.claim("gh:race", lease, ttl).await.unwrap()
        }));
    }
    let mut fresh = 0;
    for t in tasks {
        if t.await.unwrap() == Claim::Fresh {
            fresh += 1;
        }
    }
    assert_eq!(fresh, 1);
    drop_schema(&admin, &schema).await;
}

/// Claims that arrive together go out together (one statement, one commit for many), and so
/// do the completions after them: each key is still claimed exactly once, each asked-twice key
/// answers pending to its second claim, and every completion is kept. The rows one statement
/// wrote share a transaction id (`xmin`): far fewer of those than keys shows the batching.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_and_completions_at_once_are_written_together() {
    let Some((admin, pool, schema)) = fresh_pool().await else {
        return;
    };
    let a = Arc::new(PgDeliveryStore::new(pool.clone()));
    a.migrate().await.expect("migrate");
    let b = Arc::new(PgDeliveryStore::new(pool.clone()));
    let lease = Duration::from_secs(30);
    let ttl = Duration::from_secs(3600);
    const KEYS: usize = 200;
    // Every key asked for twice, once by each store, all at once.
    let tasks: Vec<_> = (0..2 * KEYS)
        .map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            let key = format!("gh:{}", i / 2);
            tokio::spawn(async move {
                let claim = store.claim(&key, lease, ttl).await.unwrap();
                if claim == Claim::Fresh {
                    let job = JobId::new();
                    store.complete(&key, job, ttl).await.unwrap();
                    (key, claim, Some(job))
                } else {
                    (key, claim, None)
                }
            })
        })
        .collect();
    let mut fresh: std::collections::HashMap<String, JobId> = Default::default();
    for t in tasks {
        let (key, claim, job) = t.await.unwrap();
        match claim {
            Claim::Fresh => assert!(fresh.insert(key, job.unwrap()).is_none(), "claimed twice"),
            Claim::Pending | Claim::Done(_) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(fresh.len(), KEYS, "every key claimed exactly once");
    for (key, job) in &fresh {
        assert_eq!(a.get(key).await.unwrap(), Some(*job), "{key}");
    }
    let transactions: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT xmin::text) FROM aiwg_inbound_deliveries")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(
        transactions <= (KEYS / 2) as i64,
        "{transactions} transactions for {KEYS} completions: they were not batched"
    );
    drop_schema(&admin, &schema).await;
}

/// Two instances (two stores, each batching its own claims) asked for the same keys at once,
/// one in ascending order and the other in descending order, round after round: every claim
/// is answered, each key claimed exactly once. Batches written in the order their claims
/// arrived took the same rows' locks in opposite orders and deadlocked (`40P01`, a claim
/// answered with an error, its delivery refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_claiming_the_same_keys_in_opposite_orders_never_deadlock() {
    let Some((admin, pool, schema)) = fresh_pool().await else {
        return;
    };
    let a = Arc::new(PgDeliveryStore::new(pool.clone()));
    a.migrate().await.expect("migrate");
    let b = Arc::new(PgDeliveryStore::new(pool.clone()));
    let (lease, ttl) = (Duration::from_secs(30), Duration::from_secs(3600));
    const KEYS: usize = 40;
    for round in 0..20 {
        let keys: Vec<String> = (0..KEYS).map(|i| format!("gh:{round}:{i}")).collect();
        let ascending = keys.iter().map(|k| (a.clone(), k.clone()));
        let descending = keys.iter().rev().map(|k| (b.clone(), k.clone()));
        let tasks: Vec<_> = ascending
            .zip(descending)
            .flat_map(|(x, y)| [x, y])
            .map(|(store, key)| {
                tokio::spawn(async move { (store.claim(&key, lease, ttl).await, key) })
            })
            .collect();
        let mut fresh = std::collections::HashSet::new();
        for t in tasks {
            let (claim, key) = t.await.unwrap();
            match claim {
                Ok(Claim::Fresh) => assert!(fresh.insert(key), "claimed twice"),
                Ok(_) => {}
                Err(e) => panic!("round {round}, {key}: {e:?}"),
            }
        }
        assert_eq!(fresh.len(), KEYS, "round {round}: every key claimed once");
    }
    drop_schema(&admin, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_tracking_store_passes_the_tracking_store_suite() {
    use aiwg_webhook::tracking::{tracking_store_suite, PgTrackingStore, TrackingStore};
    let Some((admin, pool, schema)) = fresh_pool().await else {
        return;
    };
    tracking_store_suite(|| {
        let pool = pool.clone();
        async move {
            sqlx::query("DROP TABLE IF EXISTS aiwg_tracking_comments")
                .execute(&pool)
                .await
                .unwrap();
            sqlx::query("DELETE FROM _sqlx_migrations WHERE version = 5")
                .execute(&pool)
                .await
                .ok();
            let store = PgTrackingStore::new(pool);
            store.migrate().await.expect("migrate");
            Arc::new(store) as Arc<dyn TrackingStore>
        }
    })
    .await;
    drop_schema(&admin, &schema).await;
}
