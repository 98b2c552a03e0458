//! A closed-loop HTTP/1.1 load generator that runs in its own process, so the server under
//! load and the client never share a runtime (issue 15, part 6). `scripts/http_load.sh` drives
//! it against the release example server and a bare server answering the same bytes.
//!
//! ```text
//! load --name http_trigger_axum_vs_bare \
//!      --ours http://127.0.0.1:3200/workflows/trigger --bare http://127.0.0.1:3201/workflows/trigger \
//!      --header 'authorization: Bearer …' --header 'content-type: application/json' \
//!      --body '{"workflow":"noop"}' --expect 202 --requests 20000 --connections 32
//! ```
//!
//! Each of `--connections` keep-alive connections sends one request, reads the whole answer,
//! then sends the next, until `--requests` have been answered. `--unique-header NAME` adds
//! `NAME: <run>-<i>` to request `i` (a GitHub delivery id, so de-duplication does not answer
//! early). `--github-secret S` replaces the body by a GitHub `issue_comment` of about
//! `--github-size` bytes (default 8 800) whose comment id is new for every request (GitHub
//! de-duplicates on it), signed with `S` in `x-hub-signature-256`, exactly as GitHub sends it.
//! With `--bare`, the two targets run alternately `--rounds` times after a warm-up;
//! the output ends with `ratio <name> <ours req/s ÷ bare req/s>`. Every answer's status must
//! be `--expect`, or the run stops with an error.

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Clone)]
struct Target {
    addr: String,
    /// The request line and fixed headers, without the final blank line.
    head: Arc<Vec<u8>>,
    body: Arc<Vec<u8>>,
    unique: Option<String>,
    github: Option<Arc<GitHubBodies>>,
}

/// Per-request GitHub deliveries: the body around the comment id, and the signing secret.
struct GitHubBodies {
    before: Vec<u8>,
    after: Vec<u8>,
    secret: String,
}

/// The comment's id in [`aiwg_benches::github::issue_comment`] (its URLs also carry the number;
/// the `id` field is what GitHub de-duplication keys on).
const COMMENT_ID: &[u8] = b"\"id\":492700400";

struct Options {
    name: String,
    ours: Target,
    bare: Option<Target>,
    requests: usize,
    connections: usize,
    rounds: usize,
    expect: u16,
}

struct Run {
    elapsed: Duration,
    latencies: Vec<Duration>,
}

fn usage() -> String {
    "usage: load --ours URL [--bare URL] [--name NAME] [--method M] [--header 'k: v']... \
     [--body TEXT | --body-file PATH] [--unique-header NAME] [--requests N] [--connections C] \
     [--rounds R] [--expect STATUS]"
        .to_owned()
}

