-- AWS Signature Version 4 presigned GET URLs (query string) for S3, the same bytes as the
-- gateway's src/sign.rs and botocore's generate_presigned_url: the object key encoded once
-- (`/` kept), no path normalisation, botocore's parameter order. SHA-256 comes from the
-- system libcrypto through the LuaJIT FFI; HMAC-SHA256 is built on it with the inner and
-- outer hash states of the day's signing key prepared once per UTC day.

local ffi = require "ffi"
local bit = require "bit"

local C = ffi.C
local byte, format, gsub, sub = string.byte, string.format, string.gsub, string.sub
local bxor = bit.bxor
local ffi_copy, ffi_string, ffi_new, ffi_sizeof = ffi.copy, ffi.string, ffi.new, ffi.sizeof

ffi.cdef [[
typedef struct {
    unsigned int h[8];
    unsigned int Nl, Nh;
    unsigned int data[16];
    unsigned int num, md_len;
} audiolib_sha256_ctx;
int SHA256_Init(audiolib_sha256_ctx *c);
int SHA256_Update(audiolib_sha256_ctx *c, const void *data, size_t len);
int SHA256_Final(unsigned char *md, audiolib_sha256_ctx *c);
unsigned char *SHA256(const unsigned char *d, size_t n, unsigned char *md);
unsigned char *ngx_hex_dump(unsigned char *dst, const unsigned char *src, size_t len);
]]

-- libssl3's soname: Debian has no unversioned libcrypto.so without libssl-dev.
local crypto = ffi.load("libcrypto.so.3")

local ctx_t = ffi.typeof("audiolib_sha256_ctx")
local CTX_SIZE = ffi_sizeof(ctx_t)
local md = ffi_new("unsigned char[32]")
local md2 = ffi_new("unsigned char[32]")
local hex = ffi_new("unsigned char[64]")
local work = ffi_new(ctx_t)

local M = {}

-- Lower-case hex of SHA-256 (nginx's own ngx_hex_dump does the hex, as lua-resty-string does).
function M.sha256_hex(s)
    crypto.SHA256(s, #s, md)
    C.ngx_hex_dump(hex, md, 32)
    return ffi_string(hex, 64)
end

-- The inner and outer hash states of HMAC-SHA256 under `key` (a Lua string).
local function hmac_states(key)
    if #key > 64 then
        crypto.SHA256(key, #key, md)
        key = ffi_string(md, 32)
    end
    local ipad = ffi_new("unsigned char[64]", 0x36)
    local opad = ffi_new("unsigned char[64]", 0x5c)
    for i = 1, #key do
        local b = byte(key, i)
        ipad[i - 1] = bxor(0x36, b)
        opad[i - 1] = bxor(0x5c, b)
    end
    local inner, outer = ffi_new(ctx_t), ffi_new(ctx_t)
    crypto.SHA256_Init(inner)
    crypto.SHA256_Update(inner, ipad, 64)
    crypto.SHA256_Init(outer)
    crypto.SHA256_Update(outer, opad, 64)
    return inner, outer
end

-- HMAC-SHA256 of `msg` from prepared states, into `out` (32 bytes).
local function hmac_finish(inner, outer, msg, out)
    ffi_copy(work, inner, CTX_SIZE)
    crypto.SHA256_Update(work, msg, #msg)
    crypto.SHA256_Final(md2, work)
    ffi_copy(work, outer, CTX_SIZE)
    crypto.SHA256_Update(work, md2, 32)
    crypto.SHA256_Final(out, work)
end

local function hmac(key, msg)
    local inner, outer = hmac_states(key)
    hmac_finish(inner, outer, msg, md)
    return ffi_string(md, 32)
end
M.hmac = hmac

local function escape(c)
    return format("%%%02X", byte(c))
end

-- SigV4 URI encoding: all but A-Z a-z 0-9 - _ . ~ escaped, UTF-8 byte by byte.
function M.encode_value(s)
    return (gsub(s, "[^A-Za-z0-9%-_%.~]", escape))
end

-- The same for an object key in a path: `/` stays. Encoded once, as S3 wants.
function M.encode_key(s)
    return (gsub(s, "[^A-Za-z0-9%-_%.~/]", escape))
end

local Signer = {}
Signer.__index = Signer

-- cfg: scheme, endpoint_authority (host[:port], the port only when not the default),
-- bucket, region, path_style, ttl (seconds), access_key_id, secret_access_key,
-- session_token (optional).
function M.new(cfg)
    local authority, path_prefix
    if cfg.path_style then
        authority = cfg.endpoint_authority
        path_prefix = "/" .. M.encode_key(cfg.bucket) .. "/"
    else
        authority = cfg.bucket .. "." .. cfg.endpoint_authority
        path_prefix = "/"
    end
    local token = cfg.session_token
    return setmetatable({
        url_prefix = cfg.scheme .. "://" .. authority .. path_prefix,
        path_prefix = path_prefix,
        authority = authority,
        region = cfg.region,
        secret = cfg.secret_access_key,
        credential_prefix = M.encode_value(cfg.access_key_id) .. "%2F",
        credential_suffix = "%2F" .. M.encode_value(cfg.region) .. "%2Fs3%2Faws4_request",
        token_param = (type(token) == "string" and token ~= "")
            and ("&X-Amz-Security-Token=" .. M.encode_value(token)) or "",
        ttl = tostring(math.floor(cfg.ttl)),
        second = -1,
        day = nil,
        sig = ffi_new("unsigned char[32]"),
    }, Signer)
end

-- Everything that changes once a second (the stamp) or once a day (the signing key).
function Signer:set_time(t)
    local stamp = os.date("!%Y%m%dT%H%M%SZ", t)
    local date = sub(stamp, 1, 8)
    if date ~= self.day then
        local k = hmac("AWS4" .. self.secret, date)
        k = hmac(k, self.region)
        k = hmac(k, "s3")
        k = hmac(k, "aws4_request")
        self.inner, self.outer = hmac_states(k)
        self.day = date
    end
    -- The query before the signature, in botocore's order.
    self.head = "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=" .. self.credential_prefix
        .. date .. self.credential_suffix .. "&X-Amz-Date=" .. stamp .. "&X-Amz-Expires=" .. self.ttl
    self.scope = "AWS4-HMAC-SHA256\n" .. stamp .. "\n" .. date .. "/" .. self.region .. "/s3/aws4_request\n"
    self.second = t
end

-- The presigned URL of an already-encoded object key at Unix second `t`.
function Signer:presign(encoded_key, t)
    if t ~= self.second then
        self:set_time(t)
    end
    -- The canonical query sorts the security token before SignedHeaders.
    local canonical = "GET\n" .. self.path_prefix .. encoded_key .. "\n" .. self.head
        .. self.token_param .. "&X-Amz-SignedHeaders=host\nhost:" .. self.authority
        .. "\n\nhost\nUNSIGNED-PAYLOAD"
    local to_sign = self.scope .. M.sha256_hex(canonical)
    hmac_finish(self.inner, self.outer, to_sign, self.sig)
    C.ngx_hex_dump(hex, self.sig, 32)
    return self.url_prefix .. encoded_key .. "?" .. self.head .. "&X-Amz-SignedHeaders=host"
        .. self.token_param .. "&X-Amz-Signature=" .. ffi_string(hex, 64)
end

return M
