//! The outbound webhook dispatcher on PostgreSQL: two dispatchers sharing one database never
//! send a delivery twice, and a new instance picks up the retries and the abandoned attempts of
//! one that went away.
//!
//! Run with `cargo test -p aiwg-core --features postgres,test-util --test pg_dispatch`.
#![cfg(all(feature = "postgres", feature = "test-util"))]

#[path = "dispatch_support.rs"]
mod support;

mod pg_support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use aiwg_core::dispatch::PgDispatchStore;
use aiwg_core::dispatch::{
    Attempt, AttemptOutcome, AttemptTrigger, CreateSubscription, DeliveryClaimRequest,
    DeliveryState, DispatchStore, DispatchStoreError, Dispatcher, OutboundEvent, RetryPolicy,
    SigningSecret, Subscription, SubscriptionId,
};
use chrono::Utc;
use pg_support::test_db;
use serde_json::json;
use support::{wait_delivery, wait_until, Receiver, Reply};

fn dispatcher(store: PgDispatchStore, instance: &str) -> Dispatcher {
    Dispatcher::builder()
        .store(Arc::new(store))
        .allow_private_targets(true)
        .retry(RetryPolicy::from_delays(vec![Duration::from_millis(20); 5]).with_jitter(0.0))
        .workers(4)
        .poll_interval(Duration::from_millis(20))
        .instance_id(instance)
        .build()
        .unwrap()
}

