"""Scaling curves for keys (issue 13): on the embedded store and on Redis, with 10, 1,000,
100,000 and 1,000,000 keys (added by `POST /admin/keys:import`, digests only), measures

  - the import rate, and the store's size (the SQLite file, Redis `used_memory`);
  - start-up of `audiolib serve` to the first /readyz 200, and its RSS once started;
  - /v1/audio with one hot key (cache hits) and the first call of 200 keys never called since
    the start (cache misses: one store read each);
  - /v1/audio over 50,000 distinct keys with the key cache capped at 10,000 (misses all the
    time), and the RSS after it: memory bounded by the cache, not by the key count;
  - `GET /admin/keys?limit=100`: the first page and a page from the middle (a cursor);
  - one account per ten keys (up to 100,000), made by `POST /admin/accounts` from 16 clients
    at once, and `GET /admin/accounts?limit=100` the same way,

then rewrites the keys part of docs/scaling.md and draws docs/scaling-keys.svg. Run through
scripts/scale (which builds first) or `scripts/scale --keys`.
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale import (ADMIN_TOKEN, RELEASE, ROOT, free_port, get, loadavg, machine, panel, poll,  # noqa: E402
                   rewrite_section, rss_mib, wrk_script)

SIZES = [10, 1_000, 100_000, 1_000_000]
BATCH = 10_000
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
BODY = json.dumps({"library": "audio.focus"})
ALNUM = string.ascii_letters + string.digits


def secret(i):
    """A valid key, the same for the same index: alp_ and 32 letters or digits."""
    rnd = random.Random(i)
    return "alp_" + "".join(rnd.choice(ALNUM) for _ in range(32))


def import_keys(admin, start, end):
    """Imports keys start..end; returns the ids in order."""
    ids = []
    for lo in range(start, end, BATCH):
        items = []
        for i in range(lo, min(end, lo + BATCH)):
            s = secret(i)
            items.append({"digest": hashlib.sha256(s.encode()).hexdigest(), "prefix": s[:8],
                          "name": f"scale {i}", "plan": "unlimited"})
        status, data = get(admin, "/admin/keys:import", "POST", json.dumps({"keys": items}), AUTH)
        assert status == 201, data[:300]
        ids += json.loads(data)["ids"]
    return ids


def create_accounts(admin, start, end, clients=16):
    """Creates accounts start..end from `clients` threads; returns their ids in creation order
    (by the ids the answers carry, sorted as the store lists them is not needed)."""
    import concurrent.futures
    import http.client

    def make(lo, hi):
        c = http.client.HTTPConnection("127.0.0.1", admin, timeout=30)
        ids = []
        for i in range(lo, hi):
            body = json.dumps({"email": f"scale{i}@example.com", "name": f"Scale {i}"})
            c.request("POST", "/admin/accounts", body=body, headers=AUTH)
            r = c.getresponse()
            data = r.read()
            assert r.status == 201, data[:300]
            ids.append(json.loads(data)["id"])
        c.close()
        return ids

    step = max(1, (end - start + clients - 1) // clients)
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        parts = list(pool.map(lambda lo: make(lo, min(end, lo + step)), range(start, end, step)))
    return [i for part in parts for i in part]


def wrk(port, work, keys, duration, connections):
    """req/s, p99 ms and non-2xx of /v1/audio rotating over `keys`."""
    script = os.path.join(work, "keys.lua")
    with open(script, "w") as f:
        f.write("keys = {" + ",".join(json.dumps(k) for k in keys) + "}\n")
        f.write(f"body = {json.dumps(BODY)}\n")
        f.write("""
