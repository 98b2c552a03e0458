//! The baseline of the out-of-process HTTP load runs (`scripts/http_load.sh`): a server that
//! does nothing but read the request body and answer the bytes the aiwg example server answers
//! on the same paths, on the same framework, runtime shape and allocator.
//!
//! ```text
//! bare_server axum  127.0.0.1:3201
//! bare_server actix 127.0.0.1:3202
//! ```
//!
//! Paths: `POST /hooks/github` → `202` and a GitHub-shaped answer, `POST /workflows/trigger` →
//! `202` and a trigger answer (same shape and length as aiwg's). Stops on SIGINT/SIGTERM.
//!
//! The reads, on axum only: `GET /workflows/{job_id}/status` and `GET /jobs` answer `200` with
//! the bytes of the files named by `AIWG_BARE_STATUS` and `AIWG_BARE_JOBS` (`scripts/http_load.sh`
//! saves aiwg's own answers there; a route whose file is not named is not served), with the
//! headers aiwg sends beside them (`cache-control: no-store`, an `x-request-id`). With
//! `AIWG_BARE_DATABASE_URL`, each read first reads the rows aiwg's PostgreSQL store reads for it
//! (the job's row by id; the newest 51 rows), every column that holds the job as text: the
//! ceiling for a read of a job kept in PostgreSQL.

use std::process::ExitCode;

/// The allocator the example servers use (their default `jemalloc` feature), so the two sides
/// differ only in what they do with a request.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// What `POST /workflows/trigger` answers (the shape and size of aiwg's answer).
const TRIGGER_ANSWER: &str = r#"{"job_id":"01a2011d-0a50-72f9-9aee-afd3b7f83d39","status":"queued","estimated_duration":null,"status_url":"/workflows/01a2011d-0a50-72f9-9aee-afd3b7f83d39/status","events_url":"/workflows/01a2011d-0a50-72f9-9aee-afd3b7f83d39/events"}"#;
/// What `POST /hooks/github` answers (the shape and size of aiwg's answer).
const GITHUB_ANSWER: &str = r#"{"job_id":"01a2011d-0a50-72f9-9aee-afd3b7f83d39","status":"queued","status_url":"/workflows/01a2011d-0a50-72f9-9aee-afd3b7f83d39/status"}"#;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(kind), Some(addr)) = (args.first(), args.get(1)) else {
        eprintln!("usage: bare_server axum|actix ADDR");
        return ExitCode::from(2);
    };
    let result = match kind.as_str() {
        "axum" => axum_server(addr),
        "actix" => actix_server(addr),
        other => Err(format!("unknown server kind `{other}` (axum, actix)")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bare_server: {e}");
            ExitCode::from(2)
        }
    }
}

/// The bytes a read answers: the file named by `var`, if it is set.
fn answer(var: &str) -> Result<Option<axum::body::Bytes>, String> {
    std::env::var_os(var)
        .map(|path| {
            std::fs::read(&path)
                .map(axum::body::Bytes::from)
                .map_err(|e| format!("{var}: cannot read {}: {e}", path.to_string_lossy()))
        })
        .transpose()
}

/// The headers aiwg answers a keyed read with (`x-request-id` a fixed id of the same length).
const READ_HEADERS: [(&str, &str); 3] = [
    ("content-type", "application/json"),
    ("cache-control", "no-store"),
    ("x-request-id", "01a25369-2b9f-752b-a5b7-b4961b80f1f6"),
];

/// The columns of `aiwg_jobs` (migration 0030) that hold a job: its document and its state.
macro_rules! job_columns {
    () => {
        "j.job::text, j.status, j.retry_at::text, j.cancel_requested::text, j.attempt::text, \
         j.started_at::text, j.finished_at::text, j.dead_letter::text, \
         j.resume_after_approval::text, j.progress::text, j.history::text, j.approvals::text, \
         j.result::text, j.error::text"
    };
}

/// A row of `job_columns!()`.
type JobRow = (
    String,
    String,
    Option<String>,
    String,
    String,
    Option<String>,
    Option<String>,
    String,
    String,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
);

