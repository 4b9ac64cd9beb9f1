//! Upstream binary caches (pull-through). On a narinfo miss in the store, upstreams are asked in
//! the configured order before the server answers 404 (a 404 sticks in clients for an hour). An
//! upstream narinfo is accepted only if it carries a valid signature by one of that upstream's
//! keys; it is then served signed by this server, and its NAR (and log, listing) streamed from
//! the upstream through `/nar/…`, asked of the upstream whose narinfo named it. A slow or dead
//! upstream is a miss after its timeout, and after [`FAILURES_IN_A_ROW`] such failures it is
//! skipped for a while, so an outage does not turn every request into a wait.

use std::fmt;
use std::io;
use std::time::Duration;

use async_trait::async_trait;
use futures::{StreamExt as _, TryStreamExt as _};

use crate::backoff::{Attempt, Backoff};
use crate::config::UpstreamConfig;
use crate::nix::{
    Compression, NarFileName, NarInfo, NarInfoError, NarUrlError, PublicKey, StorePathBaseName,
    StorePathHash, MAX_NARINFO_BYTES,
};
use crate::store::{ByteRange, ContentRange, Object, ObjectWriter, Store, StoreError};

/// After [`FAILURES_IN_A_ROW`] failures, how long an upstream is skipped.
const BACKOFF: Duration = Duration::from_secs(30);

/// Failures with no answer between them that make an upstream skipped. One slow answer (a part
/// of a large NAR, one of many prefetches) is not an outage: skipping the upstream makes every
/// path only it holds a miss.
pub const FAILURES_IN_A_ROW: u32 = 3;

/// How many NAR names are remembered with the upstream whose narinfo named them.
const ROUTES: u64 = 200_000;

struct Upstream {
    /// Where requests go: may hold credentials (`https://user:token@host`, how a private
    /// cellar is used as an upstream).
    base: String,
    /// `base` without its credentials: what logs, metrics and `/status` show.
    name: String,
    keys: Vec<PublicKey>,
    timeout: Duration,
    mirror: bool,
    /// `base`, parsed, if it holds credentials: a 403 from its origin is their refusal (a
    /// private cellar answers a token that matches none so), not a missing object. One from
    /// elsewhere (a bucket a presigned redirect led to) is not.
    credentialed: Option<reqwest::Url>,
    /// Active while the upstream is skipped after a failure.
    down: Backoff,
    /// When a request it could not answer was last logged at warn (see [`WARN_EVERY`]).
    warned: std::sync::Mutex<Option<tokio::time::Instant>>,
}

/// A request an upstream could not answer is logged at warn at most this often (the others
/// at debug): a burst of them at the start of an outage is one line.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Why an upstream could not answer: it is then skipped for a while.
enum Failure {
    /// No answer within the upstream's timeout.
    Timeout,
    /// The request failed (connection refused, DNS, TLS, a connection cut).
    Request(reqwest::Error),
    /// An error status: a 5xx, a 429, a 408, or a refusal of the credentials (401, 403).
    Status(reqwest::StatusCode),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout => f.write_str("timeout"),
            // With its causes: reqwest's own words alone ("error sending request for url")
            // do not say what went wrong (refused, reset, no address, TLS).
            Self::Request(e) => f.write_str(&crate::error::display_chain(e)),
            Self::Status(s) => write!(f, "HTTP {s}"),
        }
    }
}

/// Why a narinfo from an upstream is not accepted (the upstream itself is fine).
enum Refusal {
    /// Larger than the cap given to [`read_capped`].
    TooLarge(usize),
    /// The body could not be read to its end.
    Body(reqwest::Error),
    /// Not a narinfo, or not the one asked for.
    Invalid(NarInfoError),
    Unsigned,
    /// Its `URL` is not `nar/<file>`, so its NAR could not be served through `/nar/…`.
    BadUrl(NarUrlError),
    /// Sent compressed in a way cellar does not decode, or not decodable as it says.
    Encoded(String),
    /// Not a realisation.
    NotARealisation(crate::nix::RealisationError),
    /// A realisation of another output than the one asked for (its `id`).
    OtherOutput(Option<String>),
}

impl Refusal {
    /// A short, bounded name for it, for the metrics.
    fn label(&self) -> &'static str {
        match self {
            Self::TooLarge(_) => "too_large",
            Self::Body(_) => "body",
            Self::Invalid(_) | Self::NotARealisation(_) => "invalid",
            Self::Unsigned => "unsigned",
            Self::BadUrl(_) => "bad_url",
            Self::Encoded(_) => "encoded",
            Self::OtherOutput(_) => "other_output",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge(cap) => write!(f, "too large (over {cap} bytes)"),
            Self::Body(e) => write!(f, "reading the body: {e}"),
            Self::Invalid(e) => fmt::Display::fmt(e, f),
            Self::Unsigned => f.write_str("no valid signature by the upstream's keys"),
            Self::BadUrl(e) => fmt::Display::fmt(e, f),
            Self::Encoded(why) => f.write_str(why),
            Self::NotARealisation(e) => write!(f, "not a realisation: {e}"),
            Self::OtherOutput(id) => write!(f, "the realisation of another output ({id:?})"),
        }
    }
}

impl Upstream {
    /// Counts a failure: the upstream is skipped for a while once [`FAILURES_IN_A_ROW`] came
    /// with no answer between them. Logs the start of an outage only.
    /// A failure counts only if none was counted since `started`
    /// ([`Backoff::trip_after`]): 64 prefetches that time out together on one slow upstream
    /// are one failure.
    fn failed(&self, started: Attempt, why: &Failure) {
        if self.down.trip_after(started) {
            tracing::warn!(
                upstream = %self.name,
                cause = %why,
                "upstream unavailable; skipping it for {} s at a time",
                self.down.period().as_secs()
            );
        }
    }

    /// Logs the end of an outage, once.
    fn answered(&self) {
        if self.down.reset() {
            tracing::info!(upstream = %self.name, "upstream answers again");
        }
    }
}

