//! `/metrics` after real traffic (uploads with the real nix client, substitution, refusals)
//! against Garage: the counters move as they should, a real Prometheus scrapes them, and the
//! log of the whole run holds request ids but no secret (token, signing key, S3 secret) and no
//! terminal escape codes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The samples of an OpenMetrics page: `name{labels}` → value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

/// The sum of every sample of `name` whose labels contain all of `labels` (`k="v"` each).
fn sum(s: &HashMap<String, f64>, name: &str, labels: &[&str]) -> f64 {
    s.iter()
        .filter(|(k, _)| k.starts_with(&format!("{name}{{")) || *k == name)
        .filter(|(k, _)| labels.iter().all(|l| k.contains(l)))
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn counters_follow_traffic_and_prometheus_scrapes_them() {
    let f = fixture();
    let (w, wcfg) = token("builder", "write");
    let work = tempfile::tempdir().unwrap();
    let nar_dir = work.path().join("nar-cache");
    let app = App::s3("metrics")
        .config(&wcfg)
        .env("CELLAR_CACHE__NAR_DIR", nar_dir.to_str().unwrap())
        .spawn()
        .await;
    let srv = &app.srv;

    // Uploads through the real client to the upload address, as the README sets builders
    // up, then a substitution (narinfos and NARs read back).
    let netrc = netrc(work.path(), srv, &w);
    let mut up = nix("nix", &work.path().join("xdg-up"));
    let upload = format!("{}/upload", srv.url);
    up.args(["copy", "--to", &upload, "--option", "netrc-file"])
        .arg(&netrc)
        .arg(&f.top);
    run_ok(up);
    substitute_and_verify(&srv.url, &srv.public_key, &f.top, &work.path().join("sub"));

    let client = reqwest::Client::new();
    // The prefetches the substitution started all end (what a benchmark waits for before it
    // measures a warm copy): the gauge comes back to 0.
    let pending = || async {
        let text = client
            .get(format!("{}/metrics", srv.url))
            .send()
            .await
            .unwrap();
        sum(
            &samples(&text.text().await.unwrap()),
            "cellar_prefetches_pending",
            &[],
        )
    };
    let settled = async {
        while pending().await != 0.0 {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), settled)
        .await
        .expect("prefetches still pending a minute after the substitution");
    // A refused upload: a narinfo whose NAR is not there.
    let h = Fixture::hash(&f.top);
    let bogus = format!(
        "StorePath: /nix/store/{h}-x\nURL: nar/{}.nar\nCompression: none\nNarHash: sha256:{}\nNarSize: 1\nReferences:\n",
        "1".repeat(52),
        "1".repeat(52)
    );
    let res = client
        .put(format!("{upload}/{}.narinfo", "0".repeat(32)))
        .basic_auth("builder", Some(&w))
        .header("X-Request-Id", "refused-upload-1")
        .body(bogus)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(res.headers()["x-request-id"], "refused-upload-1");
    // A path nobody has, twice: a miss, then a remembered miss.
    for _ in 0..2 {
        let res = client
            .get(format!("{}/{}.narinfo", srv.url, "a".repeat(32)))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 404);
        assert_eq!(res.headers()["x-request-id"].len(), 16, "a generated id");
    }

    // As Prometheus scrapes: asking for OpenMetrics first.
    let page = client
        .get(format!("{}/metrics", srv.url))
        .header(
            "Accept",
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
             version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
        )
        .send()
        .await
        .unwrap();
    assert!(page.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let text = page.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
    // Asked for nothing in particular (curl, promtool, older agents): the Prometheus text
    // format, which the real promtool accepts.
    let page = client
        .get(format!("{}/metrics", srv.url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        page.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let scraped = tempfile::tempdir().unwrap();
    let file = scraped.path().join("metrics.txt");
    std::fs::write(&file, page.text().await.unwrap()).unwrap();
    promtool_accepts(&file);
    let s = samples(&text);
    let n = f.closure.len() as f64;
    let c = |name: &str, labels: &[&str]| sum(&s, name, labels);

    // Every path of the closure was uploaded (NAR then narinfo) and accepted; one refused.
    assert_eq!(
        c(
            "cellar_uploads_total",
            &[r#"kind="narinfo""#, r#"verdict="accepted""#]
        ),
        n,
        "{text}"
    );
    assert_eq!(
        c(
            "cellar_uploads_total",
            &[r#"kind="nar""#, r#"verdict="accepted""#]
        ),
        n
    );
    assert_eq!(c("cellar_uploads_total", &[r#"verdict="rejected""#]), 1.0);
    assert!(c("cellar_http_request_bytes_total", &[r#"route="nar""#]) > 0.0);
    assert!(c("cellar_http_response_bytes_total", &[r#"route="nar""#]) > 0.0);
    assert!(
        c(
            "cellar_http_requests_total",
            &[r#"route="narinfo""#, r#"method="GET""#, r#"status="2xx""#]
        ) >= n
    );
    assert!(
        c(
            "cellar_http_requests_total",
            &[r#"route="narinfo""#, r#"status="4xx""#]
        ) >= 2.0
    );
    // Lookups and uploads timed apart.
    assert!(
        c(
            "cellar_http_request_duration_seconds_count",
            &[r#"route="nar""#, r#"method="GET""#]
        ) >= n
    );
    assert!(
        c(
            "cellar_http_request_duration_seconds_count",
            &[r#"route="nar""#, r#"method="PUT""#]
        ) >= 1.0
    );
    // The caches: the missing path was a miss, then answered from memory. Each NAR GET is a
    // lookup in the cache that would hold its NAR: memory for the small ones (their narinfos
    // were read), the disk for the large one; a small one missing in memory is then looked up
    // on disk too. The prefetches that loaded them ahead are no lookups.
    assert!(
        c(
            "cellar_cache_lookups_total",
            &[r#"layer="narinfo_memory""#, r#"result="negative_hit""#]
        ) >= 1.0
    );
    assert!(
        c(
            "cellar_cache_lookups_total",
            &[r#"layer="narinfo_memory""#, r#"result="miss""#]
        ) >= 1.0
    );
    let disk = |result: &str| {
        c(
            "cellar_cache_lookups_total",
            &[r#"layer="nar_disk""#, &format!(r#"result="{result}""#)],
        )
    };
    let memory = |result: &str| {
        c(
            "cellar_cache_lookups_total",
            &[r#"layer="nar_memory""#, &format!(r#"result="{result}""#)],
        )
    };
    let gets = c(
        "cellar_http_requests_total",
        &[r#"route="nar""#, r#"method="GET""#],
    );
    assert!(gets >= n, "{text}");
    let on_disk = disk("hit") + disk("miss") + disk("bypass");
    assert!(memory("hit") + memory("miss") + on_disk >= gets, "{text}");
    assert!(
        memory("hit") + on_disk <= gets + memory("miss"),
        "lookups no client made: {text}"
    );
    // A hit when the prefetch its narinfo started filled the disk before the client asked, a
    // miss (joining that fill) when not: both happen.
    assert!(disk("hit") + disk("miss") >= 1.0, "the large NAR: {text}");
    // What each cache holds now, within its budget: the closure's narinfos in memory, its
    // large NAR on disk.
    let held = |what: &str, layer: &str| c(what, &[&format!(r#"layer="{layer}""#)]);
    assert!(
        held("cellar_cache_entries", "narinfo_memory") >= n,
        "{text}"
    );
    assert!(held("cellar_cache_entries", "nar_disk") >= 1.0, "{text}");
    for layer in ["narinfo_memory", "nar_memory", "nar_disk"] {
        let bytes = held("cellar_cache_bytes", layer);
        assert!(bytes > 0.0, "{layer}: {text}");
        assert!(
            bytes <= held("cellar_cache_max_bytes", layer),
            "{layer}: {text}"
        );
    }
    // What the uploads left to remember, still relied on this soon after them.
    assert!(c("cellar_upload_memory_entries", &[]) >= n, "{text}");
    // S3: objects were written and read, and each call timed.
    assert!(c("cellar_store_requests_total", &[r#"result="ok""#]) > 0.0);
    assert!(c("cellar_store_requests_total", &[r#"op="GetObject""#]) > 0.0);
    assert!(c("cellar_store_request_duration_seconds_count", &[]) > 0.0);
    assert_eq!(
        c(
            "cellar_build_info",
            &[
                r#"store="s3""#,
                &format!(r#"version="{}""#, env!("CARGO_PKG_VERSION"))
            ]
        ),
        1.0
    );
    // No hash or path in any label.
    assert!(!text.contains(h), "a store path hash in a label");

    scrape_with_prometheus(srv, work.path());

    // The whole run's log: request ids, no secrets, no escape codes.
    let log = srv.log();
    let s3 = s3_env();
    let secret_key = std::fs::read_to_string(srv.dir.path().join("cellar-test.sec")).unwrap();
    let secret_key = secret_key.trim();
    assert!(!log.contains(&w), "the token is in the log");
    assert!(
        !log.contains(secret_key.split_once(':').unwrap().1),
        "the signing key is in the log"
    );
    assert!(!log.contains(&s3.secret), "the S3 secret is in the log");
    assert!(!log.contains('\u{1b}'), "escape codes in a log file");
    // The refused upload's line names the token, not the token itself, and the request.
    let refused = log
        .lines()
        .find(|l| l.contains("upload rejected"))
        .unwrap_or_else(|| panic!("no rejection logged:\n{log}"));
    assert!(refused.contains("request{id=refused-upload-1"), "{refused}");
    assert!(refused.contains("upload{token=builder}"), "{refused}");
}

/// Runs the real Prometheus against `srv` and waits (bounded) until it has scraped it.
fn scrape_with_prometheus(srv: &Server, work: &std::path::Path) {
    let dir = work.join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: cellar\n    static_configs:\n      - targets: [\"{}\"]\n",
            srv.addr
        ),
    )
    .unwrap();
    let mut prom = Command::new("prometheus")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg("--web.listen-address=127.0.0.1:0")
        .stderr(Stdio::piped())
        .spawn()
        .expect("prometheus (Debian's `prometheus` package; scripts/test installs it)");
    // Its log says which port it got. The reader keeps draining the log afterwards: a Go
    // program writing to a closed stderr dies of SIGPIPE.
    let stderr = prom.stderr.take().unwrap();
    let _prom = KillOnDrop(prom);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(r#"msg="Listening on""#) {
                if let Some((_, a)) = line.rsplit_once("address=") {
                    let _ = tx.send(a.trim().to_owned());
                }
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("prometheus did not say where it listens");
    let query = |q: &str| -> serde_json::Value {
        let url = format!("http://{addr}/api/v1/query");
        let out = Command::new("curl")
            .args(["-fsS", "--get", "--data-urlencode"])
            .arg(format!("query={q}"))
            .arg(url)
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    };
    // Prometheus has no "scraped" event to wait for: ask until the series is there, bounded.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = query(r#"up{job="cellar"}"#);
        let uploads = query(r#"sum(cellar_uploads_total{verdict="rejected"})"#);
        let value = |v: &serde_json::Value| {
            v["data"]["result"][0]["value"][1]
                .as_str()
                .map(str::to_owned)
        };
        if value(&up).as_deref() == Some("1") && value(&uploads).as_deref() == Some("1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus did not scrape cellar: up = {up}, uploads = {uploads}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Stops Prometheus however the test ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
