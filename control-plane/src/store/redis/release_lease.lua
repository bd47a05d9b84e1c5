-- `release_lease`. KEYS[1]: the lease; ARGV[1]: holder. Deletes it only
-- if `holder` holds it (1), else 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
