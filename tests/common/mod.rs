//! Shared test harness: the real Garage S3 server started by `scripts/test`, the real `cellar`
//! binary (it binds port 0 itself and announces the address it got), [`App`]: a cellar over a
//! test's own key prefix, a TCP proxy that can cut the store off, and a fixture closure built
//! with the real nix client.
#![allow(dead_code)]

mod upload;

#[allow(unused_imports)] // not every test binary uses the upload helpers
pub use upload::*;

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region, RequestChecksumCalculation};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const CELLAR: &str = env!("CARGO_BIN_EXE_cellar");

// ---------------------------------------------------------------------------------------------
// S3 (Garage)

#[derive(Clone, Debug)]
pub struct S3Env {
    pub endpoint: String,
    pub bucket: String,
    pub key_id: String,
    pub secret: String,
}

/// The Garage that `scripts/test` started. Integration tests never run without one.
pub fn s3_env() -> S3Env {
    let get = |k: &str| {
        std::env::var(k).unwrap_or_else(|_| {
            panic!("{k} is not set: run the tests with scripts/test, which starts Garage")
        })
    };
    S3Env {
        endpoint: get("S3_ENDPOINT"),
        bucket: get("S3_BUCKET"),
        key_id: get("AWS_ACCESS_KEY_ID"),
        secret: get("AWS_SECRET_ACCESS_KEY"),
    }
}

