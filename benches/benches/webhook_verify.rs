//! Verify + parse of a typical ~8 KB GitHub `issue_comment` delivery, beside a bare
//! HMAC-SHA256 of the same bytes (the floor: verification cannot cost less than one HMAC).
//!
//! `cargo bench -p aiwg-benches --bench webhook_verify` (`-- summary_only` skips the criterion
//! groups). The last lines, from 11 alternated rounds of 2 000 calls each: `ratio
//! github_verify_vs_hmac` (the bare HMAC's time over the verification's) and `ratio
//! github_verify_parse_grammar_vs_hmac` (the same for verification, the typed parse and the
//! comment's grammar: what the GitHub path does before its submit).

// `criterion_group!` generates an undocumented public function.
#![allow(missing_docs)]

use std::hint::black_box;

use aiwg_benches::github::issue_comment;
use aiwg_webhook::platform::{self, github};
use aiwg_webhook::Secret;
use axum::http::HeaderMap;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const SECRET: &str = "bench-webhook-secret";

fn bench(c: &mut Criterion) {
    let body = issue_comment(8 * 1024);
    let mut headers = HeaderMap::new();
    headers.insert("x-github-event", "issue_comment".parse().expect("header"));
    headers.insert(
        "x-github-delivery",
        "72d3162e-cc78-11e3-81ab-4c9367dc0958"
            .parse()
            .expect("header"),
    );
    headers.insert("content-type", "application/json".parse().expect("header"));
    headers.insert(
        "x-hub-signature-256",
        github::sign(SECRET, &body).parse().expect("header"),
    );
    let secret = Secret::new(SECRET);
    // Sanity: the delivery verifies and parses into the command we expect.
    github::verify(&secret, &headers, &body).expect("verifies");
    let ev = github::parse(&headers, &body).expect("parses");
    assert_eq!(ev.pull_request.map(|p| p.number), Some(7));

    let mut group = c.benchmark_group("webhook_verify");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function(format!("bare_hmac_sha256_{}B", body.len()), |b| {
        b.iter(|| platform::hmac_sha256_bytes(black_box(SECRET.as_bytes()), black_box(&body)));
    });
    group.bench_function(format!("github_verify_{}B", body.len()), |b| {
        b.iter(|| github::verify(black_box(&secret), black_box(&headers), black_box(&body)));
    });
    group.bench_function(format!("github_verify_and_parse_{}B", body.len()), |b| {
        b.iter(|| {
            github::verify(&secret, black_box(&headers), black_box(&body)).expect("verifies");
            github::parse(black_box(&headers), black_box(&body)).expect("parses")
        });
    });
    group.bench_function(
        format!("github_verify_parse_grammar_{}B", body.len()),
        |b| {
            b.iter(|| {
                github::verify(&secret, black_box(&headers), black_box(&body)).expect("verifies");
                let ev = github::parse(black_box(&headers), black_box(&body)).expect("parses");
                aiwg_webhook::grammar::parse_comment(ev.text.as_deref().unwrap_or(""), "@aiwg")
                    .expect("grammar")
            });
        },
    );
    group.finish();

    let hmac = || {
        black_box(platform::hmac_sha256_bytes(
            black_box(SECRET.as_bytes()),
            black_box(&body),
        ));
    };
    let verify = || {
        github::verify(black_box(&secret), black_box(&headers), black_box(&body))
            .expect("verifies");
    };
    let whole = || {
        github::verify(&secret, black_box(&headers), black_box(&body)).expect("verifies");
        let ev = github::parse(black_box(&headers), black_box(&body)).expect("parses");
        black_box(
            aiwg_webhook::grammar::parse_comment(ev.text.as_deref().unwrap_or(""), "@aiwg")
                .expect("grammar"),
        );
    };
    let v = aiwg_benches::ratio_of_medians(11, 2_000, verify, hmac);
    let w = aiwg_benches::ratio_of_medians(11, 2_000, whole, hmac);
    println!("ratio github_verify_vs_hmac {v:.3}");
    println!("ratio github_verify_parse_grammar_vs_hmac {w:.3}");
}

criterion_group!(benches, bench);
criterion_main!(benches);
