"""Correctness check of the load benchmark's `nginx-lua` target (scripts/nginx_lua/).

Starts a Redis and the target (the module and nginx.conf exactly as bench_load.py starts
them), twice: with the benchmark's S3 settings (virtual-host style, AWS endpoint) and with
path-style addressing, another region and a session token. Checks:
  - 200 answers in the gateway's exact body shape and headers, tracks of every library
    (only active ones), titles JSON-escaped as the gateway does;
  - every presigned URL byte-identical to botocore's for the same time (read from its
    X-Amz-Date), credentials and object key, keys with spaces, `+`, `&`, `=`, `~`, `//`,
    `%` and non-ASCII letters included (botocore through tests/oracle/botocore_presign.py);
  - the error rows: 401 MISSING_AUTH / INVALID_KEY_FORMAT / INVALID_KEY (unknown and revoked),
    400 INVALID_JSON / MISSING_LIBRARY, 404 LIBRARY_NOT_FOUND / NO_AUDIO_ITEMS, 429
    QUOTA_EXCEEDED at the limit (denied calls not counted), 405, 204 preflight.

Run with a Python that has botocore: scripts/check-nginx-lua (installs what it needs), or
PYTHON scripts/nginx_lua/check.py. Ends with `N passed, N failed`; exit status 1 on a failure.
"""

import datetime
import http.client
import json
import os
import shutil
import sys
import tempfile
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "oracle"))

import target  # noqa: E402
from bench_load import S3, Procs, free_port, wait_port  # noqa: E402
from botocore_presign import presign as botocore_presign  # noqa: E402

KEY = "alp_" + "Ch3ck" * 6 + "Ab"            # unlimited-ish: limit 10**12
LIMITED = "alp_" + "L1m1t" * 6 + "Ab"        # limit 3
UNLIMITED = "alp_" + "N0L1m" * 6 + "Ab"      # no limit
REVOKED = "alp_" + "R3v0k" * 6 + "Ab"
UNKNOWN = "alp_" + "Unkn0" * 6 + "Ab"
LIMIT = 3

# Object keys S3 is particular about (SPEC §6), beside the bundled catalog's.
ODD = '''name = "Odd keys"
[[track]]
title = "Say \\"hi\\" \\\\ now"
key = "odd/a b+&=~//é.mp3"
duration_sec = 1
[[track]]
title = "Hundred"
key = "odd/100%.mp3"
duration_sec = 2
weight = 3
[[track]]
title = "Dots"
key = "odd/./x/../y (1).mp3"
duration_sec = 3
'''
EMPTY = '''[[track]]
title = "Gone"
key = "empty/gone.mp3"
duration_sec = 9
active = false
'''

CONFIGS = {
    "virtual-host": S3,
    "path-style+token": dict(endpoint="http://127.0.0.1:9000", bucket="media", region="eu-west-1",
                             path_style=True, ttl=900, access_key="AKIDEXAMPLE",
                             secret_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                             token="tok/en+="),
}

passed, failed = 0, 0


def check(ok, what):
    global passed, failed
    if ok:
        passed += 1
    else:
        failed += 1
        print(f"FAIL {what}")


def call(port, method="POST", body='{"library":"audio.focus"}', auth=None, key=KEY):
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = auth
    elif key is not None:
        headers["Authorization"] = f"Bearer {key}"
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request(method, "/v1/audio", body=body.encode() if body is not None else None, headers=headers)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, data.decode()


def error_body(message, code):
    return json.dumps({"error": message, "code": code}, ensure_ascii=False, separators=(",", ":"))


def expect_error(port, status, code, message, what, **kw):
    got_status, headers, body = call(port, **kw)
    check(got_status == status, f"{what}: status {got_status}, want {status} ({body})")
    check(body == error_body(message, code), f"{what}: body {body!r}")
    check(headers.get("content-type") == "application/json", f"{what}: content-type {headers}")
    if status == 401:
        check(headers.get("www-authenticate") == "Bearer", f"{what}: WWW-Authenticate {headers}")
    return headers