fn parse_url(url: &str) -> Result<(String, String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("`{url}`: only http:// URLs"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    Ok((addr, authority.to_owned(), path.to_owned()))
}

fn parse() -> Result<Options, String> {
    let mut args = std::env::args().skip(1);
    let (mut ours, mut bare, mut name) = (None, None, "http".to_owned());
    let (mut method, mut headers, mut body) = ("POST".to_owned(), Vec::new(), Vec::new());
    let mut unique = None;
    let (mut github_secret, mut github_size) = (None, 8_800usize);
    let (mut requests, mut connections, mut rounds, mut expect) = (10_000, 32, 3, 200u16);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--ours" => ours = Some(value()?),
            "--bare" => bare = Some(value()?),
            "--name" => name = value()?,
            "--method" => method = value()?,
            "--header" => headers.push(value()?),
            "--body" => body = value()?.into_bytes(),
            "--body-file" => {
                let path = value()?;
                body = std::fs::read(&path).map_err(|e| format!("{path}: {e}"))?;
            }
            "--unique-header" => unique = Some(value()?),
            "--github-secret" => github_secret = Some(value()?),
            "--github-size" => {
                github_size = value()?
                    .parse()
                    .map_err(|e| format!("--github-size: {e}"))?;
            }
            "--requests" => requests = value()?.parse().map_err(|e| format!("--requests: {e}"))?,
            "--connections" => {
                connections = value()?
                    .parse()
                    .map_err(|e| format!("--connections: {e}"))?;
            }
            "--rounds" => rounds = value()?.parse().map_err(|e| format!("--rounds: {e}"))?,
            "--expect" => expect = value()?.parse().map_err(|e| format!("--expect: {e}"))?,
            "--help" | "-h" => return Err(usage()),
            other => return Err(format!("unknown argument `{other}`\n{}", usage())),
        }
    }
    if connections == 0 || requests == 0 || rounds == 0 {
        return Err("--requests, --connections and --rounds must be at least 1".to_owned());
    }
    let github = match github_secret {
        None => None,
        Some(secret) => {
            body = aiwg_benches::github::issue_comment(github_size);
            let at = body
                .windows(COMMENT_ID.len())
                .position(|w| w == COMMENT_ID)
                .ok_or("the GitHub fixture has no comment id")?;
            Some(Arc::new(GitHubBodies {
                before: body[..at + b"\"id\":".len()].to_vec(),
                after: body[at + COMMENT_ID.len()..].to_vec(),
                secret,
            }))
        }
    };
    let body = Arc::new(body);
    let target = |url: &str| -> Result<Target, String> {
        let (addr, host, path) = parse_url(url)?;
        let mut head = format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\n");
        for h in &headers {
            head.push_str(h);
            head.push_str("\r\n");
        }
        Ok(Target {
            addr,
            head: Arc::new(head.into_bytes()),
            body: Arc::clone(&body),
            unique: unique.clone(),
            github: github.clone(),
        })
    };
    let ours = target(&ours.ok_or_else(usage)?)?;
    let bare = bare.as_deref().map(target).transpose()?;
    Ok(Options {
        name,
        ours,
        bare,
        requests,
        connections,
        rounds,
        expect,
    })
}

/// Reads one answer; returns its status.
async fn read_answer(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<u16, String> {
    buf.clear();
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed before an answer".to_owned());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| "answer head is not UTF-8")?;
    let status: u16 = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let mut length = None;
    let mut chunked = false;
    for line in head.split("\r\n").skip(1) {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        if k.eq_ignore_ascii_case("content-length") {
            length = v.trim().parse::<usize>().ok();
        } else if k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked") {
            chunked = true;
        }
    }
    if chunked {
        // Enough for the small answers measured here: read until the last chunk.
        while !buf[head_end..].ends_with(b"0\r\n\r\n") {
            let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed inside a chunked answer".to_owned());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    } else {
        let want = head_end + length.unwrap_or(0);
        while buf.len() < want {
            let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed inside an answer".to_owned());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }
    Ok(status)
}

/// Sends `n` requests; `salt` makes delivery ids unique, `base` comment ids (`base` followed by
/// seven digits of the request's number).
async fn run(
    target: &Target,
    opts: &Options,
    n: usize,
    salt: &str,
    base: u64,
) -> Result<Run, String> {
    if n > 9_999_999 {
        return Err("at most 9 999 999 requests per run".to_owned());
    }
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..opts.connections.min(n) {
        let (target, next, salt, expect) = (
            target.clone(),
            Arc::clone(&next),
            salt.to_owned(),
            opts.expect,
        );
        tasks.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(&target.addr)
                .await
                .map_err(|e| format!("connect {}: {e}", target.addr))?;
            stream.set_nodelay(true).map_err(|e| e.to_string())?;
            let (mut out, mut answer, mut lat) = (Vec::new(), Vec::new(), Vec::new());
            let mut body = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, String>(lat);
                }
                out.clear();
                out.extend_from_slice(&target.head);
                if let Some(h) = &target.unique {
                    out.extend_from_slice(format!("{h}: {salt}-{i}\r\n").as_bytes());
                }
                let body: &[u8] = match &target.github {
                    None => &target.body,
                    Some(g) => {
                        body.clear();
                        body.extend_from_slice(&g.before);
                        body.extend_from_slice(format!("{base}{i:07}").as_bytes());
                        body.extend_from_slice(&g.after);
                        let signature = aiwg_webhook::platform::github::sign(&g.secret, &body);
                        out.extend_from_slice(
                            format!("x-hub-signature-256: {signature}\r\n").as_bytes(),
                        );
                        &body
                    }
                };
                out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
                out.extend_from_slice(body);
                let t = Instant::now();
                stream.write_all(&out).await.map_err(|e| e.to_string())?;
                let status = read_answer(&mut stream, &mut answer).await?;
                lat.push(t.elapsed());
                if status != expect {
                    let text = String::from_utf8_lossy(&answer);
                    return Err(format!(
                        "request {i}: status {status}, expected {expect}: {text}"
                    ));
                }
            }
        }));
    }
    let mut latencies = Vec::with_capacity(n);
    for t in tasks {
        latencies.extend(t.await.map_err(|e| e.to_string())??);
    }
    Ok(Run {
        elapsed: start.elapsed(),
        latencies,
    })
}

