-- neighbourhood.lua: add one replica's sums to a neighbourhood's decayed counters, read them.
-- One key per neighbourhood, with its own hash tag: no hot key (the worst-neighbourhoods
-- index is written beside it in the same pipeline, on its own shard).
-- KEYS[1] {nb:<N>}:r  hash: e events, w weighted errors, p penalties (decayed to t, unix ms)
-- ARGV[1] events  ARGV[2] weighted errors  ARGV[3] penalties (all 0: only read)
-- ARGV[4] half-life ms  ARGV[5] ttl ms
-- Returns {events, weighted, penalties, now_ms, as of ms} (strings)
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rep = redis.call('HMGET', KEYS[1], 'e', 'w', 'p', 't')
local f = 0
if rep[4] then f = 2 ^ (-math.max(0, now_ms - tonumber(rep[4])) / tonumber(ARGV[4])) end
local e = tonumber(rep[1] or '0') * f + tonumber(ARGV[1])
local w = tonumber(rep[2] or '0') * f + tonumber(ARGV[2])
local p = tonumber(rep[3] or '0') * f + tonumber(ARGV[3])
if tonumber(ARGV[1]) > 0 or tonumber(ARGV[3]) > 0 then
  redis.call('HSET', KEYS[1], 'e', string.format('%.6g', e), 'w', string.format('%.6g', w),
    'p', string.format('%.4g', p), 't', now_ms)
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
end
return {string.format('%.6g', e), string.format('%.6g', w), string.format('%.4g', p),
  tostring(now_ms)}
