-- POST /v1/audio on nginx + LuaJIT, built the way Kong and APISIX build a plugin: the
-- benchmark's `nginx-lua` target (scripts/bench_load.py), the comparison behind the
-- product's throughput goal. Per request:
--   1. Bearer parse and key format check (SPEC §2 rows 3-4);
--   2. the key record by the SHA-256 digest of the key, from a per-worker lrucache (60 s,
--      unknown keys 5 s), filled from Redis (HMGET) on a miss (row 5);
--   3. the JSON body (cjson), the library, a random active track, weighted (rows 7-10);
--   4. the monthly quota counted exactly in Redis, one round trip per request as Kong's
--      `redis` rate-limiting policy: INCR of the key's counter for the UTC month pipelined
--      with EXPIREAT ... NX (so a new counter gets its expiry); above the limit a DECR gives
--      the unit back and the answer is 429 (row 11; denied calls are not counted);
--   5. a SigV4 presigned GET URL (sigv4.lua), one per track and second per worker, as the
--      gateway's answer cache does, and the 200 body in the gateway's exact shape.
-- Static headers (CORS, Cache-Control, the request id) come from the nginx configuration.
-- Not covered: accounts, plans' per-second rates, key expiry and rotation, repeated JSON
-- keys, fail-open; a body over 16 KiB gets nginx's own 413 page.

local cjson = require "cjson.safe"
local lrucache = require "resty.lrucache"
local redis = require "redis_resp"
local sigv4 = require "sigv4"

local ngx = ngx
local var = ngx.var
local header = ngx.header
local null = ngx.null
local re_find, re_match = ngx.re.find, ngx.re.match
local get_method, read_body, get_body_data = ngx.req.get_method, ngx.req.read_body, ngx.req.get_body_data
local ngx_time, ngx_print, ngx_log, WARN = ngx.time, ngx.print, ngx.log, ngx.WARN
local random, floor = math.random, math.floor
local gsub, lower, find, sub = string.gsub, string.lower, string.find, string.sub
local decode, encode = cjson.decode, cjson.encode
local type, tonumber, tostring = type, tonumber, tostring

local M = {}

local conf, libs, signer, keys
local rhost, rport, rtimeout, rpool, ridle, prefix
local key_ttl, negative_ttl

-- A JSON string as serde_json writes it: cjson also escapes `/`, which serde does not.
local function json_string(s)
    return (gsub(encode(s), "\\/", "/"))
end

local function error_body(message, code)
    return '{"error":' .. json_string(message) .. ',"code":"' .. code .. '"}'
end

local ERR = {
    missing_auth = error_body("Authorization header is missing or malformed; expected 'Bearer <key>'", "MISSING_AUTH"),
    invalid_format = error_body("API key does not match the expected format (alp_ followed by 32 letters or digits)", "INVALID_KEY_FORMAT"),
    invalid_key = error_body("API key is invalid, inactive, or revoked", "INVALID_KEY"),
    invalid_json = error_body("Request body is not a valid JSON object", "INVALID_JSON"),
    missing_library = error_body("The 'library' field is missing or not a non-empty string", "MISSING_LIBRARY"),
    method = error_body("Method not allowed; allowed: POST, OPTIONS", "METHOD_NOT_ALLOWED"),
    unavailable = error_body("Service temporarily unavailable; retry later", "SERVICE_UNAVAILABLE"),
    presign = error_body("Temporary URL could not be generated", "PRESIGN_FAILED"),
}

-- Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil).
local function days_from_civil(y, m, d)
    if m <= 2 then
        y = y - 1
    end
    local era = floor(y / 400)
    local yoe = y - era * 400
    local doy = floor((153 * ((m + 9) % 12) + 2) / 5) + d - 1
    local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
    return era * 146097 + doe - 719468
end

-- The UTC month, refreshed once a second: its name, start and reset, and the counter's expiry
-- (the reset plus a week of grace, as the gateway keeps usage).
local clock = { second = -1 }
local GRACE_SECS = 7 * 86400

local function tick()
    local now = ngx_time()
    if now == clock.second then
        return now
    end
    local d = os.date("!*t", now)
    local period = string.format("%04d-%02d", d.year, d.month)
    if period ~= clock.period then
        local ny, nm = d.year, d.month + 1
        if nm == 13 then
            ny, nm = ny + 1, 1
        end
        clock.period = period
        clock.start = days_from_civil(d.year, d.month, 1) * 86400
        clock.reset = days_from_civil(ny, nm, 1) * 86400
        clock.reset_at = os.date("!%Y-%m-%dT%H:%M:%SZ", clock.reset)
        clock.expire_at = tostring(clock.reset + GRACE_SECS)
        clock.window = tostring(clock.reset - clock.start)
    end
    clock.to_reset = clock.reset - now
    if clock.to_reset < 1 then
        clock.to_reset = 1
    end
    clock.second = now
    return now
