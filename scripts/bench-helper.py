#!/usr/bin/env python3
"""Helpers for scripts/bench (standard library only).

  bench-helper.py free-port
  bench-helper.py s3-put DIR          upload every file under DIR to the bucket (key = relative
                                      path), SigV4-signed, on one keep-alive connection. Reads
                                      S3_ENDPOINT, S3_BUCKET, AWS_ACCESS_KEY_ID,
                                      AWS_SECRET_ACCESS_KEY, AWS_REGION.
  bench-helper.py latency FILE        FILE: curl -w '%{http_code} %{time_total} %{num_connects}'
                                      lines. Prints "p50_us p90_us mean_us count connects"; exits 1
                                      if any status is not 200.
  bench-helper.py throughput FILE NANOSECONDS
                                      FILE: curl -w '%{http_code} %{size_download}' lines. Prints
                                      MiB/s (total bytes / wall time); exits 1 on any non-200.
  bench-helper.py wrk FILE            FILE: wrk's output. Prints requests/s; exits 1 on errors.
  bench-helper.py table RESULTS META OUT
                                      RESULTS: "metric<TAB>server<TAB>value" lines (value a number
                                      or "failed"); META: markdown
                                      lines put under the table. Prints the report and writes OUT.
"""
import datetime
import hashlib
import hmac
import http.client
import os
import re
import socket
import statistics
import sys
import urllib.parse


def die(msg):
    print(f"bench-helper: {msg}", file=sys.stderr)
    sys.exit(1)


# --- S3 upload ---------------------------------------------------------------------------------

def sigv4_headers(method, host, path, payload_hash, key_id, secret, region):
    now = datetime.datetime.now(datetime.timezone.utc)
    amz_date, date = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    headers = {"host": host, "x-amz-content-sha256": payload_hash, "x-amz-date": amz_date}
    signed = ";".join(sorted(headers))
    canonical = "\n".join([
        method,
        urllib.parse.quote(path, safe="/-_.~"),
        "",
        "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)),
        signed,
        payload_hash,
    ])
    scope = f"{date}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    k = ("AWS4" + secret).encode()
    for part in (date, region, "s3", "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    sig = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={key_id}/{scope}, "
                                f"SignedHeaders={signed}, Signature={sig}")
    del headers["host"]
    return headers


