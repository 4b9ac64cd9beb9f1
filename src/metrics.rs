//! The server's Prometheus metrics: one registry for the process, rendered by `/metrics` in
//! the OpenMetrics text format (which Prometheus scrapes as it is).
//!
//! The registry is a process-wide static, as with the `metrics` facade or Prometheus' default
//! registry: the code that sees an event (the narinfo memory cache, the NAR disk cache, one S3
//! call, one upstream request) records it where it happens, without a handle threaded through
//! every constructor. A process serves one cache, so one registry is all there is to scrape.
//!
//! Every label value is bounded: route families, status classes, cache layers, S3 operation
//! names, upstream URLs from the config, fixed verdicts. Never a hash, a path or a token name.
//!
//! What each series means is listed in `docs/operations.md`.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// The endpoint family (`narinfo`, `nar`, `listing`, …), see [`crate::http`].
    pub route: &'static str,
    pub method: &'static str,
    /// `2xx`, `3xx`, `4xx` or `5xx`; `aborted` if the client went away before the answer.
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

/// A latency's labels: uploads (`PUT`) are timed apart from lookups, which they would
/// otherwise drown (a NAR's upload takes its whole body, a lookup from memory microseconds).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteMethodLabels {
    pub route: &'static str,
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    /// `narinfo_memory`, `nar_memory` or `nar_disk`.
    pub layer: &'static str,
    /// `hit`, `negative_hit` (a remembered miss), `miss` or `bypass` (the layer could not serve
    /// the request, e.g. a range of a NAR not on disk).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LayerLabels {
    /// `narinfo_memory`, `nar_memory` or `nar_disk`.
    pub layer: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PrefetchLabels {
    /// `narinfo` or `nar`.
    pub kind: &'static str,
    /// `loaded`, `absent` (nobody has the narinfo), `failed` or `dropped` (too many queued).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    /// The S3 operation (`GetObject`, `HeadObject`, `PutObject`, …).
    pub op: &'static str,
    /// `ok`, `not_found`, `bad_range`, `timeout` or `error`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UploadLabels {
    /// The route family of the PUT (`nar`, `narinfo`, `log`, …).
    pub kind: &'static str,
    /// `accepted`, or why not: see [`crate::error::Error::label`].
    pub verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NarCheckLabels {
    /// How a NAR this process did not receive was checked for a narinfo: `record` (its digest
    /// record and a HEAD) or `read_back` (read whole and hashed).
    pub how: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamRefusedLabels {
    /// The upstream's configured URL (bounded by the config).
    pub upstream: String,
    /// `narinfo` or `realisation`.
    pub kind: &'static str,
    /// Why: `unsigned` (no valid signature by its `public_keys`), `invalid`, `bad_url`,
    /// `too_large`, `encoded` or `other_output`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// The upstream's configured URL (bounded by the config).
    pub upstream: String,
    /// `ok`, `not_found` (a 404, 403 or another 4xx not below), `timeout` (no answer in time,
    /// or a 408), `unauthorized` (401), `throttled` (429), `error` (connection, TLS) or
    /// `server_error` (5xx). An upstream backed off after a failure is not asked, and not
    /// counted.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AccessRecordLabels {
    /// `use` (the narinfos served, written every `gc.access_flush_secs`) or `upload` (what an
    /// upload relies on).
    pub kind: &'static str,
    /// `written` or `failed`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
    /// `s3` or `local`.
    pub store: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_duration: HistogramFamily<RouteMethodLabels>,
    pub bytes_sent: Family<RouteLabels, Counter>,
    pub bytes_received: Family<RouteLabels, Counter>,
    pub cache: Family<CacheLabels, Counter>,
    pub cache_evictions: Family<LayerLabels, Counter>,
    pub prefetches: Family<PrefetchLabels, Counter>,
    pub store_requests: Family<StoreLabels, Counter>,
    pub store_duration: HistogramFamily<OpLabels>,
    pub uploads: Family<UploadLabels, Counter>,
    pub upstream_requests: Family<UpstreamLabels, Counter>,
    pub upstream_refused: Family<UpstreamRefusedLabels, Counter>,
    pub access_records: Family<AccessRecordLabels, Counter>,
    pub upload_nar_checks: Family<NarCheckLabels, Counter>,
    pub access_entries_dropped: Counter,
    pub build_info: Family<BuildLabels, Gauge>,
    pub uploads_waiting: Gauge,
    pub uploads_running: Gauge,
    pub prefetches_pending: Gauge,
    pub store_clock_offset: Gauge,
}

/// 1 ms to ~35 min in powers of two: a hot narinfo takes well under a millisecond; an
/// upload is timed with its whole body, and an 8 MiB part to a slow store may take minutes
/// (a top bucket of seconds would put them all in `+Inf`, and quantiles would cap there).
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 22))
}