async fn subscribe(d: &Dispatcher, url: String) -> SubscriptionId {
    d.create(CreateSubscription {
        url,
        events: vec!["job.*".into()],
        ..Default::default()
    })
    .await
    .unwrap()
    .subscription
    .id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dispatchers_on_one_database_send_each_delivery_once() {
    let Some(db) = test_db().await else { return };
    let schema = db.schema().await;
    let r = Receiver::ok().await;
    let a = dispatcher(db.outbox_in(&schema, 5).await, "a");
    let b = dispatcher(db.outbox_in(&schema, 5).await, "b");
    a.start().unwrap();
    b.start().unwrap();
    let sub = subscribe(&a, r.url("/hook")).await;
    const N: usize = 100;
    for i in 0..N {
        let d = if i % 2 == 0 { &a } else { &b };
        let n = d
            .publish(OutboundEvent::new("job.completed", json!({ "i": i })))
            .await
            .unwrap();
        assert_eq!(n, 1, "B sees the subscription A created");
    }
    r.wait_for(N).await;
    wait_until("every delivery finished", || async {
        (a.pending_deliveries().await.unwrap() == 0).then_some(())
    })
    .await;
    let ids: HashSet<String> = r
        .requests()
        .iter()
        .map(|q| q.header("webhook-id").to_owned())
        .collect();
    assert_eq!(r.count(), N, "no delivery was sent twice");
    assert_eq!(ids.len(), N);
    let page = b.deliveries(sub, 500, None).await.unwrap();
    assert_eq!(page.deliveries.len(), N);
    assert!(page
        .deliveries
        .iter()
        .all(|d| d.state == DeliveryState::Succeeded && d.attempts.len() == 1));
    a.shutdown().await;
    b.shutdown().await;
    db.cleanup().await;
}

/// The outbox keeps a connection for its claims and one for its records while its dispatcher
/// is busy (sqlx tests every connection handed back to the pool with a round trip), and hands
/// both back once the dispatcher is idle: with every delivery sent and recorded, every
/// connection of the pool is idle again, the dispatcher still running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_kept_while_busy_go_back_to_the_pool_when_idle() {
    let Some(db) = test_db().await else { return };
    let schema = db.schema().await;
    let r = Receiver::ok().await;
    let store = db.outbox_in(&schema, 4).await;
    let d = dispatcher(store.clone(), "a");
    d.start().unwrap();
    for i in 0..4 {
        subscribe(&d, r.url(&format!("/hook{i}"))).await;
    }
    const EVENTS: usize = 50;
    for i in 0..EVENTS {
        let n = d
            .publish(OutboundEvent::new("job.completed", json!({ "i": i })))
            .await
            .unwrap();
        assert_eq!(n, 4);
    }
    r.wait_for(4 * EVENTS).await;
    wait_until("every delivery recorded", || async {
        (d.pending_deliveries().await.unwrap() == 0).then_some(())
    })
    .await;
    let pool = store.pool().clone();
    wait_until("every connection back in the pool", || async {
        (pool.num_idle() == pool.size() as usize).then_some(())
    })
    .await;
    assert_eq!(r.count(), 4 * EVENTS);
    d.shutdown().await;
    tokio::time::timeout(Duration::from_secs(10), pool.close())
        .await
        .expect("the pool closed: no connection kept after the shutdown");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_instance_takes_over_retries_and_abandoned_attempts() {
    let Some(db) = test_db().await else { return };
    let schema = db.schema().await;
    let r = Receiver::start(|_, _| Reply::status(200)).await;
    // The instance that goes away: never started, it acts through its store.
    let old_store = Arc::new(db.outbox_in(&schema, 3).await);
    let old = Dispatcher::builder()
        .store(old_store.clone())
        .allow_private_targets(true)
        .build()
        .unwrap();
    let sub = subscribe(&old, r.url("/hook")).await;
    old.publish(OutboundEvent::new("job.completed", json!({ "n": 1 })))
        .await
        .unwrap();
    old.publish(OutboundEvent::new("job.completed", json!({ "n": 2 })))
        .await
        .unwrap();
    let now = Utc::now();
    let claim = |lease: Duration| {
        let store = old_store.clone();
        async move {
            let mut got = store
                .claim_due(&DeliveryClaimRequest::new(
                    Utc::now(),
                    1,
                    "old",
                    lease,
                    usize::MAX,
                ))
                .await
                .unwrap();
            assert_eq!(got.len(), 1);
            got.remove(0)
        }
    };
    let first = claim(Duration::from_secs(60)).await;
    // The second was being attempted when the instance died: its lease lapses.
    let abandoned = claim(Duration::from_millis(300)).await;
    assert_ne!(abandoned.id, first.id);
    // The first one's attempt failed with a 503 and a retry is due now.
    old_store
        .finish_attempt(
            &first.lease,
            &Attempt {
                status_code: 503,
                duration_ms: 3,
                response_body: String::new(),
                error: None,
                at: now,
                trigger: AttemptTrigger::Scheduled,
            },
            AttemptOutcome::Retry { at: now },
        )
        .await
        .unwrap();

    let new = dispatcher(db.outbox_in(&schema, 5).await, "new");
    new.start().unwrap();
    let got = r.wait_for(2).await;
    let ids: HashSet<String> = got
        .iter()
        .map(|q| q.header("webhook-id").to_owned())
        .collect();
    assert_eq!(
        ids,
        HashSet::from([first.id.to_string(), abandoned.id.to_string()])
    );
    let retried = wait_until("the retry succeeded", || async {
        let d = new.delivery(sub, first.id).await.unwrap();
        (d.state == DeliveryState::Succeeded).then_some(d)
    })
    .await;
    assert_eq!(retried.scheduled_attempts, 2);
    assert_eq!(
        retried
            .attempts
            .iter()
            .map(|a| a.status_code)
            .collect::<Vec<_>>(),
        [503, 200]
    );
    let taken_over = wait_until("the abandoned delivery succeeded", || async {
        let d = new.delivery(sub, abandoned.id).await.unwrap();
        (d.state == DeliveryState::Succeeded).then_some(d)
    })
    .await;
    assert_eq!(taken_over.attempts.len(), 1);
    // The old instance cannot record anything for it any more.
    assert!(matches!(
        old_store
            .finish_attempt(
                &abandoned.lease,
                &Attempt {
                    status_code: 200,
                    duration_ms: 1,
                    response_body: String::new(),
                    error: None,
                    at: Utc::now(),
                    trigger: AttemptTrigger::Scheduled,
                },
                AttemptOutcome::Succeeded,
            )
            .await,
        Err(DispatchStoreError::LeaseLost)
    ));
    assert_eq!(r.count(), 2);
    new.shutdown().await;
    db.cleanup().await;
}

/// The per-subscription cap holds when claims of two outboxes on one database run at once:
/// each claim (`aiwg_claim_deliveries`, migration 0018) locks the subscriptions of its
/// candidates (in the order of their ids) and counts their leases in flight in a statement
/// after it holds the locks, so no two claims fill the same room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_subscription_cap_holds_under_concurrent_claims_of_two_outboxes() {
    let Some(db) = test_db().await else { return };
    let schema = db.schema().await;
    let outboxes = [
        Arc::new(db.outbox_in(&schema, 4).await),
        Arc::new(db.outbox_in(&schema, 4).await),
    ];
    let now = Utc::now();
    let subs = subscriptions_with_deliveries(&outboxes[0], 3, 20, now).await;
    const CAP: usize = 2;
    let mut claimers = Vec::new();
    for i in 0..8 {
        let outbox = Arc::clone(&outboxes[i % 2]);
        claimers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..5 {
                let req = DeliveryClaimRequest::new(
                    now,
                    1 + i % 3,
                    format!("c{i}"),
                    Duration::from_secs(60),
                    CAP,
                );
                got.extend(outbox.claim_due(&req).await.unwrap());
            }
            got
        }));
    }
    let mut claimed = Vec::new();
    for c in claimers {
        claimed.extend(c.await.unwrap());
    }
    let ids: HashSet<_> = claimed.iter().map(|c| c.id).collect();
    assert_eq!(ids.len(), claimed.len(), "a delivery claimed twice");
    for sub in subs {
        let n = claimed.iter().filter(|c| c.subscription.id == sub).count();
        assert_eq!(n, CAP, "deliveries in flight for one subscription");
    }
    db.cleanup().await;
}

