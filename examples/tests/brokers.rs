//! The example server with all three brokers configured (features `nats`, `amqp`, `redis`):
//! one trigger message per broker runs a job, visible through the HTTP API with the broker as
//! its trigger source; a malformed `brokers:` section refuses to start naming the key.
#![cfg(all(feature = "nats", feature = "amqp", feature = "redis"))]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

const KEY: &str = "brokers-test-key-0123456789";
const LIMIT: Duration = Duration::from_secs(60);

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn up(port: u16) -> bool {
    let ok = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
    if !ok {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("no broker on 127.0.0.1:{port}; run scripts/ensure-brokers.sh");
        }
        eprintln!("skipping: no broker on 127.0.0.1:{port} (scripts/ensure-brokers.sh)");
    }
    ok
}

#[tokio::test]
async fn a_trigger_message_per_broker_runs_a_job_through_the_server() {
    if !(up(4222) && up(5672) && up(6379)) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let n = format!(
        "ex{}x{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
            % 1_000_000_000
    );
    let config = format!(
        r#"
server: {{ bind: "127.0.0.1:0" }}
projects: {{ root: "{root}" }}
agents:
  sh: {{ kind: command }}
workflows:
  echo:
    steps:
      - {{ name: say, agent: sh, command: ["echo", "{{{{guidance}}}}"] }}
brokers:
  nats:  {{ url: "nats://127.0.0.1:4222", stream: "AIWG_{n}", trigger_subject: "{n}.trigger",
           events_subject: "{n}.events", dead_letter_subject: "{n}.dead" }}
  amqp:  {{ url: "amqp://guest:guest@127.0.0.1:5672/%2f", queue: "{n}.trigger", events_exchange: "{n}.events" }}
  redis: {{ url: "redis://127.0.0.1:6379", stream: "{n}:trigger", events_stream: "{n}:events" }}
"#,
        root = dir.path().display()
    );
    let path = dir.path().join("aiwg.yaml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_server"))
        .arg("--config")
        .arg(&path)
        .env("AIWG_API_KEY", KEY)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let base = loop {
        let line = rx
            .recv_timeout(LIMIT)
            .expect("the server prints its address");
        if let Some(rest) = line.strip_prefix("aiwg listening on ") {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    let server = Server { child, base };

    // NATS JetStream.
    let js =
        async_nats::jetstream::new(async_nats::connect("nats://127.0.0.1:4222").await.unwrap());
    js.publish(
        format!("{n}.trigger"),
        r#"{"workflow": "echo", "guidance": "via-nats"}"#.into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    // RabbitMQ.
    let conn =
        lapin::Connection::connect("amqp://guest:guest@127.0.0.1:5672/%2f", Default::default())
            .await
            .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.basic_publish(
        "".into(),
        format!("{n}.trigger").as_str().into(),
        Default::default(),
        br#"{"workflow": "echo", "guidance": "via-amqp"}"#,
        lapin::BasicProperties::default().with_message_id("m1".into()),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    // Redis Streams.
    let mut r = redis::Client::open("redis://127.0.0.1:6379")
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: String = redis::AsyncCommands::xadd(
        &mut r,
        format!("{n}:trigger"),
        "*",
        &[("body", r#"{"workflow": "echo", "guidance": "via-redis"}"#)],
    )
    .await
    .unwrap();

    let http = reqwest::Client::new();
    let jobs = tokio::time::timeout(LIMIT, async {
        loop {
            let list: Value = http
                .get(format!("{}/jobs", server.base))
                .bearer_auth(KEY)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let jobs = list["jobs"].as_array().cloned().unwrap_or_default();
            if jobs.len() == 3 && jobs.iter().all(|j| j["status"] == "completed") {
                break jobs;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("three completed jobs");
    let mut sources: Vec<(String, String)> = jobs
        .iter()
        .map(|j| {
            (
                j["trigger"]["source"].as_str().unwrap().to_owned(),
                j["result"]["summary"]
                    .as_str()
                    .unwrap_or_default()
                    .trim()
                    .to_owned(),
            )
        })
        .collect();
    sources.sort();
    assert_eq!(
        sources,
        [
            ("amqp".into(), "via-amqp".into()),
            ("nats".into(), "via-nats".into()),
            ("redis".into(), "via-redis".into())
        ],
        "{jobs:?}"
    );
    // The audit trail names each broker.
    let audit: Value = http
        .get(format!("{}/audit", server.base))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let text = audit.to_string();
    for b in ["\"nats\"", "\"amqp\"", "\"redis\""] {
        assert!(text.contains(b), "{text}");
    }
    drop(server);
    let _ = js.delete_stream(format!("AIWG_{n}")).await;
    let _ = ch
        .queue_delete(format!("{n}.trigger").as_str().into(), Default::default())
        .await;
    let _ = ch
        .queue_delete(
            format!("{n}.trigger.dead").as_str().into(),
            Default::default(),
        )
        .await;
}

#[test]
fn a_bad_brokers_section_names_the_key_and_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "brokers: { redis: { url: \"redis://127.0.0.1:6379\", strem: x } }\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_server"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("brokers.redis"), "{err}");
}