impl Metrics {
    fn new() -> Self {
        let mut r = Registry::with_prefix("cellar");
        let m = Self {
            http_requests: Family::default(),
            http_duration: Family::new_with_constructor(latency_histogram),
            bytes_sent: Family::default(),
            bytes_received: Family::default(),
            cache: Family::default(),
            cache_evictions: Family::default(),
            prefetches: Family::default(),
            store_requests: Family::default(),
            store_duration: Family::new_with_constructor(latency_histogram),
            uploads: Family::default(),
            upstream_requests: Family::default(),
            upstream_refused: Family::default(),
            access_records: Family::default(),
            upload_nar_checks: Family::default(),
            access_entries_dropped: Counter::default(),
            build_info: Family::default(),
            uploads_waiting: Gauge::default(),
            uploads_running: Gauge::default(),
            prefetches_pending: Gauge::default(),
            store_clock_offset: Gauge::default(),
            registry: Registry::default(),
        };
        r.register(
            "http_requests",
            "HTTP requests answered, by route family, method and status class",
            m.http_requests.clone(),
        );
        r.register(
            "http_request_duration_seconds",
            "Time to the response headers, by route family and method",
            m.http_duration.clone(),
        );
        r.register(
            "http_response_bytes",
            "Response body bytes sent, by route family",
            m.bytes_sent.clone(),
        );
        r.register(
            "http_request_bytes",
            "Request body bytes received (uploads), by route family",
            m.bytes_received.clone(),
        );
        r.register(
            "cache_lookups",
            "Lookups in the narinfo memory cache and the NAR memory and disk caches, by result",
            m.cache.clone(),
        );
        r.register(
            "cache_evictions",
            "Entries the narinfo memory cache and the NAR memory and disk caches let go to stay within their budgets, by layer",
            m.cache_evictions.clone(),
        );
        r.register(
            "prefetches",
            "Narinfos and small NARs fetched ahead of the client, by kind and result",
            m.prefetches.clone(),
        );
        r.register(
            "store_requests",
            "Requests to the S3 store, by operation and result",
            m.store_requests.clone(),
        );
        r.register(
            "store_request_duration_seconds",
            "Time to an S3 response, by operation",
            m.store_duration.clone(),
        );
        r.register(
            "uploads",
            "Upload requests (PUT), by kind and verdict",
            m.uploads.clone(),
        );
        r.register(
            "upstream_requests",
            "Requests to upstream caches, by upstream and result",
            m.upstream_requests.clone(),
        );
        r.register(
            "upstream_refused",
            "Narinfos and realisations an upstream answered (counted ok in upstream_requests) that cellar refused, by upstream, kind and reason",
            m.upstream_refused.clone(),
        );
        r.register(
            "access_records",
            "Access records written to the store for `cellar gc`, by kind and result",
            m.access_records.clone(),
        );
        r.register(
            "upload_nar_checks",
            "NARs another process received checked for an uploaded narinfo, by how: their digest record, or read back whole",
            m.upload_nar_checks.clone(),
        );
        r.register(
            "access_entries_dropped",
            "Uses (narinfos and NARs served) not recorded for `cellar gc` because the set of gc.access_max_entries was full and not yet written",
            m.access_entries_dropped.clone(),
        );
        r.register(
            "uploads_running",
            "Uploads holding a slot: NARs received (upload.max_concurrent), and as many in each pool of their own: other uploads (listings, logs, realisations, debug info links), NARs read back for narinfos",
            m.uploads_running.clone(),
        );
        r.register(
            "uploads_waiting",
            "Uploads waiting for a slot (of the NARs' upload.max_concurrent, or of a pool as large)",
            m.uploads_waiting.clone(),
        );
        r.register(
            "prefetches_pending",
            "Prefetches waiting for a slot or running: what a client will ask next, being fetched ahead",
            m.prefetches_pending.clone(),
        );
        r.register(
            "store_clock_offset_seconds",
            "How far the S3 store's clock is ahead of this machine's (negative: behind), by the Date of its answers; cellar goes by the store's",
            m.store_clock_offset.clone(),
        );
        r.register(
            "build_info",
            "Always 1; the labels say which cellar this is",
            m.build_info.clone(),
        );
        // Both ways of checking a NAR are shown from the start, at 0: a series that appears
        // only once counted leaves `rate()` nothing to compare against.
        for how in ["record", "read_back"] {
            let _ = m.upload_nar_checks.get_or_create(&NarCheckLabels { how });
        }
        for layer in LAYERS {
            let _ = m.cache_evictions.get_or_create(&LayerLabels { layer });
        }
        Self { registry: r, ..m }
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

/// Records the build info series (once the store kind is known).
pub fn set_build_info(store: &'static str) {
    get()
        .build_info
        .get_or_create(&BuildLabels {
            version: env!("CARGO_PKG_VERSION"),
            store,
        })
        .set(1);
}

/// The cache layers, as labelled.
const LAYERS: [&str; 3] = ["narinfo_memory", "nar_memory", "nar_disk"];

/// Whether an entry a moka cache of `budget` bytes removed for `cause` was let go for room:
/// one heavier than the whole budget (`weight`) was never held (moka reports it as removed
/// for its size at once), and one replaced, invalidated or expired was not let go for room.
pub fn evicted_for_room(cause: moka::notification::RemovalCause, weight: u64, budget: u64) -> bool {
    cause == moka::notification::RemovalCause::Size && weight <= budget
}

/// Counts `n` entries a cache layer let go for room.
pub fn cache_evicted(layer: &'static str, n: u64) {
    get()
        .cache_evictions
        .get_or_create(&LayerLabels { layer })
        .inc_by(n);
}

/// Entries `layer` let go for room since the start.
pub fn cache_evictions(layer: &'static str) -> u64 {
    get()
        .cache_evictions
        .get(&LayerLabels { layer })
        .map_or(0, |c| c.get())
}

/// Counts one lookup in a cache layer.
pub fn cache_lookup(layer: &'static str, result: &'static str) {
    get()
        .cache
        .get_or_create(&CacheLabels { layer, result })
        .inc();
}

/// Counts one prefetch.
pub fn prefetch(kind: &'static str, result: &'static str) {
    get()
        .prefetches
        .get_or_create(&PrefetchLabels { kind, result })
        .inc();
}

/// Counts one S3 call and its latency.
pub fn store_request(op: &'static str, result: &'static str, took: Duration) {
    let m = get();
    m.store_requests
        .get_or_create(&StoreLabels { op, result })
        .inc();
    m.store_duration
        .get_or_create(&OpLabels { op })
        .observe(took.as_secs_f64());
}

/// Counts one request to an upstream cache.
pub fn upstream_request(upstream: &str, result: &'static str) {
    get()
        .upstream_requests
        .get_or_create(&UpstreamLabels {
            upstream: upstream.to_owned(),
            result,
        })
        .inc();
}

/// Counts one narinfo or realisation (`kind`) from `upstream` refused for `reason`.
pub fn upstream_refused(upstream: &str, kind: &'static str, reason: &'static str) {
    get()
        .upstream_refused
        .get_or_create(&UpstreamRefusedLabels {
            upstream: upstream.to_owned(),
            kind,
            reason,
        })
        .inc();
}

/// Objects from `upstream` of `kind` refused for `reason` since the start.
pub fn upstream_refusals(upstream: &str, kind: &'static str, reason: &'static str) -> u64 {
    get()
        .upstream_refused
        .get(&UpstreamRefusedLabels {
            upstream: upstream.to_owned(),
            kind,
            reason,
        })
        .map_or(0, |c| c.get())
}

/// Requests to `upstream` with `result` since the start.
pub fn upstream_requests(upstream: &str, result: &'static str) -> u64 {
    get()
        .upstream_requests
        .get(&UpstreamLabels {
            upstream: upstream.to_owned(),
            result,
        })
        .map_or(0, |c| c.get())
}

/// Counts one access record written (or not) to the store.
pub fn access_record(kind: &'static str, written: bool) {
    get()
        .access_records
        .get_or_create(&AccessRecordLabels {
            kind,
            result: if written { "written" } else { "failed" },
        })
        .inc();
}

/// Counts one NAR this process did not receive checked for a narinfo, `how`: `record` or
/// `read_back`.
pub fn upload_nar_check(how: &'static str) {
    get()
        .upload_nar_checks
        .get_or_create(&NarCheckLabels { how })
        .inc();
}

/// The current value of a cache counter (for `/status`'s hit ratios).
pub fn cache_count(layer: &'static str, result: &'static str) -> u64 {
    get()
        .cache
        .get(&CacheLabels { layer, result })
        .map_or(0, |c| c.get())
}

/// The content type of [`render_classic`]: the Prometheus text format 0.0.4.
pub const CLASSIC_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The registry in the Prometheus text format 0.0.4, for scrapers that do not ask for
/// OpenMetrics (`promtool check metrics`, older agents): the same samples, with a counter's
/// `# HELP` and `# TYPE` under its samples' name (`…_total`, where OpenMetrics names the family
/// without it), and no `# UNIT` or `# EOF`.
pub fn render_classic(now: &Now) -> String {
    to_classic(&render(now))
}

fn to_classic(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let header = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match header {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// What one cache layer holds now, and its budget (0: off).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayerUsage {
    pub entries: u64,
    pub bytes: u64,
    pub max_bytes: u64,
}

/// What a scrape shows of the server's state as it is then (gauges read from the caches
/// themselves, not kept up to date in the process-wide registry).
#[derive(Debug, Default)]
pub struct Now {
    /// Each cache layer there is, by its label.
    pub layers: Vec<(&'static str, LayerUsage)>,
    /// Entries a server remembers of recent uploads and probes.
    pub upload_memory_entries: u64,
}

impl Now {
    fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("cellar");
        let entries = Family::<LayerLabels, Gauge>::default();
        let bytes = Family::<LayerLabels, Gauge>::default();
        let max_bytes = Family::<LayerLabels, Gauge>::default();
        for &(layer, u) in &self.layers {
            let l = LayerLabels { layer };
            let set = |f: &Family<LayerLabels, Gauge>, v: u64| {
                f.get_or_create(&l)
                    .set(i64::try_from(v).unwrap_or(i64::MAX));
            };
            set(&entries, u.entries);
            set(&bytes, u.bytes);
            set(&max_bytes, u.max_bytes);
        }
        r.register(
            "cache_entries",
            "Entries the narinfo memory cache and the NAR memory and disk caches hold, by layer",
            entries,
        );
        r.register(
            "cache_bytes",
            "Bytes the narinfo memory cache and the NAR memory and disk caches hold, by layer (as each counts them against its budget)",
            bytes,
        );
        r.register(
            "cache_max_bytes",
            "Each cache layer's budget in bytes (cache.narinfo_memory_bytes, cache.nar_memory_bytes, cache.nar_max_bytes; 0: off)",
            max_bytes,
        );
        let uploads = Gauge::<i64>::default();
        uploads.set(i64::try_from(self.upload_memory_entries).unwrap_or(i64::MAX));
        r.register(
            "upload_memory_entries",
            "Entries the server remembers of recent uploads and probes (bounded, let go once no upload relies on them)",
            uploads,
        );
        r
    }
}

/// The whole registry and `now` in the OpenMetrics text format.
pub fn render(now: &Now) -> String {
    use prometheus_client::encoding::text::{encode_eof, encode_registry};
    let mut out = String::new();
    // Writing into a String cannot fail; an encoder error would be a bug in a label type, and
    // a partial page is still better than none for the scrape that meets it.
    let encoded = encode_registry(&mut out, &get().registry)
        .and_then(|()| encode_registry(&mut out, &now.registry()))
        .and_then(|()| encode_eof(&mut out));
    if let Err(e) = encoded {
        tracing::error!(cause = %e, "encoding the metrics failed");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_openmetrics_with_the_prefix() {
        cache_lookup("narinfo_memory", "hit");
        set_build_info("local");
        let text = render(&Now::default());
        assert!(
            text.contains("# TYPE cellar_cache_lookups counter"),
            "{text}"
        );
        assert!(text.contains(r#"cellar_cache_lookups_total{layer="narinfo_memory",result="hit"}"#));
        assert!(text.contains(r#"cellar_build_info{version=""#));
        // Shown before anything counts them.
        for how in ["record", "read_back"] {
            let series = format!("cellar_upload_nar_checks_total{{how=\"{how}\"}}");
            assert!(text.contains(&series), "{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    /// Only an entry the cache held and let go for room counts as evicted.
    #[test]
    fn evictions_are_entries_let_go_for_room() {
        use moka::notification::RemovalCause;
        assert!(evicted_for_room(RemovalCause::Size, 100, 1000));
        assert!(evicted_for_room(RemovalCause::Size, 1000, 1000));
        assert!(
            !evicted_for_room(RemovalCause::Size, 1001, 1000),
            "never held"
        );
        assert!(!evicted_for_room(RemovalCause::Size, 100, 0), "a cache off");
        for cause in [
            RemovalCause::Expired,
            RemovalCause::Explicit,
            RemovalCause::Replaced,
        ] {
            assert!(!evicted_for_room(cause, 100, 1000), "{cause:?}");
        }
    }

    /// A NAR upload of ten minutes lands in a bucket of its own, not only in `+Inf`.
    #[test]
    fn latencies_of_minutes_have_buckets() {
        let h = latency_histogram();
        h.observe(600.0);
        let mut r = Registry::default();
        r.register("t_seconds", "t", h);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        let counts: Vec<(f64, u64)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("t_seconds_bucket{le=\""))
            .filter_map(|l| {
                let (le, count) = l.split_once("\"} ")?;
                Some((le.parse().ok()?, count.parse().ok()?))
            })
            .collect();
        let first = counts.iter().find(|(_, n)| *n == 1);
        assert!(
            first.is_some_and(|(le, _)| le.is_finite() && *le < 1200.0),
            "{text}"
        );
    }

    #[test]
    fn the_classic_format_names_a_counter_family_by_its_samples() {
        let om = "# HELP cellar_x Xs seen.\n# TYPE cellar_x counter\n\
                  cellar_x_total{a=\"b\"} 1\n\
                  # HELP cellar_y_seconds Time.\n# TYPE cellar_y_seconds histogram\n# UNIT cellar_y_seconds seconds\n\
                  cellar_y_seconds_sum 0.5\ncellar_y_seconds_count 1\n\
                  # HELP cellar_z Zs.\n# TYPE cellar_z gauge\ncellar_z 3\n# EOF\n";
        assert_eq!(
            to_classic(om),
            "# HELP cellar_x_total Xs seen.\n# TYPE cellar_x_total counter\n\
             cellar_x_total{a=\"b\"} 1\n\
             # HELP cellar_y_seconds Time.\n# TYPE cellar_y_seconds histogram\n\
             cellar_y_seconds_sum 0.5\ncellar_y_seconds_count 1\n\
             # HELP cellar_z Zs.\n# TYPE cellar_z gauge\ncellar_z 3\n"
        );
    }
}
