-- lift.lua: end a penalty now and record who lifted it and why (for Explain).
-- KEYS[1] penalty key, KEYS[2] lift record.  ARGV[1] record, ARGV[2] record ttl (ms).
-- Returns 1 if a penalty was active.
local removed = redis.call('DEL', KEYS[1])
if removed == 1 then redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2]) end
return removed