end

-- init_by_lua: reads the configuration bench_load.py wrote (settings and the catalog).
function M.init(path)
    local f = assert(io.open(path))
    conf = assert(cjson.decode(f:read("*a")))
    f:close()
    local r = conf.redis
    rhost, rport, rtimeout, rpool, ridle = r.host, r.port, r.timeout_ms, r.pool_size, r.idle_ms
    prefix = r.prefix
    key_ttl, negative_ttl = conf.key_cache.ttl, conf.key_cache.negative_ttl
    keys = lrucache.new(conf.key_cache.size)
    signer = sigv4.new(conf.s3)
    libs = {}
    for name, tracks in pairs(conf.catalog) do
        local lib = { n = 0, total = 0, uniform = true, cum = {}, tracks = {} }
        for _, t in ipairs(tracks) do
            if t.active ~= false then
                local w = t.weight or 1
                lib.n = lib.n + 1
                lib.total = lib.total + w
                lib.cum[lib.n] = lib.total
                if w ~= 1 then
                    lib.uniform = false
                end
                lib.tracks[lib.n] = {
                    encoded_key = sigv4.encode_key(t.key),
                    head = '{"code":0,"msg":"ok","data":{"title":' .. json_string(t.title) .. ',"url":"',
                    tail = '","duration_sec":' .. string.format("%d", t.duration_sec) .. "}}",
                    second = -1,
                    body = nil,
                }
            end
        end
        libs[name] = lib
    end
end

-- init_worker_by_lua: each worker its own random sequence.
function M.init_worker()
    math.randomseed(floor(ngx.now() * 1000) + ngx.worker.pid())
end

local function pick(lib)
    if lib.uniform then
        return lib.tracks[random(lib.n)]
    end
    local r = random() * lib.total
    local cum, lo, hi = lib.cum, 1, lib.n
    while lo < hi do
        local mid = floor((lo + hi) / 2)
        if cum[mid] > r then
            hi = mid
        else
            lo = mid + 1
        end
    end
    return lib.tracks[lo]
end

local function answer(status, body)
    ngx.status = status
    header.content_length = #body
    ngx_print(body)
end

local function unauthorized(body)
    header["WWW-Authenticate"] = "Bearer"
    return answer(401, body)
end

local function store_down(sock, err)
    if sock then
        sock:close()
    end
    ngx_log(WARN, "redis: ", err)
    header["Retry-After"] = "1"
    return answer(503, ERR.unavailable)
end

-- Row 3: the token of `Authorization: Bearer <token>` (scheme case-insensitive, blanks
-- around tolerated), or nil.
local function bearer(value)
    if not value or value == "" then
        return nil
    end
    local m = re_match(value, [[^[ \t]*([^ \t]+)[ \t]+(.*?)[ \t]*$]], "jo")
    if not m or lower(m[1]) ~= "bearer" or m[2] == "" then
        return nil
    end
    return m[2]
end

-- The key's record: { limit = number or nil, active = bool, counter = Redis key prefix }.
local function parse_record(res)
    if res[1] == null then
        return false
    end
    local limit = res[3]
    return {
        active = res[2] == "active",
        limit = (limit ~= null and limit ~= "") and tonumber(limit) or nil,
        counter = prefix .. "{" .. res[1] .. "}:usage:",
        period = nil,
        quota_cmd = nil,
    }
end

-- INCR and EXPIREAT ... NX of the key's counter for this month, encoded once per month.
local function quota_command(rec)
    if rec.period ~= clock.period then
        local k = rec.counter .. clock.period
        rec.quota_cmd = table.concat(redis.encode(redis.encode({}, { "INCR", k }),
            { "EXPIREAT", k, clock.expire_at, "NX" }))
        rec.decr_cmd = table.concat(redis.encode({}, { "DECR", k }))
        if rec.limit then
            rec.policy = '"monthly";q=' .. rec.limit .. ";w=" .. clock.window
        end
        rec.period = clock.period
    end
    return rec.quota_cmd
end

