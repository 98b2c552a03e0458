//! The dispatch store conformance suite against every store: in memory always, PostgreSQL with
//! feature `postgres` (`AIWG_TEST_DATABASE_URL`, default the local test database).

use std::sync::Arc;

use aiwg_core::dispatch::{store_suite, DispatchStore, MemoryStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_conformance() {
    store_suite(|| async { Arc::new(MemoryStore::new()) as Arc<dyn DispatchStore> }).await;
}

#[cfg(feature = "postgres")]
mod pg_support;

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_store_conformance() {
    let Some(db) = pg_support::test_db().await else {
        return;
    };
    store_suite(|| async { Arc::new(db.fresh_store().await) as Arc<dyn DispatchStore> }).await;
    db.cleanup().await;
}