def check_answers(port, s3, catalog):
    """Every library, enough calls to see every active track; every URL against botocore
    (once per object key and second: the same inputs give the same URL)."""
    references = {}
    for library, tracks in catalog.items():
        active = {t["title"]: t for t in tracks if t["active"]}
        if not active:
            continue
        seen = set()
        for _ in range(40):
            status, headers, body = call(port, body=json.dumps({"library": library}))
            check(status == 200, f"{library}: status {status} ({body})")
            if status != 200:
                return
            check(headers.get("content-type") == "application/json", f"content-type {headers}")
            check(headers.get("cache-control") == "no-store", f"cache-control {headers}")
            check(headers.get("access-control-allow-origin") == "*", f"CORS {headers}")
            check(len(headers.get("x-request-id", "")) == 32, f"x-request-id {headers}")
            data = json.loads(body)["data"]
            track = active.get(data["title"])
            check(track is not None, f"{library}: not an active track: {data['title']!r}")
            if track is None:
                continue
            seen.add(track["title"])
            url = data["url"]
            shape = ('{"code":0,"msg":"ok","data":{"title":' + json.dumps(track["title"], ensure_ascii=False)
                     + ',"url":"' + url + '","duration_sec":' + str(track["duration_sec"]) + "}}")
            check(body == shape, f"{library}: body shape {body!r}")
            stamp = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["X-Amz-Date"][0]
            at = datetime.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
            case = (track["key"], stamp)
            if case not in references:
                references[case] = botocore_presign({
                    "region": s3["region"], "endpoint": s3["endpoint"], "access_key": s3["access_key"],
                    "secret_key": s3["secret_key"], "token": s3.get("token"),
                    "path_style": s3["path_style"], "time": at.timestamp(), "bucket": s3["bucket"],
                    "key": track["key"], "expires": s3["ttl"]})
            reference = references[case]
            check(url == reference, f"{library} {track['key']!r}:\n  lua      {url}\n  botocore {reference}")
        check(seen == set(active), f"{library}: tracks seen {sorted(seen)}, active {sorted(active)}")


def check_errors(port, redis_port):
    expect_error(port, 401, "MISSING_AUTH",
                 "Authorization header is missing or malformed; expected 'Bearer <key>'",
                 "no Authorization", key=None)
    for bad in ["", "Basic abc", "Bearer", "Bearer  ", f"Token {KEY}"]:
        expect_error(port, 401, "MISSING_AUTH",
                     "Authorization header is missing or malformed; expected 'Bearer <key>'",
                     f"Authorization {bad!r}", auth=bad)
    for bad in ["alp_short", "alp_" + "-" * 32, KEY + "x", "xlp_" + KEY[4:]]:
        expect_error(port, 401, "INVALID_KEY_FORMAT",
                     "API key does not match the expected format (alp_ followed by 32 letters or digits)",
                     f"key {bad!r}", key=bad)
    for key, what in [(UNKNOWN, "unknown key"), (REVOKED, "revoked key")]:
        expect_error(port, 401, "INVALID_KEY", "API key is invalid, inactive, or revoked", what, key=key)
    status, _, _ = call(port, auth=f"  bearer \t{KEY}  ")
    check(status == 200, f"scheme in lower case with blanks: {status}")
    for body in ["nope", "", "[1]", '"x"', '{"library":"audio.focus"} x', '{"library":']:
        expect_error(port, 400, "INVALID_JSON", "Request body is not a valid JSON object",
                     f"body {body!r}", body=body)
    for body in ["{}", '{"library":null}', '{"library":""}', '{"library":5}', '{"other":"audio.focus"}']:
        expect_error(port, 400, "MISSING_LIBRARY",
                     "The 'library' field is missing or not a non-empty string", f"body {body!r}", body=body)
    expect_error(port, 404, "LIBRARY_NOT_FOUND", "Library 'audio.unknown' not found", "unknown library",
                 body='{"library":"audio.unknown"}')
    expect_error(port, 404, "NO_AUDIO_ITEMS", "Library 'audio.empty' has no active audio items",
                 "library without active tracks", body='{"library":"audio.empty"}')
    status, headers, body = call(port, method="GET", body=None)
    check(status == 405 and headers.get("allow") == "POST, OPTIONS", f"GET: {status} {headers}")
    status, headers, _ = call(port, method="OPTIONS", body=None, key=None)
    check(status == 204 and headers.get("access-control-allow-methods") == "POST, OPTIONS",
          f"OPTIONS: {status} {headers}")

    # The quota: exactly LIMIT answers, then 429; denied calls are not counted.
    now = datetime.datetime.now(datetime.timezone.utc)
    period = now.strftime("%Y-%m")
    reset = (now.replace(day=1, hour=0, minute=0, second=0, microsecond=0) + datetime.timedelta(days=32)).replace(day=1)
    reset_at = reset.strftime("%Y-%m-%dT%H:%M:%SZ")
    for i in range(LIMIT):
        status, headers, body = call(port, key=LIMITED)
        check(status == 200, f"limited key call {i + 1}: {status} {body}")
        check(headers.get("ratelimit", "").startswith(f'"monthly";r={LIMIT - i - 1};t='),
              f"RateLimit {headers.get('ratelimit')}")
        check(headers.get("ratelimit-policy", "").startswith(f'"monthly";q={LIMIT};w='),
              f"RateLimit-Policy {headers.get('ratelimit-policy')}")
    for i in range(2):
        got_status, headers, body = call(port, key=LIMITED)
        want = json.dumps({"error": f"Monthly quota of {LIMIT} calls reached; it resets at {reset_at}",
                           "code": "QUOTA_EXCEEDED", "limit": LIMIT, "reset_at": reset_at},
                          separators=(",", ":"))
        check(got_status == 429 and body == want, f"over the limit: {got_status} {body!r}")
        retry = int(headers.get("retry-after", "0"))
        check(abs(retry - (reset - now).total_seconds()) < 5, f"Retry-After {retry}")
    check(target.usage(redis_port, "key_limited", period) == LIMIT, "denied calls not counted")
    ttl = target.redis_command(redis_port, "TTL", f"{target.PREFIX}{{key_limited}}:usage:{period}")
    check((reset - now).total_seconds() + 6 * 86400 < ttl <= (reset - now).total_seconds() + 7 * 86400 + 5,
          f"counter expires a week after the month: TTL {ttl}")
    status, headers, _ = call(port, key=UNLIMITED)
    check(status == 200 and "ratelimit" not in headers, f"unlimited key: {status} {headers}")
    check(target.usage(redis_port, "key_unlimited", period) == 1, "unlimited key counted")