pub fn s3_client(env: &S3Env) -> aws_sdk_s3::Client {
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .http_client(cellar::store::s3::sdk_http_client())
        .region(Region::new("us-east-1"))
        .endpoint_url(&env.endpoint)
        .force_path_style(true)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .credentials_provider(Credentials::new(
            &env.key_id,
            &env.secret,
            None,
            None,
            "test",
        ))
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

/// The object `key` of the test bucket, read directly.
pub async fn s3_get(env: &S3Env, key: &str) -> bytes::Bytes {
    s3_client(env)
        .get_object()
        .bucket(&env.bucket)
        .key(key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("get {key}: {e:?}"))
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes()
}

pub async fn s3_put(env: &S3Env, key: &str, data: impl Into<Vec<u8>>) {
    s3_client(env)
        .put_object()
        .bucket(&env.bucket)
        .key(key)
        .body(data.into().into())
        .send()
        .await
        .unwrap_or_else(|e| panic!("put {key}: {e:?}"));
}

pub async fn s3_exists(env: &S3Env, key: &str) -> bool {
    s3_client(env)
        .head_object()
        .bucket(&env.bucket)
        .key(key)
        .send()
        .await
        .is_ok()
}

/// Uploads every file under `dir` to `prefix` + its relative path (what `aws s3 sync` does to a
/// directory written by `nix copy --to file://`).
pub async fn s3_upload_dir(env: &S3Env, prefix: &str, dir: &Path) {
    for path in walk(dir) {
        let rel = path.strip_prefix(dir).unwrap().to_str().unwrap().to_owned();
        s3_put(
            env,
            &format!("{prefix}{rel}"),
            std::fs::read(&path).unwrap(),
        )
        .await;
    }
}

pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// A key prefix no other test uses, so tests share one bucket without seeing each other.
pub fn unique_prefix(name: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "t-{name}-{}-{}/",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

// ---------------------------------------------------------------------------------------------
// A TCP proxy in front of the store that a test can cut (connections reset, nothing accepted)
// and restore, that counts bytes sent to the store, and that can hold answers mid-body.

pub struct Proxy {
    pub addr: SocketAddr,
    down: Arc<AtomicBool>,
    to_upstream: Arc<AtomicU64>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    /// A connection that has passed this many bytes from the store waits until it is raised.
    hold_after: tokio::sync::watch::Sender<u64>,
    /// Connections waiting at `hold_after` now, watched by tests waiting for a hold.
    holding: Arc<tokio::sync::watch::Sender<u64>>,
    /// The next request whose first line starts with `.0` and holds `.1` reaches the store,
    /// and its answer is lost: the client's connection is closed instead.
    lose: Arc<Mutex<Option<(String, String)>>>,
    /// The next request whose first line starts with `.0` and holds `.1` never reaches the
    /// store: the proxy goes down ([`Proxy::set_down`]) instead.
    down_on: Arc<Mutex<Option<(String, String)>>>,
}

/// Whether `chunk`, read from a client, starts a request whose first line starts with
/// `method` and holds `part`.
fn request_is(chunk: &[u8], method: &str, part: &str) -> bool {
    let line = chunk.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    line.starts_with(method) && line.contains(part)
}

impl Proxy {
    pub async fn start(upstream: &str) -> Proxy {
        let upstream: SocketAddr = upstream
            .trim_start_matches("http://")
            .parse()
            .expect("S3_ENDPOINT is http://ip:port");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let down = Arc::new(AtomicBool::new(false));
        let to_upstream = Arc::new(AtomicU64::new(0));
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (hold_after, _) = tokio::sync::watch::channel(u64::MAX);
        let holding = Arc::new(tokio::sync::watch::channel(0u64).0);
        let (d, t, c) = (down.clone(), to_upstream.clone(), conns.clone());
        let (hold, held) = (hold_after.clone(), holding.clone());
        let lose: Arc<Mutex<Option<(String, String)>>> = Arc::default();
        let losing = lose.clone();
        let down_on: Arc<Mutex<Option<(String, String)>>> = Arc::default();
        let downing = down_on.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                if d.load(Ordering::SeqCst) {
                    drop(client); // refused: closed at once
                    continue;
                }
                let t = t.clone();
                let mut hold = hold.subscribe();
                let held = held.clone();
                let losing = losing.clone();
                let (downing, down, all) = (downing.clone(), d.clone(), c.clone());
                let task = tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    // This connection's next answer is lost.
                    let lost = AtomicBool::new(false);
                    let (mut cr, mut cw) = client.split();
                    let (mut sr, mut sw) = server.split();
                    let up = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = cr.read(&mut buf).await.unwrap_or(0);
                            if n == 0 {
                                break;
                            }
                            {
                                let mut down_on = downing.lock().unwrap();
                                if down_on
                                    .as_ref()
                                    .is_some_and(|(m, p)| request_is(&buf[..n], m, p))
                                {
                                    *down_on = None;
                                    down.store(true, Ordering::SeqCst);
                                    for conn in all.lock().unwrap().drain(..) {
                                        conn.abort();
                                    }
                                    break;
                                }
                            }
                            t.fetch_add(n as u64, Ordering::SeqCst);
                            {
                                let mut lose = losing.lock().unwrap();
                                if lose
                                    .as_ref()
                                    .is_some_and(|(m, p)| request_is(&buf[..n], m, p))
                                {
                                    *lose = None;
                                    lost.store(true, Ordering::SeqCst);
                                }
                            }
                            if sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = sw.shutdown().await;
                    };
                    let downstream = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        let mut passed = 0u64;
                        loop {
                            if passed >= *hold.borrow_and_update() {
                                held.send_modify(|n| *n += 1);
                                while passed >= *hold.borrow_and_update() {
                                    if hold.changed().await.is_err() {
                                        break;
                                    }
                                }
                                held.send_modify(|n| *n -= 1);
                            }
                            let n = sr.read(&mut buf).await.unwrap_or(0);
                            if n == 0
                                || lost.load(Ordering::SeqCst)
                                || cw.write_all(&buf[..n]).await.is_err()
                            {
                                break;
                            }
                            passed += n as u64;
                        }
                        let _ = cw.shutdown().await;
                    };
                    tokio::join!(up, downstream);
                });
                c.lock().unwrap().push(task.abort_handle());
            }
        });
        Proxy {
            addr,
            down,
            to_upstream,
            conns,
            hold_after,
            holding,
            lose,
            down_on,
        }
    }

    /// The next request whose first line starts with `method` and holds `part` goes nowhere:
    /// the proxy goes down as it arrives, as [`Proxy::set_down`] does.
    pub fn down_on(&self, method: &str, part: &str) {
        *self.down_on.lock().unwrap() = Some((method.to_owned(), part.to_owned()));
    }

    /// The next request whose first line starts with `method` and holds `part` reaches the
    /// store, which acts on it, but its answer never reaches the client: the proxy closes
    /// the client's connection when the answer comes.
    pub fn lose_answer_to(&self, method: &str, part: &str) {
        *self.lose.lock().unwrap() = Some((method.to_owned(), part.to_owned()));
    }

    /// From now on, a connection that has passed `bytes` bytes from the store (a NAR body
    /// partly sent) stops passing more until [`Proxy::release`].
    pub fn hold_after(&self, bytes: u64) {
        self.hold_after.send_replace(bytes);
    }

    /// Lets every held connection go on, and holds none from now on.
    pub fn release(&self) {
        self.hold_after.send_replace(u64::MAX);
    }

    /// How many connections are being held now.
    pub fn holding(&self) -> u64 {
        *self.holding.borrow()
    }

    /// The number of connections held, as it changes.
    pub fn holds(&self) -> tokio::sync::watch::Receiver<u64> {
        self.holding.subscribe()
    }

    /// Returns once a connection is being held (woken by the hold itself); fails after a
    /// minute (a guard against a hung test).
    pub async fn held(&self) {
        let mut holds = self.holds();
        tokio::time::timeout(Duration::from_secs(60), holds.wait_for(|n| *n >= 1))
            .await
            .expect("no connection was held within a minute")
            .expect("the proxy is alive while the test holds it");
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Cuts every open connection and refuses new ones (true), or lets them through (false).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            for c in self.conns.lock().unwrap().drain(..) {
                c.abort();
            }
        }
    }

    /// Bytes the proxy has forwarded to the store so far (requests reaching S3).
    pub fn bytes_to_store(&self) -> u64 {
        self.to_upstream.load(Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------------------------
// The cellar binary

pub struct Server {
    pub url: String,
    pub addr: SocketAddr,
    /// The server's public key line (`name:base64`).
    pub public_key: String,
    pub dir: tempfile::TempDir,
    child: Child,
}

/// Waits until the file `path` holds `needle` at least `count` times, woken by each write to
/// it (inotify), not on a timer: for events only a log reports. Fails after a minute (a
/// guard against a hung test) with the file. Inside a multi-threaded tokio runtime
/// the worker hands its tasks over first, so in-process helpers (a [`Proxy`]) keep running.
pub fn wait_for_in_file(path: &Path, needle: &str, count: usize) {
    wait_for_file(path, &format!("{needle:?} {count} time(s)"), |text| {
        text.matches(needle).count() >= count
    });
}

/// Waits as [`wait_for_in_file`] does until the text of the file `path` satisfies `done`
/// (`what` says what was waited for, if it never comes).
pub fn wait_for_file(path: &Path, what: &str, done: impl Fn(&str) -> bool) {
    let wait = || {
        use rustix::fs::inotify;
        let read =
            || String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned();
        let changes = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)
            .expect("inotify");
        inotify::add_watch(&changes, path, inotify::WatchFlags::MODIFY).expect("watching the log");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        // Read after the watch is set: a write after this read wakes the poll below.
        while !done(&read()) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                panic!(
                    "waited in vain for {what} in {}:\n{}",
                    path.display(),
                    read()
                );
            }
            let left = rustix::event::Timespec {
                tv_sec: left.as_secs() as i64,
                tv_nsec: i64::from(left.subsec_nanos()),
            };
            let mut fds = [rustix::event::PollFd::new(
                &changes,
                rustix::event::PollFlags::IN,
            )];
            let _ = rustix::event::poll(&mut fds, Some(&left));
            let mut events = [0u8; 4096];
            while rustix::io::read(&changes, &mut events).is_ok_and(|n| n > 0) {}
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    }
}

