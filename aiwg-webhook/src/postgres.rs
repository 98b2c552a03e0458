//! Delivery de-duplication in PostgreSQL (feature `postgres`), so several server instances
//! sharing a database start one job per platform delivery between them.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use aiwg_core::store::PgStore;
use aiwg_core::JobId;
use async_trait::async_trait;

use crate::dedupe::{Claim, DeliveryStore};
use crate::error::DeliveryStoreError;

/// A [`DeliveryStore`] over the `aiwg_inbound_deliveries` table of a [`PgStore`].
#[derive(Clone, Debug)]
pub struct PgDeliveryStore(Arc<PgStore>);

impl PgDeliveryStore {
    /// De-duplication in `store`'s database (its migrations create the table).
    #[must_use]
    pub fn new(store: Arc<PgStore>) -> Self {
        Self(store)
    }
}

fn unavailable(e: aiwg_core::store::StoreError) -> DeliveryStoreError {
    DeliveryStoreError::Unavailable(e.to_string())
}

#[async_trait]
impl DeliveryStore for PgDeliveryStore {
    async fn claim(
        &self,
        key: &str,
        lease: Duration,
        ttl: Duration,
    ) -> Result<Claim, DeliveryStoreError> {
        Ok(
            match self
                .0
                .inbound_claim(key, lease, ttl)
                .await
                .map_err(unavailable)?
            {
                ControlFlow::Continue(()) => Claim::Fresh,
                ControlFlow::Break(Some(job)) => Claim::Done(job),
                ControlFlow::Break(None) => Claim::Pending,
            },
        )
    }

    async fn complete(
        &self,
        key: &str,
        job: JobId,
        ttl: Duration,
    ) -> Result<(), DeliveryStoreError> {
        self.0
            .inbound_complete(key, job, ttl)
            .await
            .map_err(unavailable)
    }

    async fn release(&self, key: &str) -> Result<(), DeliveryStoreError> {
        self.0.inbound_release(key).await.map_err(unavailable)
    }

    async fn get(&self, key: &str) -> Result<Option<JobId>, DeliveryStoreError> {
        self.0.inbound_get(key).await.map_err(unavailable)
    }
}
