//! Test databases for the PostgreSQL tests: one fresh schema per store, dropped at the end.
//!
//! The URL comes from `AIWG_TEST_DATABASE_URL`; without it,
//! `postgres://postgres@127.0.0.1:5432/test` is tried. When no database answers the tests
//! print why and pass, except under `CI=true` (or with an explicit URL), where they fail.

#![allow(dead_code, unreachable_pub)]

use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use aiwg_core::dispatch::PgDispatchStore;
use aiwg_core::store::PgStore;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The keyring the test stores seal secrets with (`AIWG_SECRET_KEY` syntax).
pub const TEST_KEYRING: &str = "test1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// [`TEST_KEYRING`], parsed.
pub fn keyring() -> aiwg_core::secrets::SecretKeyring {
    aiwg_core::secrets::SecretKeyring::parse(TEST_KEYRING).expect("keyring")
}

/// A reachable database and the schemas made in it.
pub struct TestDb {
    admin: PgPool,
    url: String,
    schemas: Mutex<Vec<String>>,
}

/// The test database, or `None` (after saying why) when there is none and that is allowed.
pub async fn test_db() -> Option<TestDb> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let (url, explicit) = match std::env::var("AIWG_TEST_DATABASE_URL") {
        Ok(u) if !u.trim().is_empty() => (u, true),
        _ => (DEFAULT_URL.to_owned(), false),
    };
    let options = match PgConnectOptions::from_str(&url) {
        Ok(o) => o,
        Err(_) => panic!("AIWG_TEST_DATABASE_URL is not a valid PostgreSQL URL"),
    };
    let admin = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await;
    match admin {
        Ok(admin) => {
            drop_stale_schemas(&admin).await;
            Some(TestDb {
                admin,
                url,
                schemas: Mutex::new(Vec::new()),
            })
        }
        Err(e) if ci || explicit => {
            panic!("the PostgreSQL test database is not reachable: {e}")
        }
        Err(e) => {
            eprintln!(
                "skipping: no PostgreSQL at the default test URL ({e}); \
                 set AIWG_TEST_DATABASE_URL to run these tests"
            );
            None
        }
    }
}

/// Drops test schemas left behind by runs that panicked more than an hour ago (their names
/// carry a UUID v7, whose first 48 bits are the creation time in milliseconds).
async fn drop_stale_schemas(admin: &PgPool) {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'aiwg\\_test\\_%'",
    )
    .fetch_all(admin)
    .await
    .unwrap_or_default();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    for name in names {
        let Some(hex) = name.strip_prefix("aiwg_test_").and_then(|h| h.get(..12)) else {
            continue;
        };
        let Ok(created_ms) = u128::from_str_radix(hex, 16) else {
            continue;
        };
        if now_ms.saturating_sub(created_ms) > 3_600_000 {
            let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                .execute(admin)
                .await;
        }
    }
}

impl TestDb {
    /// The admin pool (default schema).
    pub fn admin(&self) -> &PgPool {
        &self.admin
    }

    /// The database URL (tests only; never printed).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Creates a fresh, empty schema (dropped by [`cleanup`](Self::cleanup)).
    pub async fn schema(&self) -> String {
        let name = format!("aiwg_test_{}", uuid::Uuid::now_v7().simple());
        sqlx::query(&format!("CREATE SCHEMA {name}"))
            .execute(&self.admin)
            .await
            .expect("create schema");
        self.schemas.lock().unwrap().push(name.clone());
        name
    }

    /// A pool whose `search_path` is `schema` (commits not waiting for the disk: these tests
    /// check visibility and locking, not durability, and run several times faster).
    pub async fn pool(&self, schema: &str, max: u32) -> PgPool {
        self.pool_named(schema, max, "aiwg-tests").await
    }

    /// [`pool`](Self::pool) whose connections carry `application_name`, so that a test can
    /// find them in `pg_stat_activity`.
    pub async fn pool_named(&self, schema: &str, max: u32, application_name: &str) -> PgPool {
        // The pool the store's own `connect` builds.
        self.pool_named_with(schema, max, application_name, PgStore::pool_options())
            .await
    }

    /// [`pool_named`](Self::pool_named) built from `pool` options of the test's own.
    pub async fn pool_named_with(
        &self,
        schema: &str,
        max: u32,
        application_name: &str,
        pool: PgPoolOptions,
    ) -> PgPool {
        let options = PgConnectOptions::from_str(&self.url)
            .unwrap()
            .application_name(application_name)
            .options([("search_path", schema), ("synchronous_commit", "off")]);
        pool.max_connections(max)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await
            .expect("connect")
    }

    /// A migrated store in a fresh schema whose connections carry a name of their own
    /// (`<prefix>-<unique>`, returned beside it), for tests that find them in
    /// `pg_stat_activity`.
    pub async fn named_store(&self, prefix: &str, max: u32) -> (PgStore, String) {
        self.named_store_with(prefix, max, PgStore::pool_options())
            .await
    }

    /// [`named_store`](Self::named_store) on a pool built from `pool` options of the test's own.
    pub async fn named_store_with(
        &self,
        prefix: &str,
        max: u32,
        pool: PgPoolOptions,
    ) -> (PgStore, String) {
        let schema = self.schema().await;
        let app = format!("{prefix}-{}", uuid::Uuid::now_v7().simple());
        let store = PgStore::from_pool(self.pool_named_with(&schema, max, &app, pool).await)
            .await
            .expect("store");
        store.migrate().await.expect("migrate");
        (store, app)
    }

    /// A migrated store in `schema` (pool of `max` connections).
    pub async fn store_in(&self, schema: &str, max: u32) -> PgStore {
        let store = PgStore::from_pool(self.pool(schema, max).await)
            .await
            .expect("store")
            .with_keyring(keyring());
        store.migrate().await.expect("migrate");
        store
    }

    /// A migrated store in a fresh schema.
    pub async fn fresh_store(&self) -> PgStore {
        let schema = self.schema().await;
        self.store_in(&schema, 4).await
    }

    /// A migrated outbox in `schema` (pool of `max` connections).
    pub async fn outbox_in(&self, schema: &str, max: u32) -> PgDispatchStore {
        let store = PgDispatchStore::from_pool(self.pool(schema, max).await)
            .await
            .expect("outbox")
            .with_keyring(keyring());
        store.migrate().await.expect("migrate outbox");
        store
    }

    /// A migrated outbox in a fresh schema.
    pub async fn fresh_outbox(&self) -> PgDispatchStore {
        let schema = self.schema().await;
        self.outbox_in(&schema, 4).await
    }

    /// Drops every schema made through this handle.
    pub async fn cleanup(&self) {
        let schemas = std::mem::take(&mut *self.schemas.lock().unwrap());
        for s in schemas {
            sqlx::query(&format!("DROP SCHEMA IF EXISTS {s} CASCADE"))
                .execute(&self.admin)
                .await
                .expect("drop schema");
        }
    }
}