/// Env for an S3 store at `endpoint` (usually a [`Proxy`]) under `prefix`.
pub fn s3_store_env(s3: &S3Env, endpoint: &str, prefix: &str) -> Vec<(String, String)> {
    [
        ("CELLAR_STORE__KIND", "s3"),
        ("CELLAR_STORE__BUCKET", s3.bucket.as_str()),
        ("CELLAR_STORE__ENDPOINT", endpoint),
        ("CELLAR_STORE__REGION", "us-east-1"),
        ("CELLAR_STORE__PREFIX", prefix),
        ("CELLAR_STORE__TIMEOUT_SECS", "3"),
        ("CELLAR_STORE__CONNECT_TIMEOUT_SECS", "1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

impl Server {
    /// Starts `cellar serve` with a fresh signing key and the given `CELLAR_*` env.
    pub fn start(env: Vec<(String, String)>) -> Server {
        Self::start_with_config("", env)
    }

    /// Same, with a config file holding `toml` (env still overrides it).
    ///
    /// The server binds port 0 itself (no port is picked here and released for another
    /// process to take) and announces the address it got on stdout.
    pub fn start_with_config(toml: &str, env: Vec<(String, String)>) -> Server {
        Self::start_via(&[], toml, env)
    }

    /// [`Server::start_with_config`], run through the command `via` (a program and its
    /// arguments that exec the rest, e.g. util-linux's `prlimit --nofile=N:N --`), which
    /// changes the server's process alone.
    pub fn start_via(via: &[&str], toml: &str, env: Vec<(String, String)>) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("cellar.toml");
        std::fs::write(&config, toml).unwrap();
        let key = dir.path().join("cellar-test.sec");
        let out = Command::new(CELLAR)
            .args(["keygen", "cellar-test-1", "--out"])
            .arg(&key)
            .output()
            .unwrap();
        assert!(out.status.success(), "keygen: {out:?}");
        let public_key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        let log_path = dir.path().join("server.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut cmd = match via.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(CELLAR);
                c
            }
            None => Command::new(CELLAR),
        };
        cmd.arg("serve")
            .arg("--config")
            .arg(&config)
            .current_dir(dir.path())
            .env("CELLAR_LISTEN", "127.0.0.1:0")
            .env("CELLAR_SIGNING__KEY_FILES", &key)
            .env("RUST_LOG", "info,cellar=debug")
            .stdout(Stdio::piped())
            .stderr(log);
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let addr = wait_until_listening(&mut child, || {
            String::from_utf8_lossy(&std::fs::read(&log_path).unwrap_or_default()).into_owned()
        });
        Server {
            url: format!("http://{addr}"),
            addr,
            public_key,
            dir,
            child,
        }
    }

    /// What the server wrote on stderr so far (it writes there before it answers).
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.log_path()).unwrap_or_default()).into_owned()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The config file the server was started with (rewrite it, then [`Server::sighup`]).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("cellar.toml")
    }

    /// Sends SIGHUP (reload) to the server.
    pub fn sighup(&self) {
        let st = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success(), "kill -HUP failed");
    }

    /// Waits until the log holds `needle` at least `count` times: for events only the log
    /// reports (a reload done, an upload refused). Woken by the server's writes to its log
    /// ([`wait_for_in_file`]); fails after a minute, with the log.
    pub fn wait_for_log(&self, needle: &str, count: usize) {
        wait_for_in_file(&self.log_path(), needle, count);
    }

    /// The address of `metrics_listen` (the kernel's choice for port 0), from the log line
    /// the server writes before it announces its own address.
    pub fn metrics_addr(&self) -> String {
        let log = self.log();
        log.lines()
            .find(|l| l.contains("metrics served"))
            .and_then(|l| l.split("listen=").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no metrics address in:\n{log}"))
            .to_owned()
    }

    /// How often the log holds `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }

    /// The server's process id (to send it signals).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the server as systemd does (SIGTERM) and waits for it to exit: what it writes
    /// at shutdown (the access record) is then in the store. Fails if it has not exited
    /// within a minute, or exited with an error.
    pub fn stop(mut self) {
        self.stop_in_place();
    }

    /// [`Self::stop`], keeping the `Server` (its log stays readable): for a restart, before
    /// another takes its place.
    pub fn stop_in_place(&mut self) {
        let st = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success(), "kill -TERM failed");
        let mut child = std::mem::replace(
            &mut self.child,
            Command::new("true").spawn().expect("true runs"),
        );
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let status = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("the server did not stop:\n{}", self.log()))
            .unwrap();
        assert!(status.success(), "{status}:\n{}", self.log());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let pid = self.child.id();
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A server run under libfaketime (tests/e2e_clock.rs) leaves its shared memory and
        // semaphore behind when killed (it removes them only at a normal exit).
        for name in [
            format!("faketime_shm_{pid}"),
            format!("sem.faketime_sem_{pid}"),
        ] {
            let _ = std::fs::remove_file(Path::new("/dev/shm").join(name));
        }
    }
}

