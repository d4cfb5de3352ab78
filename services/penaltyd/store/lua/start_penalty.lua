-- start_penalty.lua: start a penalty unless one is active (NX) and mark its evidence used.
-- An active penalty bound to one client of the address (its reason holds the BIND mark,
-- \x1d: penaltyd.reasons) is replaced by an unbound one (the shared rules fired on the
-- whole address while its newcomers misbehaved together).
-- A penalty is two fields of the identity's window hash ("p" reason, "x" expiry): no key
-- of its own, which halves what an active penalty costs in Redis.
-- KEYS[1] the identity's window hash, KEYS[2] its offence counter (escalation),
-- KEYS[3] the address window (the same key as KEYS[1] unless KEYS[1] is a client's window
-- behind a shared address: its evidence is in the address window too, and must not add
-- up, after a few such penalties, to a penalty on the whole address).
-- KEYS[4] the address's reputation {A}:r (a new penalty adds one to its decayed count).
-- ARGV[1] base length (ms), ARGV[2] compact reason, ARGV[3] bucket length (ms),
-- ARGV[4] escalation multiplier (1 = off), ARGV[5] cap (ms), ARGV[6] offence memory (ms),
-- ARGV[7] reputation half-life (ms), ARGV[8] reputation ttl (ms)
-- Returns {created 0|1, pttl, reason, now_ms, offences}
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local current = redis.call('HMGET', KEYS[1], 'p', 'x')
local offences = tonumber(redis.call('GET', KEYS[2]) or '0')
if current[1] and tonumber(current[2] or '0') > now_ms then
  local unbinds = string.find(current[1], '\29', 1, true) and not string.find(ARGV[2], '\29', 1, true)
  if not unbinds then
    return {0, tonumber(current[2]) - now_ms, current[1], now_ms, offences}
  end
end
local ttl = tonumber(ARGV[1])
local mult = tonumber(ARGV[4])
if mult > 1 then
  ttl = math.min(math.floor(ttl * mult ^ offences), tonumber(ARGV[5]))
  offences = redis.call('INCR', KEYS[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[6])
end
local expires = now_ms + ttl
-- Evidence up to this bucket caused this penalty; it must not cause the next one.
local bucket = math.floor(now_ms / tonumber(ARGV[3]))
redis.call('HSET', KEYS[1], 'p', ARGV[2], 'x', expires, 'm', bucket)
local left = redis.call('PTTL', KEYS[1])
if left < 0 or now_ms + left < expires then redis.call('PEXPIREAT', KEYS[1], expires) end
if KEYS[3] ~= KEYS[1] and redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HSET', KEYS[3], 'm', bucket)
end
local rep = redis.call('HMGET', KEYS[4], 'e', 'w', 'p', 't')
local f = 0
if rep[4] then f = 2 ^ (-math.max(0, now_ms - tonumber(rep[4])) / tonumber(ARGV[7])) end
redis.call('HSET', KEYS[4], 'e', string.format('%.6g', tonumber(rep[1] or '0') * f),
  'w', string.format('%.6g', tonumber(rep[2] or '0') * f),
  'p', string.format('%.4g', tonumber(rep[3] or '0') * f + 1), 't', now_ms)
redis.call('PEXPIRE', KEYS[4], ARGV[8])
return {1, ttl, ARGV[2], now_ms, offences}
