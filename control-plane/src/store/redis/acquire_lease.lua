-- `acquire_lease`. KEYS[1]: the lease; ARGV: holder, ttl (ms). Free
-- (absent: never taken, released, or expired by Redis itself) -> taken
-- (1); ours -> extended (1); someone else's -> 0.
local cur = redis.call('GET', KEYS[1])
if not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
