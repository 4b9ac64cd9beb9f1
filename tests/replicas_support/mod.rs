//! Helpers for the replica tests: a 3-node Garage cluster (`scripts/garage-cluster.sh`), nginx
//! in front of several cellars as one upstream, one signing key and token shared by replicas,
//! and closures built with the real nix and laid out in the bucket.
#![allow(dead_code)]

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt as _;

use crate::common::{nix, run_ok, s3_put, s3_store_env, walk, S3Env, Server, CELLAR};

// ---------------------------------------------------------------------------------------------
// A 3-node Garage cluster, replication factor 3

pub struct Cluster {
    /// Node I's S3 endpoint.
    pub endpoints: Vec<String>,
    /// Bucket and credentials (`endpoint` is node 0's).
    pub s3: S3Env,
    dir: tempfile::TempDir,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/garage-cluster.sh")
}

impl Cluster {
    /// Starts three nodes on free ports with a fresh bucket and key; ready when it returns.
    /// A start that fails is tried again with fresh ports and state, three times in all (seen
    /// once in CI: a node aborted at start and its RPC port answered with another cluster's
    /// handshake: the script handed two nodes overlapping ports then, fixed since). The
    /// script stops the nodes of a failed start itself and prints their logs.
    pub fn start() -> Cluster {
        let mut tries = 0;
        let (dir, out) = loop {
            tries += 1;
            let dir = tempfile::tempdir().unwrap();
            let out = Command::new(script())
                .arg("start")
                .arg(dir.path().join("c"))
                .stderr(Stdio::inherit())
                .output()
                .unwrap();
            if out.status.success() || tries == 3 {
                break (dir, out);
            }
            eprintln!(
                "garage-cluster.sh start failed ({:?}); trying again",
                out.status
            );
        };
        assert!(
            out.status.success(),
            "garage-cluster.sh start, {tries} tries: {out:?}"
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let var = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("{k} missing from {text}"))
                .to_owned()
        };
        let endpoints: Vec<String> = var("S3_ENDPOINTS").split(',').map(str::to_owned).collect();
        assert_eq!(endpoints.len(), 3);
        let s3 = S3Env {
            endpoint: endpoints[0].clone(),
            bucket: var("S3_BUCKET"),
            key_id: var("AWS_ACCESS_KEY_ID"),
            secret: var("AWS_SECRET_ACCESS_KEY"),
        };
        Cluster { endpoints, s3, dir }
    }

    /// SIGKILLs node `i`.
    pub fn kill(&self, i: usize) {
        let st = Command::new(script())
            .arg("kill")
            .arg(self.dir.path().join("c"))
            .arg(i.to_string())
            .status()
            .unwrap();
        assert!(st.success(), "garage-cluster.sh kill {i}");
    }

    /// The `CELLAR_STORE__*` env for a cellar reaching the cluster at `endpoint` (a node or a
    /// proxy in front of one), under `prefix`, with the cluster's credentials.
    pub fn store_env(&self, endpoint: &str, prefix: &str) -> Vec<(String, String)> {
        let mut env = s3_store_env(&self.s3, endpoint, prefix);
        env.push(("CELLAR_STORE__ACCESS_KEY_ID".into(), self.s3.key_id.clone()));
        env.push((
            "CELLAR_STORE__SECRET_ACCESS_KEY".into(),
            self.s3.secret.clone(),
        ));
        env
    }

    /// Uploads every file of the `file://` cache `dir` under `prefix`, 16 at a time.
    pub async fn seed_dir(&self, prefix: &str, dir: &Path) {
        let files = walk(dir);
        futures::stream::iter(files)
            .map(|path| async move {
                let rel = path.strip_prefix(dir).unwrap().to_str().unwrap().to_owned();
                s3_put(
                    &self.s3,
                    &format!("{prefix}{rel}"),
                    std::fs::read(&path).unwrap(),
                )
                .await;
            })
            .buffer_unordered(16)
            .collect::<Vec<()>>()
            .await;
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .arg("stop")
            .arg(self.dir.path().join("c"))
            .status();
    }
}

// ---------------------------------------------------------------------------------------------
// Replicas: cellars sharing one signing key and one config

/// What replicas share: the signing key file, its public key, and a config file text.
pub struct Shared {
    pub key_file: PathBuf,
    pub public_key: String,
    pub config: String,
    _dir: tempfile::TempDir,
}

impl Shared {
    /// A fresh signing key; `config` for every replica.
    pub fn new(config: &str) -> Shared {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("replicas.sec");
        let out = Command::new(CELLAR)
            .args(["keygen", "cellar-replicas-1", "--out"])
            .arg(&key_file)
            .output()
            .unwrap();
        assert!(out.status.success(), "keygen: {out:?}");
        Shared {
            key_file,
            public_key: String::from_utf8(out.stdout).unwrap().trim().to_owned(),
            config: config.to_owned(),
            _dir: dir,
        }
    }

