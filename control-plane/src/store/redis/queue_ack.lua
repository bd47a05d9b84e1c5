-- `ack`. KEYS[1]: the queue's stream; ARGV: group, consumer, entry id.
-- Acknowledges and deletes the entry only if the consumer holds it (1), in
-- one step, so the stream holds only work not yet done. An entry another
-- consumer claimed stays with it, and one already gone changes nothing (0).
local held = redis.pcall('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2])
if type(held) ~= 'table' or #held == 0 then
  return 0
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
