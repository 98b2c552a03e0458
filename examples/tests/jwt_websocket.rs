//! The example servers (axum and actix-web) as real processes with `auth.jwt`: a token signed
//! in the test, verified against a JWKS served on loopback, triggers a job whose events then
//! arrive over a WebSocket (authenticated by its first message, as a browser does) exactly as
//! the SSE stream gives them; a refused token gets its precise `WWW-Authenticate`.

mod support;

use aiwg_core::test_util::conformance::parse_sse;
use aiwg_core::test_util::jwt::{now, JwksServer, KeyKind, TestIssuer, AUDIENCE, ISSUER};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::start;
use tokio_tungstenite::tungstenite::Message;

fn config(dir: &std::path::Path, jwks_url: &str) -> String {
    format!(
        r#"
server: {{ bind: "127.0.0.1:0" }}
projects: {{ root: "{}" }}
auth:
  api_keys: [ {{ name: ci, key: "${{AIWG_API_KEY}}", scopes: [admin] }} ]
  jwt: {{ issuer: "{ISSUER}", audience: {AUDIENCE}, jwks_url: "{jwks_url}", leeway: 5s }}
agents:
  sh: {{ kind: command }}
workflows:
  hello:
    steps:
      - {{ name: say, agent: sh, command: ["printf", "hello"] }}
  gated:
    steps:
      - {{ name: go, agent: sh, command: ["printf", "go"], approval: required }}
"#,
        dir.display()
    )
}

#[tokio::test]
async fn the_axum_server_takes_jwts_and_streams_over_websocket() {
    jwt_and_websocket(env!("CARGO_BIN_EXE_server")).await;
}

#[tokio::test]
async fn the_actix_server_takes_jwts_and_streams_over_websocket() {
    jwt_and_websocket(env!("CARGO_BIN_EXE_actix_server")).await;
}

async fn jwt_and_websocket(bin: &str) {
    let issuer = TestIssuer::generate();
    let jwks = JwksServer::start(json!({"keys": [issuer.jwk(KeyKind::Rsa, "k1")]})).await;
    let dir = tempfile::tempdir().unwrap();
    let server = start(bin, &config(dir.path(), jwks.url()), dir.path());
    let token = issuer.sign(
        KeyKind::Rsa,
        Some("k1"),
        &issuer.claims("alice", "trigger read"),
    );
    let http = reqwest::Client::new();

    let res = http
        .post(format!("{}/workflows/trigger", server.base))
        .bearer_auth(&token)
        .json(&json!({"workflow": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 202);
    let id = res.json::<Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_owned();

    // The SSE stream, read to its end.
    let text = http
        .get(format!("{}/workflows/{id}/events", server.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let sse: Vec<Value> = parse_sse(&text)
        .into_iter()
        .filter(|f| !f.comment)
        .map(|f| {
            json!({"id": f.id.unwrap(), "event": f.event.unwrap(),
                "data": serde_json::from_str::<Value>(&f.data).unwrap()})
        })
        .collect();
    assert_eq!(sse.last().unwrap()["data"]["to"], "completed", "{sse:?}");

    // The WebSocket, authenticated by its first message.
    let url = format!(
        "ws{}/workflows/{id}/ws",
        server.base.trim_start_matches("http")
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    ws.send(Message::text(
        json!({"type": "auth", "token": token}).to_string(),
    ))
    .await
    .unwrap();
    let mut texts = Vec::new();
    let close = loop {
        let m = tokio::time::timeout(std::time::Duration::from_secs(20), ws.next())
            .await
            .expect("a message")
            .expect("the socket is open")
            .unwrap();
        match m {
            Message::Text(t) => texts.push(serde_json::from_str::<Value>(t.as_str()).unwrap()),
            Message::Close(c) => break c.expect("a close frame"),
            _ => {}
        }
    };
    assert_eq!(
        texts[0],
        json!({"event": "ready", "data": {"name": "alice", "scopes": ["trigger", "read"]}})
    );
    assert_eq!(texts[1..], sse[..]);
    assert_eq!(u16::from(close.code), 1000);
    assert_eq!(jwks.hits(), 1);

    // A token's approval is recorded under the name the audit gives a token's caller,
    // `jwt:<sub>`, never to be taken for the API key of the same name.
    let lead = issuer.sign(
        KeyKind::Rsa,
        Some("k1"),
        &issuer.claims("lead", "trigger read approve"),
    );
    let res = http
        .post(format!("{}/workflows/trigger", server.base))
        .bearer_auth(&lead)
        .json(&json!({"workflow": "gated"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 202);
    let gated = res.json::<Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut events = http
        .get(format!("{}/workflows/{gated}/events", server.base))
        .bearer_auth(&lead)
        .send()
        .await
        .unwrap()
        .bytes_stream();
    let mut seen = String::new();
    tokio::time::timeout(std::time::Duration::from_secs(20), async {
        while let Some(Ok(chunk)) = events.next().await {
            seen.push_str(&String::from_utf8_lossy(&chunk));
            if seen.contains("\"awaiting_approval\"") {
                return;
            }
        }
    })
    .await
    .expect("the job waits for its approval");
    drop(events);
    let res = http
        .post(format!("{}/workflows/{gated}/approve", server.base))
        .bearer_auth(&lead)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    let doc: Value = res.json().await.unwrap();
    assert_eq!(doc["approvals"][0]["decision"]["by"], "jwt:lead", "{doc}");

    // A malformed handshake (no Sec-WebSocket-Key): a problem document, not the stack's text.
    let res = http
        .get(format!("{}/ws", server.base))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 400);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let problem: Value = res.json().await.unwrap();
    assert_eq!(
        problem["type"], "urn:aiwg:problem:invalid-upgrade",
        "{problem}"
    );

    // An expired token: 401 saying so.
    let mut claims = issuer.claims("alice", "read");
    claims["exp"] = json!(now() - 600);
    let expired = issuer.sign(KeyKind::Rsa, Some("k1"), &claims);
    let res = http
        .get(format!("{}/jobs", server.base))
        .bearer_auth(&expired)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 401);
    let challenge = res.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        challenge.contains(r#"error="invalid_token""#) && challenge.contains("expired"),
        "{challenge}"
    );
}
