-- Forget one customer and release its relay networks.
-- KEYS[1] <p>:{cust}:rec, KEYS[2] <p>:{cust}:relay; ARGV[1] id. Returns 1 if it existed.
local value = redis.call('HGET', KEYS[1], ARGV[1])
if not value then return 0 end
local ok, rec = pcall(cjson.decode, string.match(value, '^%d+:%d+:(.*)$') or '{}')
if ok and type(rec) == 'table' and type(rec.relay_networks) == 'table' then
  for _, cidr in ipairs(rec.relay_networks) do
    if redis.call('HGET', KEYS[2], cidr) == ARGV[1] then redis.call('HDEL', KEYS[2], cidr) end
  end
end
redis.call('HDEL', KEYS[1], ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return (tonumber(string.match(value, '^%d+:(%d+):') or '0') > now) and 1 or 0
