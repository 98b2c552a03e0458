//! One request to a forge, with its rate limits honoured and transient failures retried.

use std::time::Duration;

use super::client::ForgeError;
use crate::event::Platform;

/// How many times a request is tried.
pub(crate) const ATTEMPTS: u32 = 5;
/// The longest wait for a rate limit to lift before giving up (the job's reply is then
/// abandoned with a logged reason, never the job).
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(120);

/// Backoff before attempt `n + 1` after a transient failure (1 s, 2 s, 4 s, 8 s).
pub(crate) fn backoff(n: u32, base: Duration) -> Duration {
    base.saturating_mul(1 << n.min(6))
}

/// How long the answer asks us to wait, when it is a rate limit.
fn rate_limit_wait(res: &reqwest::Response, now_unix: i64) -> Option<Duration> {
    let status = res.status().as_u16();
    let h = res.headers();
    let header = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
    if let Some(secs) = header("retry-after").and_then(|v| v.trim().parse::<u64>().ok()) {
        if status == 429 || status == 403 || status == 503 {
            return Some(Duration::from_secs(secs));
        }
    }
    let exhausted = header("x-ratelimit-remaining").is_some_and(|v| v.trim() == "0")
        || header("ratelimit-remaining").is_some_and(|v| v.trim() == "0");
    if (status == 429 || status == 403) && exhausted {
        let reset = header("x-ratelimit-reset")
            .or_else(|| header("ratelimit-reset"))
            .and_then(|v| v.trim().parse::<i64>().ok());
        return Some(match reset {
            // Unix seconds (GitHub, Gitea) or seconds to wait (small values: GitLab's RateLimit-Reset is absolute too).
            Some(r) if r > 1_000_000_000 => {
                Duration::from_secs(u64::try_from((r - now_unix).max(1)).unwrap_or(1))
            }
            Some(r) => Duration::from_secs(u64::try_from(r.max(1)).unwrap_or(1)),
            None => Duration::from_secs(60),
        });
    }
    if status == 429 {
        return Some(Duration::from_secs(60));
    }
    None
}

/// Sends the request `make` builds (again for each attempt) and returns the successful answer.
///
/// # Errors
/// [`ForgeError`] once the forge refused for good (4xx other than a rate limit), a rate limit
/// asks for longer than [`MAX_WAIT`], or `attempts` transient failures.
pub(crate) async fn send(
    platform: Platform,
    what: &'static str,
    base_delay: Duration,
    attempts: u32,
    mut make: impl FnMut() -> reqwest::RequestBuilder,
) -> Result<reqwest::Response, ForgeError> {
    let mut last = ForgeError::Unreachable { platform, what };
    for n in 0..attempts {
        let last_try = n + 1 == attempts;
        match make().send().await {
            Ok(res) if res.status().is_success() => return Ok(res),
            Ok(res) => {
                let status = res.status().as_u16();
                let now = chrono::Utc::now().timestamp();
                if let Some(wait) = rate_limit_wait(&res, now) {
                    if wait > MAX_WAIT {
                        return Err(ForgeError::RateLimited {
                            platform,
                            what,
                            wait,
                        });
                    }
                    tracing::info!(%platform, what, wait_s = wait.as_secs(), "rate limited by the forge; waiting");
                    tokio::time::sleep(wait).await;
                    last = ForgeError::RateLimited {
                        platform,
                        what,
                        wait,
                    };
                    continue;
                }
                if status >= 500 {
                    last = ForgeError::Status {
                        platform,
                        what,
                        status,
                    };
                    tokio::time::sleep(backoff(n, base_delay)).await;
                    continue;
                }
                return Err(ForgeError::Status {
                    platform,
                    what,
                    status,
                });
            }
            Err(e) => {
                tracing::debug!(%platform, what, error = %e.without_url(), "forge request failed");
                last = ForgeError::Unreachable { platform, what };
                if !last_try {
                    tokio::time::sleep(backoff(n, base_delay)).await;
                }
            }
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles() {
        let b = Duration::from_secs(1);
        assert_eq!(backoff(0, b), Duration::from_secs(1));
        assert_eq!(backoff(3, b), Duration::from_secs(8));
    }
}
