//! Verify + parse of a typical ~8 KB GitHub `issue_comment` delivery, beside a bare
//! HMAC-SHA256 of the same bytes (the floor: verification cannot cost less than one HMAC).
//!
//! `cargo bench -p aiwg-benches --bench webhook_verify`

// `criterion_group!` generates an undocumented public function.
#![allow(missing_docs)]

use std::hint::black_box;

use aiwg_webhook::platform::{self, github};
use aiwg_webhook::Secret;
use axum::http::HeaderMap;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const SECRET: &str = "bench-webhook-secret";

/// The `*_url` templates of a GitHub repository object.
const URL_KEYS: &str = "forks keys collaborators teams hooks issue_events events assignees branches tags blobs git_tags \
    git_refs trees statuses languages stargazers contributors subscribers subscription commits git_commits comments issue_comment \
    contents compare merges archive downloads issues pulls milestones notifications labels releases deployments";

fn user(login: &str, id: u64) -> String {
    let api = format!("https://api.github.com/users/{login}");
    format!(
        r#"{{"login":"{login}","id":{id},"node_id":"MDQ6VXNlcjIxMDMxMDY3","avatar_url":"https://avatars.githubusercontent.com/u/{id}?v=4","gravatar_id":"","url":"{api}","html_url":"https://github.com/{login}","followers_url":"{api}/followers","following_url":"{api}/following{{/other_user}}","gists_url":"{api}/gists{{/gist_id}}","starred_url":"{api}/starred{{/owner}}{{/repo}}","subscriptions_url":"{api}/subscriptions","organizations_url":"{api}/orgs","repos_url":"{api}/repos","events_url":"{api}/events{{/privacy}}","received_events_url":"{api}/received_events","type":"User","site_admin":false}}"#
    )
}

/// An `issue_comment` shaped like GitHub's (users, issue, comment, repository with its URL
/// templates), its issue body padded so the whole delivery is about `target` bytes.
fn issue_comment(target: usize) -> Vec<u8> {
    let api = "https://api.github.com/repos/octo-org/octo-app";
    let mut urls = String::new();
    for key in URL_KEYS.split_whitespace() {
        urls.push_str(&format!(r#","{key}_url":"{api}/{key}{{/id}}""#));
    }
    let owner = user("octo-org", 1);
    let alice = user("alice", 21_031_067);
    let bob = user("bob", 21_031_068);
    let build = |issue_body: &str| {
        format!(
            r#"{{"action":"created","issue":{{"url":"{api}/issues/7","repository_url":"{api}","labels_url":"{api}/issues/7/labels{{/name}}","comments_url":"{api}/issues/7/comments","events_url":"{api}/issues/7/events","html_url":"https://github.com/octo-org/octo-app/pull/7","id":444500041,"node_id":"MDU6SXNzdWU0NDQ1MDAwNDE=","number":7,"title":"Speed up the parser","user":{alice},"labels":[{{"id":1362934389,"name":"enhancement","color":"a2eeef","default":true}}],"state":"open","locked":false,"assignee":null,"assignees":[],"milestone":null,"comments":3,"created_at":"2019-05-15T15:20:18Z","updated_at":"2019-05-15T15:20:21Z","closed_at":null,"author_association":"MEMBER","pull_request":{{"url":"{api}/pulls/7","html_url":"https://github.com/octo-org/octo-app/pull/7","diff_url":"https://github.com/octo-org/octo-app/pull/7.diff","patch_url":"https://github.com/octo-org/octo-app/pull/7.patch"}},"body":"{issue_body}"}},"comment":{{"url":"{api}/issues/comments/492700400","html_url":"https://github.com/octo-org/octo-app/pull/7#issuecomment-492700400","issue_url":"{api}/issues/7","id":492700400,"node_id":"MDEyOklzc3VlQ29tbWVudDQ5MjcwMDQwMA==","user":{bob},"created_at":"2019-05-15T15:20:21Z","updated_at":"2019-05-15T15:20:21Z","author_association":"MEMBER","body":"Thanks! @aiwg review --depth 2 --focus \"error paths\" please check the parser and the new tests"}},"repository":{{"id":186853002,"node_id":"MDEwOlJlcG9zaXRvcnkxODY4NTMwMDI=","name":"octo-app","full_name":"octo-org/octo-app","private":false,"owner":{owner},"html_url":"https://github.com/octo-org/octo-app","description":null,"fork":false,"url":"{api}","created_at":"2019-05-15T15:19:25Z","updated_at":"2019-05-15T15:21:03Z","pushed_at":"2019-05-15T15:20:57Z","git_url":"git://github.com/octo-org/octo-app.git","ssh_url":"git@github.com:octo-org/octo-app.git","clone_url":"https://github.com/octo-org/octo-app.git","svn_url":"https://github.com/octo-org/octo-app","homepage":null,"size":0,"stargazers_count":0,"watchers_count":0,"language":"Rust","has_issues":true,"has_projects":true,"has_downloads":true,"has_wiki":true,"has_pages":true,"forks_count":0,"archived":false,"disabled":false,"open_issues_count":2,"license":null,"forks":0,"open_issues":2,"watchers":0,"default_branch":"main"{urls}}},"sender":{bob}}}"#
        )
    };
    let base = build("").len();
    let filler = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. ".repeat(200);
    let pad = target.saturating_sub(base).min(filler.len());
    build(&filler[..pad]).into_bytes()
}

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
}

criterion_group!(benches, bench);
criterion_main!(benches);
