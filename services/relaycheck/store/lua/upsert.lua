-- Create or replace one customer, atomically.
-- KEYS[1] <p>:{cust}:rec    hash  id -> "<updated_ms>:<expires_ms>:<config json>"
-- KEYS[2] <p>:{cust}:relay  hash  relay cidr -> id
-- ARGV[1] id, ARGV[2] config json, ARGV[3] ttl ms, ARGV[4..] relay cidrs (normalised)
-- Returns {"conflict", index, cidr, owner} or {"ok", stored value}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id, ttl = ARGV[1], tonumber(ARGV[3])

local function expires(value)
  local e = string.match(value, '^%d+:(%d+):')
  return tonumber(e or '0')
end

-- Release every relay network of a record (only entries that still point at it).
local function release(owner, value)
  local ok, rec = pcall(cjson.decode, string.match(value, '^%d+:%d+:(.*)$') or '{}')
  if ok and type(rec) == 'table' and type(rec.relay_networks) == 'table' then
    for _, cidr in ipairs(rec.relay_networks) do
      if redis.call('HGET', KEYS[2], cidr) == owner then
        redis.call('HDEL', KEYS[2], cidr)
      end
    end
  end
end

for i = 4, #ARGV do
  local owner = redis.call('HGET', KEYS[2], ARGV[i])
  if owner and owner ~= id then
    local value = redis.call('HGET', KEYS[1], owner)
    if value and expires(value) > now then
      return {'conflict', i - 4, ARGV[i], owner}
    end
    if value then  -- an expired owner: forget it entirely
      release(owner, value)
      redis.call('HDEL', KEYS[1], owner)
    end
  end
end

local old = redis.call('HGET', KEYS[1], id)
if old then release(id, old) end
for i = 4, #ARGV do redis.call('HSET', KEYS[2], ARGV[i], id) end
local stored = now .. ':' .. (now + ttl) .. ':' .. ARGV[2]
redis.call('HSET', KEYS[1], id, stored)
-- Every key expires: each hash lives as long as its newest record.
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 and redis.call('PTTL', key) < ttl then
    redis.call('PEXPIRE', key, ttl)
  end
end
return {'ok', stored}