    /// A replica with `env` (its store) and the shared key and config.
    pub async fn replica(&self, mut env: Vec<(String, String)>) -> Server {
        env.push((
            "CELLAR_SIGNING__KEY_FILES".into(),
            self.key_file.to_str().unwrap().to_owned(),
        ));
        let config = self.config.clone();
        tokio::task::spawn_blocking(move || Server::start_with_config(&config, env))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }
}

// ---------------------------------------------------------------------------------------------
// nginx: one upstream of several cellars

/// The upstream and server blocks used, with `{servers}` and `{listen}` filled in. The same
/// snippet is in docs/deployment.md ("Several replicas").
const NGINX_HTTP: &str = r#"
    upstream cellar {
{servers}
        keepalive 16;
        keepalive_timeout 25s;
    }
    upstream cellar_upload {
        hash $remote_addr consistent;
{servers}
        keepalive 16;
        keepalive_timeout 25s;
    }
    server {
        listen {listen};
        client_max_body_size 0;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_set_header X-Request-Id $request_id;
        proxy_buffering off;
        proxy_request_buffering off;
        proxy_read_timeout 300s;
        proxy_send_timeout 300s;
        proxy_connect_timeout 2s;
        # A replica that refuses the connection or answers 502/503/504 (its store is
        # unreachable) gets the request retried on the next one. Only before anything was
        # sent to the client, and never for a PUT (not idempotent).
        proxy_next_upstream error timeout http_502 http_503 http_504;
        location / {
            proxy_pass http://cellar;
        }
        location /upload/ {
            proxy_pass http://cellar_upload;
            proxy_read_timeout 3600s;
        }
    }
"#;

pub struct Nginx {
    pub url: String,
    dir: tempfile::TempDir,
    child: Child,
}

fn nginx_bin() -> PathBuf {
    // Debian puts it in /usr/sbin, which a non-root PATH may lack.
    for d in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(d).join("nginx");
        if p.exists() {
            return p;
        }
    }
    let p = PathBuf::from("/usr/sbin/nginx");
    assert!(
        p.exists(),
        "nginx is not installed: run the tests with scripts/test, which installs it"
    );
    p
}

impl Nginx {
    /// nginx in the foreground (one process, `master_process off`) on a free port of
    /// 127.0.0.1, with every path in its own temporary directory, proxying to `servers`.
    pub fn start(servers: &[&Server]) -> Nginx {
        let upstream: String = servers
            .iter()
            .map(|s| format!("        server {} max_fails=1 fail_timeout=10s;\n", s.addr))
            .collect();
        Self::serving("http", |listen| {
            NGINX_HTTP
                .replace("{servers}", upstream.trim_end())
                .replace("{listen}", listen)
        })
    }

    /// nginx as [`Self::start`] runs it, with the `server` blocks `http` gives for the address
    /// to listen on (`127.0.0.1:<port>`), reached with `scheme`.
    pub fn serving(scheme: &str, http: impl Fn(&str) -> String) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        // nginx cannot bind port 0 and say which port it got: take a free one and retry on
        // the (rare) loss of the race for it.
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let listen = format!("127.0.0.1:{port}");
            let http = http(&listen);
            let conf = format!(
                r#"daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 1024; }}
http {{
    log_format replicas '$request_method $uri $status $body_bytes_sent range="$http_range" upstream="$upstream_addr" ustatus="$upstream_status" t=$msec rt=$request_time proto=$server_protocol';
    access_log {d}/access.log replicas;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
{http}
}}
"#
            );
            std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
            let mut child = Command::new(nginx_bin())
                .arg("-p")
                .arg(dir.path())
                .arg("-c")
                .arg(dir.path().join("nginx.conf"))
                .arg("-e")
                .arg(dir.path().join("error.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            // Ready when the port answers; a lost race for the port ends the process.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if TcpStream::connect(&listen).is_ok() {
                    return Nginx {
                        url: format!("{scheme}://{listen}"),
                        dir,
                        child,
                    };
                }
                if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "nginx did not start: {}",
            std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
        );
    }

    /// The access log: one line per request, written when it ends.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.access_log_path()).unwrap_or_default()
    }

    pub fn access_log_path(&self) -> std::path::PathBuf {
        self.dir.path().join("access.log")
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Closures built by the real nix

/// `nix-build tests/fixtures/closure.nix -A attr` (with `args`), and the path's closure.
pub fn build(attr: &str, args: &[&str], xdg: &Path) -> (String, Vec<String>) {
    let expr = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/closure.nix");
    let mut b = nix("nix-build", xdg);
    b.arg(&expr).args(["-A", attr, "--no-out-link"]).args(args);
    let top = run_ok(b).trim().to_owned();
    let mut q = nix("nix-store", xdg);
    q.args(["-qR", &top]);
    let closure = run_ok(q).lines().map(str::to_owned).collect();
    (top, closure)
}

/// `nix copy --to file://dir path` (xz, unsigned).
pub fn copy_to_dir(path: &str, dir: &Path, xdg: &Path) {
    let mut c = nix("nix", xdg);
    c.args(["copy", "--to", &format!("file://{}", dir.display()), path]);
    run_ok(c);
}
