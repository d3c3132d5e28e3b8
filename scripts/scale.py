"""Scaling curves for the catalog (issue 13): for 10, 1,000, 100,000 and 1,000,000 tracks in
one library, and 1,000,000 over 10,000 libraries, measures

  - `audiolib catalog check` time, and start-up to the first /readyz 200 of `audiolib serve`;
  - the snapshot's memory (examples/catalog_memory: a counting allocator) and the gateway's
    RSS once the catalog is loaded;
  - /v1/audio throughput with wrk (one unlimited key, the size's library),

then rewrites the generated part of docs/scaling.md and draws docs/scaling-tracks.svg (by
hand, stdlib only). Run through scripts/scale, which builds first.
"""

import argparse
import datetime
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from catalog_gen import library_name, write_catalog  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release")
ADMIN_TOKEN = "scale-admin-token-0123456789"
# (tracks, libraries): the curve, then the same million spread over many files.
CASES = [(10, 1), (1_000, 1), (100_000, 1), (1_000_000, 1), (1_000_000, 10_000)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port, path, method="GET", body=None, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data


def poll(what, check, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return time.monotonic()
        except OSError:
            pass
        time.sleep(0.01)
    raise SystemExit(f"timed out waiting for {what}")


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_wrk(port, library, key, work, duration, connections):
    script = os.path.join(work, "audio.lua")
    with open(script, "w") as f:
        f.write(f"""
wrk.method = "POST"
wrk.body = {json.dumps(json.dumps({"library": library}))}
wrk.headers["Authorization"] = "Bearer {key}"
wrk.headers["Content-Type"] = "application/json"
""")
    return wrk_script(port, script, duration, connections)


def wrk_script(port, script, duration, connections):
    """req/s, p99 in ms and non-2xx answers of wrk running the Lua `script` on /v1/audio."""
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency", "-s", script,
                          f"http://127.0.0.1:{port}/v1/audio"],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    m = re.search(r"\s99(?:\.000)?%\s+([\d.]+)(us|ms|s)", out)
    p99 = float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, p99, int(m.group(1)) if m else 0


def measure(tracks, libraries, work, args):
    catalog = os.path.join(work, f"catalog-{tracks}-{libraries}")
    write_catalog(catalog, tracks, libraries)
    row = {"tracks": tracks, "libraries": libraries}

    t = time.monotonic()
    subprocess.run([os.path.join(RELEASE, "audiolib"), "catalog", "check", catalog],
                   check=True, stdout=subprocess.DEVNULL)
    row["check_s"] = time.monotonic() - t
    mem = json.loads(subprocess.run([os.path.join(RELEASE, "examples", "catalog_memory"), catalog],
                                    check=True, capture_output=True, text=True).stdout)
    row["bytes_per_track"] = mem["bytes_per_track"]
    row["snapshot_mib"] = mem["snapshot_bytes"] / 2**20
    row["peak_mib"] = mem["peak_bytes"] / 2**20

    port, admin = free_port(), free_port()
    env = {
        "PATH": os.environ["PATH"], "RUST_LOG": "warn",
        "AUDIOLIB_LISTEN": f"127.0.0.1:{port}", "AUDIOLIB_ADMIN_LISTEN": f"127.0.0.1:{admin}",
        "AUDIOLIB_PORTAL_LISTEN": "127.0.0.1:0",  # any free port: several nodes share the host
        "AUDIOLIB_ADMIN_TOKEN": ADMIN_TOKEN, "AUDIOLIB_THREADS": "2",
        "AUDIOLIB_CATALOG_DIR": catalog, "AUDIOLIB_CATALOG_WATCH": "false",
        "AUDIOLIB_S3_BUCKET": "audiolib-media",
        "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    }
    started = time.monotonic()
    gw = subprocess.Popen([os.path.join(RELEASE, "audiolib"), "serve"], env=env, cwd=work,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        healthy = poll("/healthz", lambda: get(port, "/healthz")[0] == 200)
        ready = poll("/readyz", lambda: get(port, "/readyz")[0] == 200)
        row["healthz_s"] = healthy - started
        row["ready_s"] = ready - started
        row["rss_mib"] = rss_mib(gw.pid)
        status, data = get(admin, "/admin/keys", "POST", json.dumps({"name": "scale", "plan": "unlimited"}),
                           {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"})
        assert status == 201, data
        key = json.loads(data)["key"]
        row["rps"], row["p99_ms"], row["non2xx"] = run_wrk(
            port, library_name(0), key, work, args.duration, args.connections)
        row["rss_after_load_test_mib"] = rss_mib(gw.pid)
    finally:
        gw.send_signal(signal.SIGINT)
        gw.wait(10)
    shutil.rmtree(catalog, ignore_errors=True)
    return row


# --- the picture -------------------------------------------------------------------------

def nice_ceiling(v):
    """A round number at or above v (1, 2, 2.5 or 5 times a power of ten)."""
    if v <= 0:
        return 1
    p = 10 ** int(f"{v:e}".split("e")[1])
    for m in (1, 2, 2.5, 5, 10):
        if m * p >= v:
            return m * p
    return 10 * p


def panel(x0, title, unit, lines, fmt, xlabel="tracks", squares=()):
    """One chart: log x (10 to 10^6), linear y from 0. `lines` are (colour, points) drawn as
    lines with dots; `squares` are (colour, point) drawn alone (the 10,000-library case)."""
    import math
    w, h, left, top = 270, 200, 55, 40
    values = [v for _, pts in lines for _, v in pts] + [v for _, (_, v) in squares]
    ymax = nice_ceiling(max(values) * 1.05)
    X = lambda t: x0 + left + (math.log10(t) - 1) / 5 * w  # noqa: E731
    Y = lambda v: top + h - v / ymax * h  # noqa: E731
    out = [f'<text x="{x0 + left + w / 2}" y="22" text-anchor="middle" font-weight="bold">{title}</text>',
           f'<rect x="{x0 + left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#999"/>']
    for i in range(5):
        v = ymax * i / 4
        out.append(f'<line x1="{x0 + left}" x2="{x0 + left + w}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{x0 + left - 6}" y="{Y(v) + 4:.1f}" text-anchor="end">{fmt(v)}</text>')
    for e, label in ((1, "10"), (3, "1k"), (5, "100k"), (6, "1M")):
        out.append(f'<text x="{X(10 ** e):.1f}" y="{top + h + 16}" text-anchor="middle">{label}</text>')
    out.append(f'<text x="{x0 + left + w / 2}" y="{top + h + 34}" text-anchor="middle">{xlabel} (log scale)</text>')
    out.append(f'<text x="{x0 + 14}" y="{top + h / 2}" text-anchor="middle" '
               f'transform="rotate(-90 {x0 + 14} {top + h / 2})">{unit}</text>')
    for colour, pts in lines:
        path = " ".join(f"{X(t):.1f},{Y(v):.1f}" for t, v in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        out += [f'<circle cx="{X(t):.1f}" cy="{Y(v):.1f}" r="4" fill="{colour}"/>' for t, v in pts]
    for colour, (t, v) in squares:
        out.append(f'<rect x="{X(t) - 4:.1f}" y="{Y(v) - 4:.1f}" width="8" height="8" fill="{colour}"/>')
    return out


def svg(rows):
    one = [r for r in rows if r["libraries"] == 1]
    spread = ([r for r in rows if r["libraries"] > 1] or rows[-1:])[0]
    charts = [
        ("load: start to /readyz 200", "seconds", "ready_s", lambda v: f"{v:g}"),
        ("gateway RSS after load", "MiB", "rss_mib", lambda v: f"{v:g}"),
        ("snapshot memory per track", "bytes", "bytes_per_track", lambda v: f"{v:g}"),
        ("/v1/audio throughput (wrk)", "requests/s", "rps", lambda v: f"{v / 1000:g}k"),
    ]
    parts = ['<svg xmlns="http://www.w3.org/2000/svg" width="1360" height="320" '
             'font-family="sans-serif" font-size="11">',
             '<rect width="100%" height="100%" fill="white"/>']
    for i, (title, unit, field, fmt) in enumerate(charts):
        parts += panel(i * 340, title, unit, [("#1f77b4", [(r["tracks"], r[field]) for r in one])], fmt,
                       squares=[("#d62728", (spread["tracks"], spread[field]))])
    parts.append('<circle cx="80" cy="300" r="4" fill="#1f77b4"/>'
                 '<text x="90" y="304">one library</text>'
                 '<rect x="186" y="296" width="8" height="8" fill="#d62728"/>'
                 f'<text x="200" y="304">{spread["tracks"]:,} tracks over {spread["libraries"]:,} libraries</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


# --- the page ----------------------------------------------------------------------------

def machine():
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    free = subprocess.run(["free", "-h"], capture_output=True, text=True).stdout.rstrip()
    return cpu, nproc, free


def table(rows, args, before_load, after_load):
    cpu, nproc, free = machine()
    lines = [
        f"Run of {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by `scripts/scale`: "
        f"`nproc` = {nproc} ({cpu}); wrk `-t2 -c{args.connections} -d{args.duration}s` on the same cores; "
        f"gateway with 2 worker threads, embedded store, one unlimited key. "
        f"**The machine was shared** with other builds and tests (load average {before_load} "
        f"before the run, {after_load} after), so absolute numbers are noisy; compare within this run.",
        "",
        "```", "$ free -h", free, "```",
        "",
        "| tracks | libraries | `catalog check` | start → /readyz 200 | /healthz 200 after | snapshot per track | snapshot | load peak (heap) | RSS after load | /v1/audio req/s | p99 ms | non-2xx |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tracks']:,} | {r['libraries']:,} | {r['check_s']:.2f} s | {r['ready_s']:.2f} s | "
            f"{r['healthz_s'] * 1000:.0f} ms | {r['bytes_per_track']:.0f} B | {r['snapshot_mib']:.1f} MiB | "
            f"{r['peak_mib']:.1f} MiB | {r['rss_mib']:.1f} MiB | {r['rps']:,.0f} | {r['p99_ms']:.2f} | {r['non2xx']} |")
    lines += ["", "![load time, RSS and throughput against the track count](scaling-tracks.svg)", ""]
    return "\n".join(lines)


def rewrite_section(page, name, text):
    """Replaces what stands between `<!-- scale:NAME:begin -->` and its end marker in `page`."""
    with open(page) as f:
        whole = f.read()
    begin, end = f"<!-- scale:{name}:begin -->", f"<!-- scale:{name}:end -->"
    i, j = whole.index(begin) + len(begin), whole.index(end)
    with open(page, "w") as f:
        f.write(whole[:i] + "\n" + text + "\n" + whole[j:])


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=5, help="seconds of wrk per size")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs"))
    ap.add_argument("--cases", help="comma list of TRACKSxLIBRARIES, for a quick try "
                    "(default: " + ",".join(f"{t}x{l}" for t, l in CASES) + ")")
    args = ap.parse_args()
    cases = [tuple(int(n) for n in c.split("x")) for c in args.cases.split(",")] if args.cases else CASES

    before = loadavg()
    work = tempfile.mkdtemp(prefix="audiolib-scale-")
    rows = []
    try:
        for tracks, libraries in cases:
            row = measure(tracks, libraries, work, args)
            print(json.dumps(row), file=sys.stderr)
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    with open(os.path.join(args.out, "scaling-tracks.svg"), "w") as f:
        f.write(svg(rows))
    page = os.path.join(args.out, "scaling.md")
    rewrite_section(page, "tracks", table(rows, args, before, loadavg()))
    with open(os.path.join(args.out, "scaling-tracks.json"), "w") as f:
        json.dump(rows, f, indent=1)
        f.write("\n")
    print(f"wrote {page} and scaling-tracks.svg", file=sys.stderr)


if __name__ == "__main__":
    main()
