//! Turning a trigger message into a job: [`submit_message`] (and
//! [`submit_message_without_id`]) parse the body as the HTTP API does, submit the job under the
//! message's idempotency key ([`message_key`]), record the decision in the engine's audit trail
//! and answer with a [`Verdict`]: stored, refused for good (its [`problem_document`] goes to the
//! dead-letter destination), or to be retried.

use aiwg_core::audit::{AuditRecord, Decision};
use aiwg_core::http::{openapi::idempotency_key_ok, trigger_body, Problem};
use aiwg_core::{Engine, JobId, SubmitError};
use sha2::Digest;

/// What became of one trigger message.
#[derive(Debug)]
#[non_exhaustive]
pub enum Verdict {
    /// The job is stored: acknowledge the message.
    Stored {
        /// The job.
        job_id: JobId,
        /// `false` when the message's key found an existing job (a redelivery).
        created: bool,
    },
    /// Refused for good: acknowledge it and publish the problem document to the dead-letter
    /// destination.
    Refused(Problem),
    /// Refused for now (queue full, shutting down, store failure): leave it to be redelivered.
    Retry(SubmitError),
}

/// The idempotency key of a message: `<broker>:<namespace>:<id>`, hashed when it would not be
/// a valid key (longer than 255 bytes or not printable ASCII).
#[must_use]
pub fn message_key(broker: &str, namespace: &str, id: &str) -> String {
    let key = format!("{broker}:{namespace}:{id}");
    if idempotency_key_ok(&key) {
        return key;
    }
    let digest = hex::encode(sha2::Sha256::digest(id.as_bytes()));
    let ns: String = namespace
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(100)
        .collect();
    format!("{broker}:{ns}:sha256:{digest}")
}

/// Submits the trigger message `body` from `broker` (`nats`, `amqp`, `redis` or a host's own
/// name) with the id `message_id` in `namespace` (the stream or queue), and records the
/// decision in the engine's audit trail.
pub async fn submit_message(
    engine: &Engine,
    broker: &'static str,
    namespace: &str,
    message_id: &str,
    body: &[u8],
) -> Verdict {
    submit(
        engine,
        broker,
        namespace,
        Some(message_id),
        body,
        usize::MAX,
    )
    .await
}

/// Like [`submit_message`] for a message without an id (an AMQP message whose publisher set
/// no `message_id`): the job's idempotency key is the body's own `idempotency_key` when it has
/// one, else there is none, and a redelivery of the message runs it again (at least once).
pub async fn submit_message_without_id(
    engine: &Engine,
    broker: &'static str,
    namespace: &str,
    body: &[u8],
) -> Verdict {
    submit(engine, broker, namespace, None, body, usize::MAX).await
}

/// The most of a refused message's body a dead letter keeps when the body is larger than
/// `max_message_bytes`.
pub(crate) const DEAD_LETTER_PREFIX: usize = 64 * 1024;

/// The body a dead letter keeps of `body`, and whether it is cut: all of it when it is at most
/// `limit` bytes, else its first [`DEAD_LETTER_PREFIX`] bytes (or `limit`, when smaller).
#[allow(dead_code)] // without any broker feature nothing dead-letters
pub(crate) fn dead_letter_body(body: &[u8], limit: usize) -> (&[u8], bool) {
    if body.len() <= limit {
        (body, false)
    } else {
        (&body[..DEAD_LETTER_PREFIX.min(limit)], true)
    }
}

/// The refusal of a body of `size` bytes, more than `limit`: 413 `payload-too-large`.
fn too_large(size: usize, limit: usize) -> Problem {
    problem(
        413,
        "payload-too-large",
        format!(
            "the message body is {size} bytes, more than the limit of {limit} \
             (max_message_bytes); it was not parsed"
        ),
    )
}