def main():
    if target.missing():
        raise SystemExit(f"missing {target.missing()}: scripts/check-nginx-lua installs them")
    work = tempfile.mkdtemp(prefix="audiolib-nginx-lua-check-")
    procs = Procs()
    try:
        catalog_dir = os.path.join(work, "catalog")
        shutil.copytree(os.path.join(ROOT, "catalog"), catalog_dir)
        with open(os.path.join(catalog_dir, "audio.odd.toml"), "w") as f:
            f.write(ODD)
        with open(os.path.join(catalog_dir, "audio.empty.toml"), "w") as f:
            f.write(EMPTY)
        catalog = target.load_catalog(catalog_dir)

        redis_port = free_port()
        procs.start(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                     "--save", "", "--appendonly", "no", "--dir", work])
        wait_port(redis_port)
        target.seed_key(redis_port, KEY, "key_check", 10**12)
        target.seed_key(redis_port, LIMITED, "key_limited", LIMIT)
        target.seed_key(redis_port, UNLIMITED, "key_unlimited", None)
        target.seed_key(redis_port, REVOKED, "key_revoked", 10**12, status="revoked")

        for name, s3 in CONFIGS.items():
            before = passed + failed
            port = free_port()
            settings = target.s3_settings(**s3)
            nginx = target.start(procs, work, port, redis_port, 2, settings, catalog_dir,
                                 name=f"nginx-lua-{name}")
            wait_port(port)
            check_answers(port, s3, catalog)
            if name == "virtual-host":
                check_errors(port, redis_port)
            nginx.terminate()
            nginx.wait(5)
            with open(os.path.join(work, f"nginx-lua-{name}.err")) as f:
                errors = [line for line in f if "[error]" in line or "[alert]" in line or "[emerg]" in line]
            check(not errors, f"{name}: nginx error log: {errors[:3]}")
            print(f"{name}: {passed + failed - before} checks")
    finally:
        procs.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