i = 0
request = function()
  i = i + 1
  return wrk.format("POST", "/v1/audio",
    {["Authorization"] = "Bearer " .. keys[(i % #keys) + 1], ["Content-Type"] = "application/json"}, body)
end
""")
    return wrk_script(port, script, duration, connections)


def timed(fn, n):
    """Median and worst of n timed calls of fn, in ms."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return times[len(times) // 2], times[-1]


class Gateway:
    def __init__(self, work, store_env, cache_conf=None):
        self.port, self.admin = free_port(), free_port()
        self.env = {
            "PATH": os.environ["PATH"], "RUST_LOG": "warn",
            "AUDIOLIB_LISTEN": f"127.0.0.1:{self.port}", "AUDIOLIB_ADMIN_LISTEN": f"127.0.0.1:{self.admin}",
            "AUDIOLIB_ADMIN_TOKEN": ADMIN_TOKEN, "AUDIOLIB_THREADS": "2",
            "AUDIOLIB_CATALOG_DIR": os.path.join(ROOT, "catalog"), "AUDIOLIB_CATALOG_WATCH": "false",
            "AUDIOLIB_S3_BUCKET": "audiolib-media", "AUDIOLIB_UPGRADE_SOCK": os.path.join(work, "up.sock"),
            "AUDIOLIB_PORTAL_LISTEN": f"127.0.0.1:{free_port()}",
            "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
            "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            **store_env,
        }
        self.work, self.cache_conf = work, cache_conf

    def start(self):
        args = [os.path.join(RELEASE, "audiolib"), "serve"]
        if self.cache_conf:
            args += ["--config", self.cache_conf]
        started = time.monotonic()
        self.proc = subprocess.Popen(args, env=self.env, cwd=self.work,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ready = poll("/readyz", lambda: get(self.port, "/readyz")[0] == 200)
        return ready - started

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(30)


def redis_server(work):
    port = free_port()
    data = os.path.join(work, "redis")
    os.makedirs(data)
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", data,
                             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    poll("redis", lambda: subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True,
                                         text=True).stdout.strip() == "PONG")
    return proc, port


def redis_memory_mib(port):
    info = subprocess.run(["redis-cli", "-p", str(port), "info", "memory"], capture_output=True, text=True).stdout
    for line in info.splitlines():
        if line.startswith("used_memory:"):
            return int(line.split(":")[1]) / 2**20
    return 0.0


def measure_store(store, work, args):
    rows = []
    redis = None
    if store == "redis":
        redis, rport = redis_server(work)
        env = {"AUDIOLIB_REDIS_URL": f"redis://127.0.0.1:{rport}"}
    else:
        env = {"AUDIOLIB_DATA_DIR": os.path.join(work, "data")}
    cache_conf = os.path.join(work, "small-cache.toml")
    with open(cache_conf, "w") as f:
        f.write("[key_cache]\ncapacity = 10000\n")
    gw = Gateway(work, env)
    small = Gateway(work, env, cache_conf)
    try:
        gw.start()
        have, ids, accounts = 0, [], []
        for n in [s for s in SIZES if s <= args.max_keys]:
            t = time.monotonic()
            ids += import_keys(gw.admin, have, n)
            took = time.monotonic() - t
            row = {"store": store, "keys": n, "import_keys_per_s": (n - have) / took if n > have else 0}
            t = time.monotonic()
            want = max(1, n // 10)
            accounts += create_accounts(gw.admin, len(accounts), want)
            row["accounts"] = want
            row["accounts_per_s"] = want / (time.monotonic() - t)
            have = n
            gw.stop()
            if store == "redis":
                row["store_mib"] = redis_memory_mib(rport)
            else:
                db = os.path.join(work, "data", "audiolib.db")
                row["store_mib"] = sum(os.path.getsize(db + x) for x in ("", "-wal") if os.path.exists(db + x)) / 2**20
            row["ready_s"] = gw.start()
            row["rss_start_mib"] = rss_mib(gw.proc.pid)
            cold = [secret(random.randrange(n)) for _ in range(min(200, n))]
            first = []
            for k in cold:
                t = time.perf_counter()
                status, _ = get(gw.port, "/v1/audio", "POST", BODY,
                                {"Authorization": f"Bearer {k}", "Content-Type": "application/json"})
                first.append((time.perf_counter() - t) * 1000)
                assert status == 200, status
            first.sort()
            row["cold_p50_ms"], row["cold_p99_ms"] = first[len(first) // 2], first[int(len(first) * 0.99) - 1]
            row["hot_rps"], row["hot_p99_ms"], row["hot_non2xx"] = wrk(
                gw.port, work, [secret(0)], args.duration, args.connections)
            row["list_first_ms"], _ = timed(lambda: get(gw.admin, "/admin/keys?limit=100", headers=AUTH), 20)
            middle = ids[len(ids) // 2]
            row["list_middle_ms"], _ = timed(
                lambda: get(gw.admin, f"/admin/keys?limit=100&cursor={middle}", headers=AUTH), 20)
            row["accounts_first_ms"], _ = timed(lambda: get(gw.admin, "/admin/accounts?limit=100", headers=AUTH), 20)
            middle = accounts[len(accounts) // 2]
            row["accounts_middle_ms"], _ = timed(
                lambda: get(gw.admin, f"/admin/accounts?limit=100&cursor={middle}", headers=AUTH), 20)
            row["rss_after_mib"] = rss_mib(gw.proc.pid)
            gw.stop()
            # Many distinct keys through a cache of 10,000: memory stays the cache's.
            small.start()
            spread = [secret(i) for i in range(min(n, 50_000))]
            row["churn_rps"], row["churn_p99_ms"], row["churn_non2xx"] = wrk(
                small.port, work, spread, args.duration, args.connections)
            row["rss_churn_mib"] = rss_mib(small.proc.pid)
            small.stop()
            gw.start()
            print(json.dumps(row), file=sys.stderr)
            rows.append(row)
        gw.stop()
    finally:
        for g in (gw, small):
            if getattr(g, "proc", None) and g.proc.poll() is None:
                g.proc.kill()
        if redis:
            redis.kill()
    return rows


def svg(rows):
    stores = sorted({r["store"] for r in rows})
    charts = [
        ("start → /readyz 200", "seconds", [("ready_s", "")], lambda v: f"{v:g}"),
        ("gateway RSS", "MiB", [("rss_after_mib", "hot"), ("rss_churn_mib", "50k keys, cache 10k")],
         lambda v: f"{v:g}"),
        ("/v1/audio throughput", "requests/s", [("hot_rps", "one key"), ("churn_rps", "50k keys")],
         lambda v: f"{v / 1000:g}k"),
        ("first call of a cold key", "ms (median)", [("cold_p50_ms", "")], lambda v: f"{v:g}"),
    ]
    parts = ['<svg xmlns="http://www.w3.org/2000/svg" width="1360" height="340" '
             'font-family="sans-serif" font-size="11">', '<rect width="100%" height="100%" fill="white"/>']
    # One colour per store and kind of run, the same in every panel.
    colours = {("embedded", 0): "#1f77b4", ("embedded", 1): "#d62728",
               ("redis", 0): "#2ca02c", ("redis", 1): "#9467bd"}
    for i, (title, unit, fields, fmt) in enumerate(charts):
        lines = [(colours[(store, j)], [(r["keys"], r[field]) for r in rows if r["store"] == store])
                 for store in stores for j, (field, _) in enumerate(fields)]
        parts += panel(i * 340, title, unit, lines, fmt, xlabel="keys")
    x = 80
    for (store, j), colour in colours.items():
        if store in stores:
            what = "one hot key" if j == 0 else "50k keys through a 10k cache"
            parts.append(f'<circle cx="{x}" cy="320" r="4" fill="{colour}"/>'
                         f'<text x="{x + 10}" y="324">{store}, {what}</text>')
            x += 260
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def table(rows, args, before, after):
    cpu, nproc, free = machine()
    import datetime
    lines = [
        f"Run of {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by `scripts/scale --keys`: "
        f"`nproc` = {nproc} ({cpu}); wrk `-t2 -c{args.connections} -d{args.duration}s` on the same cores; "
        f"gateway with 2 worker threads; Redis 7 on loopback without persistence; keys imported "
        f"{BATCH:,} per `POST /admin/keys:import`. Load average {before} before the run, {after} after: "
        f"compare within this run.",
        "",
        "| store | keys | accounts | import keys | create accounts | store size | start → /readyz | RSS at start | first call, cold key (p50 / p99) | one hot key req/s (p99) | keys page: first / middle | accounts page: first / middle | 50k keys, cache 10k: req/s (p99) | RSS after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['store']} | {r['keys']:,} | {r['accounts']:,} | {r['import_keys_per_s']:,.0f}/s | "
            f"{r['accounts_per_s']:,.0f}/s | {r['store_mib']:.1f} MiB | "
            f"{r['ready_s']:.2f} s | {r['rss_start_mib']:.1f} MiB | {r['cold_p50_ms']:.2f} / {r['cold_p99_ms']:.2f} ms | "
            f"{r['hot_rps']:,.0f} ({r['hot_p99_ms']:.2f} ms) | {r['list_first_ms']:.1f} / {r['list_middle_ms']:.1f} ms | "
            f"{r['accounts_first_ms']:.1f} / {r['accounts_middle_ms']:.1f} ms | "
            f"{r['churn_rps']:,.0f} ({r['churn_p99_ms']:.2f} ms) | {r['rss_churn_mib']:.1f} MiB |")
    lines += ["", "![start-up, memory, throughput and cold calls against the key count](scaling-keys.svg)", ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=5, help="seconds of each wrk run")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--max-keys", type=int, default=SIZES[-1], help="stop at this size, for a quick try")
    ap.add_argument("--stores", default="embedded,redis")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs"))
    ap.add_argument("--redraw", action="store_true", help="only redraw the picture from scaling-keys.json")
    args = ap.parse_args()
    if args.redraw:
        with open(os.path.join(args.out, "scaling-keys.json")) as f:
            rows = json.load(f)
        with open(os.path.join(args.out, "scaling-keys.svg"), "w") as f:
            f.write(svg(rows))
        return
    before = loadavg()
    rows = []
    for store in args.stores.split(","):
        work = tempfile.mkdtemp(prefix=f"audiolib-scale-keys-{store}-")
        try:
            rows += measure_store(store, work, args)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    with open(os.path.join(args.out, "scaling-keys.svg"), "w") as f:
        f.write(svg(rows))
    with open(os.path.join(args.out, "scaling-keys.json"), "w") as f:
        json.dump(rows, f, indent=1)
        f.write("\n")
    page = os.path.join(args.out, "scaling.md")
    rewrite_section(page, "keys", table(rows, args, before, loadavg()))
    print(f"wrote {page} and scaling-keys.svg", file=sys.stderr)


if __name__ == "__main__":
    main()