/// A problem with the status `code`. `Problem::new` takes `http`'s `StatusCode`, a dependency
/// of `aiwg-core`, not of this crate: the type is reached through the function's own.
fn problem(code: u16, slug: &'static str, detail: String) -> Problem {
    fn with_status<S: TryFrom<u16>>(
        new: fn(S, &'static str, String) -> Problem,
        code: u16,
        slug: &'static str,
        detail: String,
    ) -> Problem {
        match S::try_from(code) {
            Ok(status) => new(status, slug, detail),
            Err(_) => unreachable!("{code} is a valid status code"),
        }
    }
    with_status(Problem::new, code, slug, detail)
}

/// Like [`submit_message`] (`message_id` `None`: [`submit_message_without_id`]), refusing
/// without parsing it a body larger than `max_bytes` (`payload-too-large`, audited and counted
/// as any refusal).
#[allow(dead_code)] // without any broker feature nothing submits
pub(crate) async fn submit_bounded(
    engine: &Engine,
    broker: &'static str,
    namespace: &str,
    message_id: Option<&str>,
    body: &[u8],
    max_bytes: usize,
) -> Verdict {
    submit(engine, broker, namespace, message_id, body, max_bytes).await
}

async fn submit(
    engine: &Engine,
    broker: &'static str,
    namespace: &str,
    message_id: Option<&str>,
    body: &[u8],
    max_bytes: usize,
) -> Verdict {
    let mut record = AuditRecord::new(broker, Decision::Refused);
    if let Some(id) = message_id {
        record = record.delivery_id(id);
    }
    let verdict = if body.len() > max_bytes {
        Verdict::Refused(too_large(body.len(), max_bytes))
    } else {
        decide(engine, broker, namespace, message_id, body, &mut record).await
    };
    match &verdict {
        Verdict::Stored { job_id, created } => {
            record.job_id = Some(*job_id);
            record.decision = if *created {
                Decision::Accepted
            } else {
                record.reason = Some("message seen before: the same job".into());
                Decision::Duplicate
            };
        }
        Verdict::Refused(p) => record.reason = Some(p.detail().to_owned()),
        Verdict::Retry(e) => record.reason = Some(format!("{e} (the message will come again)")),
    }
    engine.audit().record(record).await;
    verdict
}

async fn decide(
    engine: &Engine,
    broker: &'static str,
    namespace: &str,
    message_id: Option<&str>,
    body: &[u8],
    record: &mut AuditRecord,
) -> Verdict {
    let parsed = match trigger_body(body) {
        Ok(b) => b,
        Err(p) => return Verdict::Refused(p),
    };
    record.workflow = Some(parsed.workflow.clone());
    let own_key = parsed.idempotency_key.clone();
    let mut request = match parsed.into_job_request() {
        Ok(r) => r,
        Err(p) => return Verdict::Refused(p),
    };
    request.idempotency_key = match (own_key, message_id) {
        (Some(k), _) => Some(message_key(broker, namespace, &format!("key:{k}"))),
        (None, Some(id)) => Some(message_key(broker, namespace, id)),
        (None, None) => None,
    };
    request.trigger = aiwg_core::TriggerInfo::new(broker);
    request.trigger.delivery_id = message_id.map(str::to_owned);
    match engine.submission(request).await {
        Ok(s) => Verdict::Stored {
            job_id: s.job.id,
            created: s.created,
        },
        Err(e) if e.is_transient() => Verdict::Retry(e),
        Err(e) => Verdict::Refused(Problem::from(&e)),
    }
}

/// The JSON document of a refusal (what the HTTP API answers).
#[must_use]
pub fn problem_document(problem: &Problem) -> String {
    serde_json::to_string(problem).unwrap_or_else(|_| "{}".into())
}

/// The JSON document of a refusal, at most `max` bytes long (for a header): when the whole
/// document is longer, its `detail` is cut (at a character boundary, ending with `…`).
#[allow(dead_code)] // without any broker feature nothing dead-letters
pub(crate) fn problem_document_within(problem: &Problem, max: usize) -> String {
    let doc = problem_document(problem);
    if doc.len() <= max {
        return doc;
    }
    let Ok(serde_json::Value::Object(mut fields)) = serde_json::to_value(problem) else {
        return doc;
    };
    let detail = problem.detail();
    let mut with_detail = |keep: usize| {
        let mut cut = detail[..keep].to_owned();
        cut.push('…');
        fields.insert("detail".into(), serde_json::Value::String(cut));
        serde_json::Value::Object(fields.clone()).to_string()
    };
    // The longest cut that fits: `fits` fits (0 bytes kept, when nothing does), `over` does not.
    let (mut fits, mut over) = (0, detail.len());
    while over - fits > 1 {
        let mut mid = fits + (over - fits) / 2;
        while !detail.is_char_boundary(mid) {
            mid -= 1;
        }
        if mid == fits {
            break;
        }
        if with_detail(mid).len() <= max {
            fits = mid;
        } else {
            over = mid;
        }
    }
    with_detail(fits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_namespaced_and_hashed_when_unfit() {
        assert_eq!(message_key("nats", "S", "42"), "nats:S:42");
        let long = "x".repeat(300);
        let k = message_key("redis", "s", &long);
        assert!(
            k.starts_with("redis:s:sha256:") && idempotency_key_ok(&k),
            "{k}"
        );
        assert_ne!(k, message_key("redis", "s", &"y".repeat(300)));
        assert!(idempotency_key_ok(&message_key("amqp", "q", "é\n")));
    }

    #[test]
    fn a_body_over_the_limit_is_refused_unparsed_and_counted() {
        use aiwg_core::audit::AuditQuery;
        use aiwg_core::test_util::{MetricsCapture, ScriptedExecutor};
        use aiwg_core::{Step, Workflow};
        use std::sync::Arc;

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let counters = MetricsCapture::default();
        let engine = rt.block_on(async {
            Engine::builder()
                .executor("x", Arc::new(ScriptedExecutor::succeeding("ok")))
                .workflow(Workflow::new("check").step(Step::prompt("run", "x", "check")))
                .build()
                .unwrap()
        });
        // A valid trigger, one byte too many.
        let body = br#"{"workflow": "check"}"#;
        let verdict = metrics::with_local_recorder(&counters, || {
            rt.block_on(submit_bounded(
                &engine,
                "nats",
                "S",
                Some("1"),
                body,
                body.len() - 1,
            ))
        });
        let Verdict::Refused(problem) = verdict else {
            panic!("{verdict:?}");
        };
        assert_eq!(problem.status(), 413);
        assert_eq!(problem.slug(), "payload-too-large");
        let (size, limit) = (body.len().to_string(), (body.len() - 1).to_string());
        assert!(
            problem.detail().contains(&size) && problem.detail().contains(&limit),
            "{}",
            problem.detail()
        );
        assert_eq!(
            counters.get("aiwg_trigger_decisions_total{decision=refused,source=nats}"),
            1
        );
        let entries = rt.block_on(async {
            let mut q = AuditQuery::default();
            q.source = Some("nats".into());
            engine.audit().store().list(&q).await.unwrap().entries
        });
        // Not parsed: the audit entry names no workflow.
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].workflow, None);
        // At the limit: parsed and stored.
        let verdict = rt.block_on(submit_bounded(
            &engine,
            "nats",
            "S",
            Some("2"),
            body,
            body.len(),
        ));
        assert!(
            matches!(verdict, Verdict::Stored { created: true, .. }),
            "{verdict:?}"
        );
        rt.block_on(engine.shutdown(std::time::Duration::from_secs(1)));
    }

    #[test]
    fn a_problem_document_for_a_header_is_bounded_and_still_json() {
        let short = problem(404, "unknown-workflow", "unknown workflow `x`".into());
        assert_eq!(
            problem_document_within(&short, 1024),
            problem_document(&short)
        );
        let long = problem(
            404,
            "unknown-workflow",
            format!("unknown workflow `{}`", "é\"".repeat(2000)),
        );
        let doc = problem_document_within(&long, 1024);
        assert!(doc.len() <= 1024, "{}", doc.len());
        let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
        assert_eq!(v["status"], 404);
        assert!(v["detail"].as_str().unwrap().ends_with('…'), "{v}");
        assert!(v["detail"].as_str().unwrap().len() > 500, "{v}");
    }

    #[test]
    fn a_dead_letter_keeps_a_bounded_prefix_of_an_oversized_body() {
        let small = b"not json";
        assert_eq!(dead_letter_body(small, 100), (&small[..], false));
        let big = vec![b'x'; 200_000];
        let (kept, cut) = dead_letter_body(&big, 100_000);
        assert!(cut);
        assert_eq!(kept.len(), DEAD_LETTER_PREFIX);
        let (kept, cut) = dead_letter_body(&big, 10);
        assert!(cut);
        assert_eq!(kept.len(), 10);
    }
}
