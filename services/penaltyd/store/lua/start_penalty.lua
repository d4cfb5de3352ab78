-- start_penalty.lua: start a penalty unless one is active (NX) and mark its evidence used.
-- KEYS[1] penalty key, KEYS[2] window hash.
-- ARGV[1] penalty ttl (ms), ARGV[2] compact reason, ARGV[3] bucket length (ms)
-- Returns {created 0|1, pttl, reason, now_ms}
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local created = 0
if redis.call('SET', KEYS[1], ARGV[2], 'NX', 'PX', ARGV[1]) then
  created = 1
  -- Evidence up to this bucket caused this penalty; it must not cause the next one.
  -- The window key keeps its own expiry (set by record.lua); HSET does not change it.
  if redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('HSET', KEYS[2], 'm', math.floor(now_ms / tonumber(ARGV[3])))
  end
end
return {created, redis.call('PTTL', KEYS[1]), redis.call('GET', KEYS[1]), now_ms}