/// The reads of a job kept in PostgreSQL: the rows aiwg's store reads, as they are kept.
#[derive(Clone)]
struct Rows(sqlx::PgPool);

impl Rows {
    async fn connect() -> Result<Option<Self>, String> {
        let url = std::env::var("AIWG_BARE_DATABASE_URL").unwrap_or_default();
        if url.is_empty() {
            return Ok(None);
        }
        // The pool aiwg's store makes: ten connections, checked only after an idle second.
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(10)
            .test_before_acquire(false)
            .connect(&url)
            .await
            .map_err(|e| format!("AIWG_BARE_DATABASE_URL: {e}"))?;
        Ok(Some(Self(pool)))
    }

    /// The job's row; `false` when there is none.
    async fn one(&self, id: &str) -> bool {
        let Ok(id) = id.parse::<sqlx::types::Uuid>() else {
            return false;
        };
        let row: Option<JobRow> = sqlx::query_as(concat!(
            "SELECT ",
            job_columns!(),
            " FROM aiwg_jobs j WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.0)
        .await
        .unwrap_or(None);
        row.is_some()
    }

    /// The newest 51 rows (a page of 50 and the one that says there is more).
    async fn page(&self) {
        let _rows: Vec<JobRow> = sqlx::query_as(concat!(
            "SELECT ",
            job_columns!(),
            " FROM aiwg_jobs j WHERE TRUE ORDER BY id DESC LIMIT $1"
        ))
        .bind(51_i64)
        .fetch_all(&self.0)
        .await
        .unwrap_or_default();
    }
}

fn axum_server(addr: &str) -> Result<(), String> {
    use axum::extract::Path;
    use axum::http::StatusCode;
    use axum::routing::{get, post};
    let json = [("content-type", "application/json")];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let rows = rt.block_on(Rows::connect())?;
    let mut app = axum::Router::new();
    if let Some(status) = answer("AIWG_BARE_STATUS")? {
        let rows = rows.clone();
        app = app.route(
            "/workflows/{job_id}/status",
            get(move |Path(id): Path<String>| {
                let (status, rows) = (status.clone(), rows.clone());
                async move {
                    if let Some(rows) = rows {
                        if !rows.one(&id).await {
                            return (
                                StatusCode::NOT_FOUND,
                                READ_HEADERS,
                                axum::body::Bytes::new(),
                            );
                        }
                    }
                    (StatusCode::OK, READ_HEADERS, status)
                }
            }),
        );
    }
    if let Some(jobs) = answer("AIWG_BARE_JOBS")? {
        app = app.route(
            "/jobs",
            get(move || {
                let (jobs, rows) = (jobs.clone(), rows.clone());
                async move {
                    if let Some(rows) = rows {
                        rows.page().await;
                    }
                    (StatusCode::OK, READ_HEADERS, jobs)
                }
            }),
        );
    }
    let app = app
        .route(
            "/hooks/github",
            post(move |_body: axum::body::Bytes| async move {
                (StatusCode::ACCEPTED, json, GITHUB_ANSWER)
            }),
        )
        .route(
            "/workflows/trigger",
            post(move |_body: axum::body::Bytes| async move {
                (StatusCode::ACCEPTED, json, TRIGGER_ANSWER)
            }),
        );
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        println!("bare axum server on {addr}");
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .map_err(|e| e.to_string())
    })
}

fn actix_server(addr: &str) -> Result<(), String> {
    use actix_web::{web, App, HttpResponse, HttpServer};
    let sys = actix_web::rt::System::new();
    sys.block_on(async move {
        let server = HttpServer::new(|| {
            App::new()
                .route(
                    "/hooks/github",
                    web::post().to(|_body: web::Bytes| async {
                        HttpResponse::Accepted()
                            .content_type("application/json")
                            .body(GITHUB_ANSWER)
                    }),
                )
                .route(
                    "/workflows/trigger",
                    web::post().to(|_body: web::Bytes| async {
                        HttpResponse::Accepted()
                            .content_type("application/json")
                            .body(TRIGGER_ANSWER)
                    }),
                )
        })
        .bind(addr)
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        println!("bare actix-web server on {addr}");
        server.run().await.map_err(|e| e.to_string())
    })
}
