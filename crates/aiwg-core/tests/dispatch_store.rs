//! The store conformance suite against the in-memory store (a durable store runs the same).

use std::sync::Arc;

use aiwg_core::dispatch::{store_suite, DispatchStore, MemoryStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_conformance() {
    store_suite(|| async { Arc::new(MemoryStore::new()) as Arc<dyn DispatchStore> }).await;
}
