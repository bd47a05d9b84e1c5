-- The Redis store's one writing script: applies groups of changes decided in
-- Rust (store/rules.rs), each only if every record its decision read is
-- unchanged. It knows no rule of GRS: it compares and writes.
--
-- ARGV: groups back to back; per group:
--   the number of checks, then per check: kind, key, expected
--     'r': the hash's `rev` field ('' when absent)
--     'e': EXISTS (0 or 1)
--     'c': SCARD
--   then per write: op and its arguments
--     'h' key n f1 v1 ... fn vn   HSET the n fields, then HINCRBY rev 1
--     'n' key n f1 v1 ... fn vn   HSET the n fields and rev 1: a record its
--                                 group checked has no rev (is new)
--     'x' key seconds             EXPIRE
--     'p' key                     PERSIST
--     's' key value seconds       SET with EX
--     'd' key                     DEL
--     'a' key member              SADD
--     'm' key member              SREM
--     'z' key score member        ZADD
--     'q' key maxlen n f1 v1 ...  XADD (MAXLEN ~ maxlen unless it is '')
--   then '.', the end of the group.
-- Groups apply in order. The first group whose check fails stops the
-- script, with nothing of it written. Returns how many groups applied.
local i = 1
local function nxt()
  local v = ARGV[i]
  i = i + 1
  return v
end
local g = 0
while i <= #ARGV do
  g = g + 1
  for _ = 1, tonumber(nxt()) do
    local kind, key, want = nxt(), nxt(), nxt()
    local have
    if kind == 'r' then
      have = redis.call('HGET', key, 'rev') or ''
    elseif kind == 'e' then
      have = tostring(redis.call('EXISTS', key))
    else
      have = tostring(redis.call('SCARD', key))
    end
    if have ~= want then return g - 1 end
  end
  while true do
    local op = nxt()
    if op == '.' then break end
    local key = nxt()
    if op == 'h' then
      local n = tonumber(nxt())
      local args = {}
      for f = 1, 2 * n do args[f] = nxt() end
      if n > 0 then redis.call('HSET', key, unpack(args)) end
      redis.call('HINCRBY', key, 'rev', 1)
    elseif op == 'n' then
      local n = tonumber(nxt())
      local args = {}
      for f = 1, 2 * n do args[f] = nxt() end
      args[2 * n + 1] = 'rev'
      args[2 * n + 2] = '1'
      redis.call('HSET', key, unpack(args))
    elseif op == 'x' then
      redis.call('EXPIRE', key, nxt())
    elseif op == 'p' then
      redis.call('PERSIST', key)
    elseif op == 's' then
      local v = nxt()
      redis.call('SET', key, v, 'EX', nxt())
    elseif op == 'd' then
      redis.call('DEL', key)
    elseif op == 'a' then
      redis.call('SADD', key, nxt())
    elseif op == 'm' then
      redis.call('SREM', key, nxt())
    elseif op == 'z' then
      local score = nxt()
      redis.call('ZADD', key, score, nxt())
    elseif op == 'q' then
      local maxlen, n = nxt(), tonumber(nxt())
      local args = {}
      for f = 1, 2 * n do args[f] = nxt() end
      if maxlen == '' then
        redis.call('XADD', key, '*', unpack(args))
      else
        redis.call('XADD', key, 'MAXLEN', '~', maxlen, '*', unpack(args))
      end
    else
      return redis.error_reply('apply: unknown write ' .. tostring(op))
    end
  end
end
return g
