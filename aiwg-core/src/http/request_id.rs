//! `x-request-id`: every response names the request it answers. Both routers keep the id a
//! client sent and make one otherwise, show it to the API with the request's headers, and put
//! it on the response (unless the API set one itself).

use http::{HeaderMap, HeaderName, HeaderValue};

/// The header that carries a request's id.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A new request id: a UUIDv7 in its hyphenated form (time-ordered, so ids sort as the
/// requests arrived).
#[must_use]
pub fn new_request_id() -> HeaderValue {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text = uuid::Uuid::now_v7().hyphenated().encode_lower(&mut buf);
    // A hyphenated UUID is visible ASCII: always a valid header value.
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// The id of the request with these headers: the client's `x-request-id` when it sent one,
/// otherwise a [new](new_request_id) one, which is then added to `headers` so that the API sees
/// the same id the response carries.
pub fn request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(id) = headers.get(REQUEST_ID) {
        return id.clone();
    }
    let id = new_request_id();
    headers.insert(REQUEST_ID, id.clone());
    id
}

/// Puts `id` on a response's headers unless the API named the request itself.
pub fn answer_with_request_id(headers: &mut HeaderMap, id: HeaderValue) {
    headers.entry(REQUEST_ID).or_insert(id);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clients_id_is_kept_and_a_missing_one_is_made_once() {
        let mut sent = HeaderMap::new();
        sent.insert(REQUEST_ID, HeaderValue::from_static("req-42"));
        assert_eq!(request_id(&mut sent), "req-42");
        assert_eq!(sent.get_all(REQUEST_ID).iter().count(), 1);

        let mut none = HeaderMap::new();
        let made = request_id(&mut none);
        assert_eq!(
            none.get(REQUEST_ID),
            Some(&made),
            "the API sees the id it answers with"
        );
        let text = made.to_str().unwrap();
        assert_eq!(uuid::Uuid::parse_str(text).unwrap().get_version_num(), 7);
        assert_ne!(made, new_request_id(), "each request gets its own");

        let mut answer = HeaderMap::new();
        answer.insert(REQUEST_ID, HeaderValue::from_static("the-api's"));
        answer_with_request_id(&mut answer, made.clone());
        assert_eq!(answer[REQUEST_ID], "the-api's");
        let mut answer = HeaderMap::new();
        answer_with_request_id(&mut answer, made.clone());
        assert_eq!(answer[REQUEST_ID], made);
    }
}
