//! Stream-json parsing throughput: `aiwg_agents::stream_json::parse_line` (lines to agent
//! events) beside `serde_json::from_str::<serde_json::Value>` over the same lines (the baseline:
//! merely parsing each line into a generic JSON tree, without producing events).
//!
//! The input is a multi-megabyte stream generated from a real capture of
//! `claude -p … --output-format stream-json --verbose` (aiwg-agents/tests/fixtures):
//! the capture's init line once, then its assistant / tool-use / tool-result / text lines
//! repeated with fresh ids and larger tool outputs, and a result line per turn.
//!
//! Run: `cargo bench -p aiwg-benches --bench stream_json` (`-- summary_only` skips the
//! criterion group). The last line, from 5 alternated rounds over the whole stream: `ratio
//! stream_json_vs_serde_value` (the generic parse's time over ours).

#![allow(missing_docs)] // criterion_group! generates an undocumented function

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const CAPTURE: &str = include_str!("../../aiwg-agents/tests/fixtures/claude-tool-use.jsonl");

/// About `target` bytes of stream, one JSON object per line.
fn recorded_stream(target: usize) -> Vec<String> {
    let lines: Vec<&str> = CAPTURE.lines().collect();
    let (init, body) = lines.split_first().expect("capture has lines");
    let mut out = vec![(*init).to_owned()];
    let mut size = init.len();
    let mut turn = 0u64;
    // A tool output like a file listing or a test log.
    let tool_output: String = (0..40)
        .map(|i| format!("src/module_{i}/file_{i}.rs: ok, 12{i} lines checked\\n"))
        .collect();
    while size < target {
        turn += 1;
        for l in body {
            let mut l = l
                .replace("toolu_01", &format!("toolu_{turn:08}"))
                .replace("msg_1", &format!("msg_{turn:08}"));
            if l.contains("\"tool_result\"") {
                l = l.replace(
                    "File created successfully",
                    &format!("{tool_output}File created successfully"),
                );
            }
            size += l.len() + 1;
            out.push(l);
        }
    }
    out
}

fn bench(c: &mut Criterion) {
    let lines = recorded_stream(8 << 20);
    let bytes: usize = lines.iter().map(|l| l.len() + 1).sum();
    eprintln!(
        "stream: {} lines, {:.1} MiB",
        lines.len(),
        bytes as f64 / (1 << 20) as f64
    );
    let mut g = c.benchmark_group("stream_json");
    g.throughput(Throughput::Bytes(bytes as u64));
    g.sample_size(20);
    g.bench_function("aiwg_parse_line_to_events", |b| {
        b.iter(|| {
            let mut n = 0usize;
            for l in &lines {
                n += aiwg_agents::stream_json::parse_line(black_box(l))
                    .events
                    .len();
            }
            n
        });
    });
    g.bench_function("baseline_serde_json_value", |b| {
        b.iter(|| {
            let mut n = 0usize;
            for l in &lines {
                let v: serde_json::Value = serde_json::from_str(black_box(l)).expect("json");
                n += usize::from(v.is_object());
            }
            n
        });
    });
    g.finish();

    let r = aiwg_benches::ratio_of_medians(
        5,
        1,
        || {
            for l in &lines {
                black_box(aiwg_agents::stream_json::parse_line(black_box(l)));
            }
        },
        || {
            for l in &lines {
                let v: serde_json::Value = serde_json::from_str(black_box(l)).expect("json");
                black_box(v);
            }
        },
    );
    println!("ratio stream_json_vs_serde_value {r:.3}");
}

criterion_group!(benches, bench);
criterion_main!(benches);
