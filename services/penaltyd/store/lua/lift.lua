-- lift.lua: end a penalty now and record who lifted it and why (for Explain).
-- KEYS[1] the identity's window hash, KEYS[2] lift record.
-- ARGV[1] record, ARGV[2] record ttl (ms). Returns the lifted penalty's reason, or 0 if none
-- was active (the feed's LIFTED event carries the reason: a sealed identity travels in it).
local v = redis.call('HMGET', KEYS[1], 'p', 'x')
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if not v[1] or tonumber(v[2] or '0') <= now_ms then return 0 end
redis.call('HDEL', KEYS[1], 'p', 'x')
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return v[1]