/// Waits for the line `cellar serve` prints on stdout once its port is open
/// (`listening on http://ADDR`) and returns ADDR. If the child exits first, or stays silent for
/// a minute (a guard against a hung start, not a wait for it), the child is killed and the test
/// fails with `log()`.
pub fn wait_until_listening(child: &mut Child, log: impl Fn() -> String) -> SocketAddr {
    let stdout = child.stdout.take().expect("cellar's stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        for line in lines.by_ref() {
            let Ok(line) = line else { return };
            if let Some(addr) = line.strip_prefix("listening on http://") {
                let _ = tx.send(addr.to_owned());
                break;
            }
        }
        // Keep reading whatever else comes, so the server never writes into a closed pipe.
        for _ in lines {}
    });
    let fail = |child: &mut Child, why: String| -> ! {
        let _ = child.kill();
        let status = child.wait();
        panic!("cellar {why} ({status:?}); its log:\n{}", log());
    };
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(addr) => addr
            .parse()
            .unwrap_or_else(|e| fail(child, format!("announced {addr:?}: {e}"))),
        Err(RecvTimeoutError::Disconnected) => {
            fail(child, "exited before announcing its address".into())
        }
        Err(RecvTimeoutError::Timeout) => {
            fail(child, "did not announce its address within 60 s".into())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One test's cellar over its own key prefix in the Garage bucket

/// What almost every S3 test starts from: a key prefix no other test uses, seeded with
/// objects, optionally reached through a [`Proxy`] the test can cut, and a cellar serving it.
///
/// ```ignore
/// let app = App::s3("narinfo").seed_dir(&f.xz_dir).spawn().await;
/// let srv = &app.srv;
/// ```
pub struct App {
    pub srv: Server,
    pub s3: S3Env,
    /// The key prefix in the bucket (ends in `/`).
    pub prefix: String,
    proxy: Option<Proxy>,
}

/// How to set up an [`App`]: see [`App::s3`].
pub struct AppBuilder {
    s3: S3Env,
    prefix: String,
    proxy: bool,
    seeds: Vec<Seed>,
    config: String,
    env: Vec<(String, String)>,
}

enum Seed {
    Dir(PathBuf),
    Object(String, Vec<u8>),
}

impl App {
    /// An app over a fresh prefix named after `name`, in the Garage that `scripts/test` started.
    pub fn s3(name: &str) -> AppBuilder {
        AppBuilder {
            s3: s3_env(),
            prefix: unique_prefix(name),
            proxy: false,
            seeds: Vec::new(),
            config: String::new(),
            env: Vec::new(),
        }
    }

    /// The proxy between cellar and S3; only for apps built with
    /// [`through_proxy`](AppBuilder::through_proxy).
    pub fn proxy(&self) -> &Proxy {
        self.proxy
            .as_ref()
            .expect("this app was not built with .through_proxy()")
    }

    /// The `CELLAR_STORE__*` env for this prefix, straight to S3: for commands run against it
    /// beside the server (`cellar import`, `cellar gc`).
    pub fn direct_store_env(&self) -> Vec<(String, String)> {
        store_env(&self.s3, None, &self.prefix)
    }

    /// One more cellar over the same prefix (and proxy), with only `env` added.
    pub async fn another_server(&self, env: &[(&str, &str)]) -> Server {
        let mut all = store_env(&self.s3, self.proxy.as_ref(), &self.prefix);
        all.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        start_off_runtime(String::new(), all).await
    }
}

/// The `CELLAR_STORE__*` env for `prefix`, through `proxy` if there is one.
fn store_env(s3: &S3Env, proxy: Option<&Proxy>, prefix: &str) -> Vec<(String, String)> {
    let endpoint = proxy.map_or_else(|| s3.endpoint.clone(), Proxy::url);
    s3_store_env(s3, &endpoint, prefix)
}

impl AppBuilder {
    /// Cellar reaches S3 through a [`Proxy`] (see [`App::proxy`]); seeding does not.
    pub fn through_proxy(mut self) -> Self {
        self.proxy = true;
        self
    }

    /// Uploads the files under `dir` (a `nix copy --to file://` cache) before cellar starts.
    pub fn seed_dir(mut self, dir: &Path) -> Self {
        self.seeds.push(Seed::Dir(dir.to_owned()));
        self
    }

    /// Puts one object at `key` (relative to the prefix) before cellar starts.
    pub fn seed(mut self, key: impl Into<String>, data: impl Into<Vec<u8>>) -> Self {
        self.seeds.push(Seed::Object(key.into(), data.into()));
        self
    }

    /// The server's config file.
    pub fn config(mut self, toml: &str) -> Self {
        toml.clone_into(&mut self.config);
        self
    }

    /// One more `CELLAR_*` variable (overrides the config file).
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.to_owned(), value.into()));
        self
    }

    /// The `CELLAR_STORE__*` env for this prefix, straight to S3: for commands run against it
    /// before the server starts (`cellar import`).
    pub fn direct_store_env(&self) -> Vec<(String, String)> {
        store_env(&self.s3, None, &self.prefix)
    }

    /// Seeds the prefix, then starts cellar over it.
    pub async fn spawn(self) -> App {
        for seed in self.seeds {
            match seed {
                Seed::Dir(dir) => s3_upload_dir(&self.s3, &self.prefix, &dir).await,
                Seed::Object(key, data) => {
                    s3_put(&self.s3, &format!("{}{key}", self.prefix), data).await;
                }
            }
        }
        let proxy = if self.proxy {
            Some(Proxy::start(&self.s3.endpoint).await)
        } else {
            None
        };
        let mut env = store_env(&self.s3, proxy.as_ref(), &self.prefix);
        env.extend(self.env);
        let srv = start_off_runtime(self.config, env).await;
        App {
            srv,
            s3: self.s3,
            prefix: self.prefix,
            proxy,
        }
    }
}

