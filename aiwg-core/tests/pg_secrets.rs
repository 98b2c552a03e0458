//! Secrets at rest in PostgreSQL: subscription secrets and job reply credentials are sealed
//! with the keyring before they are written, never stored in the clear, refused without a
//! key, and keep working across a key rotation.
//!
//! Run with `cargo test -p aiwg-core --features postgres,test-util --test pg_secrets`.
#![cfg(all(feature = "postgres", feature = "test-util"))]

mod pg_support;

use aiwg_core::dispatch::{DispatchStore, PgDispatchStore, SigningSecret, Subscription};
use aiwg_core::secrets::SecretKeyring;
use aiwg_core::store::{Created, JobStore, NewJob, PgStore};
use aiwg_core::test_util::sample_job;
use chrono::Utc;
use pg_support::{test_db, TEST_KEYRING};

const SLACK_URL: &str = "https://hooks.slack.com/commands/T1/42/capability-in-the-url";

fn subscription(secret: &SigningSecret) -> Subscription {
    Subscription::new(
        "https://example.com/hook",
        vec!["*".into()],
        None,
        secret.clone(),
        Utc::now(),
    )
}

async fn raw(pool: &sqlx::PgPool, sql: &str) -> String {
    sqlx::query_scalar::<_, String>(sql)
        .fetch_one(pool)
        .await
        .expect("raw read")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_secrets_are_sealed_and_refused_without_a_key() {
    let Some(db) = test_db().await else { return };
    let schema = db.schema().await;
    let pool = db.pool(&schema, 2).await;
    let outbox = db.outbox_in(&schema, 2).await;
    let secret = SigningSecret::generate();
    let sub = subscription(&secret);
    outbox.insert_subscription(&sub).await.unwrap();
    let stored = raw(&pool, "SELECT keys::text FROM aiwg_webhook_subscriptions").await;
    assert!(!stored.contains(secret.expose()), "stored in the clear");
    let body = secret.expose().trim_start_matches("whsec_");
    assert!(!stored.contains(body), "stored in the clear");
    assert!(stored.contains("aiwg:v1:test1:"), "{stored}");
    let back = outbox.subscription(sub.id).await.unwrap().unwrap();
    assert_eq!(back.keys[0].secret.expose(), secret.expose());

    // Without a key nothing is written, and the error names the variable.
    let keyless = PgDispatchStore::from_pool(pool.clone()).await.unwrap();
    let err = keyless
        .insert_subscription(&subscription(&SigningSecret::generate()))
        .await
        .unwrap_err();
    let text = format!("{err}: {:?}", std::error::Error::source(&err));
    assert!(text.contains("AIWG_SECRET_KEY"), "{text}");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM aiwg_webhook_subscriptions")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 1);
    // Nor is a sealed secret read without it.
    assert!(keyless.subscription(sub.id).await.is_err());
    // A sealed value moved to another row does not open there.
    let other = subscription(&SigningSecret::generate());
    outbox.insert_subscription(&other).await.unwrap();
    sqlx::query("UPDATE aiwg_webhook_subscriptions SET keys = (SELECT keys FROM aiwg_webhook_subscriptions WHERE id = $1) WHERE id = $2")
        .bind(sub.id.as_uuid())
        .bind(other.id.as_uuid())
        .execute(&pool)
        .await
        .unwrap();
    let err = outbox.subscription(other.id).await.unwrap_err();
    assert!(err.to_string().contains("does not open"), "{err}");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_secrets_from_before_are_read_and_sealed_again_after_a_rotation() {
    let Some(db) = test_db().await else { return };
    let schema = db.schema().await;
    let pool = db.pool(&schema, 2).await;
    let outbox = db.outbox_in(&schema, 2).await;
    // A row as the first wave wrote it: the secret in the clear.
    let legacy = SigningSecret::generate();
    let sub = subscription(&SigningSecret::generate());
    outbox.insert_subscription(&sub).await.unwrap();
    sqlx::query("UPDATE aiwg_webhook_subscriptions SET keys = $2 WHERE id = $1")
        .bind(sub.id.as_uuid())
        .bind(sqlx::types::Json(
            serde_json::json!([{"secret": legacy.expose(), "expires_at": null}]),
        ))
        .execute(&pool)
        .await
        .unwrap();
    let back = outbox.subscription(sub.id).await.unwrap().unwrap();
    assert_eq!(back.keys[0].secret.expose(), legacy.expose());

    // Rotation: the new key first, the old one still there.
    let new_key = SecretKeyring::generate("test2");
    let rotated = SecretKeyring::parse(&format!("{new_key}, {TEST_KEYRING}")).unwrap();
    let second = subscription(&SigningSecret::generate());
    outbox.insert_subscription(&second).await.unwrap();
    let outbox2 = PgDispatchStore::from_pool(pool.clone())
        .await
        .unwrap()
        .with_keyring(rotated);
    // Both the legacy row and the one sealed with the old key are rewritten, once.
    assert_eq!(outbox2.reseal_secrets().await.unwrap(), 2);
    assert_eq!(outbox2.reseal_secrets().await.unwrap(), 0);
    let stored = raw(
        &pool,
        "SELECT string_agg(keys::text, ' ') FROM aiwg_webhook_subscriptions",
    )
    .await;
    assert!(!stored.contains(legacy.expose()));
    assert!(!stored.contains("aiwg:v1:test1:"), "{stored}");
    assert_eq!(stored.matches("aiwg:v1:test2:").count(), 2, "{stored}");
    // The new key alone now opens everything.
    let only_new = PgDispatchStore::from_pool(pool.clone())
        .await
        .unwrap()
        .with_keyring(SecretKeyring::parse(&new_key).unwrap());
    assert_eq!(
        only_new.subscription(sub.id).await.unwrap().unwrap().keys[0]
            .secret
            .expose(),
        legacy.expose()
    );
    // The old keyring alone no longer does.
    assert!(outbox.subscription(sub.id).await.is_err());
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_reply_credentials_are_sealed_and_refused_without_a_key() {
    let Some(db) = test_db().await else { return };
    let schema = db.schema().await;
    let pool = db.pool(&schema, 2).await;
    let store = db.store_in(&schema, 2).await;
    let mut job = sample_job("w", "/p", 0);
    job.reply_credentials
        .insert("slack_response_url", SLACK_URL);
    let id = job.id;
    assert!(matches!(
        store.create(NewJob::new(job.clone())).await.unwrap(),
        Created::New(..)
    ));
    let stored = raw(&pool, "SELECT job::text FROM aiwg_jobs").await;
    assert!(!stored.contains("capability-in-the-url"), "{stored}");
    assert!(!stored.contains("hooks.slack.com"), "{stored}");
    assert!(stored.contains("aiwg:v1:test1:"), "{stored}");
    let back = store.get(id).await.unwrap().unwrap();
    assert_eq!(
        back.reply_credentials.get("slack_response_url"),
        Some(SLACK_URL)
    );

    // Without a key: the job is not written at all.
    let keyless = PgStore::from_pool(pool.clone()).await.unwrap();
    let mut other = sample_job("w", "/p", 0);
    other
        .reply_credentials
        .insert("discord_token", "token-that-lets-you-post");
    let err = keyless
        .create(NewJob::new(other.clone()))
        .await
        .unwrap_err();
    let text = format!("{err}: {:?}", std::error::Error::source(&err));
    assert!(text.contains("AIWG_SECRET_KEY"), "{text}");
    assert!(store.get(other.id).await.unwrap().is_none());
    // A job without credentials needs no key.
    keyless
        .create(NewJob::new(sample_job("w", "/p", 0)))
        .await
        .unwrap();
    // Reading a sealed job without the key keeps the job readable, without credentials.
    let seen = keyless.get(id).await.unwrap().unwrap();
    assert!(seen.reply_credentials.is_empty());
    assert_eq!(seen.id, id);
    db.cleanup().await;
}

/// The completer writes an outcome from the job its claim or its step event returned, without
/// reading the row again: the credentials come out of that job opened and go back in sealed,
/// for an outcome straight after the claim (a pause for an approval) and after a step event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_reply_credentials_stay_sealed_through_outcomes_written_without_a_read() {
    use aiwg_core::job::{Approval, JobResult};
    use aiwg_core::store::{ClaimRequest, Finish};
    use aiwg_core::JobEventKind;

    let Some(db) = test_db().await else { return };
    let schema = db.schema().await;
    let pool = db.pool(&schema, 2).await;
    let store = db.store_in(&schema, 2).await;
    for step_first in [false, true] {
        let mut job = sample_job("w", "/p", 0);
        job.reply_credentials
            .insert("slack_response_url", SLACK_URL);
        let id = job.id;
        store.create(NewJob::new(job)).await.unwrap();
        let req = ClaimRequest::new("w", std::time::Duration::from_secs(600));
        let claimed = store.claim_many(&req, 8).await.unwrap().remove(0);
        assert_eq!(claimed.job.id, id);
        let finish = if step_first {
            let started = JobEventKind::StepStarted {
                step: "s".into(),
                agent: "a".into(),
                attempt: 1,
            };
            store.append(&claimed.lease, started).await.unwrap();
            Finish::Completed(JobResult::default())
        } else {
            let now = Utc::now();
            Finish::AwaitingApproval {
                result: JobResult::default(),
                approval: Approval::new("s", now, now + chrono::Duration::hours(1)),
            }
        };
        let (answered, _) = store.finish(&claimed.lease, finish).await.unwrap();
        assert_eq!(
            answered.reply_credentials.get("slack_response_url"),
            Some(SLACK_URL)
        );
        let stored = raw(
            &pool,
            &format!(
                "SELECT job::text FROM aiwg_jobs WHERE id = '{}'",
                id.as_uuid()
            ),
        )
        .await;
        assert!(!stored.contains("hooks.slack.com"), "{stored}");
        assert!(stored.contains("aiwg:v1:test1:"), "{stored}");
        let back = store.get(id).await.unwrap().unwrap();
        assert_eq!(
            back.reply_credentials.get("slack_response_url"),
            Some(SLACK_URL)
        );
    }
    db.cleanup().await;
}