local function rate_headers(rec, limit, used)
    header["RateLimit-Policy"] = rec.policy
    local remaining = limit - used
    if remaining < 0 then
        remaining = 0
    end
    header["RateLimit"] = '"monthly";r=' .. remaining .. ";t=" .. clock.to_reset
end

function M.handle()
    local method = get_method()
    if method ~= "POST" then
        if method == "OPTIONS" then
            header["Access-Control-Allow-Methods"] = "POST, OPTIONS"
            header["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            header["Access-Control-Max-Age"] = "86400"
            header.content_type = nil
            ngx.status = 204
            return ngx.exit(204)
        end
        header["Allow"] = "POST, OPTIONS"
        return answer(405, ERR.method)
    end

    -- Rows 3-5: the key.
    local token = bearer(var.http_authorization)
    if not token then
        return unauthorized(ERR.missing_auth)
    end
    if #token ~= 36 or not re_find(token, [[^alp_[A-Za-z0-9]{32}$]], "jo") then
        return unauthorized(ERR.invalid_format)
    end
    local digest = sigv4.sha256_hex(token)
    local rec = keys:get(digest)
    local sock, err
    if rec == nil then
        sock, err = redis.connect(rhost, rport, rtimeout, rpool)
        if not sock then
            return store_down(nil, err)
        end
        local res
        res, err = redis.command(sock, { "HMGET", prefix .. "key:" .. digest, "id", "status", "monthly_limit" })
        if not res then
            return store_down(sock, err)
        end
        rec = parse_record(res)
        keys:set(digest, rec, rec and key_ttl or negative_ttl)
    end
    if not rec or not rec.active then
        if sock then
            sock:setkeepalive(ridle, rpool)
        end
        return unauthorized(ERR.invalid_key)
    end

    -- Rows 7-10: the body, the library, a track.
    read_body()
    local body = get_body_data() or ""
    local req = find(body, "^%s*{") and decode(body)
    if type(req) ~= "table" then
        if sock then
            sock:setkeepalive(ridle, rpool)
        end
        return answer(400, ERR.invalid_json)
    end
    local name = req.library
    if type(name) ~= "string" or name == "" then
        if sock then
            sock:setkeepalive(ridle, rpool)
        end
        return answer(400, ERR.missing_library)
    end
    local lib = libs[name]
    if not lib or lib.n == 0 then
        if sock then
            sock:setkeepalive(ridle, rpool)
        end
        if not lib then
            return answer(404, error_body("Library '" .. name .. "' not found", "LIBRARY_NOT_FOUND"))
        end
        return answer(404, error_body("Library '" .. name .. "' has no active audio items", "NO_AUDIO_ITEMS"))
    end
    local track = pick(lib)

    -- Row 11: the month's quota, one round trip.
    local now = tick()
    if not sock then
        sock, err = redis.connect(rhost, rport, rtimeout, rpool)
        if not sock then
            return store_down(nil, err)
        end
    end
    local replies
    replies, err = redis.pipeline(sock, quota_command(rec), 2)
    if not replies then
        return store_down(sock, err)
    end
    local used = replies[1]
    if type(used) ~= "number" then
        return store_down(sock, "INCR answered " .. tostring(used))
    end
    local limit = rec.limit
    if limit and used > limit then
        local back
        back, err = redis.pipeline(sock, rec.decr_cmd, 1)
        if not back then
            return store_down(sock, err)
        end
        sock:setkeepalive(ridle, rpool)
        used = used - 1
        rate_headers(rec, limit, used)
        header["Retry-After"] = clock.to_reset
        return answer(429, '{"error":"Monthly quota of ' .. limit .. " calls reached; it resets at "
            .. clock.reset_at .. '","code":"QUOTA_EXCEEDED","limit":' .. limit .. ',"reset_at":"'
            .. clock.reset_at .. '"}')
    end
    sock:setkeepalive(ridle, rpool)

    -- Row 12 and the answer: one signature per track and second.
    local out = track.body
    if track.second ~= now then
        local ok, url = pcall(signer.presign, signer, track.encoded_key, now)
        if not ok then
            ngx_log(WARN, "presign: ", url)
            local s = redis.connect(rhost, rport, rtimeout, rpool)
            if s and redis.pipeline(s, rec.decr_cmd, 1) then
                s:setkeepalive(ridle, rpool)
            end
            return answer(503, ERR.presign)
        end
        out = track.head .. url .. track.tail
        track.body, track.second = out, now
    end
    if limit then
        rate_headers(rec, limit, used)
    end
    return answer(200, out)
end

return M
