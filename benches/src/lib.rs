//! Shared fixtures of the benches and load harnesses (`benches/benches/*.rs`).

/// Realistic GitHub payloads.
pub mod github {
    /// A GitHub user object as webhooks carry it.
    #[must_use]
    pub fn user(login: &str, id: u64) -> String {
        let api = format!("https://api.github.com/users/{login}");
        format!(
            r#"{{"login":"{login}","id":{id},"node_id":"MDQ6VXNlcjIxMDMxMDY3","avatar_url":"https://avatars.githubusercontent.com/u/{id}?v=4","gravatar_id":"","url":"{api}","html_url":"https://github.com/{login}","followers_url":"{api}/followers","following_url":"{api}/following{{/other_user}}","gists_url":"{api}/gists{{/gist_id}}","starred_url":"{api}/starred{{/owner}}{{/repo}}","subscriptions_url":"{api}/subscriptions","organizations_url":"{api}/orgs","repos_url":"{api}/repos","events_url":"{api}/events{{/privacy}}","received_events_url":"{api}/received_events","type":"User","site_admin":false}}"#
        )
    }

    /// An `issue_comment` shaped like GitHub's (users, issue, comment, repository with its URL
    /// templates), its issue body padded so the whole delivery is about `target` bytes.
    #[must_use]
    pub fn issue_comment(target: usize) -> Vec<u8> {
        let api = "https://api.github.com/repos/octo-org/octo-app";
        let mut urls = String::new();
        for key in [
            "forks",
            "keys",
            "collaborators",
            "teams",
            "hooks",
            "issue_events",
            "events",
            "assignees",
            "branches",
            "tags",
            "blobs",
            "git_tags",
            "git_refs",
            "trees",
            "statuses",
            "languages",
            "stargazers",
            "contributors",
            "subscribers",
            "subscription",
            "commits",
            "git_commits",
            "comments",
            "issue_comment",
            "contents",
            "compare",
            "merges",
            "archive",
            "downloads",
            "issues",
            "pulls",
            "milestones",
            "notifications",
            "labels",
            "releases",
            "deployments",
        ] {
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
}

/// The `engine` benches' two loops: jobs through an engine, and the bare round trips they are
/// compared with.
pub mod engine {
    use std::time::Duration;

    use aiwg_core::{Engine, JobRequest};

    /// Submits `n` jobs of workflow `noop` one by one, then waits for each to end.
    ///
    /// # Panics
    ///
    /// When a submit is refused or a job does not end within a minute.
    pub async fn submit_then_wait(engine: &Engine, n: usize) {
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            ids.push(
                engine
                    .submit(JobRequest::new("noop"))
                    .await
                    .expect("submit")
                    .id,
            );
        }
        for id in ids {
            engine
                .wait(id, Duration::from_secs(60))
                .await
                .expect("terminal");
        }
    }

    /// `n` bare round trips: a spawned task answers through a oneshot channel, all spawned
    /// first, then all awaited.
    ///
    /// # Panics
    ///
    /// When a task does not answer.
    pub async fn spawn_round_trips(n: usize) {
        let mut rxs = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                let _ = tx.send(i);
            });
            rxs.push(rx);
        }
        for rx in rxs {
            rx.await.expect("round trip");
        }
    }
}

/// The number in environment variable `name`, or `default` when it is unset or not a number.
#[must_use]
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The median of `v` (its upper middle for an even count).
///
/// # Panics
/// When `v` is empty.
#[must_use]
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times `ours` and `baseline` side by side: `rounds` rounds (alternating which goes first)
/// of `calls` calls of each, and answers the baseline's median time a call over ours (higher
/// is better; 1.0: as fast as the baseline), for a bench's `ratio` line.
pub fn ratio_of_medians(
    rounds: usize,
    calls: usize,
    mut ours: impl FnMut(),
    mut baseline: impl FnMut(),
) -> f64 {
    let time = |f: &mut dyn FnMut()| {
        let start = std::time::Instant::now();
        for _ in 0..calls {
            f();
        }
        start.elapsed().as_secs_f64()
    };
    let (mut o, mut b) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
    for round in 0..rounds.max(1) {
        if round % 2 == 0 {
            o.push(time(&mut ours));
            b.push(time(&mut baseline));
        } else {
            b.push(time(&mut baseline));
            o.push(time(&mut ours));
        }
    }
    median(b) / median(o)
}

