-- `touch`. KEYS[1]: the queue's stream; ARGV: group, consumer, entry id.
-- Resets the entry's idle time only if the consumer holds it (1); an entry
-- another consumer claimed, or one already acknowledged, is left as it is
-- (0): the caller has lost it. XCLAIM alone (min-idle 0) would take it
-- back from its new holder. No group or no stream: nobody holds it (0).
local held = redis.pcall('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2])
if type(held) ~= 'table' or #held == 0 then
  return 0
end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
