# Shared by the scripts: install what a fresh Debian machine with Rust lacks.

# apt_need CMD PACKAGE...: install PACKAGE(s) when CMD is missing. CMD may be an absolute
# path instead, for packages without a command (an nginx module, Lua libraries).
apt_need() {
    local cmd=$1; shift
    if [[ $cmd == /* ]]; then
        [ -e "$cmd" ] && return 0
    else
        command -v "$cmd" >/dev/null 2>&1 && return 0
    fi
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing $* (for $cmd)" >&2
    if [ -z "${APT_UPDATED:-}" ]; then
        $sudo apt-get update -qq
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

# The S3-compatible server the tests fetch signed URLs from; it verifies signatures.
S3S_FS_VERSION=0.14.1
need_s3s_fs() {
    if command -v s3s-fs >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/s3s-fs" ]; then
        return 0
    fi
    echo "installing s3s-fs $S3S_FS_VERSION (12 minutes measured with one build job on a shared machine)" >&2
    cargo install "s3s-fs@$S3S_FS_VERSION" --features binary --locked --quiet
}

# The path of the s3s-fs binary (after need_s3s_fs).
s3s_fs_bin() {
    command -v s3s-fs 2>/dev/null || echo "$HOME/.cargo/bin/s3s-fs"
}

# A Python environment in .venv with the reference clients the tests run.
need_venv() {
    local py=.venv/bin/python
    if [ -x "$py" ] && "$py" -c 'import botocore, requests, schemathesis, openapi_spec_validator' 2>/dev/null; then
        return 0
    fi
    echo "creating .venv with botocore, requests, schemathesis and openapi-spec-validator" >&2
    python3 -m venv .venv
    "$py" -m pip install --quiet --disable-pip-version-check -r scripts/requirements-test.txt
}

# playwright-core in .tools/node: drives Debian's chromium in the browser test (it downloads
# no browser of its own).
PLAYWRIGHT_VERSION=1.65.1
need_playwright() {
    [ -f .tools/node/node_modules/playwright-core/package.json ] && return 0
    echo "installing playwright-core $PLAYWRIGHT_VERSION in .tools/node" >&2
    mkdir -p .tools/node
    npm install --silent --no-audit --no-fund --prefix .tools/node "playwright-core@$PLAYWRIGHT_VERSION"
}

# nginx with its Lua module (LuaJIT), resty.core, lrucache and cjson: the load benchmark's
# nginx-lua comparison target (scripts/nginx_lua/).
need_nginx_lua() {
    apt_need nginx nginx-light
    apt_need /usr/lib/nginx/modules/ngx_http_lua_module.so libnginx-mod-http-lua lua-resty-core lua-resty-lrucache
    apt_need /usr/share/lua/5.1/cjson/util.lua lua-cjson
}