struct Summary {
    rps: f64,
    p50: Duration,
    p99: Duration,
}

fn summarise(runs: &[Run]) -> Summary {
    let mut all: Vec<Duration> = runs.iter().flat_map(|r| r.latencies.clone()).collect();
    all.sort();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    let total: Duration = runs.iter().map(|r| r.elapsed).sum();
    Summary {
        rps: all.len() as f64 / total.as_secs_f64(),
        p50: pct(0.50),
        p99: pct(0.99),
    }
}

fn line(label: &str, s: &Summary) -> String {
    format!(
        "{label:<5} {:>9.0} req/s  p50 {:>8.3} ms  p99 {:>8.3} ms",
        s.rps,
        s.p50.as_secs_f64() * 1e3,
        s.p99.as_secs_f64() * 1e3
    )
}

async fn measure(opts: Options) -> Result<(), String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let salt = format!("{}-{now}", std::process::id());
    // Comment ids never seen by a server that outlives one run: time-based, and one block of
    // ten million per run.
    let mut base = u64::try_from(now % 1_000_000_000).unwrap_or(0) * 100;
    let mut next_base = || {
        base += 1;
        base
    };
    let warm = (opts.requests / 10).clamp(100, 2_000);
    let mut targets = vec![("ours", &opts.ours)];
    if let Some(b) = &opts.bare {
        targets.push(("bare", b));
    }
    println!(
        "{}: {} requests × {} rounds per target, {} connections, {} byte bodies",
        opts.name,
        opts.requests,
        opts.rounds,
        opts.connections,
        opts.ours.body.len()
    );
    for (label, t) in &targets {
        run(t, &opts, warm, &format!("{salt}-warm-{label}"), next_base()).await?;
    }
    let mut results: Vec<Vec<Run>> = targets.iter().map(|_| Vec::new()).collect();
    for round in 0..opts.rounds {
        for (k, (label, t)) in targets.iter().enumerate() {
            let salt = format!("{salt}-{round}-{label}");
            let r = run(t, &opts, opts.requests, &salt, next_base()).await?;
            results[k].push(r);
        }
    }
    let sums: Vec<Summary> = results.iter().map(|r| summarise(r)).collect();
    for ((label, _), s) in targets.iter().zip(&sums) {
        println!("{}", line(label, s));
    }
    if let [ours, bare] = sums.as_slice() {
        println!(
            "ratio {}_p50 {:.3}",
            opts.name,
            bare.p50.as_secs_f64() / ours.p50.as_secs_f64()
        );
        println!("ratio {} {:.3}", opts.name, ours.rps / bare.rps);
    }
    Ok(())
}

fn main() -> ExitCode {
    let opts = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    // One thread: the client takes one core at most, whatever the server does.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("load: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(measure(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("load: {e}");
            ExitCode::FAILURE
        }
    }
}
