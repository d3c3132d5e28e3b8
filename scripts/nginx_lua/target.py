"""The `nginx-lua` benchmark target: POST /v1/audio in OpenResty style on Debian's nginx
(libnginx-mod-http-lua, LuaJIT, lua-resty-core, lua-resty-lrucache, lua-cjson) with its keys
and quota counters in Redis. Used by scripts/bench_load.py and scripts/nginx_lua/check.py.

start() converts the catalog to JSON, writes the Lua module's configuration and an
nginx.conf into the work directory, seeds the keys into Redis under PREFIX and starts nginx.
"""

import hashlib
import json
import os
import socket
import tomllib

LUA_DIR = os.path.dirname(os.path.abspath(__file__))
MODULES = "/usr/lib/nginx/modules"
PREFIX = "nginxlua:"
# What the module needs beside nginx itself (scripts/bench-load installs them).
NEEDED = [os.path.join(MODULES, "ngx_http_lua_module.so"), "/usr/share/lua/5.1/resty/core.lua",
          "/usr/share/lua/5.1/resty/lrucache.lua", "/usr/share/lua/5.1/cjson/util.lua"]


def missing():
    """The files of the Debian packages above that are not installed."""
    return [p for p in NEEDED if not os.path.exists(p)]


def load_catalog(catalog_dir):
    """{standard name: [track, ...]} from catalog/*.toml, as the gateway reads it."""
    catalog = {}
    for entry in sorted(os.listdir(catalog_dir)):
        if not entry.endswith(".toml"):
            continue
        with open(os.path.join(catalog_dir, entry), "rb") as f:
            data = tomllib.load(f)
        catalog[entry[:-len(".toml")]] = [
            {"title": t["title"], "key": t["key"], "duration_sec": t["duration_sec"],
             "active": t.get("active", True), "weight": t.get("weight", 1)}
            for t in data.get("track", [])
        ]
    return catalog


def s3_settings(endpoint, bucket, region, path_style, ttl, access_key, secret_key, token=None):
    """The signer's settings; the endpoint's port is kept only when not the scheme's default."""
    scheme, _, authority = endpoint.partition("://")
    authority = authority.rstrip("/")
    default = ":443" if scheme == "https" else ":80"
    if authority.endswith(default):
        authority = authority[: -len(default)]
    return {"scheme": scheme, "endpoint_authority": authority, "bucket": bucket, "region": region,
            "path_style": path_style, "ttl": ttl, "access_key_id": access_key,
            "secret_access_key": secret_key, "session_token": token}


def redis_command(port, *args):
    """One command to the Redis on 127.0.0.1:port. Its reply: an int, a str, or None."""
    out = f"*{len(args)}\r\n".encode()
    for a in args:
        a = str(a).encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(out)
        reply = s.makefile("rb")
        line = reply.readline().decode().rstrip("\r\n")
        kind, rest = line[:1], line[1:]
        if kind == "-":
            raise SystemExit(f"redis: {rest}")
        if kind == ":":
            return int(rest)
        if kind == "$":
            return None if int(rest) < 0 else reply.read(int(rest) + 2)[:-2].decode()
        return rest


def seed_key(redis_port, key, key_id, monthly_limit=None, status="active"):
    """A key record the module reads by the SHA-256 digest of the key (SPEC §3)."""
    digest = hashlib.sha256(key.encode()).hexdigest()
    redis_command(redis_port, "HSET", f"{PREFIX}key:{digest}", "id", key_id, "status", status,
                  "monthly_limit", "" if monthly_limit is None else monthly_limit)


def usage(redis_port, key_id, period):
    """The counter of a key for a month (`YYYY-MM`), 0 when absent."""
    return int(redis_command(redis_port, "GET", f"{PREFIX}{{{key_id}}}:usage:{period}") or 0)


def start(procs, work, port, redis_port, threads, s3, catalog_dir, name="nginx-lua"):
    """Writes the configuration and starts nginx (master in the foreground; its workers are
    its children). Returns the master's process."""
    config = os.path.join(work, f"{name}.json")
    with open(config, "w") as f:
        json.dump({
            "redis": {"host": "127.0.0.1", "port": redis_port, "prefix": PREFIX, "timeout_ms": 1000,
                      "pool_size": 128, "idle_ms": 60000},
            "key_cache": {"size": 100000, "ttl": 60, "negative_ttl": 5},
            "s3": s3,
            "catalog": load_catalog(catalog_dir),
        }, f, ensure_ascii=False)
    conf = os.path.join(work, f"{name}.conf")
    with open(conf, "w") as f:
        f.write(f"""
load_module {MODULES}/ndk_http_module.so;
load_module {MODULES}/ngx_http_lua_module.so;
worker_processes {threads};
daemon off;
pid {work}/{name}.pid;
error_log {work}/{name}.err warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  lua_code_cache on;
  lua_package_path "{LUA_DIR}/?.lua;;";
  lua_socket_log_errors off;
  client_max_body_size 16k;
  client_body_buffer_size 16k;
  init_by_lua_block {{ require("audio").init("{config}") }}
  init_worker_by_lua_block {{ require("audio").init_worker() }}
  # The request's id: the client's when it is 1-128 of [A-Za-z0-9._-], else a new one.
  map $http_x_request_id $audiolib_request_id {{
    "~^[A-Za-z0-9._-]{{1,128}}$" $http_x_request_id;
    default $request_id;
  }}
  server {{
    listen 127.0.0.1:{port} reuseport;
    default_type application/json;
    add_header Cache-Control no-store always;
    add_header Access-Control-Allow-Origin * always;
    add_header Access-Control-Expose-Headers "RateLimit, RateLimit-Policy, Retry-After" always;
    add_header X-Request-Id $audiolib_request_id always;
    location = /v1/audio {{ content_by_lua_block {{ require("audio").handle() }} }}
    location = /v1/audio/ {{ content_by_lua_block {{ require("audio").handle() }} }}
    location / {{ return 404 '{{"error":"No such route","code":"NOT_FOUND"}}'; }}
  }}
}}
""")
    return procs.start(["nginx", "-c", conf, "-p", work])