/// A schema of its own in the benches' PostgreSQL database, for a bench's stores.
pub mod pg {
    use std::str::FromStr;
    use std::time::Duration;

    use aiwg_core::store::PgStore;
    use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

    /// A fresh schema of `AIWG_TEST_DATABASE_URL`'s database (default
    /// `postgres://postgres@127.0.0.1:5432/test`), and the admin pool that made it.
    pub struct BenchSchema {
        /// A pool outside the schema (it made the schema and drops it).
        pub admin: PgPool,
        url: String,
        /// The schema's name.
        pub name: String,
    }

    impl BenchSchema {
        /// Connects and creates the schema (named after `bench`, the process and the time).
        ///
        /// # Errors
        /// Why there is no database to run on: the URL is not valid, or nothing answers.
        pub async fn create(bench: &str) -> Result<Self, String> {
            let url = std::env::var("AIWG_TEST_DATABASE_URL")
                .ok()
                .filter(|u| !u.trim().is_empty())
                .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned());
            let options = PgConnectOptions::from_str(&url)
                .map_err(|_| "AIWG_TEST_DATABASE_URL is not a valid URL".to_owned())?;
            let admin = PgPoolOptions::new()
                .max_connections(2)
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(options)
                .await
                .map_err(|e| format!("no PostgreSQL: {e}"))?;
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            let name = format!("aiwg_bench_{bench}_{}_{nanos}", std::process::id());
            sqlx::query(&format!("CREATE SCHEMA {name}"))
                .execute(&admin)
                .await
                .map_err(|e| format!("creating the schema: {e}"))?;
            Ok(Self { admin, url, name })
        }

        /// A pool of `max` connections in the schema: the pool the store's own `connect`
        /// builds (`PgStore::pool_options`).
        ///
        /// # Panics
        /// If the database refuses the connections.
        pub async fn pool(&self, max: u32) -> PgPool {
            let options = PgConnectOptions::from_str(&self.url)
                .expect("url")
                .options([("search_path", self.name.as_str())]);
            PgStore::pool_options()
                .max_connections(max)
                .connect_with(options)
                .await
                .expect("connect")
        }

        /// Drops the schema and everything in it.
        ///
        /// # Panics
        /// If the database refuses.
        pub async fn drop_schema(&self) {
            sqlx::query(&format!("DROP SCHEMA {} CASCADE", self.name))
                .execute(&self.admin)
                .await
                .expect("drop schema");
        }
    }
}

/// What the broker benches share: a count of what arrived, broker names of their own.
pub mod brokers {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio::sync::Notify;

    /// The longest a round may take before a bench gives up on it.
    pub const ROUND_LIMIT: Duration = Duration::from_secs(120);

    /// Messages (or jobs) counted as they arrive, and a wake-up when a target is reached.
    #[derive(Debug, Default)]
    pub struct Arrivals {
        count: AtomicUsize,
        target: AtomicUsize,
        reached: Notify,
    }

    impl Arrivals {
        /// Counts `n` more.
        pub fn add(&self, n: usize) {
            let now = self.count.fetch_add(n, Ordering::AcqRel) + n;
            if now >= self.target.load(Ordering::Acquire) {
                self.reached.notify_one();
            }
        }

        /// How many so far.
        pub fn count(&self) -> usize {
            self.count.load(Ordering::Acquire)
        }

        /// Waits until `n` more than `from` have arrived.
        ///
        /// # Panics
        /// When they have not within [`ROUND_LIMIT`].
        pub async fn wait_for(&self, from: usize, n: usize) {
            self.target.store(from + n, Ordering::Release);
            tokio::time::timeout(ROUND_LIMIT, async {
                while self.count() < from + n {
                    self.reached.notified().await;
                }
            })
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {n} arrived within {ROUND_LIMIT:?}",
                    self.count() - from
                )
            });
        }
    }

    /// Whether something listens on 127.0.0.1:`port`.
    #[must_use]
    pub fn reachable(port: u16) -> bool {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    }

    /// A name no other run uses (`bench<pid>x<time>`): for streams, queues and subjects.
    #[must_use]
    pub fn unique() -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("bench{}x{}", std::process::id(), nanos % 1_000_000_000)
    }
}
