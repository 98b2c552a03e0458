//! The body of `POST /workflows/trigger`, read once for every trigger source: the HTTP API and
//! the message brokers (`aiwg-brokers`) turn the same bytes into the same [`JobRequest`], or
//! refuse them with the same [`Problem`].

use std::collections::BTreeMap;

use http::StatusCode;
use serde::de::DeserializeOwned;

use super::types::TriggerBody;
use super::Problem;
use crate::request::JobRequest;

/// Reads a JSON object (the API's bodies are all objects; serde alone would also read a struct
/// from an array).
pub(super) fn json_object<T: DeserializeOwned>(body: &[u8]) -> Result<T, Problem> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|b| *b != b'{') {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-body",
            "invalid JSON body: expected an object",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-body",
            format!("invalid JSON body: {e}"),
        )
    })
}

/// A parameter value as the engine takes it (text).
pub(super) fn param_value(name: &str, v: serde_json::Value) -> Result<String, Problem> {
    match v {
        serde_json::Value::String(s) => Ok(s),
        serde_json::Value::Number(n) => Ok(n.to_string()),
        serde_json::Value::Bool(b) => Ok(b.to_string()),
        _ => Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-params",
            format!("parameter `{name}` must be a string, number or boolean"),
        )),
    }
}

/// Parses the bytes of a trigger body (`{"workflow", "params", …}`), refusing what the HTTP
/// API refuses with the same problem (`invalid-body`, 400).
///
/// ```
/// use aiwg_core::http::trigger_body;
///
/// let body = trigger_body(br#"{"workflow": "review", "params": {"n": 3}}"#)?;
/// let request = body.into_job_request()?;
/// assert_eq!(request.workflow, "review");
/// assert_eq!(request.params["n"], "3");
///
/// let refused = trigger_body(b"[1, 2]").unwrap_err();
/// assert_eq!((refused.status(), refused.slug()), (400, "invalid-body"));
/// # Ok::<(), aiwg_core::http::Problem>(())
/// ```
pub fn trigger_body(body: &[u8]) -> Result<TriggerBody, Problem> {
    json_object(body)
}

impl TriggerBody {
    /// The job request this body asks for: workflow, project, guidance, parameters (numbers
    /// and booleans as text) and priority. The idempotency key, the trigger's source and actor
    /// are the caller's to set (each source namespaces keys its own way); `async` is the HTTP
    /// API's concern.
    pub fn into_job_request(self) -> Result<JobRequest, Problem> {
        let mut params = BTreeMap::new();
        for (k, v) in self.params.unwrap_or_default() {
            let v = param_value(&k, v)?;
            params.insert(k, v);
        }
        let mut request = JobRequest::new(self.workflow);
        request.project_path = self.project_path;
        request.project = self.project;
        request.guidance = self.guidance;
        request.params = params;
        request.priority = self.priority;
        Ok(request)
    }
}
