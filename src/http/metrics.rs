//! `/metrics` and the middleware that counts every request for it: requests by route family,
//! method and status class, time to the response headers, body bytes both ways, and the verdict
//! of every upload. What the layers below count themselves (caches, S3, upstreams) is recorded
//! where it happens, see [`crate::metrics`].

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body::Frame;
use prometheus_client::metrics::counter::Counter;

use super::AppState;
use crate::error::ErrorLabel;
use crate::metrics::{self, HttpLabels, RouteLabels, RouteMethodLabels, UploadLabels};

/// `GET /metrics`: OpenMetrics to a scraper that asks for it (Prometheus does), else the
/// Prometheus text format 0.0.4, which every other reader of metrics takes
/// (`promtool check metrics`, curl, older agents).
pub(super) async fn get(State(st): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let usage = st.cache_usage().await;
    let mut layers = vec![
        ("narinfo_memory", usage.narinfo_memory),
        ("nar_memory", usage.nar_memory),
    ];
    layers.extend(usage.nar_disk.map(|u| ("nar_disk", u)));
    let now = metrics::Now {
        layers,
        upload_memory_entries: st.upload_memory_entries() as u64,
    };
    let (content_type, body) = if openmetrics {
        (metrics::CONTENT_TYPE, metrics::render(&now))
    } else {
        (metrics::CLASSIC_CONTENT_TYPE, metrics::render_classic(&now))
    };
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        body,
    )
        .into_response()
}

/// The endpoint family of `path`, a bounded label. Only the shape of the path counts: whether
/// the name is valid is the handler's business (a bad name is a 4xx of its family). The upload
/// address serves the cache's files under `/upload/`: its requests count in their file's
/// family (a `PUT /upload/nar/…` is a `nar` upload), the `method` label telling probes from
/// reads of the cache apart only as far as Nix's requests do.
pub(super) fn route_family(path: &str) -> &'static str {
    let rest = path.trim_start_matches('/');
    match rest.strip_prefix("upload/") {
        Some(file) => match family(file) {
            f @ ("nar" | "log" | "debuginfo" | "realisation" | "build_trace" | "cache_info"
            | "narinfo" | "listing") => f,
            _ => "other",
        },
        None => family(rest),
    }
}

/// The family of a path of the cache's address, without its leading `/`.
fn family(rest: &str) -> &'static str {
    let (first, tail) = rest.split_once('/').unwrap_or((rest, ""));
    match first {
        "nar" if !tail.is_empty() => "nar",
        "log" if !tail.is_empty() => "log",
        "debuginfo" if !tail.is_empty() => "debuginfo",
        "realisations" if !tail.is_empty() => "realisation",
        "build-trace" | "build-trace-v2" if !tail.is_empty() => "build_trace",
        "nix-cache-info" if tail.is_empty() => "cache_info",
        "healthz" | "readyz" if tail.is_empty() => "health",
        "metrics" if tail.is_empty() => "metrics",
        "status" if tail.is_empty() => "status",
        f if tail.is_empty() && f.ends_with(".narinfo") => "narinfo",
        f if tail.is_empty() && f.ends_with(".ls") => "listing",
        _ => "other",
    }
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        _ => "other",
    }
}

fn status_class(s: StatusCode) -> &'static str {
    match s.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Counts the request and its body on the way in, its status and latency once the handler
/// answers, and the response body as it is streamed. A request whose client went away before
/// the answer (its handler dropped) is counted too, as `aborted`: the slowest requests (a
/// lookup on a slow upstream, an upload waiting for a slot) are the ones clients give up on,
/// and leaving them out would make the latencies look better than they are.
pub(super) async fn observe(req: Request, next: Next) -> Response {
    let m = metrics::get();
    let route = route_family(req.uri().path());
    let method = method_label(req.method());
    let (parts, body) = req.into_parts();
    let received = m.bytes_received.get_or_create_owned(&RouteLabels { route });
    let req = Request::from_parts(parts, Body::new(Counted::new(body, received)));
    let mut pending = Pending {
        started: Instant::now(),
        route,
        method,
        answered: false,
    };

    let res = next.run(req).await;

    pending.answered = true;
    let status = res.status();
    let verdict = pending
        .is_upload()
        .then(|| match res.extensions().get::<ErrorLabel>() {
            Some(ErrorLabel(label)) => *label,
            None if status.is_success() => "accepted",
            None => "other",
        });
    pending.count(status_class(status), verdict);
    let sent = m.bytes_sent.get_or_create_owned(&RouteLabels { route });
    res.map(|body| Body::new(Counted::new(body, sent)))
}

/// A request being worked on, counted when answered or, if dropped first, as aborted.
struct Pending {
    started: Instant,
    route: &'static str,
    /// Its label ([`method_label`]).
    method: &'static str,
    answered: bool,
}

