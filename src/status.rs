//! What a running server says about itself at `/status` (JSON), and how `cellar status`
//! shows it to a person: version, store, public keys, cache sizes and hit ratios, upstream
//! health. The same types serialize on the server and deserialize in the command, so the two
//! cannot drift apart.
//!
//! Hit ratios count since the server started (they come from the same counters as
//! `/metrics`); for rates over a window, use Prometheus.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    /// The store, as in the start-up log line (never credentials).
    pub store: String,
    /// What `/readyz` answers now: `ready`, or why not (`store unavailable`, `store timed
    /// out`, `shutting down`). `None` from a server from before it was reported.
    #[serde(default)]
    pub store_state: Option<String>,
    /// Requests answered 5xx because of the store since the server started. `None` from a
    /// server from before it was reported.
    #[serde(default)]
    pub store_failures: Option<StoreFailures>,
    /// `name:base64` lines, for clients' `trusted-public-keys`.
    pub public_keys: Vec<String>,
    pub private: bool,
    pub narinfo_cache: CacheStatus,
    /// `max_bytes` 0 when `cache.nar_memory_bytes` is 0; `None` from a server from before it
    /// was reported.
    #[serde(default)]
    pub nar_memory_cache: Option<CacheStatus>,
    /// `None` when `cache.nar_dir` is unset.
    pub nar_cache: Option<CacheStatus>,
    pub upstreams: Vec<UpstreamStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreFailures {
    /// Requests answered 5xx because the store failed (unavailable, timed out, misconfigured,
    /// a corrupt object, another error), since the start.
    pub count: u64,
    /// How long ago the last one was, in seconds, and why (`store_unavailable`,
    /// `store_timeout`, `store_misconfigured`, `store_error`, `corrupt_object`: the `verdict`s
    /// of `/metrics`); `None` if there was none.
    pub last_secs_ago: Option<u64>,
    pub last: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CacheStatus {
    pub entries: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    pub hits: u64,
    /// Misses answered from memory (narinfo cache only).
    pub negative_hits: u64,
    pub misses: u64,
    /// Requests the cache could not serve and passed to the store (NAR cache only).
    pub bypasses: u64,
}

impl CacheStatus {
    /// Share of lookups answered by the cache, if there were any.
    pub fn hit_ratio(&self) -> Option<f64> {
        let answered = self.hits + self.negative_hits;
        let all = answered + self.misses + self.bypasses;
        (all > 0).then(|| answered as f64 / all as f64)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpstreamStatus {
    pub url: String,
    /// False while it is skipped after a failure.
    pub up: bool,
}

#[derive(Debug, Error)]
pub enum StatusError {
    #[error(
        "{url}: not an http:// or https:// URL (--url takes the server's base URL, e.g. \
         http://127.0.0.1:8080)"
    )]
    BadUrl { url: String },
    /// With its cause's chain: reqwest's own text ("error sending request") hides why.
    #[error("{url}: {}", crate::error::display_chain(cause))]
    Request { url: String, cause: reqwest::Error },
    #[error("{url}: HTTP {status}{hint}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
        hint: String,
    },
    #[error("{url}: not a cellar status answer: {cause}")]
    Decode {
        url: String,
        cause: serde_json::Error,
    },
}

