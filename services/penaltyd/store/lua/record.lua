-- record.lua: add outcomes to one address's windows and read them back, atomically.
-- With no outcome pairs it only reads (Explain) and changes nothing.
-- Every key carries the address's hash tag: one Cluster slot, one round trip.
-- KEYS[1] address window  {A}:w       hash: bucket*SLOTS+outcome -> count, "m" -> used-up bucket,
--                                      "p" -> penalty reason, "x" -> penalty expiry (unix ms)
-- KEYS[2] distinct clients {A}:h:<g>  HyperLogLog of client fingerprints, this generation
-- KEYS[3] previous generation {A}:h:<g-1> (read only)
-- KEYS[4] shared mark     {A}:s       string, PX shared_ttl: the address is handled as shared
-- KEYS[5] sub window      {A}:w:<fp>  as KEYS[1], for one client behind a shared address
-- KEYS[6] reputation      {A}:r       hash: e events, w weighted errors, p penalties (decayed
--                                      to t, unix ms), PX reputation ttl
-- ARGV[1] bucket ms  ARGV[2] buckets per window  ARGV[3] fingerprint ("" if unknown)
-- ARGV[4] K (more distinct clients than this: shared)  ARGV[5] "1" if configured shared
-- ARGV[6] shared mark ttl ms  ARGV[7] HLL ttl ms  ARGV[8] reputation half-life ms
-- ARGV[9] reputation ttl ms  ARGV[10] the report's weighted errors
-- ARGV[11..] outcome, n pairs (none: read only)
-- Returns {pttl, reason|false, now_ms, distinct, shared, newly_shared, sub_pttl,
--          sub_reason|false, sub_kept, totals[SLOTS]..., sub_totals[SLOTS]...,
--          rep events, rep weighted, rep penalties (strings: Lua numbers reply as integers)}
-- Outcome slots per bucket: penalty.outcomes.SLOT_WIDTH (a test checks they agree).
local SLOTS = 16
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local bucket_ms = tonumber(ARGV[1])
local nbuckets = tonumber(ARGV[2])
local bucket = math.floor(now_ms / bucket_ms)
local oldest = bucket - nbuckets + 1
local writing = #ARGV > 10

local function add(key)
  for i = 11, #ARGV, 2 do
    redis.call('HINCRBY', key, bucket * SLOTS + tonumber(ARGV[i]), ARGV[i + 1])
  end
  -- The key dies when its newest bucket has left the window, or when its penalty ends if
  -- that is later: nothing outlives its window or its penalty.
  local until_ms = (bucket + 1 + nbuckets) * bucket_ms
  local expires = tonumber(redis.call('HGET', key, 'x') or '0')
  if expires > until_ms then until_ms = expires end
  redis.call('PEXPIREAT', key, until_ms)
end

-- Totals of the evidence that still counts (inside the window, after the bucket a penalty
-- already used) and the penalty held in the same hash. Stale buckets and an ended
-- penalty are deleted on the way when writing.
local function read(key)
  local all = redis.call('HGETALL', key)
  local marker, reason, expires = -1, false, 0
  for i = 1, #all, 2 do
    local f = all[i]
    if f == 'm' then marker = tonumber(all[i + 1])
    elseif f == 'p' then reason = all[i + 1]
    elseif f == 'x' then expires = tonumber(all[i + 1]) end
  end
  local totals = {}
  for i = 1, SLOTS do totals[i] = 0 end
  for i = 1, #all, 2 do
    local f = all[i]
    if f ~= 'm' and f ~= 'p' and f ~= 'x' then
      local code = tonumber(f)
      local b = math.floor(code / SLOTS)
      if b < oldest then
        if writing then redis.call('HDEL', key, f) end
      elseif b > marker then
        local o = code % SLOTS + 1
        totals[o] = totals[o] + tonumber(all[i + 1])
      end
    end
  end
  if expires > now_ms and reason then return totals, expires - now_ms, reason end
  if writing and reason then redis.call('HDEL', key, 'p', 'x') end
  return totals, -2, false
end

if writing then add(KEYS[1]) end
local totals, pttl, reason = read(KEYS[1])

local fp = ARGV[3]
local distinct, shared, newly, kept = 0, 0, 0, 0
local sub_pttl, sub_reason = -2, false
local sub_totals = {}
for i = 1, SLOTS do sub_totals[i] = 0 end
if fp ~= '' then
  if writing then
    redis.call('PFADD', KEYS[2], fp)
    redis.call('PEXPIRE', KEYS[2], ARGV[7])
  end
  distinct = redis.call('PFCOUNT', KEYS[2], KEYS[3])
  if ARGV[5] == '1' or redis.call('EXISTS', KEYS[4]) == 1 then
    shared = 1
  elseif writing and distinct > tonumber(ARGV[4]) then
    redis.call('SET', KEYS[4], '1', 'PX', ARGV[6])
    shared, newly = 1, 1
  end
  -- Clients are told apart as soon as a second one appears, before the address is
  -- known to be shared, so one client's evidence never lands on its neighbours.
  if shared == 1 or distinct >= 2 then
    if writing then add(KEYS[5]) end
    sub_totals, sub_pttl, sub_reason = read(KEYS[5])
    kept = 1
  else
    -- Not told apart, but the client may hold a penalty of its own (cold start).
    local sp = redis.call('HMGET', KEYS[5], 'p', 'x')
    if sp[1] and tonumber(sp[2] or '0') > now_ms then
      sub_pttl, sub_reason = tonumber(sp[2]) - now_ms, sp[1]
    end
  end
end

-- The address's reputation: counters decayed to now, plus this report.
local rep = redis.call('HMGET', KEYS[6], 'e', 'w', 'p', 't')
local f = 0
if rep[4] then f = 2 ^ (-math.max(0, now_ms - tonumber(rep[4])) / tonumber(ARGV[8])) end
local re = tonumber(rep[1] or '0') * f
local rw = tonumber(rep[2] or '0') * f
local rp = tonumber(rep[3] or '0') * f
if writing then
  for i = 12, #ARGV, 2 do re = re + tonumber(ARGV[i]) end
  rw = rw + tonumber(ARGV[10])
  redis.call('HSET', KEYS[6], 'e', string.format('%.6g', re), 'w', string.format('%.6g', rw),
    'p', string.format('%.4g', rp), 't', now_ms)
  redis.call('PEXPIRE', KEYS[6], ARGV[9])
end

local out = {pttl, reason, now_ms, distinct, shared, newly, sub_pttl, sub_reason, kept}
for i = 1, SLOTS do out[#out + 1] = totals[i] end
for i = 1, SLOTS do out[#out + 1] = sub_totals[i] end
out[#out + 1] = string.format('%.6g', re)
out[#out + 1] = string.format('%.6g', rw)
out[#out + 1] = string.format('%.4g', rp)
return out
