//! One HTTP attempt: sign, POST, read at most 20 000 bytes of the answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE, RETRY_AFTER, USER_AGENT};

use super::retry::parse_retry_after;
use super::sign::signature_header;
use super::ssrf::{GuardedResolver, TargetPolicy};
use super::store::ClaimedDelivery;
use super::DispatchError;

/// How much of a response body the delivery log keeps.
pub const RESPONSE_BODY_LIMIT: usize = 20_000;

/// The `user-agent` of every delivery.
pub const USER_AGENT_VALUE: &str = concat!("aiwg/", env!("CARGO_PKG_VERSION"));

/// What came back from one attempt.
#[derive(Debug)]
pub(crate) struct SendResult {
    pub(crate) at: DateTime<Utc>,
    pub(crate) status_code: u16,
    pub(crate) duration: Duration,
    pub(crate) body: String,
    pub(crate) error: Option<String>,
    pub(crate) retry_after: Option<Duration>,
}

#[derive(Debug, Clone)]
pub(crate) struct Sender {
    client: reqwest::Client,
    policy: Arc<TargetPolicy>,
}

impl Sender {
    pub(crate) fn new(
        policy: Arc<TargetPolicy>,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Result<Self, DispatchError> {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            // A proxy would resolve the target itself, past the guard.
            .no_proxy()
            .connect_timeout(connect_timeout)
            .timeout(timeout)
            .default_headers(headers)
            .dns_resolver(Arc::new(GuardedResolver::new(policy.clone())))
            .build()
            .map_err(|e| DispatchError::Invalid(format!("HTTP client: {e}")))?;
        Ok(Self { client, policy })
    }

    pub(crate) async fn send(&self, task: &ClaimedDelivery) -> SendResult {
        let at = Utc::now();
        let start = Instant::now();
        let fail = |error: String, start: Instant| SendResult {
            at,
            status_code: 0,
            duration: start.elapsed(),
            body: String::new(),
            error: Some(error),
            retry_after: None,
        };
        let url = match reqwest::Url::parse(&task.subscription.url) {
            Ok(u) => u,
            Err(e) => return fail(format!("invalid URL: {e}"), start),
        };
        if let Err(e) = self.policy.check_url_host(&url) {
            return fail(e, start);
        }
        let msg_id = task.id.to_string();
        let ts = at.timestamp();
        let signature = signature_header(
            task.subscription.live_keys(at),
            &msg_id,
            ts,
            task.payload.as_bytes(),
        );
        let request = self
            .client
            .post(url)
            .header("webhook-id", &msg_id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", signature)
            .body(task.payload.clone());
        let mut resp = match request.send().await {
            Ok(r) => r,
            Err(e) => return fail(error_chain(&e), start),
        };
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, Utc::now()));
        let mut body = Vec::new();
        let mut error = None;
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    let room = RESPONSE_BODY_LIMIT - body.len();
                    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    if body.len() >= RESPONSE_BODY_LIMIT {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    error = Some(format!("reading the response: {}", error_chain(&e)));
                    break;
                }
            }
        }
        if error.is_none() && !status.is_success() {
            error = Some(format!("HTTP {status}"));
        }
        SendResult {
            at,
            status_code: status.as_u16(),
            duration: start.elapsed(),
            body: truncate_utf8(body),
            error,
            retry_after,
        }
    }
}

/// The bytes as text, at most [`RESPONSE_BODY_LIMIT`] bytes, cut at a character boundary.
pub(crate) fn truncate_utf8(mut body: Vec<u8>) -> String {
    body.truncate(RESPONSE_BODY_LIMIT);
    match String::from_utf8(body) {
        Ok(s) => s,
        Err(e) => {
            let valid = e.utf8_error().valid_up_to();
            let mut bytes = e.into_bytes();
            if bytes.len() - valid < 4 {
                // An incomplete character at the cut.
                bytes.truncate(valid);
                String::from_utf8(bytes).unwrap_or_default()
            } else {
                let s = String::from_utf8_lossy(&bytes).into_owned();
                let mut end = s.len().min(RESPONSE_BODY_LIMIT);
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                s[..end].to_owned()
            }
        }
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        src = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_the_first_20000_bytes_on_a_boundary() {
        assert_eq!(truncate_utf8(vec![b'a'; 50_000]).len(), 20_000);
        assert_eq!(truncate_utf8(b"short".to_vec()), "short");
        // 'é' is two bytes: 19 999 ASCII bytes then 'é' straddles the limit.
        let mut v = vec![b'a'; 19_999];
        v.extend_from_slice("é".as_bytes());
        let s = truncate_utf8(v);
        assert_eq!(s.len(), 19_999);
        let lossy = truncate_utf8(vec![0xff; 30_000]);
        assert!(lossy.len() <= 20_000 && !lossy.is_empty());
    }
}
