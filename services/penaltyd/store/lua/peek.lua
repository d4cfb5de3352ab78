-- peek.lua: the penalty of one identity with its exact remaining time (the check path).
-- KEYS[1] the identity's window hash (fields "p" reason, "x" expiry in unix ms).
-- Returns {pttl, reason|false, now_ms}; pttl <= 0 means none. Time is Redis's own.
local v = redis.call('HMGET', KEYS[1], 'p', 'x')
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expires = tonumber(v[2] or '0')
if v[1] and expires > now_ms then return {expires - now_ms, v[1], now_ms} end
return {-2, false, now_ms}
