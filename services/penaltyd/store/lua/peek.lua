-- peek.lua: the penalty of one identity with its exact remaining time (the check path).
-- KEYS[1] penalty key.  Returns {pttl, reason|false, now_ms}; pttl <= 0 means none.
local pttl = redis.call('PTTL', KEYS[1])
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if pttl <= 0 then return {pttl, false, now_ms} end
return {pttl, redis.call('GET', KEYS[1]), now_ms}
