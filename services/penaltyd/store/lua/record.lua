-- record.lua: add outcomes to one identity's sliding window and read it back, atomically.
-- With no outcome pairs it only reads (Explain) and leaves the key's expiry alone.
-- KEYS[1] window hash  {identity}:w   fields: bucket*16+outcome -> count, "m" -> marker bucket
-- KEYS[2] penalty      {identity}:p   string (compact reason) with a PX TTL
-- ARGV[1] bucket length (ms)  ARGV[2] buckets per window  ARGV[3..] outcome, n pairs
-- Returns {penalty_pttl, penalty_reason|false, now_ms, total_0, ..., total_15}
-- Time comes from Redis (TIME): one clock for the whole fleet.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local bucket_ms = tonumber(ARGV[1])
local nbuckets = tonumber(ARGV[2])
local bucket = math.floor(now_ms / bucket_ms)
local oldest = bucket - nbuckets + 1

for i = 3, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[1], bucket * 16 + tonumber(ARGV[i]), ARGV[i + 1])
end
-- The key dies when its newest bucket has left the window: nothing outlives its window.
if #ARGV > 2 then redis.call('PEXPIREAT', KEYS[1], (bucket + 1 + nbuckets) * bucket_ms) end

local all = redis.call('HGETALL', KEYS[1])
local marker = -1
for i = 1, #all, 2 do
  if all[i] == 'm' then marker = tonumber(all[i + 1]) end
end
local totals = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
for i = 1, #all, 2 do
  local f = all[i]
  if f ~= 'm' then
    local code = tonumber(f)
    local b = math.floor(code / 16)
    if b < oldest then
      redis.call('HDEL', KEYS[1], f)
    elseif b > marker then
      local o = code % 16 + 1
      totals[o] = totals[o] + tonumber(all[i + 1])
    end
  end
end

local pttl = redis.call('PTTL', KEYS[2])
local reason = false
if pttl > 0 then reason = redis.call('GET', KEYS[2]) end
local out = {pttl, reason, now_ms}
for i = 1, 16 do out[#out + 1] = totals[i] end
return out
