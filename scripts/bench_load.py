"""Load benchmark of the whole binary beside ceilings measured in the same run.

Targets (all on 127.0.0.1, 2 server threads each unless --threads):
  nginx          nginx answering the gateway's JSON with `return 200` (ceiling; `reuseport`, so
                 the kernel spreads connections over its workers, as for nginx-lua)
  nginx-lua      POST /v1/audio in Lua on nginx (LuaJIT, per-worker lrucache of keys, one Redis
                 INCR per request: the architecture of Kong and APISIX; scripts/nginx_lua/) on
                 the same Redis, with the embedded target's key
  pingora-fixed  examples/fixed_body: Pingora answering a fixed body from request_filter (ceiling)
  embedded       the gateway, embedded durable store (SQLite in a temp dir), one free-plan key
  NAME           with --baseline NAME=BIN (repeatable): another build of the gateway (an
                 earlier release) on its embedded store, one key: before/after comparisons
  NAME-passthrough  that build proxying the passthrough target's upstream
  redis-limited  the gateway on Redis, a free-plan key with a huge limit
  redis-unlimited the gateway on Redis, an unlimited key
  redis-10k      the gateway on Redis, 10,000 distinct keys in rotation
  redis-wait     the gateway on a Redis with one replica and WAIT 1 (every lease operation
                 confirmed on the replica before its units are used), a huge-limit key
  pingora-proxy  examples/plain_proxy in front of a small upstream (passthrough ceiling)
  passthrough    the gateway proxying the same upstream, given by host name (localhost:PORT,
                 resolved in the background)
  embedded-log   the embedded target with the access log on (text lines to a file)
  pingora-fixed-tls  examples/fixed_body over TLS, HTTP/1.1 keep-alive (TLS ceiling)
  embedded-tls   the gateway over TLS (HTTP/1.1 keep-alive), embedded store, one key
  pingora-fixed-h2   examples/fixed_body over TLS, HTTP/2 (h2load; HTTP/2 ceiling)
  embedded-h2    the gateway over TLS, HTTP/2 (h2load: -c connections, --h2-streams each)

Every target is driven with the same wrk settings, one after another within a round, for
several rounds; medians are reported, with each server's CPU time per answer (user + system
from /proc, nginx's workers included), which is steadier than req/s on a shared machine. Run
through scripts/bench-load, which builds first.
"""

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from nginx_lua import target as nginx_lua

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release")
ADMIN_TOKEN = "bench-admin-token-0123456789"
BODY = '{"library":"audio.focus"}'
# What every gateway target and nginx-lua sign with: the gateway's defaults (AWS S3 in
# us-east-1, virtual-host style, 3600 s) and a bucket and credentials of our choosing.
S3 = dict(endpoint="https://s3.us-east-1.amazonaws.com", bucket="audiolib-media",
          region="us-east-1", path_style=False, ttl=3600, access_key="AKIAIOSFODNN7EXAMPLE",
          secret_key="wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


class Procs:
    def __init__(self):
        self.all = []

    def start(self, args, **kw):
        p = subprocess.Popen(args, stdout=kw.pop("stdout", subprocess.DEVNULL),
                             stderr=kw.pop("stderr", subprocess.DEVNULL), **kw)
        self.all.append(p)
        return p

    def stop(self):
        for p in self.all:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in self.all:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


def cpu_ticks(pid):
    """User + system clock ticks of a process and its direct children (nginx's workers)."""
    def own(p):
        try:
            fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            return 0
        return int(fields[11]) + int(fields[12])
    total = own(pid)
    try:
        children = open(f"/proc/{pid}/task/{pid}/children").read().split()
    except OSError:
        children = []
    return total + sum(own(int(c)) for c in children)


TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")


def rss_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def admin(port, method, path, body=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request(method, path, body=json.dumps(body) if body is not None else None,
              headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"})
    r = c.getresponse()
    data = json.loads(r.read())
    c.close()
    return r.status, data


def create_keys(port, n, plan, limit="default"):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    keys = []
    for i in range(n):
        body = {"name": f"bench {i}", "plan": plan}
        if limit != "default":
            body["monthly_limit"] = limit
        c.request("POST", "/admin/keys", body=json.dumps(body),
                  headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"})
        r = c.getresponse()
        data = json.loads(r.read())
        if r.status != 201:
            raise SystemExit(f"key creation failed: {data}")
        keys.append(data["key"])
    c.close()
    return keys


def start_gateway(procs, work, name, threads, extra_env, upstream=None, binary=None, wrap=()):
    """The gateway on free ports, `wrap` (a command such as valgrind's) in front of it."""
    port, admin_port = free_port(), free_port()
    env = {
        "PATH": os.environ["PATH"],
        "RUST_LOG": "warn",
        "AUDIOLIB_LISTEN": f"127.0.0.1:{port}",
        "AUDIOLIB_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
        "AUDIOLIB_PORTAL_LISTEN": "127.0.0.1:0",  # any free port: the portal is not measured
        "AUDIOLIB_ADMIN_TOKEN": ADMIN_TOKEN,
        "AUDIOLIB_THREADS": str(threads),
        "AUDIOLIB_CATALOG_DIR": os.path.join(ROOT, "catalog"),
        "AUDIOLIB_S3_BUCKET": S3["bucket"],
        "AWS_ACCESS_KEY_ID": S3["access_key"],
        "AWS_SECRET_ACCESS_KEY": S3["secret_key"],
    }
    if upstream:
        env["AUDIOLIB_UPSTREAM"] = upstream
    env.update(extra_env)
    log = open(os.path.join(work, f"{name}.log"), "w")
    # Run from the work directory: a binary given relative to ours is made absolute first.
    binary = os.path.abspath(binary) if binary else os.path.join(RELEASE, "audiolib")
    p = procs.start([*wrap, binary, "serve"], env=env,
                    cwd=work, stdout=log, stderr=log)
    wait_port(port, timeout=120 if wrap else 30)
    wait_port(admin_port)
    return p, port, admin_port


def start_nginx(procs, work, workers, servers):
    """nginx with `servers` (server blocks) in its http block; its pid and log in `work`."""
    conf = os.path.join(work, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""
worker_processes {workers};
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx.err warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
{servers}
}}
""")
    return procs.start(["nginx", "-c", conf, "-p", work])


def wrk_script(work, name, keys, method="POST", body=BODY):
    path = os.path.join(work, f"{name}.lua")
    keyfile = os.path.join(work, f"{name}.keys")
    with open(keyfile, "w") as f:
        f.write("\n".join(keys) + "\n")
    with open(path, "w") as f:
        f.write(f"""
local keys = {{}}
for line in io.lines("{keyfile}") do keys[#keys + 1] = line end
local i = math.random(#keys)
local body = {json.dumps(body)}
request = function()
  i = i % #keys + 1
  return wrk.format("{method}", nil, {{["Authorization"] = "Bearer " .. keys[i],
    ["Content-Type"] = "application/json"}}, body)
end
""")
    return path


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def make_certificate(work):
    """A self-signed certificate for 127.0.0.1 (clients here do not verify it)."""
    cert, key = os.path.join(work, "cert.pem"), os.path.join(work, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def run_h2load(url, key, args, work):
    """HTTP/2 over TLS: h2load with -c connections and --h2-streams streams each. It reports
    no percentiles: p50 is its mean request time, p99 its mean + 2 standard deviations."""
    body = os.path.join(work, "h2body.json")
    with open(body, "w") as f:
        f.write(BODY)
    cmd = ["h2load", f"-t{args.wrk_threads}", f"-c{args.connections}", f"-m{args.h2_streams}",
           f"-D{args.duration}", "-d", body,
           "-H", f"authorization: Bearer {key}", "-H", "content-type: application/json", url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    m = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)", out)
    mean, sd = float(m.group(1)) * UNITS[m.group(2)], float(m.group(3)) * UNITS[m.group(4)]
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    done = re.search(r"requests: \d+ total, \d+ started, \d+ done, \d+ succeeded, (\d+) failed, (\d+) errored", out)
    non2xx = sum(int(codes.group(i)) for i in (2, 3, 4)) if codes else 0
    return {"rps": rps, "p50": mean, "p99": mean + 2 * sd, "non2xx": non2xx,
            "errors": f"failed {done.group(1)} errored {done.group(2)}" if done else ""}


def run_wrk(url, script, args):
    cmd = ["wrk", f"-t{args.wrk_threads}", f"-c{args.connections}", f"-d{args.duration}s",
           "--latency", "-s", script, url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {}
    for pct in ("50", "99"):
        m = re.search(rf"\s{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s)", out)
        lat[pct] = float(m.group(1)) * UNITS[m.group(2)]
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    non2xx = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "p50": lat["50"], "p99": lat["99"], "non2xx": non2xx,
            "errors": m.group(1) if m else ""}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--wrk-threads", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="server threads / nginx workers")
    ap.add_argument("--h2-streams", type=int, default=10,
                    help="concurrent streams per HTTP/2 connection (h2load -m)")
    ap.add_argument("--only", help="comma list of targets")
    ap.add_argument("--baseline", action="append", default=[],
                    help="NAME=BIN: another audiolib binary to measure beside this one")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="audiolib-bench-")
    procs = Procs()
    try:
        # Redis of our own.
        redis_port = free_port()
        procs.start(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                     "--save", "", "--appendonly", "no", "--dir", work])
        wait_port(redis_port)
        redis_url = f"redis://127.0.0.1:{redis_port}"
        # A master with one replica, for the WAIT path.
        wait_master, wait_replica = free_port(), free_port()
        procs.start(["redis-server", "--port", str(wait_master), "--bind", "127.0.0.1",
                     "--save", "", "--appendonly", "no", "--dir", work])
        procs.start(["redis-server", "--port", str(wait_replica), "--bind", "127.0.0.1",
                     "--save", "", "--appendonly", "no", "--dir", work,
                     "--replicaof", "127.0.0.1", str(wait_master)])
        wait_port(wait_master)
        wait_port(wait_replica)

        # A small upstream for passthrough, and nginx as the fixed-answer ceiling.
        up_port, nginx_port = free_port(), free_port()
        mem, mem_port, mem_admin = start_gateway(procs, work, "embedded", args.threads,
                                                 {"AUDIOLIB_DATA_DIR": os.path.join(work, "data")})
        time.sleep(0.3)
        idle_rss = rss_kib(mem.pid, "VmRSS")
        key = create_keys(mem_admin, 1, "free", 10**12)[0]
        sample = http.client.HTTPConnection("127.0.0.1", mem_port)
        sample.request("POST", "/v1/audio", body=BODY, headers={"Authorization": f"Bearer {key}"})
        answer = sample.getresponse().read()
        body_file = os.path.join(work, "body.json")
        with open(body_file, "wb") as f:
            f.write(answer)
        escaped = answer.decode().replace("\\", "\\\\").replace("'", "\\'")
        ngx = start_nginx(procs, work, args.threads, f"""
  server {{ listen 127.0.0.1:{nginx_port} reuseport; location / {{ default_type application/json; return 200 '{escaped}'; }} }}
  server {{ listen 127.0.0.1:{up_port} reuseport; location / {{ default_type text/plain; return 200 'upstream says hello, a small body for passthrough'; }} }}
""")
        wait_port(nginx_port)
        wait_port(up_port)

        # The same API in Lua on nginx, its keys and counters in our Redis, the same key and S3
        # settings as start_gateway's.
        lua = None
        if nginx_lua.missing():
            print(f"nginx-lua left out: {', '.join(nginx_lua.missing())} missing "
                  "(scripts/bench-load installs them)", file=sys.stderr)
        else:
            lua_port = free_port()
            nginx_lua.seed_key(redis_port, key, "key_bench", 10**12)
            lua = nginx_lua.start(procs, work, lua_port, redis_port, args.threads,
                                  nginx_lua.s3_settings(**S3),
                                  os.path.join(ROOT, "catalog"))
            wait_port(lua_port)

        fixed_port, proxy_port = free_port(), free_port()
        fixed = procs.start([os.path.join(RELEASE, "examples", "fixed_body"),
                             f"127.0.0.1:{fixed_port}", body_file, str(args.threads)])
        plain = procs.start([os.path.join(RELEASE, "examples", "plain_proxy"),
                             f"127.0.0.1:{proxy_port}", f"127.0.0.1:{up_port}", str(args.threads)])
        red, red_port, red_admin = start_gateway(procs, work, "redis", args.threads,
                                                 {"AUDIOLIB_REDIS_URL": redis_url})
        pas, pas_port, _ = start_gateway(procs, work, "passthrough", args.threads, {},
                                         upstream=f"localhost:{up_port}")
        logged, logged_port, logged_admin = start_gateway(
            procs, work, "embedded-log", args.threads,
            {"AUDIOLIB_DATA_DIR": os.path.join(work, "data-log"), "RUST_LOG": "warn,access=info"})
        logged_key = create_keys(logged_admin, 1, "free", 10**12)[0]
        for p in (fixed_port, proxy_port):
            wait_port(p)

        wai, wai_port, wai_admin = start_gateway(
            procs, work, "redis-wait", args.threads,
            {"AUDIOLIB_REDIS_URL": f"redis://127.0.0.1:{wait_master}",
             "AUDIOLIB_REDIS_WAIT_REPLICAS": "1"})
        waited = None
        deadline = time.time() + 30
        while waited is None:
            try:
                waited = create_keys(wai_admin, 1, "free", 10**12)
            except SystemExit:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)  # the replica is still syncing
        limited = create_keys(red_admin, 1, "free", 10**12)
        unlimited = create_keys(red_admin, 1, "unlimited")
        t = time.time()
        many = create_keys(red_admin, 10_000, "free", 10**12)
        print(f"created 10,000 keys in {time.time() - t:.1f}s", file=sys.stderr)

        # TLS: the gateway and the fixed-body ceiling with the same certificate.
        cert, key_file = make_certificate(work)
        fixed_tls_port = free_port()
        fixed_tls = procs.start([os.path.join(RELEASE, "examples", "fixed_body"),
                                 f"127.0.0.1:{fixed_tls_port}", body_file, str(args.threads),
                                 cert, key_file])
        tls, tls_port, tls_admin = start_gateway(
            procs, work, "embedded-tls", args.threads,
            {"AUDIOLIB_DATA_DIR": os.path.join(work, "data-tls"),
             "AUDIOLIB_TLS_CERT": cert, "AUDIOLIB_TLS_KEY": key_file})
        wait_port(fixed_tls_port)
        tls_key = create_keys(tls_admin, 1, "free", 10**12)[0]

        # name -> (url, wrk script or ("h2", key) for h2load, pid whose CPU is counted)
        targets = {
            "nginx": (f"http://127.0.0.1:{nginx_port}/v1/audio", wrk_script(work, "nginx", [key]), ngx.pid),
            "pingora-fixed": (f"http://127.0.0.1:{fixed_port}/v1/audio", wrk_script(work, "fixed", [key]), fixed.pid),
            "embedded": (f"http://127.0.0.1:{mem_port}/v1/audio", wrk_script(work, "embedded", [key]), mem.pid),
            "embedded-log": (f"http://127.0.0.1:{logged_port}/v1/audio", wrk_script(work, "logged", [logged_key]), logged.pid),
            "redis-limited": (f"http://127.0.0.1:{red_port}/v1/audio", wrk_script(work, "limited", limited), red.pid),
            "redis-unlimited": (f"http://127.0.0.1:{red_port}/v1/audio", wrk_script(work, "unlimited", unlimited), red.pid),
            "redis-10k": (f"http://127.0.0.1:{red_port}/v1/audio", wrk_script(work, "many", many), red.pid),
            "redis-wait": (f"http://127.0.0.1:{wai_port}/v1/audio", wrk_script(work, "wait", waited), wai.pid),
            "pingora-proxy": (f"http://127.0.0.1:{proxy_port}/static/x", wrk_script(work, "proxy", [key], "GET", ""), plain.pid),
            "passthrough": (f"http://127.0.0.1:{pas_port}/static/x", wrk_script(work, "pass", [key], "GET", ""), pas.pid),
            "pingora-fixed-tls": (f"https://127.0.0.1:{fixed_tls_port}/v1/audio", wrk_script(work, "fixed-tls", [tls_key]), fixed_tls.pid),
            "embedded-tls": (f"https://127.0.0.1:{tls_port}/v1/audio", wrk_script(work, "tls", [tls_key]), tls.pid),
            "pingora-fixed-h2": (f"https://127.0.0.1:{fixed_tls_port}/v1/audio", ("h2", tls_key), fixed_tls.pid),
            "embedded-h2": (f"https://127.0.0.1:{tls_port}/v1/audio", ("h2", tls_key), tls.pid),
        }
        if lua:
            targets["nginx-lua"] = (f"http://127.0.0.1:{lua_port}/v1/audio",
                                    wrk_script(work, "lua", [key]), lua.pid)
        for spec in args.baseline:
            name, _, binary = spec.partition("=")
            base, base_port, base_admin = start_gateway(procs, work, name, args.threads,
                                                     {"AUDIOLIB_DATA_DIR": os.path.join(work, name)},
                                                     binary=binary)
            base_key = create_keys(base_admin, 1, "free", 10**12)[0]
            targets[name] = (f"http://127.0.0.1:{base_port}/v1/audio",
                             wrk_script(work, name, [base_key]), base.pid)
            base_pas, base_pas_port, _ = start_gateway(procs, work, f"{name}-passthrough",
                                                       args.threads, {}, binary=binary,
                                                       upstream=f"localhost:{up_port}")
            targets[f"{name}-passthrough"] = (f"http://127.0.0.1:{base_pas_port}/static/x",
                                              targets["passthrough"][1], base_pas.pid)
        if args.only:
            keep = args.only.split(",") + [f"{spec.partition('=')[0]}{suffix}"
                                           for spec in args.baseline
                                           for suffix in ("", "-passthrough")]
            targets = {k: v for k, v in targets.items() if k in keep}
        results = {name: [] for name in targets}
        for r in range(args.rounds):
            for name, (url, script, pid) in targets.items():
                before = cpu_ticks(pid)
                if isinstance(script, tuple):
                    res = run_h2load(url, script[1], args, work)
                else:
                    res = run_wrk(url, script, args)
                # Server CPU per answer: steadier than req/s on a shared machine, since it
                # does not depend on how much of the cores the server got.
                res["cpu"] = (cpu_ticks(pid) - before) * TICK_US / max(1, res["rps"] * args.duration)
                results[name].append(res)
                print(f"round {r + 1} {name:16} {res['rps']:>10.0f} req/s  p50 {res['p50']:.3f} ms  "
                      f"p99 {res['p99']:.3f} ms  cpu {res['cpu']:.1f} us/req  "
                      f"non-2xx {res['non2xx']} {res['errors']}", file=sys.stderr)

        med = {n: {k: statistics.median(x[k] for x in rs) for k in ("rps", "p50", "p99", "cpu")}
               for n, rs in results.items()}
        def ratio(a, b):
            return f"{med[a]['rps'] / med[b]['rps']:.2f}" if a in med and b in med else "-"
        print()
        print(f"wrk -t{args.wrk_threads} -c{args.connections} -d{args.duration}s, {args.rounds} interleaved "
              f"rounds, server threads {args.threads}, medians")
        def paired(a, b):
            """The median of the rounds' own ratios: each round's two runs are minutes apart at
            most, so this follows the machine's drift less than a ratio of medians."""
            if a not in results or b not in results:
                return "-"
            return f"{statistics.median(x['rps'] / y['rps'] for x, y in zip(results[a], results[b])):.2f}"
        print(f"{'target':16} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'cpu us':>7} "
              f"{'/nginx':>7} {'/pingora':>8} {'paired':>7}")
        for name, m in med.items():
            base = {"passthrough": "pingora-proxy", "embedded-tls": "pingora-fixed-tls",
                    "embedded-h2": "pingora-fixed-h2"}.get(name, "pingora-fixed")
            if name.endswith("-passthrough"):
                base = "pingora-proxy"
            print(f"{name:16} {m['rps']:>10.0f} {m['p50']:>8.3f} {m['p99']:>8.3f} {m['cpu']:>7.1f} "
                  f"{ratio(name, 'nginx'):>7} {ratio(name, base):>8} {paired(name, base):>7}")
        print("(/pingora: ratio of the medians to the target's ceiling; paired: median of the "
              "per-round ratios)")
        for spec in args.baseline:
            name = spec.partition("=")[0]
            if name in med and "embedded" in med:
                print(f"embedded / {name}: {ratio('embedded', name)} in req/s, "
                      f"{med[name]['cpu'] / med['embedded']['cpu']:.2f} in CPU per request "
                      f"({name}'s over embedded's)")
        if "nginx-lua" in med:
            cpu = {n: f"{med['nginx-lua']['cpu'] / med[n]['cpu']:.2f}" if n in med else "-"
                   for n in ("embedded", "redis-limited")}
            print(f"embedded / nginx-lua: {ratio('embedded', 'nginx-lua')} (paired "
                  f"{paired('embedded', 'nginx-lua')}), redis-limited / nginx-lua: "
                  f"{ratio('redis-limited', 'nginx-lua')} (paired {paired('redis-limited', 'nginx-lua')}) "
                  f"in req/s; nginx-lua's CPU per request over "
                  f"embedded's {cpu['embedded']}, over redis-limited's {cpu['redis-limited']} "
                  "(Redis's own CPU not counted)")
        if "embedded-log" in med and "embedded" in med:
            print(f"embedded-log / embedded (access log on / off): {ratio('embedded-log', 'embedded')}")
        if "redis-wait" in med and "redis-limited" in med:
            print(f"redis-wait / redis-limited: {ratio('redis-wait', 'redis-limited')}")
        non2xx = {n: sum(x["non2xx"] for x in rs) for n, rs in results.items()}
        print(f"non-2xx answers: {non2xx}")
        print(f"gateway RSS: idle {idle_rss / 1024:.1f} MiB (embedded store, after start); peak "
              f"{rss_kib(mem.pid, 'VmHWM') / 1024:.1f} MiB embedded, "
              f"{rss_kib(red.pid, 'VmHWM') / 1024:.1f} MiB Redis (10,000 keys), "
              f"{rss_kib(pas.pid, 'VmHWM') / 1024:.1f} MiB passthrough")
    finally:
        procs.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
