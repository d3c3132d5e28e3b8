-- A minimal Redis (RESP2) client over ngx.socket.tcp: commands are sent as arrays of bulk
-- strings, several at once when pipelined, and replies read back in order. Connections are
-- pooled per worker with setkeepalive, as lua-resty-redis does. Only what audio.lua needs.

local tcp = ngx.socket.tcp
local null = ngx.null
local byte, sub = string.byte, string.sub
local tonumber = tonumber

local M = {}

-- A connected socket (from the worker's pool when one is idle there), or nil and an error.
function M.connect(host, port, timeout_ms, pool_size)
    local sock = tcp()
    sock:settimeouts(timeout_ms, timeout_ms, timeout_ms)
    local ok, err = sock:connect(host, port, { pool_size = pool_size })
    if not ok then
        return nil, err
    end
    return sock
end

-- Appends one command (an array of strings or numbers) to `out` in RESP.
function M.encode(out, args)
    local n = #out
    out[n + 1] = "*" .. #args .. "\r\n"
    n = n + 1
    for i = 1, #args do
        local a = tostring(args[i])
        out[n + 1] = "$" .. #a .. "\r\n"
        out[n + 2] = a
        out[n + 3] = "\r\n"
        n = n + 3
    end
    return out
end

local read_replies

-- One reply: a string, number, array, ngx.null; false and the message for a Redis error;
-- nil and the socket's error when the connection failed.
local function read_reply(sock)
    local line, err = sock:receive()
    if not line then
        return nil, err
    end
    local prefix = byte(line)
    if prefix == 58 then -- ':'
        return tonumber(sub(line, 2))
    elseif prefix == 36 then -- '$'
        local n = tonumber(sub(line, 2))
        if n < 0 then
            return null
        end
        local data, e = sock:receive(n + 2)
        if not data then
            return nil, e
        end
        return sub(data, 1, n)
    elseif prefix == 42 then -- '*'
        local n = tonumber(sub(line, 2))
        if n < 0 then
            return null
        end
        return read_replies(sock, n)
    elseif prefix == 43 then -- '+'
        return sub(line, 2)
    elseif prefix == 45 then -- '-'
        return false, sub(line, 2)
    end
    return nil, "unexpected reply: " .. line
end
M.read_reply = read_reply

-- `n` replies in order (an array's elements, or a pipeline's answers); nil and the socket's
-- error when the connection failed.
read_replies = function(sock, n)
    local replies = {}
    for i = 1, n do
        local v, e = read_reply(sock)
        if v == nil then
            return nil, e
        end
        replies[i] = v
    end
    return replies
end

-- Sends the already-encoded commands in `out` in one write and reads `count` replies. The
-- replies are returned in order; on a socket error, nil and the error.
function M.pipeline(sock, out, count)
    local ok, err = sock:send(out)
    if not ok then
        return nil, err
    end
    return read_replies(sock, count)
end

-- One command; its reply, or nil/false and the error as read_reply.
function M.command(sock, args)
    local ok, err = sock:send(M.encode({}, args))
    if not ok then
        return nil, err
    end
    return read_reply(sock)
end

return M
