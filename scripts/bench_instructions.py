"""Instructions and cache misses per answer, the gateway beside its Pingora ceilings.

Requests per second on this shared 2-core machine move by a quarter between rounds, and the
ratio to a ceiling moves with the host (embedded ÷ fixed body: 0.93 on a quiet morning,
0.73-0.82 on a busy afternoon, same build). Instruction counts do not. Each target runs alone
under valgrind's callgrind and is driven by `wrk -t1 -c8`; only the answers of the measured
window are counted (counters zeroed before it, dumped after it). Printed per answer:
instructions (Ir), first-level instruction-cache misses (I1mr) and data-cache misses (D1mr +
D1mw) from callgrind's cache simulation, and each figure's ratio to its ceiling's. The
`embedded-log` target is `embedded` with the access log on, set beside `embedded`: what a line
costs, the writer thread's work included.

What it cannot show: the kernel's work (send and recv are a third to a half of either side's
CPU), contention between threads (callgrind runs one at a time), and CPU features valgrind
does not emulate: SHA-256 of the key runs in software under it (some 4,000 instructions an
answer; SHA-NI natively). Work done once a second (the presigned answer, lease top-ups) is
spread over the ~250 answers a second valgrind manages instead of tens of thousands. Use it
to compare builds and to see where instructions go; read the gap to a ceiling with those
caveats.

Run through scripts/bench-instructions, which builds first.
"""

import argparse
import http.client
import os
import re
import subprocess
import sys
import tempfile

from bench_load import (BODY, RELEASE, Procs, create_keys, free_port, start_gateway, start_nginx,
                        wait_port, wrk_script)

EVENTS = ("Ir", "I1mr", "D1mr", "D1mw")


def callgrind(work, name):
    return ["valgrind", "--tool=callgrind", "--cache-sim=yes",
            f"--callgrind-out-file={os.path.join(work, 'callgrind.' + name)}"]


def count(proc, work, name, url, script, seconds):
    """Counts per answer of `proc` (running under `callgrind(work, name)`) over `seconds` of
    wrk on `url`, after two seconds of warm-up; stops `proc`."""
    wrk = ["wrk", "-t1", "-c8", "-s", script, url]
    subprocess.run(wrk[:1] + ["-d2s"] + wrk[1:], check=True, capture_output=True)
    subprocess.run(["callgrind_control", "--zero", str(proc.pid)], check=True,
                   capture_output=True)
    out = subprocess.run(wrk[:1] + [f"-d{seconds}s"] + wrk[1:], check=True,
                         capture_output=True, text=True).stdout
    subprocess.run(["callgrind_control", "--dump", str(proc.pid)], check=True,
                   capture_output=True)
    proc.terminate()
    proc.wait(60)
    if "Non-2xx" in out:
        raise SystemExit(f"{name}: answers other than 2xx under callgrind:\n{out}")
    answers = int(re.search(r"(\d+) requests in", out).group(1))
    dump = os.path.join(work, f"callgrind.{name}.1")
    fields = {}
    for line in open(dump):
        key, _, rest = line.partition(":")
        if key in ("events", "totals"):
            fields[key] = rest.split()
    totals = dict(zip(fields["events"], map(int, fields["totals"])))
    return answers, {e: totals[e] / answers for e in EVENTS}, dump