/// `subs` enabled subscriptions, each with `per_sub` deliveries due at `now`.
async fn subscriptions_with_deliveries(
    outbox: &PgDispatchStore,
    subs: usize,
    per_sub: usize,
    now: chrono::DateTime<Utc>,
) -> Vec<SubscriptionId> {
    use aiwg_core::dispatch::{NewDelivery, SigningSecret, Subscription};
    let mut ids = Vec::new();
    for _ in 0..subs {
        let s = Subscription::new(
            "https://example.com/hook",
            vec!["*".into()],
            None,
            SigningSecret::generate(),
            now,
        );
        outbox.insert_subscription(&s).await.unwrap();
        let batch: Vec<_> = (0..per_sub)
            .map(|_| NewDelivery::new(s.id, "job.queued", "{}", now))
            .collect();
        outbox.enqueue(&batch).await.unwrap();
        ids.push(s.id);
    }
    ids
}

/// Rows of `aiwg_webhook_deliveries` read so far by this backend, as PostgreSQL counts them
/// (take the difference of two readings).
async fn deliveries_read(tx: &mut sqlx::Transaction<'static, sqlx::Postgres>) -> i64 {
    sqlx::query_scalar(
        "SELECT COALESCE(idx_tup_fetch, 0) + COALESCE(seq_tup_read, 0) \
         FROM pg_stat_xact_user_tables WHERE relid = 'aiwg_webhook_deliveries'::regclass",
    )
    .fetch_one(&mut **tx)
    .await
    .unwrap()
}

