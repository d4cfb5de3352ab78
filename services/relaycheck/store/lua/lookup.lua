-- One customer by id, or by the longest relay network containing an address.
-- KEYS[1] <p>:{cust}:rec, KEYS[2] <p>:{cust}:relay
-- ARGV[1] "id" then ARGV[2] the id, or "ip" then ARGV[2..] candidate cidrs, most
-- specific first (relaycheck.store.base.candidate_networks).
-- Returns {stored value or false, now ms, matched cidr or false}. Expired records met
-- on the way are dropped with their relay networks.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function live(id)
  local value = redis.call('HGET', KEYS[1], id)
  if not value then return nil end
  local e = tonumber(string.match(value, '^%d+:(%d+):') or '0')
  if e > now then return value end
  local ok, rec = pcall(cjson.decode, string.match(value, '^%d+:%d+:(.*)$') or '{}')
  if ok and type(rec) == 'table' and type(rec.relay_networks) == 'table' then
    for _, cidr in ipairs(rec.relay_networks) do
      if redis.call('HGET', KEYS[2], cidr) == id then redis.call('HDEL', KEYS[2], cidr) end
    end
  end
  redis.call('HDEL', KEYS[1], id)
  return nil
end

if ARGV[1] == 'id' then
  return {live(ARGV[2]) or false, now, false}
end
local owners = redis.call('HMGET', KEYS[2], unpack(ARGV, 2))
for i, owner in ipairs(owners) do
  if owner then
    local value = live(owner)
    if value then return {value, now, ARGV[i + 1]} end
    redis.call('HDEL', KEYS[2], ARGV[i + 1])
  end
end
return {false, now, false}