/// [`Server::start_with_config`] on a blocking thread: it waits for the child's first line,
/// and the runtime's workers are needed meanwhile (e.g. by a [`Proxy`] the server starts
/// through).
async fn start_off_runtime(config: String, env: Vec<(String, String)>) -> Server {
    tokio::task::spawn_blocking(move || Server::start_with_config(&config, env))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

// ---------------------------------------------------------------------------------------------
// The real nix client

/// A `nix`-family command that uses the local store and a fresh narinfo cache
/// (`XDG_CACHE_HOME`), so no test sees another's cached lookups.
pub fn nix(program: &str, cache: &Path) -> Command {
    let mut c = Command::new(program);
    c.env("NIX_REMOTE", "")
        .env("XDG_CACHE_HOME", cache)
        .env("XDG_CONFIG_HOME", cache)
        .env_remove("NIX_PATH");
    c
}

/// A signing key made by the real nix (`nix key generate-secret`), written to `sec`; its
/// public half, as `trusted-public-keys` and `upload.trusted_keys` take it.
pub fn nix_key(name: &str, sec: &Path, xdg: &Path) -> String {
    let mut k = nix("nix", xdg);
    k.args(["key", "generate-secret", "--key-name", name]);
    std::fs::write(sec, run_ok(k)).unwrap();
    let mut p = nix("nix", xdg);
    p.args(["key", "convert-secret-to-public"])
        .stdin(std::fs::File::open(sec).unwrap());
    run_ok(p).trim().to_owned()
}

/// A certificate authority of the test's own (`ca.pem`) and a certificate it signs for
/// `localhost` (`cert.pem`, key `key.pem`), written to `dir`: their paths, in that order.
pub fn tls_certs(dir: &Path) -> (String, String, String) {
    let at = |name: &str| dir.join(name).display().to_string();
    let (ca, cert, key) = (at("ca.pem"), at("cert.pem"), at("key.pem"));
    std::fs::write(
        at("leaf.ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for args in [
        &[
            "req",
            "-x509",
            "-days",
            "1",
            "-subj",
            "/CN=cellar test CA",
            "-keyout",
            &at("ca.key"),
            "-out",
            &ca,
        ][..],
        &[
            "req",
            "-subj",
            "/CN=localhost",
            "-keyout",
            &key,
            "-out",
            &at("leaf.csr"),
        ],
    ] {
        let mut openssl = std::process::Command::new("openssl");
        openssl.args(&args[..1]).args(ec).args(&args[1..]);
        run_ok(openssl);
    }
    let mut sign = std::process::Command::new("openssl");
    sign.args([
        "x509",
        "-req",
        "-days",
        "1",
        "-in",
        &at("leaf.csr"),
        "-CA",
        &ca,
    ])
    .args([
        "-CAkey",
        &at("ca.key"),
        "-CAcreateserial",
        "-extfile",
        &at("leaf.ext"),
    ])
    .args(["-out", &cert]);
    run_ok(sign);
    (ca, cert, key)
}

pub fn run_ok(mut cmd: Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn run(mut cmd: Command) -> Output {
    cmd.output().unwrap()
}

/// A closure built by the real nix (no nixpkgs: `/bin/sh` builders), copied into `file://`
/// caches (xz and zstd), unsigned, with a build log.
pub struct Fixture {
    /// The top store path; its closure is everything below.
    pub top: String,
    /// Every path of the closure.
    pub closure: Vec<String>,
    /// `nix copy --to file://` with the default compression (xz).
    pub xz_dir: PathBuf,
    /// `nix copy --to 'file://…?compression=zstd&write-nar-listing=true'`.
    pub zstd_dir: PathBuf,
    /// The derivation of `top` (for `log/<drv>`).
    pub top_drv: String,
    pub root: PathBuf,
}

impl Fixture {
    pub fn basename(path: &str) -> &str {
        path.rsplit('/').next().unwrap()
    }
    pub fn hash(path: &str) -> &str {
        &Self::basename(path)[..32]
    }
}

pub fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(build_fixture)
}

fn build_fixture() -> Fixture {
    // Under cargo's per-target temp dir; earlier runs' fixtures are removed (cargo runs test
    // binaries one after another, so none is in use).
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    if let Ok(rd) = std::fs::read_dir(base) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with("nix-fixture-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let root = base.join(format!("nix-fixture-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    let cache = root.join("xdg");
    let expr = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/closure.nix");
    let mut b = nix("nix-build", &cache);
    b.arg(&expr).args(["-A", "top", "--no-out-link"]);
    let top = run_ok(b).trim().to_owned();
    let mut q = nix("nix-store", &cache);
    q.args(["-qR", &top]);
    let closure: Vec<String> = run_ok(q).lines().map(str::to_owned).collect();
    let mut d = nix("nix-store", &cache);
    d.args(["-q", "--deriver", &top]);
    let top_drv = run_ok(d).trim().to_owned();

    let xz_dir = root.join("cache-xz");
    let zstd_dir = root.join("cache-zstd");
    let mut c = nix("nix", &cache);
    c.args([
        "copy",
        "--to",
        &format!("file://{}", xz_dir.display()),
        &top,
    ]);
    run_ok(c);
    let mut c = nix("nix", &cache);
    c.args([
        "copy",
        "--to",
        &format!(
            "file://{}?compression=zstd&write-nar-listing=true",
            zstd_dir.display()
        ),
        &top,
    ]);
    run_ok(c);
    let mut l = nix("nix", &cache);
    l.args([
        "store",
        "copy-log",
        "--to",
        &format!("file://{}", xz_dir.display()),
        &top,
    ]);
    run_ok(l);
    Fixture {
        top,
        closure,
        xz_dir,
        zstd_dir,
        top_drv,
        root,
    }
}

/// The sum of the samples of `metric` (e.g. `cellar_store_requests_total`) on `srv`'s /metrics
/// whose labels contain each of `labels` (e.g. `op="GetObject"`); for a metric without labels
/// (a gauge such as `cellar_uploads_waiting`), its value.
pub async fn metric_sum(srv: &Server, metric: &str, labels: &[&str]) -> f64 {
    let text = reqwest::get(format!("{}/metrics", srv.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let (labelled, bare) = (format!("{metric}{{"), format!("{metric} "));
    text.lines()
        .filter(|l| l.starts_with(&labelled) || l.starts_with(&bare))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// `promtool check metrics` (from Debian's prometheus package) accepts the file.
pub fn promtool_accepts(file: &std::path::Path) {
    let out = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(file).unwrap())
        .output()
        .expect("promtool (Debian's prometheus package; scripts/test installs it)");
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
