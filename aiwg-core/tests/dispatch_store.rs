//! The dispatch store conformance suite against every store: in memory always, PostgreSQL with
//! feature `postgres` (`AIWG_TEST_DATABASE_URL`, default the local test database).

use std::sync::Arc;

use aiwg_core::dispatch::{DispatchStore, MemoryDispatchStore};
use aiwg_core::test_util::dispatch_store_suite;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_conformance() {
    dispatch_store_suite(|| async {
        Arc::new(MemoryDispatchStore::new()) as Arc<dyn DispatchStore>
    })
    .await;
}

#[cfg(feature = "postgres")]
mod pg_support;

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_store_conformance() {
    let Some(db) = pg_support::test_db().await else {
        return;
    };
    dispatch_store_suite(|| async { Arc::new(db.fresh_outbox().await) as Arc<dyn DispatchStore> })
        .await;
    db.cleanup().await;
}
