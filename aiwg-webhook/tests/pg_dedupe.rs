//! The delivery-store suite against PostgreSQL (feature `postgres`).
#![cfg(all(feature = "postgres", feature = "test-util"))]

use std::sync::Arc;

use aiwg_core::store::PgStore;
use aiwg_webhook::dedupe::store_suite;
use aiwg_webhook::PgDeliveryStore;

#[tokio::test]
async fn pg_delivery_store_passes_the_suite() {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let url = std::env::var("AIWG_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".into());
    let store = match PgStore::connect(&url).await {
        Ok(s) => s,
        Err(e) if ci => panic!("PostgreSQL is required in CI: {e}"),
        Err(e) => {
            eprintln!("skipping: no PostgreSQL ({e}); set AIWG_TEST_DATABASE_URL");
            return;
        }
    };
    let prefix = format!("suite-{}-", uuid_prefix());
    store_suite(Arc::new(PgDeliveryStore::new(Arc::new(store))), &prefix).await;
}

fn uuid_prefix() -> String {
    format!(
        "{:x}{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
        std::process::id()
    )
}