def s3_put(root):
    env = os.environ
    url = urllib.parse.urlsplit(env["S3_ENDPOINT"])
    bucket, key_id, secret = env["S3_BUCKET"], env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    region = env.get("AWS_REGION", "us-east-1")
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    files = sorted(os.path.relpath(os.path.join(d, f), root)
                   for d, _, fs in os.walk(root) for f in fs)
    total = 0
    for rel in files:
        full = os.path.join(root, rel)
        h = hashlib.sha256()
        with open(full, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        size = os.path.getsize(full)
        path = f"/{bucket}/{rel}"
        headers = sigv4_headers("PUT", url.netloc, path, h.hexdigest(), key_id, secret, region)
        headers["content-length"] = str(size)
        with open(full, "rb") as f:
            conn.request("PUT", urllib.parse.quote(path, safe="/-_.~"), body=f, headers=headers)
            res = conn.getresponse()
            body = res.read()
        if res.status != 200:
            die(f"PUT {path}: HTTP {res.status}: {body[:300]!r}")
        total += size
    conn.close()
    print(f"{len(files)} objects, {total / 1048576:.1f} MiB")


# --- result parsing ----------------------------------------------------------------------------

def latency(path):
    times, connects = [], 0
    for line in open(path):
        parts = line.split()
        if not parts:
            continue
        if parts[0] != "200":
            die(f"{path}: a request answered HTTP {parts[0]}")
        times.append(float(parts[1]) * 1e6)
        connects += int(parts[2])
    if not times:
        die(f"{path}: no requests")
    times.sort()
    p90 = times[min(len(times) - 1, int(len(times) * 0.9))]
    print(f"{statistics.median(times):.0f} {p90:.0f} {statistics.fmean(times):.0f} "
          f"{len(times)} {connects}")


def throughput(path, nanos):
    total, n = 0, 0
    for line in open(path):
        parts = line.split()
        if not parts:
            continue
        if parts[0] != "200":
            die(f"{path}: a download answered HTTP {parts[0]}")
        total += int(parts[1])
        n += 1
    if n == 0:
        die(f"{path}: no downloads")
    print(f"{total / 1048576 / (int(nanos) / 1e9):.0f}")


def wrk(path):
    text = open(path).read()
    m = re.search(r"Requests/sec:\s*([0-9.]+)", text)
    if not m:
        die(f"{path}: no Requests/sec in wrk output:\n{text}")
    bad = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    if bad and int(bad.group(1)) > 0:
        die(f"{path}: {bad.group(1)} non-2xx answers:\n{text}")
    errs = re.search(r"Socket errors:.*", text)
    if errs:
        print(f"bench-helper: wrk {path}: {errs.group(0)}", file=sys.stderr)
    print(f"{float(m.group(1)):.0f}")


# --- the report --------------------------------------------------------------------------------

SERVERS = [("cellar-s3", "cellar (Garage)"), ("cellar-dir", "cellar (dir)"),
           ("nginx", "nginx"), ("python", "python http.server"), ("garage", "Garage direct"),
           ("bucket-web", "anonymous bucket")]
# (numerator, denominator, header)
RATIOS = [("cellar-s3", "nginx", "cellar (Garage) / nginx"),
          ("cellar-dir", "nginx", "cellar (dir) / nginx"),
          ("cellar-s3", "python", "cellar (Garage) / python"),
          ("cellar-s3", "garage", "cellar (Garage) / Garage direct"),
          ("cellar-s3", "bucket-web", "cellar (Garage) / anonymous bucket")]
# metric key -> (label, better): "lower" or "higher"
METRICS = [
    ("narinfo_cold", "narinfo latency, cold: µs p50, 1 keep-alive connection", "lower"),
    ("narinfo_hot", "narinfo latency, hot: µs p50, 1 keep-alive connection", "lower"),
    ("small_nar_cold", "small NAR (≤ 64 KiB) latency, cold: µs p50, 1 keep-alive connection", "lower"),
    ("small_nar_hot", "small NAR latency, hot: µs p50, 1 keep-alive connection", "lower"),
    ("small_nar_after_narinfo", "small NAR latency, right after its narinfo: µs p50", "lower"),
    ("narinfo_rps", "narinfo requests/s, wrk -c32 (python: see notes)", "higher"),
    ("nar_c1_cold", "NAR MiB/s, 1 at a time, cold", "higher"),
    ("nar_c1_warm", "NAR MiB/s, 1 at a time, warm", "higher"),
    ("nar_c4_cold", "NAR MiB/s, 4 parallel, cold", "higher"),
    ("nar_c4_warm", "NAR MiB/s, 4 parallel, warm", "higher"),
    ("nar_c16_cold", "NAR MiB/s, 16 parallel, cold", "higher"),
    ("nar_c16_warm", "NAR MiB/s, 16 parallel, warm", "higher"),
    ("nix_copy_cold", "`nix copy --from` whole closure, cold: s", "lower"),
    ("nix_copy_warm", "`nix copy --from` whole closure, warm: s", "lower"),
    ("rss_c16", "cellar peak RSS during 16 parallel NAR downloads: MiB", "lower"),
    ("rss_peak", "cellar peak RSS over the whole run: MiB", "lower"),
]
# slow S3, one group of rows per delay: metric@<ms>ms
DELAY_METRICS = [
    ("nix_copy_cold", "`nix copy --from` slow-S3 closure, cold @ +{d}ms: s", "lower"),
    ("nix_copy_warm", "`nix copy --from` slow-S3 closure, warm @ +{d}ms: s", "lower"),
    ("s3_requests_warm", "S3 requests during the warm copy @ +{d}ms", "lower"),
]


def metrics(keys):
    """The fixed rows, then the slow-S3 rows of every delay found in the results."""
    delays = sorted({int(m.group(1)) for k in keys if (m := re.search(r"@(\d+)ms$", k))})
    return METRICS + [(f"{key}@{d}ms", label.format(d=d), better)
                      for d in delays for key, label, better in DELAY_METRICS]


def fmt(v, whole=False):
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return f"**{v}**"
    if v >= 10 or whole:
        return f"{v:.0f}"
    return f"{v:.2f}"


def table(results_path, meta_path, out_path):
    values = {}
    for line in open(results_path):
        parts = line.rstrip("\n").split("\t")
        if len(parts) == 3:
            values[(parts[0], parts[1])] = parts[2] if parts[2] == "failed" else float(parts[2])
    head = ["metric", "better"] + [name for _, name in SERVERS] + [h for _, _, h in RATIOS]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "--:|" * (len(head) - 2)]
    for key, label, better in metrics({k for k, _ in values}):
        cells = [label, "↓" if better == "lower" else "↑"]
        cells += [fmt(values.get((key, s)), whole=key.startswith("s3_requests")) for s, _ in SERVERS]
        for num, den, _ in RATIOS:
            a, b = values.get((key, num)), values.get((key, den))
            ok = isinstance(a, float) and isinstance(b, float)
            cells.append(f"{a / b:.2f}×" if ok and b else "0 ÷ 0" if ok and not a else "n/a")
        rows.append("| " + " | ".join(cells) + " |")
    meta = open(meta_path).read() if meta_path and os.path.exists(meta_path) else ""
    report = "# cellar benchmark\n\n" + "\n".join(rows) + "\n\n" + meta
    with open(out_path, "w") as f:
        f.write(report)
    print(report, end="")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
    s.close()


def main():
    if len(sys.argv) < 2:
        die(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "free-port":
        free_port()
    elif cmd == "s3-put" and len(args) == 1:
        s3_put(args[0])
    elif cmd == "latency" and len(args) == 1:
        latency(args[0])
    elif cmd == "throughput" and len(args) == 2:
        throughput(*args)
    elif cmd == "wrk" and len(args) == 1:
        wrk(args[0])
    elif cmd == "table" and len(args) == 3:
        table(*args)
    else:
        die(__doc__)


if __name__ == "__main__":
    main()