impl Pending {
    /// A PUT: counted with a verdict too.
    fn is_upload(&self) -> bool {
        self.method == "PUT"
    }

    /// Counts the request with its status class, its latency, and an upload's verdict.
    fn count(&self, status: &'static str, verdict: Option<&'static str>) {
        let m = metrics::get();
        let route = self.route;
        m.http_requests
            .get_or_create(&HttpLabels {
                route,
                method: self.method,
                status,
            })
            .inc();
        m.http_duration
            .get_or_create(&RouteMethodLabels {
                route,
                method: self.method,
            })
            .observe(self.started.elapsed().as_secs_f64());
        if let Some(verdict) = verdict {
            m.uploads
                .get_or_create(&UploadLabels {
                    kind: route,
                    verdict,
                })
                .inc();
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.answered {
            let verdict = self.is_upload().then_some("aborted");
            self.count("aborted", verdict);
        }
    }
}

/// A body that adds the length of each data frame to a counter as it passes.
struct Counted {
    inner: Body,
    counter: Counter,
}

impl Counted {
    fn new(inner: Body, counter: Counter) -> Self {
        Self { inner, counter }
    }
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.counter.inc_by(data.len() as u64);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    // Keeps Content-Length: a counted body is exactly as long as the one it wraps.
    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::{method_label, route_family, status_class};
    use axum::http::{Method, StatusCode};

    #[test]
    fn route_families_are_bounded() {
        let h = "0123456789abcdfghijklmnpqrsvwxyz";
        assert_eq!(route_family(&format!("/{h}.narinfo")), "narinfo");
        assert_eq!(route_family(&format!("/{h}.ls")), "listing");
        assert_eq!(route_family("/nar/abc.nar.xz"), "nar");
        assert_eq!(route_family("/log/abc-foo.drv"), "log");
        assert_eq!(route_family("/debuginfo/abc.debug"), "debuginfo");
        assert_eq!(route_family("/upload/debuginfo/abc.debug"), "debuginfo");
        assert_eq!(
            route_family("/realisations/sha256:x!out.doi"),
            "realisation"
        );
        assert_eq!(route_family("/build-trace/x.drv/out"), "build_trace");
        assert_eq!(route_family("/build-trace-v2/x.drv/out.doi"), "build_trace");
        assert_eq!(route_family("/nix-cache-info"), "cache_info");
        assert_eq!(route_family("/healthz"), "health");
        assert_eq!(route_family("/metrics"), "metrics");
        assert_eq!(route_family("/favicon.ico"), "other");
        assert_eq!(route_family("/nar/"), "other");
        assert_eq!(route_family("/"), "other");
        // Each family has its shape: a name where one is expected, nothing after a fixed path.
        for shapeless in [
            "/nar",
            "/log",
            "/debuginfo",
            "/realisations",
            "/build-trace",
            "/build-trace-v2",
            "/nix-cache-info/x",
            "/healthz/x",
            "/readyz/x",
            "/metrics/x",
            "/status/x",
            "/y.narinfo/x",
            "/y.ls/x",
        ] {
            assert_eq!(route_family(shapeless), "other", "{shapeless}");
        }
        assert_eq!(route_family("/readyz"), "health");
        assert_eq!(route_family("/status"), "status");
    }

    /// What Nix sends to the upload address counts in the family of the file it names; the
    /// server's own endpoints are not served there.
    #[test]
    fn the_upload_address_counts_in_its_files_families() {
        let h = "0123456789abcdfghijklmnpqrsvwxyz";
        assert_eq!(route_family(&format!("/upload/{h}.narinfo")), "narinfo");
        assert_eq!(route_family(&format!("/upload/{h}.ls")), "listing");
        assert_eq!(route_family("/upload/nar/abc.nar.zst"), "nar");
        assert_eq!(route_family("/upload/log/abc-foo.drv"), "log");
        assert_eq!(
            route_family("/upload/realisations/sha256:x!out.doi"),
            "realisation"
        );
        assert_eq!(route_family("/upload/nix-cache-info"), "cache_info");
        for elsewhere in [
            "/upload",
            "/upload/",
            "/upload/metrics",
            "/upload/healthz",
            "/upload/upload/nar/x",
        ] {
            assert_eq!(route_family(elsewhere), "other", "{elsewhere}");
        }
    }

    #[test]
    fn methods_and_statuses_are_bounded() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::HEAD), "HEAD");
        assert_eq!(method_label(&Method::PUT), "PUT");
        assert_eq!(method_label(&Method::DELETE), "other");
        let class = |n: u16| status_class(StatusCode::from_u16(n).unwrap());
        assert_eq!(
            [100, 199, 200, 299, 300, 399, 400, 499, 500, 599].map(class),
            ["1xx", "1xx", "2xx", "2xx", "3xx", "3xx", "4xx", "4xx", "5xx", "5xx"]
        );
    }
}
