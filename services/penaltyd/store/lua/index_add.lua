-- index_add.lua: enter a member in one shard of a sharded expiry index
-- (active penalties, shared addresses, allowlist).
-- KEYS[1] shard sorted set (member, score = expiry unix ms)
-- ARGV[1] expires_at_ms, ARGV[2] member
-- Expired members are trimmed here, and the shard itself expires with its last member.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if last[2] then redis.call('PEXPIREAT', KEYS[1], math.floor(tonumber(last[2])) + 1000) end
return now_ms
