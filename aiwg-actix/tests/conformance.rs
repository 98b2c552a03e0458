//! aiwg-actix passes the shared conformance suite over real HTTP on loopback.

mod support;

use aiwg_core::test_util::conformance::{conformance_suite, websocket_client_that_stops_reading};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actix_service_passes_the_conformance_suite() {
    conformance_suite(&support::Actix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actix_service_passes_the_hooks_suite() {
    aiwg_webhook::testing::hooks_suite(&support::Actix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actix_service_drops_a_websocket_client_that_stops_reading() {
    websocket_client_that_stops_reading(&support::Actix).await;
}