/// A narinfo found upstream, already checked.
pub struct Found {
    pub info: NarInfo,
    /// Whether the upstream it came from is mirrored into the store.
    pub mirror: bool,
}

pub struct Upstreams {
    list: Vec<Upstream>,
    /// `nar/<file>` → the index in `list` of the upstream whose verified narinfo named it:
    /// the NAR is asked of that upstream first, and of the others only if it could not answer
    /// (asking every upstream in order would count another upstream's refusal against it, and
    /// could take the bytes from an upstream whose NAR of that name is another one). A name
    /// not held here (asked by a client that kept the narinfo, or of another replica) goes to
    /// every upstream in order.
    routes: moka::future::Cache<String, usize>,
    client: reqwest::Client,
    store_dir: String,
}

impl Upstreams {
    /// Warns of each upstream whose `/nix-cache-info` names another store directory than
    /// `store_dir`: every narinfo it serves is refused, which was said only path by path
    /// (walk). Asked once (at start, and when a reload changes the upstreams), outside the
    /// failure counts and the metrics: an upstream that does not answer is said when asked
    /// for a path.
    pub async fn check_store_dirs(self: std::sync::Arc<Self>) {
        for u in &self.list {
            let ask = async {
                let res = self
                    .client
                    .get(url(u, "nix-cache-info"))
                    .send()
                    .await
                    .ok()?;
                if !res.status().is_success() {
                    return None;
                }
                let body = read_capped(res, 64 << 10).await.ok()?;
                let text = String::from_utf8_lossy(&body).into_owned();
                text.lines()
                    .find_map(|l| l.strip_prefix("StoreDir:"))
                    .map(|d| d.trim().to_owned())
            };
            let Ok(Some(theirs)) = tokio::time::timeout(u.timeout, ask).await else {
                continue;
            };
            if theirs != self.store_dir {
                tracing::warn!(
                    upstream = %u.name,
                    theirs,
                    store_dir = %self.store_dir,
                    "this upstream serves another store directory than store_dir: every \
                     narinfo it has is refused (is it the cache you meant?)"
                );
            }
        }
    }
}

/// How long an upstream's body may send nothing before it fails (longer if an upstream is
/// given longer to answer).
const BODY_IDLE: Duration = Duration::from_secs(30);

impl Upstreams {
    /// The HTTP client's settings for upstreams: timeouts, pool, and which redirects it follows.
    /// `longest` is the longest `timeout_secs` of the upstreams.
    fn client_builder(longest: Duration) -> reqwest::ClientBuilder {
        Self::client_builder_with(GuardedResolver::default(), longest)
    }

