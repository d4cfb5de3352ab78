-- start_penalty.lua: start a penalty unless one is active (NX) and mark its evidence used.
-- KEYS[1] penalty key, KEYS[2] its window hash, KEYS[3] offence counter (escalation),
-- KEYS[4] the address window (the same key as KEYS[2] unless KEYS[1] is a client's penalty
-- behind a shared address: its evidence is in the address window too, and must not add
-- up, after a few such penalties, to a penalty on the whole address).
-- ARGV[1] base length (ms), ARGV[2] compact reason, ARGV[3] bucket length (ms),
-- ARGV[4] escalation multiplier (1 = off), ARGV[5] cap (ms), ARGV[6] offence memory (ms)
-- Returns {created 0|1, pttl, reason, now_ms, offences}
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local created = 0
local offences = tonumber(redis.call('GET', KEYS[3]) or '0')
local ttl = tonumber(ARGV[1])
local mult = tonumber(ARGV[4])
if mult > 1 then
  ttl = math.min(math.floor(ttl * mult ^ offences), tonumber(ARGV[5]))
end
if redis.call('SET', KEYS[1], ARGV[2], 'NX', 'PX', ttl) then
  created = 1
  if mult > 1 then
    offences = redis.call('INCR', KEYS[3])
    redis.call('PEXPIRE', KEYS[3], ARGV[6])
  end
  -- Evidence up to this bucket caused this penalty; it must not cause the next one.
  -- The window key keeps its own expiry (set by record.lua); HSET does not change it.
  local bucket = math.floor(now_ms / tonumber(ARGV[3]))
  for k = 2, #KEYS, 2 do
    if redis.call('EXISTS', KEYS[k]) == 1 then redis.call('HSET', KEYS[k], 'm', bucket) end
  end
end
return {created, redis.call('PTTL', KEYS[1]), redis.call('GET', KEYS[1]), now_ms, offences}
