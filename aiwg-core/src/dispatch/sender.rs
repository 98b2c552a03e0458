//! One HTTP attempt: sign, POST, read at most 20 000 bytes of the answer.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use reqwest::Method;

use super::retry::parse_retry_after;
use super::sign::signature_header;
use super::ssrf::{GuardedResolver, TargetPolicy};
use super::store::ClaimedDelivery;
use super::subscription::SubscriptionId;
use super::DispatchError;
use crate::fast_hash::FastMap;

/// How much of a response body the delivery log keeps.
pub const RESPONSE_BODY_LIMIT: usize = 20_000;

/// The `user-agent` of every delivery.
pub const USER_AGENT_VALUE: &str = concat!("aiwg/", env!("CARGO_PKG_VERSION"));

const WEBHOOK_ID: HeaderName = HeaderName::from_static("webhook-id");
const WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static("webhook-timestamp");
const WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");

/// The headers a delivery's request carries: the three above, `content-type`, `user-agent` and
/// `accept` (the client's defaults), and `host` and `content-length` (added on the way).
const REQUEST_HEADERS: usize = 8;

/// A delivery's body as the request's, without a copy.
struct Body(Arc<str>);

impl AsRef<[u8]> for Body {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

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
    endpoints: Arc<Mutex<FastMap<SubscriptionId, Arc<Endpoint>>>>,
}

/// A subscription's URL, parsed and checked once: the check of an IP-literal host depends only
/// on the URL and the policy, which never changes for a sender. (Names are checked when a
/// connection is made, by the resolver.)
#[derive(Debug)]
struct Endpoint {
    text: String,
    url: Result<reqwest::Url, String>,
}

/// Endpoints remembered at most; past it the memory starts afresh (deleted subscriptions).
const ENDPOINTS_KEPT: usize = 10_000;

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
        Ok(Self {
            client,
            policy,
            endpoints: Arc::default(),
        })
    }

    /// The parsed and checked URL of `task`'s subscription.
    fn endpoint(&self, task: &ClaimedDelivery) -> Arc<Endpoint> {
        let sub = &task.subscription;
        let mut endpoints = self
            .endpoints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(e) = endpoints.get(&sub.id).filter(|e| e.text == sub.url) {
            return e.clone();
        }
        let url = reqwest::Url::parse(&sub.url)
            .map_err(|e| format!("invalid URL: {e}"))
            .and_then(|url| self.policy.check_url_host(&url).map(|()| url));
        let endpoint = Arc::new(Endpoint {
            text: sub.url.clone(),
            url,
        });
        if endpoints.len() >= ENDPOINTS_KEPT {
            endpoints.clear();
        }
        endpoints.insert(sub.id, endpoint.clone());
        endpoint
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
        let url = match &self.endpoint(task).url {
            Ok(u) => u.clone(),
            Err(e) => return fail(e.clone(), start),
        };
        let msg_id = task.id.text();
        let ts = at.timestamp();
        let signature = signature_header(
            task.subscription.live_keys(at),
            &msg_id,
            ts,
            task.payload.as_bytes(),
        );
        // Ids, numbers and base64 are always valid header values.
        let (Ok(id_value), Ok(signature)) = (
            HeaderValue::try_from(msg_id),
            HeaderValue::try_from(signature),
        ) else {
            return fail(
                "the webhook headers are not valid header values".into(),
                start,
            );
        };
        let mut request = reqwest::Request::new(Method::POST, url);
        // Sized once for every header the request ends with (ours, the client's defaults, then
        // `host` and `content-length`): the map is copied per request by reqwest and would
        // otherwise grow and rehash on the way.
        let headers = request.headers_mut();
        *headers = HeaderMap::with_capacity(REQUEST_HEADERS);
        headers.insert(WEBHOOK_ID, id_value);
        headers.insert(WEBHOOK_TIMESTAMP, HeaderValue::from(ts));
        headers.insert(WEBHOOK_SIGNATURE, signature);
        *request.body_mut() = Some(Bytes::from_owner(Body(task.payload.clone())).into());
        let mut resp = match self.client.execute(request).await {
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