    /// [`Self::client_builder`] resolving names with `resolver`.
    fn client_builder_with(resolver: GuardedResolver, longest: Duration) -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .user_agent(concat!("cellar/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(32)
            // A body that stops arriving fails instead of holding a request (or a fill)
            // forever. The wait for an answer's headers is a read too: an upstream given
            // longer than this to answer (`timeout_secs`) was cut off at 30 s (walk).
            .read_timeout(longest.max(BODY_IDLE))
            .dns_resolver(std::sync::Arc::new(resolver))
            .redirect(reqwest::redirect::Policy::custom(|attempt| {
                let from = attempt.previous().first().cloned();
                match from.map(|f| redirect_refused(&f, attempt.url())) {
                    _ if attempt.previous().len() > MAX_REDIRECTS => {
                        attempt.error("too many redirects")
                    }
                    Some(Some(why)) => {
                        // Where to, without its path, query or credentials.
                        let u = attempt.url();
                        let to = match (u.host_str(), u.port()) {
                            (Some(host), Some(port)) => format!("{}://{host}:{port}", u.scheme()),
                            (Some(host), None) => format!("{}://{host}", u.scheme()),
                            (None, _) => format!("{}:", u.scheme()),
                        };
                        attempt.error(format!("{why}: {to}"))
                    }
                    _ => attempt.follow(),
                }
            }))
    }

    pub fn new(configs: &[UpstreamConfig], store_dir: &str) -> Result<Self, reqwest::Error> {
        let longest = configs.iter().map(|c| c.timeout).max().unwrap_or_default();
        let client = Self::client_builder(longest).build()?;
        let list = configs
            .iter()
            .map(|c| Upstream {
                base: c.url.clone(),
                name: without_credentials(&c.url),
                credentialed: reqwest::Url::parse(&c.url).ok().filter(has_credentials),
                keys: c.public_keys.clone(),
                timeout: c.timeout,
                mirror: c.mirror,
                down: Backoff::after(FAILURES_IN_A_ROW, BACKOFF),
                warned: std::sync::Mutex::new(None),
            })
            .collect();
        Ok(Self {
            list,
            // Least recently used out: moka's default admission would refuse new names once
            // full (a name inserted is not yet used).
            routes: routes(ROUTES),
            client,
            store_dir: store_dir.to_owned(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Each upstream's URL, and whether it is skipped now after a failure.
    pub fn health(&self) -> Vec<(String, bool)> {
        self.list
            .iter()
            .map(|u| (u.name.clone(), u.down.is_active()))
            .collect()
    }

    /// Asks each upstream in order for the narinfo of `h`; the first one with a narinfo that
    /// verifies wins. An upstream that is skipped or fails counts as a miss here (a narinfo
    /// lookup must answer within the upstream timeout), and the second value says whether one
    /// failed during this lookup: such a miss is not one to remember. (One skipped after
    /// failures is not asked, and a miss while it is skipped is remembered as usual, or every
    /// miss would read the store again for as long as an upstream stays down.)
    pub async fn narinfo(&self, h: StorePathHash) -> (Option<Found>, bool) {
        self.narinfo_passing_over(h, &|_| false).await
    }

    /// [`Self::narinfo`], where a narinfo `passed_over` says yes to (its NAR is known to be
    /// missing) is not the answer: the next upstream is asked, as if that one had none.
    pub async fn narinfo_passing_over(
        &self,
        h: StorePathHash,
        passed_over: &(dyn Fn(&NarInfo) -> bool + Sync),
    ) -> (Option<Found>, bool) {
        let (found, _skipped, failed) = self.lookup_narinfo(h, passed_over).await;
        (found, failed)
    }

    /// Whether `key` (`nar/<file>`) is routed to an upstream that is skipped now after
    /// failures while another is not: a narinfo that named it is to be looked up again, as
    /// that other may have the path. (With none other to ask, the narinfo stays: looked up
    /// again it would be a 404, kept by clients for an hour, for an outage of seconds.)
    pub async fn routed_to_skipped(&self, key: &str) -> bool {
        let Some(routed) = self.routes.get(key).await else {
            return false;
        };
        let skipped = |i: usize| self.list.get(i).is_some_and(|u| u.down.is_active());
        skipped(routed) && (0..self.list.len()).any(|i| !skipped(i))
    }

    /// Whether some upstream is skipped now after failures.
    pub fn any_skipped(&self) -> bool {
        self.list.iter().any(|u| u.down.is_active())
    }

    /// Forgets which upstream `key` (`nar/<file>`) is routed to: a narinfo the store holds
    /// names it now, and its NAR is the store's first.
    pub async fn unroute(&self, key: &str) {
        self.routes.invalidate(key).await;
    }

    /// True if some upstream serves a verified narinfo for `path` (used to accept uploads
    /// whose references are available through this server's upstreams): one for its hash that
    /// names another path is not `path`'s. Unavailable if it is not found and some upstream
    /// could not answer, so that an upload is retried rather than refused.
    pub async fn has(&self, path: &StorePathBaseName) -> Result<bool, StoreError> {
        Ok(self
            .path_of(path.hash())
            .await?
            .is_some_and(|served| served == *path))
    }

    /// The path some upstream serves a verified narinfo of hash `h` for, if any; unavailable
    /// as for [`Upstreams::has`].
    pub async fn path_of(&self, h: StorePathHash) -> Result<Option<StorePathBaseName>, StoreError> {
        match self.lookup_narinfo(h, &|_| false).await {
            (Some(found), _, _) => Ok(Some(found.info.store_path)),
            (None, false, false) => Ok(None),
            (None, _, _) => Err(StoreError::UpstreamDown(
                "an upstream cache could not be asked".into(),
            )),
        }
    }

    /// The narinfo, whether some upstream was skipped (after failures), and whether some
    /// upstream failed to answer now.
    async fn lookup_narinfo(
        &self,
        h: StorePathHash,
        passed_over: &(dyn Fn(&NarInfo) -> bool + Sync),
    ) -> (Option<Found>, bool, bool) {
        let mut skipped = false;
        let mut unavailable = false;
        for (i, u) in self.list.iter().enumerate() {
            if u.down.is_active() {
                skipped = true;
                continue;
            }
            // Not counted as an answer before its body is read: an upstream that sends headers
            // and then cuts every body off is failing.
            let started = u.down.attempt();
            let res = match self
                .request(
                    u,
                    started,
                    self.client.get(format!("{}/{h}.narinfo", u.base)),
                    true,
                )
                .await
            {
                Ok(Some(r)) => r,
                Ok(None) => {
                    u.answered();
                    continue;
                }
                Err(_) => {
                    unavailable = true;
                    continue;
                }
            };
            // A bucket Nix wrote with `narinfo-compression` serves its narinfos compressed,
            // saying so in their `Content-Encoding` (whatever the request accepts), as the store
            // does: decoded the same way, within the same bound.
            let coding = res
                .headers()
                .get(reqwest::header::CONTENT_ENCODING)
                .map(|v| Compression::from_content_encoding(v.to_str().unwrap_or("?")));
            let body = match tokio::time::timeout(u.timeout, async {
                let body = read_capped(res, MAX_NARINFO_BYTES as usize).await?;
                decode_body(&format!("{h}.narinfo"), coding, body, MAX_NARINFO_BYTES).await
            })
            .await
            {
                Ok(Ok(b)) => {
                    u.answered();
                    b
                }
                // A body cut off is the upstream failing, not a refusal of what it sent.
                Ok(Err(Refusal::Body(e))) => {
                    u.failed(started, &Failure::Request(e));
                    unavailable = true;
                    continue;
                }
                Ok(Err(why)) => {
                    u.answered();
                    crate::metrics::upstream_refused(&u.name, "narinfo", why.label());
                    tracing::warn!(upstream = %u.name, path = %h, cause = %why, "upstream narinfo refused");
                    continue;
                }
                Err(_) => {
                    u.failed(started, &Failure::Timeout);
                    unavailable = true;
                    continue;
                }
            };
            match self.check(u, h, &body) {
                Ok(info) if passed_over(&info) => {
                    tracing::debug!(upstream = %u.name, path = %h, "upstream narinfo passed over: its NAR is missing");
                }
                Ok(info) => {
                    if let Ok(f) = info.nar_file() {
                        self.routes
                            .insert(crate::store::object_key::nar(&f), i)
                            .await;
                    }
                    return (
                        Some(Found {
                            info,
                            mirror: u.mirror,
                        }),
                        skipped,
                        unavailable,
                    );
                }
                Err(why) => {
                    crate::metrics::upstream_refused(&u.name, "narinfo", why.label());
                    tracing::warn!(upstream = %u.name, path = %h, cause = %why, "upstream narinfo refused");
                }
            }
        }
        (None, skipped, unavailable)
    }

    /// [`Self::request`], counting an answer as the end of an outage: for requests whose
    /// answer is complete at its headers (a HEAD, a miss) or whose body goes to the caller.
    /// An error status counts against `u` only for a `routed` object, one a narinfo from it
    /// named: any client may ask for names no narinfo named (a NAR, a log), which every
    /// upstream is asked for, and some answer those with a 5xx (nix-serve) or a 429; counted,
    /// a few such requests would have the upstream skipped, and its paths answered 404, which
    /// clients keep for an hour. Not reaching it (a timeout, a connection refused) counts.
    async fn send(
        &self,
        u: &Upstream,
        req: reqwest::RequestBuilder,
        routed: bool,
    ) -> Result<Option<reqwest::Response>, Failure> {
        let r = self.request(u, u.down.attempt(), req, routed).await?;
        u.answered();
        Ok(r)
    }

    /// Sends `req` to `u` within its timeout: `Ok(Some)` for a 2xx (or 416, so a range outside
    /// the object can be reported as such), `Ok(None)` for a plain miss (4xx), `Err` when the
    /// upstream failed (timeout, connection error, 5xx, 429, 408, 401, a 403 refusing the
    /// credentials in its URL), which also counts against
    /// it ([`Upstream::failed`], which logs the start of an outage, so callers need not) unless
    /// another failure was counted since `started`, or it is an error status and not
    /// `statuses_count`.
    async fn request(
        &self,
        u: &Upstream,
        started: Attempt,
        req: reqwest::RequestBuilder,
        statuses_count: bool,
    ) -> Result<Option<reqwest::Response>, Failure> {
        let failure = match tokio::time::timeout(u.timeout, req.send()).await {
            Err(_) => Failure::Timeout,
            // A redirect cellar does not follow ([`redirect_refused`]): the upstream answered,
            // but not with anything cellar may serve. A miss of this object, not an outage.
            Ok(Err(e)) if e.is_redirect() => {
                let cause = crate::error::display_chain(&e);
                tracing::warn!(upstream = %u.name, cause, "upstream redirect not followed");
                crate::metrics::upstream_request(&u.name, "not_found");
                return Ok(None);
            }
            // reqwest takes credentials out of the URL it shows in errors.
            Ok(Err(e)) => Failure::Request(e),
            // Throttled or timed out at the upstream: it has not said the object is missing.
            // Nor has one that wants credentials (a private cellar or attic whose token in
            // the URL is wrong or expired): a failure to be seen in the log and `/status`, not
            // a quiet miss, and that `verify --repair` takes for an upstream it could not ask.
            // A 403 too when the URL holds credentials (a private cellar's answer to a token
            // that matches none); without, it stays a miss: S3 answers it for a missing key to
            // a reader without the right to list.
            Ok(Ok(r))
                if r.status().is_server_error()
                    || r.status() == reqwest::StatusCode::TOO_MANY_REQUESTS
                    || r.status() == reqwest::StatusCode::REQUEST_TIMEOUT
                    || r.status() == reqwest::StatusCode::UNAUTHORIZED
                    || (r.status() == reqwest::StatusCode::FORBIDDEN
                        && u.credentialed
                            .as_ref()
                            .is_some_and(|b| b.origin() == r.url().origin())) =>
            {
                Failure::Status(r.status())
            }
            Ok(Ok(r)) => {
                let ok = r.status().is_success()
                    || r.status() == reqwest::StatusCode::RANGE_NOT_SATISFIABLE;
                let result = if ok { "ok" } else { "not_found" };
                crate::metrics::upstream_request(&u.name, result);
                return Ok(ok.then_some(r));
            }
        };
        let result = match failure {
            Failure::Timeout => "timeout",
            Failure::Request(_) => "error",
            Failure::Status(s) => match s.as_u16() {
                401 | 403 => "unauthorized",
                429 => "throttled",
                408 => "timeout",
                _ => "server_error",
            },
        };
        crate::metrics::upstream_request(&u.name, result);
        if statuses_count || !matches!(failure, Failure::Status(_)) {
            u.failed(started, &failure);
        }
        Err(failure)
    }

    /// The realisation of the output `id` names, under `key` (`realisations/<id>`), from the first upstream whose answer is that output's and
    /// signed by one of the upstream's keys, as its narinfos must be: Nix 2.8 substitutes
    /// through a realisation without checking its signatures or its `id`, and cellar signs
    /// what it serves, so one taken unchecked (or another output's, signed) would send
    /// clients to whatever path it names. An upstream's realisation that is not so signed (or
    /// in a form whose signatures cellar cannot check, as newer Nix writes) is that
    /// upstream's miss. Unavailable, as a GET would be, when none has it and some upstream
    /// could not be asked.
    pub async fn realisation(
        &self,
        key: &str,
        id: &crate::nix::RealisationName,
    ) -> Result<Option<bytes::Bytes>, StoreError> {
        let limit = crate::upload::MAX_REALISATION_BYTES;
        let mut unavailable = false;
        for u in &self.list {
            if u.down.is_active() {
                unavailable = true;
                continue;
            }
            let started = u.down.attempt();
            let res = match self
                .request(u, started, self.client.get(url(u, key)), false)
                .await
            {
                Ok(Some(r)) => r,
                Ok(None) => {
                    u.answered();
                    continue;
                }
                Err(failure) => {
                    // Taken for a miss for now by the client (404, kept by no cache): said,
                    // once a minute, or an upstream answering 5xx would go unseen.
                    if crate::sync::once_per(&u.warned, WARN_EVERY) {
                        tracing::warn!(upstream = %u.name, key, cause = %failure, "upstream could not answer for a realisation");
                    }
                    unavailable = true;
                    continue;
                }
            };
            let coding = res
                .headers()
                .get(reqwest::header::CONTENT_ENCODING)
                .map(|v| Compression::from_content_encoding(v.to_str().unwrap_or("?")));
            let read = tokio::time::timeout(u.timeout, async {
                let body = read_capped(res, limit as usize).await?;
                let body = decode_body(key, coding, body, limit).await?;
                let r = crate::nix::Realisation::parse(&body).map_err(Refusal::NotARealisation)?;
                if !r.id().is_some_and(|own| id.names(own)) {
                    return Err(Refusal::OtherOutput(r.id().map(str::to_owned)));
                }
                match r.is_signed_by_any(&u.keys) {
                    true => Ok(body),
                    false => Err(Refusal::Unsigned),
                }
            })
            .await;
            match read {
                Ok(Ok(body)) => {
                    u.answered();
                    return Ok(Some(body));
                }
                Ok(Err(Refusal::Body(e))) => {
                    u.failed(started, &Failure::Request(e));
                    unavailable = true;
                }
                Ok(Err(why)) => {
                    u.answered();
                    crate::metrics::upstream_refused(&u.name, "realisation", why.label());
                    // Asked again at each lookup: said once a minute (a wrong `public_keys`
                    // would say it at every client's request).
                    if crate::sync::once_per(&u.warned, WARN_EVERY) {
                        tracing::warn!(upstream = %u.name, key, cause = %why, "upstream realisation refused");
                    } else {
                        tracing::debug!(upstream = %u.name, key, cause = %why, "upstream realisation refused");
                    }
                }
                Err(_) => {
                    u.failed(started, &Failure::Timeout);
                    unavailable = true;
                }
            }
        }
        if unavailable {
            return Err(StoreError::UpstreamDown(
                "an upstream cache could not be asked".into(),
            ));
        }
        Ok(None)
    }

    fn check(&self, u: &Upstream, h: StorePathHash, body: &[u8]) -> Result<NarInfo, Refusal> {
        let info = NarInfo::parse_for(body, &self.store_dir, h).map_err(Refusal::Invalid)?;
        if !info.is_signed_by_any(&u.keys, &self.store_dir) {
            return Err(Refusal::Unsigned);
        }
        // Served through /nar/<file>, so the URL must be one of those names.
        info.nar_file().map_err(Refusal::BadUrl)?;
        Ok(info)
    }

    /// The upstreams to ask for `key`, in order, and whether the first is the one whose
    /// narinfo named it (its miss is then the answer; the others are asked only when it
    /// could not be: skipped, failing, or it is a mirror of another listed after it). A NAR
    /// named after its store path ([`same_everywhere`] is false) is the routed upstream's
    /// alone: another's NAR of that name may be another build, and a part of it spliced into
    /// a fill (or served whole) would be a NAR no narinfo describes.
    async fn asked_for(&self, key: &str) -> (Vec<&Upstream>, bool) {
        match self.routes.get(key).await.and_then(|i| self.list.get(i)) {
            Some(routed) => {
                let mut order = vec![routed];
                if same_everywhere(key) {
                    order.extend(self.list.iter().filter(|u| !std::ptr::eq(*u, routed)));
                }
                (order, true)
            }
            None => (self.list.iter().collect(), false),
        }
    }

    /// Routes `key` to `u`, which serves (a part of) it, if it is a NAR named after its store
    /// path no narinfo routed: its later parts then come from the same upstream. Called only
    /// with an answer that is being returned, never one passed over for the next upstream.
    async fn pin(&self, key: &str, u: &Upstream, routed: bool) {
        if routed || same_everywhere(key) {
            return;
        }
        if let Some(i) = self.list.iter().position(|l| std::ptr::eq(l, u)) {
            self.routes.insert(key.to_owned(), i).await;
        }
    }

    /// GETs `key` (a cache-relative path such as `nar/<file>`) from the first upstream that
    /// has it.
    async fn get(&self, key: &str, range: Option<ByteRange>) -> Result<Option<Object>, StoreError> {
        let mut unavailable = false;
        let (order, routed) = self.asked_for(key).await;
        for (n, u) in order.into_iter().enumerate() {
            if u.down.is_active() {
                unavailable = true;
                continue;
            }
            let mut req = self.client.get(url(u, key));
            if let Some(r) = range {
                req = req.header(reqwest::header::RANGE, r.to_header());
            }
            let res = match self.send(u, req, routed).await {
                Ok(Some(r)) => r,
                Ok(None) if routed && n == 0 => break,
                Ok(None) => continue,
                Err(failure) => {
                    // An error status for a name no narinfo named is how some upstreams
                    // say "no" (see `send`): not worth a line each.
                    if routed || !matches!(failure, Failure::Status(_)) {
                        if crate::sync::once_per(&u.warned, WARN_EVERY) {
                            tracing::warn!(upstream = %u.name, key, cause = %failure, "upstream could not answer");
                        } else {
                            tracing::debug!(upstream = %u.name, key, cause = %failure, "upstream could not answer");
                        }
                    }
                    unavailable = true;
                    continue;
                }
            };
            let status = res.status();
            if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
                match self.refused_range_size(u, key, &res, routed).await {
                    Some(size) => return Err(StoreError::RangeNotSatisfiable { size }),
                    None => {
                        // The upstream has the object but will not say its size, which the
                        // client needs to ask again. Neither a 416 with a made-up size nor a
                        // 404 would be true: try the next upstream, else answer 503.
                        tracing::warn!(upstream = %u.name, key, "upstream refused a range without saying the object's size");
                        unavailable = true;
                        continue;
                    }
                }
            }
            // Unknown for a body streamed without one (nix-serve's NARs are chunked).
            let length = res.content_length();
            let content_range = if status == reqwest::StatusCode::PARTIAL_CONTENT {
                let stated = res
                    .headers()
                    .get(reqwest::header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(ContentRange::parse_header);
                if stated.is_none() {
                    // A part, but which part of how much is not said (or not usably, as in
                    // `bytes 0-99/*`): never served, or cut again, as if it were the whole.
                    // The next upstream may do better; else unavailable, as a failure.
                    tracing::warn!(upstream = %u.name, key, "upstream sent a part without a usable Content-Range");
                    unavailable = true;
                    continue;
                }
                stated
            } else {
                None
            };
            let encoding = crate::store::content_encoding(
                res.headers()
                    .get(reqwest::header::CONTENT_ENCODING)
                    .and_then(|v| v.to_str().ok()),
            );
            let from = u.name.clone();
            let body = res
                .bytes_stream()
                .map_err(move |e| body_broke(&from, &e))
                .boxed();
            if let (Some(r), None) = (range, content_range) {
                // The upstream ignored the range (HTTP allows it) and sends the whole object.
                // From the start, it goes out whole (as HTTP allows too; a fill then reads it
                // in one piece instead of asking for every part from the start again); a
                // range further in, as a client resuming asks, is cut from it here.
                if matches!(r, ByteRange::From { start: 0, .. }) {
                    self.pin(key, u, routed).await;
                    return Ok(Some(Object {
                        body,
                        length,
                        range: None,
                        encoding,
                    }));
                }
                let Some(length) = length else {
                    // Nor did it say how long the object is: no part of it can be promised,
                    // so the whole goes out (HTTP allows a server to ignore a range).
                    self.pin(key, u, routed).await;
                    return Ok(Some(Object {
                        body,
                        length: None,
                        range: None,
                        encoding,
                    }));
                };
                let Some((start, end)) = r.resolve(length) else {
                    return Err(StoreError::RangeNotSatisfiable { size: length });
                };
                self.pin(key, u, routed).await;
                return Ok(Some(Object {
                    body: crate::store::byte_slice(body, start, end - start + 1),
                    length: Some(end - start + 1),
                    range: Some(ContentRange {
                        start,
                        end,
                        total: length,
                    }),
                    encoding,
                }));
            }
            self.pin(key, u, routed).await;
            return Ok(Some(Object {
                body,
                // A part sent without a length has the length its Content-Range gives.
                length: length.or(content_range
                    .and_then(|r| r.end.checked_sub(r.start))
                    .map(|n| n + 1)),
                range: content_range,
                encoding,
            }));
        }
        if unavailable {
            // A NAR 404 is a hard error for Nix; 503 makes it retry.
            return Err(StoreError::Unavailable(
                "an upstream cache could not be asked".into(),
            ));
        }
        Ok(None)
    }

    /// The size of `key` at `u`, which answered a range request with 416: from the 416's
    /// `Content-Range: bytes */<size>` (RFC 9110 § 15.5.17 asks servers to send it), else
    /// from a HEAD.
    async fn refused_range_size(
        &self,
        u: &Upstream,
        key: &str,
        res: &reqwest::Response,
        routed: bool,
    ) -> Option<u64> {
        let stated = res
            .headers()
            .get(reqwest::header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(unsatisfied_range_size);
        match stated {
            Some(size) => Some(size),
            None => self.head_at(u, key, routed).await.ok().flatten(),
        }
    }

    /// The size of `key` at the first upstream that has it. Unavailable, as a GET would be,
    /// when none has it and some upstream could not be asked: a HEAD answers what the GET
    /// of the same address would (503, not a 404 that clients and proxies keep).
    pub async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let mut unavailable = false;
        let (order, routed) = self.asked_for(key).await;
        for (n, u) in order.into_iter().enumerate() {
            if u.down.is_active() {
                unavailable = true;
                continue;
            }
            match self.head_at(u, key, routed).await {
                Ok(Some(size)) => return Ok(Some(size)),
                Ok(None) if routed && n == 0 => break,
                Ok(None) => {}
                Err(_) => unavailable = true,
            }
        }
        if unavailable {
            return Err(StoreError::Unavailable(
                "an upstream cache could not be asked".into(),
            ));
        }
        Ok(None)
    }

    /// The size of `key` at `u`, if it has it and says it (a HEAD without a length finds
    /// nothing); `Err` when `u` failed.
    async fn head_at(&self, u: &Upstream, key: &str, routed: bool) -> Result<Option<u64>, Failure> {
        let Some(r) = self.send(u, self.client.head(url(u, key)), routed).await? else {
            return Ok(None);
        };
        // HEAD has no body: the length is in the header.
        Ok(r.headers()
            .get(reqwest::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok()))
    }
}

/// The map of NAR names to upstreams, of `capacity` names, the least recently used out
/// first: moka's default admission would refuse new names once full (a name inserted has not
/// been used yet).
fn routes(capacity: u64) -> moka::future::Cache<String, usize> {
    moka::future::Cache::builder()
        .max_capacity(capacity)
        .eviction_policy(moka::policy::EvictionPolicy::lru())
        .build()
}

/// Redirects an upstream may send before its answer is taken as a miss.
const MAX_REDIRECTS: usize = 5;

/// Why an upstream asked for `from` may not send cellar to `to`, if it may not. Upstreams
/// redirect NARs to where they keep them (attic to S3, a cellar with `redirect_nars`), and what
/// they redirect to is served to anyone who asks: so never to a link-local or metadata address
/// (a cloud metadata service lives at 169.254.169.254), to a loopback or private address only
/// from an upstream that is on one itself (a homelab cache and its bucket, by address or by a
/// local name: `nas`, `attic.lan`, `*.local`, `*.home.arpa`, `*.internal`), and from https to
/// plain http only within such a network. Names are judged here by their spelling: a public
/// name that resolves to a private address is not caught here, but no name is ever connected
/// to at a metadata service's address ([`GuardedResolver`]; that is a failed request, not a
/// refused redirect). A redirect refused is a miss of that object, not a failure of the
/// upstream.
fn redirect_refused(from: &reqwest::Url, to: &reqwest::Url) -> Option<&'static str> {
    if !matches!(to.scheme(), "http" | "https") {
        return Some("redirect to a scheme other than http(s)");
    }
    match (reach(from), reach(to)) {
        (_, Reach::Never) => Some("redirect to a link-local or metadata address"),
        (Reach::Public, Reach::Local) => {
            Some("redirect from a public upstream to a loopback or private address")
        }
        // Within a home network a TLS front may send cellar to a plain-http bucket.
        (Reach::Local, Reach::Local) => None,
        _ if from.scheme() == "https" && to.scheme() != "https" => {
            Some("redirect from https to plain http")
        }
        _ => None,
    }
}

/// Whether `ip` is an address no upstream has reason to send cellar to ([`Reach::Never`]):
/// link-local, unspecified, broadcast, or a cloud metadata service's ([`metadata`]).
fn never(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    if metadata(ip) {
        return true;
    }
    // An IPv4-mapped address comes here as the IPv4 one ([`reach`] maps it).
    match ip {
        IpAddr::V4(a) => a.is_link_local() || a.is_unspecified() || a.is_broadcast(),
        IpAddr::V6(a) => a.is_unspecified() || (a.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// Whether `ip` is a cloud metadata service's address: 169.254.169.254 (AWS, GCP, Azure,
/// and others), 100.100.100.200 (Alibaba), fd00:ec2::254 (AWS over IPv6).
fn metadata(ip: std::net::IpAddr) -> bool {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    const V4: [Ipv4Addr; 2] = [
        Ipv4Addr::new(169, 254, 169, 254),
        Ipv4Addr::new(100, 100, 100, 200),
    ];
    const AWS_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
    match ip {
        IpAddr::V4(a) => V4.contains(&a),
        IpAddr::V6(a) => a == AWS_V6 || a.to_ipv4_mapped().is_some_and(|v4| V4.contains(&v4)),
    }
}

/// Resolves upstream host names as the system does, leaving out cloud metadata services'
/// addresses ([`metadata`]): a name that resolves only to those (a redirect to
/// `instance-data`, which EC2 resolves to 169.254.169.254, or a public name pointed there) is
/// not connected to. The redirect guard ([`redirect_refused`]) judges names by their spelling
/// only; this holds whatever the name. (Other link-local addresses stay usable: a NAS on a
/// direct cable may have one.)
#[derive(Default)]
struct GuardedResolver {
    /// For tests: what every name resolves to, instead of the system's answer.
    #[cfg(test)]
    fixed: Option<Vec<std::net::IpAddr>>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        #[cfg(test)]
        if let Some(ips) = &self.fixed {
            let found: Vec<_> = ips.iter().map(|&ip| (ip, 0).into()).collect();
            let addrs = usable_addresses(&host, found.into_iter());
            return Box::pin(
                async move { Ok(Box::new(addrs?.into_iter()) as reqwest::dns::Addrs) },
            );
        }
        Box::pin(async move {
            let found = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let addrs = usable_addresses(&host, found)?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The addresses `host` resolved to (`found`) that may be connected to; an error if none.
fn usable_addresses(
    host: &str,
    found: impl Iterator<Item = std::net::SocketAddr>,
) -> Result<Vec<std::net::SocketAddr>, Box<dyn std::error::Error + Send + Sync>> {
    let (ok, refused): (Vec<_>, Vec<_>) = found.partition(|a| !metadata(a.ip()));
    match (ok.is_empty(), refused.is_empty()) {
        (false, _) => Ok(ok),
        (true, false) => Err(format!(
            "{host} resolves only to a cloud metadata service's address, which cellar does not connect to"
        )
        .into()),
        (true, true) => Err(format!("{host} resolves to no address").into()),
    }
}

/// Where a URL's host is, as far as its spelling says.
#[derive(Debug, PartialEq)]
enum Reach {
    Public,
    /// Loopback, private (RFC 1918, shared 100.64/10, IPv6 unique local), or a local name
    /// (`localhost`, a name without a dot, `.local`, `.lan`, `.home.arpa`, `.internal`,
    /// `.localdomain`).
    Local,
    /// Link-local, unspecified, or a cloud metadata service's address (169.254.169.254,
    /// 100.100.100.200, fd00:ec2::254): nothing an upstream has reason to send cellar to.
    Never,
}

/// Name suffixes of home and company networks.
const LOCAL_SUFFIXES: [&str; 5] = [".local", ".lan", ".home.arpa", ".internal", ".localdomain"];

fn reach(u: &reqwest::Url) -> Reach {
    use std::net::IpAddr;
    let Some(host) = u.host_str() else {
        return Reach::Never;
    };
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    let ip = match literal.parse::<IpAddr>() {
        Ok(IpAddr::V6(a)) => a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4),
        Ok(a) => a,
        Err(_) => {
            let d = host.trim_end_matches('.').to_ascii_lowercase();
            let local = d == "localhost"
                || d.ends_with(".localhost")
                || !d.contains('.')
                || LOCAL_SUFFIXES.iter().any(|s| d.ends_with(s));
            return if local { Reach::Local } else { Reach::Public };
        }
    };
    match ip {
        a if never(a) => Reach::Never,
        IpAddr::V4(a)
            if a.is_loopback()
                || a.is_private()
                || (a.octets()[0] == 100 && (a.octets()[1] & 0xc0) == 64) =>
        {
            Reach::Local
        }
        IpAddr::V6(a) if a.is_loopback() || (a.segments()[0] & 0xfe00) == 0xfc00 => Reach::Local,
        _ => Reach::Public,
    }
}

/// An upstream's body that failed while it streamed, naming the upstream and the cause
/// (reqwest's own words, "error decoding response body", say little without their source:
/// the connection closed early, say).
fn body_broke(upstream: &str, e: &reqwest::Error) -> io::Error {
    io::Error::other(format!(
        "upstream {upstream} broke off the body: {}",
        crate::error::display_chain(e)
    ))
}

/// Whether every upstream's object under `key` is the same bytes: anything but a NAR named
/// after its store path (32 characters, as attic and old nix-serve name them), whose name is
/// the hash of its bytes (Nix's names, nix-serve's and harmonia's).
fn same_everywhere(key: &str) -> bool {
    key.strip_prefix("nar/")
        .and_then(|f| NarFileName::parse_nix(f).ok())
        .is_none_or(|f| f.names_its_bytes())
}

/// The URL of `key` (a cache-relative path such as `log/<drv>`) at `u`. Store path names may
/// hold `?`, which is escaped so that it stays part of the path: a request cannot add a query
/// of its choosing to what the upstream is sent. The one query sent is harmonia's
/// `nar/<narhash>.nar?hash=<pathhash>`, which [`crate::nix::NarFileName`] allows in exactly
/// that form and nowhere else.
fn url(u: &Upstream, key: &str) -> String {
    if key.starts_with("nar/") {
        format!("{}/{key}", u.base)
    } else {
        format!("{}/{}", u.base, key.replace('?', "%3F"))
    }
}

/// Whether `u` holds a user name or a password.
fn has_credentials(u: &reqwest::Url) -> bool {
    !u.username().is_empty() || u.password().is_some()
}

/// `url` without the user name and password it may hold, for showing it.
fn without_credentials(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if has_credentials(&u) => {
            // Cannot fail for the http(s) URLs the configuration allows.
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.as_str().trim_end_matches('/').to_owned()
        }
        Ok(_) => url.to_owned(),
        // Not shown at all rather than shown with what it may hold.
        Err(_) => "(upstream URL)".to_owned(),
    }
}

/// The size in a 416's `Content-Range: bytes */<size>`.
fn unsatisfied_range_size(v: &str) -> Option<u64> {
    v.trim().strip_prefix("bytes */")?.parse().ok()
}

/// `key` as sent (`body`), decoded from its `Content-Encoding` (`coding`) within `limit`.
async fn decode_body(
    key: &str,
    coding: Option<Result<Option<Compression>, String>>,
    body: bytes::Bytes,
    limit: u64,
) -> Result<bytes::Bytes, Refusal> {
    match coding {
        None | Some(Ok(None)) => Ok(body),
        Some(Ok(Some(c))) => crate::store::decoded(key, c, body.into(), limit)
            .await
            .map_err(|e| Refusal::Encoded(e.to_string())),
        Some(Err(name)) => Err(Refusal::Encoded(format!(
            "sent with Content-Encoding {name:?}, which cellar does not decode"
        ))),
    }
}

/// Reads a response body, refusing more than `cap` bytes.
async fn read_capped(res: reqwest::Response, cap: usize) -> Result<bytes::Bytes, Refusal> {
    if res.content_length().is_some_and(|l| l > cap as u64) {
        return Err(Refusal::TooLarge(cap));
    }
    let mut buf = Vec::new();
    let mut body = res.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(Refusal::Body)?;
        if buf.len() + chunk.len() > cap {
            return Err(Refusal::TooLarge(cap));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(bytes::Bytes::from(buf))
}

/// The store as clients see it: the configured store, then the upstreams. Reads fall through
/// to upstreams on a miss; writes go to the store only.
pub struct WithUpstreams {
    pub store: std::sync::Arc<dyn Store>,
    pub upstreams: std::sync::Arc<Upstreams>,
    /// Objects an upstream served from their first byte (the store had none), for
    /// [`UPSTREAM_FIRST_FOR`]: the later parts of a NAR read in parts (the disk cache reads a
    /// large NAR 4 MiB at a time) are asked of the upstreams first, not each of the store
    /// first for a miss (a 1 GiB NAR: 256 GETs of the bucket that find nothing).
    upstream_first: moka::future::Cache<String, ()>,
}

/// How long an object an upstream served keeps its later parts going to the upstreams first.
const UPSTREAM_FIRST_FOR: Duration = Duration::from_secs(600);

impl WithUpstreams {
    pub fn new(store: std::sync::Arc<dyn Store>, upstreams: std::sync::Arc<Upstreams>) -> Self {
        Self {
            store,
            upstreams,
            upstream_first: moka::future::Cache::builder()
                .max_capacity(4096)
                .time_to_live(UPSTREAM_FIRST_FOR)
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .build(),
        }
    }
}

/// The upstreams' "one could not be asked" after the store found nothing, as such.
fn upstream_down(e: StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(m) => StoreError::UpstreamDown(m),
        other => other,
    }
}

#[async_trait]
impl Store for WithUpstreams {
    async fn get(&self, key: &str, range: Option<ByteRange>) -> Result<Option<Object>, StoreError> {
        let later_part = matches!(range, Some(ByteRange::From { start, .. }) if start > 0);
        if later_part && self.upstream_first.contains_key(key) {
            // The store is still asked if no upstream serves it (any more): mirrored or
            // uploaded since, it is the same NAR.
            match self.upstreams.get(key, range).await {
                Ok(Some(o)) => return Ok(Some(o)),
                Ok(None) => return self.store.get(key, range).await,
                Err(e) => {
                    return match self.store.get(key, range).await {
                        Ok(Some(o)) => Ok(Some(o)),
                        _ => Err(upstream_down(e)),
                    }
                }
            }
        }
        match self.store.get(key, range).await? {
            Some(o) => {
                if !later_part {
                    self.upstream_first.invalidate(key).await;
                }
                Ok(Some(o))
            }
            None => {
                let o = self
                    .upstreams
                    .get(key, range)
                    .await
                    .map_err(upstream_down)?;
                if o.is_some() && !later_part {
                    self.upstream_first.insert(key.to_owned(), ()).await;
                }
                Ok(o)
            }
        }
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        if let Some(s) = self.store.head(key).await? {
            return Ok(Some(s));
        }
        self.upstreams.head(key).await.map_err(upstream_down)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.store.ping().await
    }

    async fn writer(&self, key: &str) -> Result<Box<dyn ObjectWriter>, StoreError> {
        self.store.writer(key).await
    }

    async fn remove_unfinished(&self) -> usize {
        self.store.remove_unfinished().await
    }

    async fn cleanup_staging(&self, older_than: Duration) -> Result<usize, StoreError> {
        self.store.cleanup_staging(older_than).await
    }

    // Listing and deleting concern what this cache holds, never what upstreams hold.
    async fn stale_staging(&self, older_than: Duration) -> Result<Vec<String>, StoreError> {
        self.store.stale_staging(older_than).await
    }

    fn list(&self, prefix: &str) -> crate::store::ObjectList {
        self.store.list(prefix)
    }

    fn list_after(&self, prefix: &str, after: &str) -> crate::store::ObjectList {
        self.store.list_after(prefix, after)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.store.delete(key).await
    }

    fn now(&self) -> std::time::SystemTime {
        self.store.now()
    }

    fn describe(&self) -> String {
        format!(
            "{} (+{} upstreams)",
            self.store.describe(),
            self.upstreams.list.len()
        )
    }
}

/// One upstream serving `app` on a port of its own, trusting `keys` (for tests of what
/// relies on upstreams: uploads, verify).
#[cfg(test)]
pub(crate) async fn serving(app: axum::Router, keys: Vec<crate::nix::PublicKey>) -> Upstreams {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("binding a test upstream: {e}"));
    let url = format!(
        "http://{}",
        listener.local_addr().unwrap_or_else(|e| panic!("{e}"))
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    let config = UpstreamConfig {
        url,
        public_keys: keys,
        timeout: Duration::from_secs(30),
        mirror: false,
    };
    Upstreams::new(&[config], "/nix/store").unwrap_or_else(|e| panic!("{e}"))
}

#[cfg(test)]
mod tests;
