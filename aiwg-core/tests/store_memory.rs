//! The store conformance suite on the in-memory store.

use std::sync::Arc;

use aiwg_core::test_util::job_store_suite;
use aiwg_core::{JobStore, MemoryStore};

#[tokio::test]
async fn memory_store_passes_the_store_suite() {
    job_store_suite(|| async { Arc::new(MemoryStore::new()) as Arc<dyn JobStore> }).await;
}
