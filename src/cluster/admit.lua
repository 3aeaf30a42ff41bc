-- One admission of one identity, atomic, on Redis's own clock.
-- KEYS[1]: the identity's token bucket, a hash {tokens, at} (at: ms of Redis's TIME).
-- KEYS[2]: the identity's concurrency leases, a sorted set of lease ids scored by expiry (ms).
-- ARGV: rate (tokens a second), burst, max_concurrent (0: no cap), lease id, lease_ttl (ms).
-- Returns 0: admitted (a token taken and, with a cap, the lease added); 1: rate-limited;
-- 2: concurrency-limited. A refusal takes nothing.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local max = tonumber(ARGV[3])
local ttl = tonumber(ARGV[5])

local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(bucket[1])
local at = tonumber(bucket[2])
if tokens == nil or at == nil then
  tokens = burst
  at = now
end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate / 1000)
if tokens < 1 then
  return 1
end
if max > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= max then
    return 2
  end
  redis.call('ZADD', KEYS[2], now + ttl, ARGV[4])
  -- Every lease scores at most now + ttl: the set outlives none of them.
  redis.call('PEXPIRE', KEYS[2], ttl)
end
tokens = tokens - 1
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
-- A full bucket is the same as no bucket: let the key go once it has refilled (30 days at most).
local full_in = math.ceil((burst - tokens) * 1000 / rate)
redis.call('PEXPIRE', KEYS[1], math.max(1, math.min(full_in, 2592000000)))
return 0