/// Asks the server at `base` (e.g. `http://127.0.0.1:8080`) for its status, with `token` as
/// Bearer if given (private mode needs a read token).
pub async fn fetch(base: &str, token: Option<&str>) -> Result<Status, StatusError> {
    // `127.0.0.1:8080` does not parse; `localhost:8080` does, with `localhost` as its scheme.
    let web = reqwest::Url::parse(base).is_ok_and(|u| matches!(u.scheme(), "http" | "https"));
    if !web {
        return Err(StatusError::BadUrl { url: base.into() });
    }
    let url = format!("{}/status", base.trim_end_matches('/'));
    let err = |source| StatusError::Request {
        url: url.clone(),
        cause: source,
    };
    // Redirects are reported, not followed: reqwest drops the token on a redirect to another
    // scheme or host (http to https behind a proxy), and the 401 would then blame the user.
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(err)?;
    let mut req = client.get(&url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.map_err(err)?;
    let status = res.status();
    if !status.is_success() {
        let hint = hint(status, token.is_some(), res.headers());
        return Err(StatusError::Status { url, status, hint });
    }
    let body = res.bytes().await.map_err(err)?;
    serde_json::from_slice(&body).map_err(|source| StatusError::Decode { url, cause: source })
}

/// What to do about a failed status request, for the error message (empty if nothing helps).
fn hint(
    status: reqwest::StatusCode,
    sent_token: bool,
    headers: &reqwest::header::HeaderMap,
) -> String {
    match status.as_u16() {
        401 | 403 if sent_token => {
            " (the token was refused: is it a read token of this server?)".into()
        }
        401 | 403 => " (private mode: pass a read token with --token-file)".into(),
        404 => " (is this a cellar server, at least this version?)".into(),
        300..=399 => match headers
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
        {
            Some(to) => format!(" (redirected to {to}: pass that server's URL with --url)"),
            None => " (a redirect: pass the server's final URL with --url)".into(),
        },
        _ => String::new(),
    }
}

/// Bytes for people: `512 B`, `3.4 MiB`.
fn size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn write_cache(f: &mut fmt::Formatter<'_>, what: &str, c: &CacheStatus) -> fmt::Result {
    write!(
        f,
        "{what}: {} {}, {} of {}",
        c.entries,
        if c.entries == 1 { "entry" } else { "entries" },
        size(c.bytes),
        size(c.max_bytes)
    )?;
    match c.hit_ratio() {
        Some(r) => write!(f, "; {:.1}% hits", r * 100.0)?,
        None => write!(f, "; no lookups yet")?,
    }
    write!(f, " ({} hits", c.hits)?;
    if c.negative_hits > 0 {
        write!(f, ", {} remembered misses", c.negative_hits)?;
    }
    write!(f, ", {} misses", c.misses)?;
    if c.bypasses > 0 {
        write!(f, ", {} passed to the store", c.bypasses)?;
    }
    writeln!(f, ")")
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "cellar {}", self.version)?;
        match self.store_state.as_deref() {
            Some("ready") | None => writeln!(f, "store: {}", self.store)?,
            Some(why) => writeln!(f, "store: {} (NOT READY: {why})", self.store)?,
        }
        if let Some(StoreFailures {
            count: n @ 1..,
            last_secs_ago,
            last,
        }) = &self.store_failures
        {
            let plural = if *n == 1 { "" } else { "s" };
            write!(
                f,
                "store failures: {n} request{plural} answered 5xx since the start"
            )?;
            if let (Some(ago), Some(why)) = (last_secs_ago, last) {
                write!(f, ", the last {ago} s ago ({why})")?;
            }
            writeln!(f, "; the server's log says why")?;
        }
        if self.private {
            writeln!(f, "private: reads need a token")?;
        }
        // One line, as nix.conf takes it (a second line would replace the first).
        if !self.public_keys.is_empty() {
            writeln!(f, "trusted-public-keys = {}", self.public_keys.join(" "))?;
        }
        write_cache(f, "narinfo memory cache", &self.narinfo_cache)?;
        match &self.nar_memory_cache {
            Some(c) if c.max_bytes == 0 => writeln!(
                f,
                "small-NAR memory cache: off (cache.nar_memory_bytes or \
                 cache.nar_memory_max_object_bytes is 0)"
            )?,
            Some(c) => write_cache(f, "small-NAR memory cache", c)?,
            None => writeln!(f, "small-NAR memory cache: not reported (an older server)")?,
        }
        match &self.nar_cache {
            Some(c) => write_cache(f, "NAR disk cache", c)?,
            None => writeln!(f, "NAR disk cache: off (cache.nar_dir is unset)")?,
        }
        if self.upstreams.is_empty() {
            writeln!(f, "upstreams: none")?;
        }
        for u in &self.upstreams {
            let state = if u.up {
                "up"
            } else {
                "down (skipped after a failure)"
            };
            writeln!(f, "upstream {}: {state}", u.url)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server on 127.0.0.1 answering every request with `status` and `headers`.
    async fn answering(status: u16, headers: &'static [(&'static str, &'static str)]) -> String {
        use axum::response::IntoResponse;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new().fallback(move || async move {
            let mut res = axum::http::StatusCode::from_u16(status)
                .unwrap()
                .into_response();
            for (k, v) in headers {
                res.headers_mut().insert(*k, v.parse().unwrap());
            }
            res
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    /// What a person reads of a cache: bypasses count as lookups not answered, a cache never
    /// asked has no ratio (not 0 % or NaN), remembered misses and bypasses are named only when
    /// there were some; sizes stop at TiB.
    #[test]
    fn cache_lines_count_every_lookup_and_name_only_what_happened() {
        let disk = CacheStatus {
            entries: 1,
            bytes: 1,
            max_bytes: 1,
            hits: 1,
            negative_hits: 0,
            misses: 1,
            bypasses: 2,
        };
        assert_eq!(disk.hit_ratio(), Some(0.25));
        struct Line<'a>(&'a CacheStatus);
        impl fmt::Display for Line<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write_cache(f, "c", self.0)
            }
        }
        assert_eq!(
            Line(&disk).to_string(),
            "c: 1 entry, 1 B of 1 B; 25.0% hits (1 hits, 1 misses, 2 passed to the store)\n"
        );
        let unused = CacheStatus {
            hits: 0,
            misses: 0,
            bypasses: 0,
            ..disk.clone()
        };
        assert_eq!(unused.hit_ratio(), None);
        assert_eq!(
            Line(&unused).to_string(),
            "c: 1 entry, 1 B of 1 B; no lookups yet (0 hits, 0 misses)\n"
        );
        let remembered = CacheStatus {
            negative_hits: 1,
            ..unused
        };
        assert!(Line(&remembered)
            .to_string()
            .contains("(0 hits, 1 remembered misses, 0 misses)"));
        assert_eq!(size(1023), "1023 B");
        assert_eq!(size(1024), "1.0 KiB");
        assert_eq!(size(3 << 40), "3.0 TiB");
        assert_eq!(size(5 << 50), "5120.0 TiB");
    }

    /// A redirect is reported with where it goes, not followed (following one to another
    /// scheme or host would drop the token); a refused token is told apart from a missing one.
    #[tokio::test]
    async fn failures_say_what_to_do() {
        let moved = answering(301, &[("location", "https://cache.example/status")]).await;
        let e = fetch(&moved, Some("t")).await.unwrap_err().to_string();
        assert!(e.contains("HTTP 301"), "{e}");
        assert!(
            e.contains("redirected to https://cache.example/status: pass that server's URL"),
            "{e}"
        );
        let refused = answering(401, &[]).await;
        let e = fetch(&refused, Some("t")).await.unwrap_err().to_string();
        assert!(e.contains("the token was refused"), "{e}");
        let e = fetch(&refused, None).await.unwrap_err().to_string();
        assert!(e.contains("pass a read token with --token-file"), "{e}");
        let e = fetch(&answering(404, &[]).await, None).await.unwrap_err();
        assert!(e.to_string().contains("is this a cellar server"), "{e}");
        let e = fetch(&answering(302, &[]).await, None).await.unwrap_err();
        assert!(e.to_string().contains("pass the server's final URL"), "{e}");
        let e = fetch(&answering(500, &[]).await, None).await.unwrap_err();
        assert!(
            e.to_string().ends_with("HTTP 500 Internal Server Error"),
            "{e}"
        );
        for schemeless in ["127.0.0.1:8080", "localhost:8080", "ftp://cache.example"] {
            let e = fetch(schemeless, None).await.unwrap_err().to_string();
            assert!(e.contains("not an http:// or https:// URL"), "{e}");
        }
        // A server not running: said (the connection refused), not only "error sending".
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let gone = format!("http://{}", l.local_addr().unwrap());
        drop(l);
        let e = fetch(&gone, None).await.unwrap_err().to_string();
        assert!(e.to_lowercase().contains("connection refused"), "{e}");
    }

    #[test]
    fn ratios_and_sizes_for_people() {
        let c = CacheStatus {
            entries: 3,
            bytes: 3 << 20,
            max_bytes: 64 << 20,
            hits: 6,
            negative_hits: 2,
            misses: 2,
            bypasses: 0,
        };
        assert_eq!(c.hit_ratio(), Some(0.8));
        assert_eq!(size(512), "512 B");
        assert_eq!(size(3 << 20), "3.0 MiB");
        let s = Status {
            version: "0.1.0".into(),
            store: "local directory ./x".into(),
            store_state: Some("ready".into()),
            store_failures: Some(StoreFailures {
                count: 0,
                last_secs_ago: None,
                last: None,
            }),
            public_keys: vec!["k-1:abc=".into(), "k-2:def=".into()],
            private: false,
            narinfo_cache: c.clone(),
            nar_memory_cache: Some(CacheStatus {
                entries: 3,
                bytes: 3 << 20,
                max_bytes: 64 << 20,
                ..c
            }),
            nar_cache: None,
            upstreams: vec![UpstreamStatus {
                url: "https://up.example".into(),
                up: false,
            }],
        };
        let text = s.to_string();
        assert!(text.contains("80.0% hits"), "{text}");
        assert!(
            text.contains("small-NAR memory cache: 3 entries, 3.0 MiB of 64.0 MiB; 80.0% hits"),
            "{text}"
        );
        let off = Status {
            nar_memory_cache: Some(CacheStatus {
                max_bytes: 0,
                ..c.clone()
            }),
            ..s.clone()
        };
        assert!(off.to_string().contains("small-NAR memory cache: off"));
        let older = Status {
            nar_memory_cache: None,
            ..s.clone()
        };
        assert!(older
            .to_string()
            .contains("small-NAR memory cache: not reported"));
        // The store's readiness: said only when it is not ready.
        assert!(text.contains("store: local directory ./x\n"), "{text}");
        let failing = Status {
            store_state: Some("store unavailable".into()),
            ..s.clone()
        };
        assert!(
            failing
                .to_string()
                .contains("store: local directory ./x (NOT READY: store unavailable)\n"),
            "{failing}"
        );
        // The store's failures: said only when there were some.
        assert!(!text.contains("store failures"), "{text}");
        let failed = Status {
            store_failures: Some(StoreFailures {
                count: 3,
                last_secs_ago: Some(12),
                last: Some("store_misconfigured".into()),
            }),
            ..s.clone()
        };
        assert!(
            failed.to_string().contains(
                "store failures: 3 requests answered 5xx since the start, the last 12 s ago \
                 (store_misconfigured); the server's log says why\n"
            ),
            "{failed}"
        );
        // Both keys on one line, as nix.conf takes them.
        assert!(
            text.contains("trusted-public-keys = k-1:abc= k-2:def=\n"),
            "{text}"
        );
        assert!(text.contains("upstream https://up.example: down"));
    }
}