def functions(dump, answers):
    """Instructions per answer spent in each function itself (callees not included), read
    from callgrind's format: cost lines under `fn=` are the function's own, except the one
    after each `calls=` line, which is what that call cost. Names are compressed: `(n) name`
    the first time (under `fn=` or `cfn=`), `(n)` after."""
    names, spent, current, call_cost = {}, {}, None, False
    for line in open(dump):
        if line.startswith(("fn=", "cfn=")):
            ref, _, name = line.partition("=")[2].strip().partition(" ")
            name = names.setdefault(ref, name or ref)
            if line.startswith("fn="):
                current = name
        elif line.startswith("calls="):
            call_cost = True
        elif line[:1].isdigit() or line[:1] in "+-*":
            if call_cost:
                call_cost = False
            elif current:
                fields = line.split()
                ir = int(fields[1]) if len(fields) > 1 else 0
                spent[current] = spent.get(current, 0) + ir / answers
    return spent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=20, help="of wrk per target")
    ap.add_argument("--baseline", action="append", default=[],
                    help="NAME=BIN: another audiolib binary to count beside this one "
                         "(as NAME on /v1/audio and NAME-passthrough)")
    ap.add_argument("--top", type=int, default=0,
                    help="list the N functions each gateway target spends most above its ceiling")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="audiolib-instructions-")
    procs = Procs()
    rows = []  # (name, its ceiling, answers, counts per answer, callgrind's dump)
    try:
        up_port = free_port()
        start_nginx(procs, work, 1, f"""
  server {{ listen 127.0.0.1:{up_port}; location / {{ return 200 'upstream says hello'; }} }}
""")
        wait_port(up_port)
        body_file = os.path.join(work, "body.json")
        post = wrk_script(work, "post", ["unused"])
        get = wrk_script(work, "get", ["unused"], method="GET", body="")

        def gateway(name, binary=None, upstream=None, path="/v1/audio", env=None):
            proc, port, admin = start_gateway(
                procs, work, name, 2, {"AUDIOLIB_DATA_DIR": os.path.join(work, name), **(env or {})},
                upstream=upstream, binary=binary, wrap=callgrind(work, name))
            key = create_keys(admin, 1, "free", 10**12)[0]
            if not os.path.exists(body_file):
                # The ceiling answers with the gateway's own answer: the same bytes out.
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                c.request("POST", "/v1/audio", body=BODY,
                          headers={"Authorization": f"Bearer {key}"})
                with open(body_file, "wb") as f:
                    f.write(c.getresponse().read())
            script = (wrk_script(work, name, [key]) if path == "/v1/audio"
                      else get)
            return count(proc, work, name, f"http://127.0.0.1:{port}{path}", script,
                         args.seconds)

        def example(name, *argv, path, script):
            port = free_port()
            proc = procs.start(callgrind(work, name) + [
                os.path.join(RELEASE, "examples", name), f"127.0.0.1:{port}", *argv, "2"])
            wait_port(port, timeout=120)
            return count(proc, work, name, f"http://127.0.0.1:{port}{path}", script,
                         args.seconds)

        rows.append(("embedded", "pingora-fixed", *gateway("embedded")))
        # The access log's whole cost, the writer thread's included, above the same target.
        rows.append(("embedded-log", "embedded",
                     *gateway("embedded-log", env={"RUST_LOG": "warn,access=info"})))
        for spec in args.baseline:
            name, binary = spec.split("=", 1)
            rows.append((name, "pingora-fixed", *gateway(name, binary)))
            rows.append((f"{name}-passthrough", "pingora-proxy",
                         *gateway(f"{name}-passthrough", binary,
                                  upstream=f"http://localhost:{up_port}", path="/static/x")))
        rows.append(("pingora-fixed", None,
                     *example("fixed_body", body_file, path="/v1/audio", script=post)))
        rows.append(("pingora-proxy", None,
                     *example("plain_proxy", f"127.0.0.1:{up_port}", path="/static/x",
                              script=get)))
        rows.append(("passthrough", "pingora-proxy",
                     *gateway("passthrough", upstream=f"http://localhost:{up_port}",
                              path="/static/x")))
    finally:
        procs.stop()

    counts = {name: per for name, _, _, per, _ in rows}
    print(f"\ncallgrind, wrk -t1 -c8 for {args.seconds} s a target; per answer, and ÷ the ceiling")
    print(f"{'target':16} {'answers':>8} {'Ir':>8} {'I1mr':>6} {'D1 miss':>8}"
          f"   {'Ir':>5} {'I1mr':>5} {'D1':>5}")
    for name, ceiling, answers, per, _ in sorted(rows, key=lambda r: (r[1] or r[0], r[1] is not None)):
        d1 = per["D1mr"] + per["D1mw"]
        line = f"{name:16} {answers:8} {per['Ir']:8.0f} {per['I1mr']:6.0f} {d1:8.0f}"
        if ceiling:
            c = counts[ceiling]
            line += (f"   {per['Ir'] / c['Ir']:5.2f} {per['I1mr'] / c['I1mr']:5.2f}"
                     f" {d1 / (c['D1mr'] + c['D1mw']):5.2f}")
        print(line)
    print(f"(callgrind's dumps: {work})")
    dumps = {name: (dump, answers) for name, _, answers, _, dump in rows}
    for name, ceiling, answers, _, dump in rows if args.top else []:
        if not ceiling:
            continue
        ours, theirs = functions(dump, answers), functions(*dumps[ceiling])
        extra = sorted(ours, key=lambda f: theirs.get(f, 0) - ours[f])[:args.top]
        print(f"\n{name}: instructions an answer above {ceiling}, by function (itself only)")
        for f in extra:
            print(f"{ours[f] - theirs.get(f, 0):8.0f}  {f[:110]}")


if __name__ == "__main__":
    sys.exit(main())