/// The outbox's claim and its attempts' record (migration 0018) read the deliveries only
/// through indexes, whatever plan the statistics of the moment would suggest. Written inline,
/// each kept the generic plan made while the outbox was small, and then read the whole table
/// at every call however far it had grown (the dispatch bench on PostgreSQL: a sequential scan
/// of every delivery to lease one). A session that turns index scans off leads PostgreSQL to
/// those plans, so that stands in for the statistics here: the claim of one delivery of 3 000
/// due, and its record, must still read a handful of rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_and_the_record_read_only_the_rows_they_need() {
    let Some(db) = test_db().await else { return };
    let schema = db.schema().await;
    let outbox = db.outbox_in(&schema, 2).await;
    let now = Utc::now();
    subscriptions_with_deliveries(&outbox, 3, 1_000, now).await;
    sqlx::query("ANALYZE aiwg_webhook_deliveries")
        .execute(outbox.pool())
        .await
        .unwrap();
    let due = now.timestamp_nanos_opt().unwrap() + 1;
    let mut tx = outbox.pool().begin().await.unwrap();
    sqlx::query("SET LOCAL enable_indexscan = off")
        .execute(&mut *tx)
        .await
        .unwrap();
    for cap in [None, Some(2_i64)] {
        let before = deliveries_read(&mut tx).await;
        let claimed: Vec<(uuid::Uuid, uuid::Uuid)> = sqlx::query_as(
            "SELECT delivery_id, lease_token \
             FROM aiwg_claim_deliveries($1, $2, 1, 2, 'bench', $3, 'scope')",
        )
        .bind(due)
        .bind(cap)
        .bind(due + 60_000_000_000)
        .fetch_all(&mut *tx)
        .await
        .unwrap();
        assert_eq!(claimed.len(), 1, "cap {cap:?}: one delivery claimed");
        let read = deliveries_read(&mut tx).await - before;
        assert!(
            read < 50,
            "cap {cap:?}: {read} rows read to claim one delivery of 3 000 due"
        );
        let before = deliveries_read(&mut tx).await;
        let (id, token) = claimed[0];
        let recorded: Vec<uuid::Uuid> = sqlx::query_scalar(
            "SELECT f FROM aiwg_finish_deliveries($1, $2, ARRAY['{}'::jsonb], ARRAY[1], \
             ARRAY['succeeded'], ARRAY[NULL::bigint]) AS f",
        )
        .bind(vec![id])
        .bind(vec![token])
        .fetch_all(&mut *tx)
        .await
        .unwrap();
        assert_eq!(recorded, vec![id], "cap {cap:?}: the attempt recorded");
        let read = deliveries_read(&mut tx).await - before;
        assert!(
            read < 10,
            "cap {cap:?}: {read} rows read to record one attempt"
        );
    }
    tx.rollback().await.unwrap();
    db.cleanup().await;
}

/// A subscription to `job.*` made now.
fn job_subscription(url: &str) -> Subscription {
    Subscription::new(
        url,
        vec!["job.*".into()],
        None,
        SigningSecret::generate(),
        Utc::now(),
    )
}

/// Whom a `job.completed` event goes to, according to `store`.
async fn completed_to(store: &PgDispatchStore) -> Vec<SubscriptionId> {
    store.subscribers("job.completed").await.unwrap()
}

/// What `store` answers for `job.completed` while its subscriptions table is renamed away:
/// `Some` only when it holds its list (it asks once before, so that a list it may hold is
/// read first).
async fn held_list(store: &PgDispatchStore) -> Option<Vec<SubscriptionId>> {
    let rename = |from: &str, to: &str| {
        let sql = format!("ALTER TABLE {from} RENAME TO {to}");
        async move {
            sqlx::query(&sql).execute(store.pool()).await.unwrap();
        }
    };
    let _ = completed_to(store).await;
    rename(
        "aiwg_webhook_subscriptions",
        "aiwg_webhook_subscriptions_away",
    )
    .await;
    let held = store.subscribers("job.completed").await;
    rename(
        "aiwg_webhook_subscriptions_away",
        "aiwg_webhook_subscriptions",
    )
    .await;
    held.ok()
}

/// A store made before its migrations (`from_pool`, then `migrate`, as the example server
/// does) holds its subscriber list as soon as they ran: its listener, which found no triggers
/// to announce changes, looks again then instead of half a minute later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_made_before_its_migrations_holds_its_list_once_they_ran() {
    let Some(db) = test_db().await else { return };
    let schema = db.schema().await;
    let outbox = db.outbox_in(&schema, 2).await;
    let a = job_subscription("http://127.0.0.1:9/a");
    outbox.insert_subscription(&a).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        wait_until("the list is held", || async {
            (held_list(&outbox).await == Some(vec![a.id])).then_some(())
        }),
    )
    .await
    .expect("held well before the listener's own 30 s wait");
    db.cleanup().await;
}

