-- Add units to a key's quota and record it, or change nothing: every check first.
-- KEYS[1] account hash  KEYS[2] ledger stream   ARGV[1] units  ARGV[2] largest quota allowed
-- Returns {'ok', quota} | {'unknown_key'} | {'too_large', quota}.
local units, cap = tonumber(ARGV[1]), tonumber(ARGV[2])
local quota = redis.call('HGET', KEYS[1], 'quota')
if not quota then return {'unknown_key'} end
quota = tonumber(quota)
if not quota or quota + units > cap then return {'too_large', string.format('%.0f', quota or -1)} end
redis.call('HINCRBY', KEYS[1], 'quota', units)
redis.call('XADD', KEYS[2], '*', 'event', 'top_up', 'units', units)
return {'ok', string.format('%.0f', quota + units)}