/// Each store holds the list of enabled subscriptions (a job event then costs no query) and
/// drops it when a subscription changes: at once after its own change, and on the table's
/// announcement (migration 0021) after another instance's or a host's own SQL. Changes to a
/// subscription's health keep it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscriber_list_follows_changes_made_here_and_elsewhere() {
    let Some(db) = test_db().await else { return };
    let schema = db.schema().await;
    let here = db.outbox_in(&schema, 2).await;
    let there = db.outbox_in(&schema, 2).await;
    assert!(completed_to(&there).await.is_empty());
    // Added here: seen here at once, there once announced.
    let a = job_subscription("http://127.0.0.1:9/a");
    here.insert_subscription(&a).await.unwrap();
    assert_eq!(completed_to(&here).await, [a.id]);
    wait_until("the other instance sees the subscription", || async {
        (completed_to(&there).await == [a.id]).then_some(())
    })
    .await;
    // The list is held: with the table out of the way, the question is still answered.
    wait_until("the list is held", || async {
        (held_list(&there).await == Some(vec![a.id])).then_some(())
    })
    .await;
    // A failing endpoint's health changes nothing there.
    here.endpoint_failed(a.id, Utc::now()).await.unwrap();
    // Disabled there: gone there at once, here once announced.
    assert!(there
        .disable_subscription(a.id, "test", Utc::now())
        .await
        .unwrap());
    assert!(completed_to(&there).await.is_empty());
    wait_until("this instance sees the subscription disabled", || async {
        completed_to(&here).await.is_empty().then_some(())
    })
    .await;
    // Enabled again, and a second one added, by a host's own SQL: both instances see both,
    // oldest first.
    let b = job_subscription("http://127.0.0.1:9/b");
    here.insert_subscription(&b).await.unwrap();
    sqlx::query("UPDATE aiwg_webhook_subscriptions SET enabled = TRUE WHERE id = $1")
        .bind(a.id.to_string().parse::<uuid::Uuid>().unwrap())
        .execute(here.pool())
        .await
        .unwrap();
    for store in [&here, &there] {
        wait_until("both subscriptions, oldest first", || async {
            (completed_to(store).await == [a.id, b.id]).then_some(())
        })
        .await;
    }
    // Deleted here: gone everywhere.
    assert!(here.delete_subscription(a.id).await.unwrap());
    assert_eq!(completed_to(&here).await, [b.id]);
    wait_until("the other instance sees the deletion", || async {
        (completed_to(&there).await == [b.id]).then_some(())
    })
    .await;
    db.cleanup().await;
}

/// A subscription whose keys this instance cannot open (sealed with a key it lacks) holds
/// back only its own deliveries: the others claimed with them are sent, and its own are not
/// sent unsigned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_whose_keys_cannot_be_opened_holds_back_only_its_own_deliveries() {
    let Some(db) = test_db().await else { return };
    let schema = db.schema().await;
    let r = Receiver::ok().await;
    drop(db.outbox_in(&schema, 2).await);
    let elsewhere = PgDispatchStore::from_pool(db.pool(&schema, 2).await)
        .await
        .unwrap()
        .with_keyring(
            aiwg_core::secrets::SecretKeyring::parse(
                "elsewhere:ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=",
            )
            .unwrap(),
        );
    let unreadable = Subscription::new(
        r.url("/unreadable"),
        vec!["job.*".into()],
        None,
        SigningSecret::generate(),
        Utc::now(),
    );
    elsewhere.insert_subscription(&unreadable).await.unwrap();
    let d = dispatcher(db.outbox_in(&schema, 4).await, "a");
    d.start().unwrap();
    let readable = subscribe(&d, r.url("/readable")).await;
    let n = d
        .publish(OutboundEvent::new("job.completed", json!({})))
        .await
        .unwrap();
    assert_eq!(n, 2, "both subscriptions get a delivery");
    wait_delivery(&d, readable, DeliveryState::Succeeded).await;
    assert!(
        r.requests().iter().all(|q| q.path == "/readable"),
        "nothing was sent for the subscription whose keys cannot be opened"
    );
    // (Its log, read where its keys can be opened.)
    let log = elsewhere.deliveries(unreadable.id, 10, None).await.unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].state, DeliveryState::Pending);
    assert!(log[0].attempts.is_empty());
    d.shutdown().await;
    db.cleanup().await;
}
