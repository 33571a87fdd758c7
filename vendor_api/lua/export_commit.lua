-- Move one exporter's cursor over an account's ledger forward, and trim what every exporter has
-- exported, atomically (one slot: both keys carry the account's hash tag).
-- KEYS[1] ledger stream  KEYS[2] export cursors hash (consumer -> last exported entry id)
-- ARGV[1] consumer  ARGV[2] id of the last entry it wrote  ARGV[3] trim (0/1)
-- Returns {cursor now, entries trimmed}.
--
-- The cursor never moves backwards (a stale or repeated commit changes nothing). Trimming keeps
-- every entry that some consumer has not exported yet: entries older than the smallest cursor
-- go (XTRIM MINID, exact), so a second billing sink is never robbed of events by the first.

local function parse(id)
  local dash = string.find(id, '-', 1, true)
  if not dash then return tonumber(id), 0 end
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end
local function less(a, b)
  local ams, aseq = parse(a)
  local bms, bseq = parse(b)
  return ams < bms or (ams == bms and aseq < bseq)
end

local current = redis.call('HGET', KEYS[2], ARGV[1])
if not current or less(current, ARGV[2]) then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  current = ARGV[2]
end
local trimmed = 0
if ARGV[3] == '1' then
  local oldest = nil
  for _, cursor in ipairs(redis.call('HVALS', KEYS[2])) do
    if not oldest or less(cursor, oldest) then oldest = cursor end
  end
  local ms, seq = parse(oldest)
  trimmed = redis.call('XTRIM', KEYS[1], 'MINID', string.format('%.0f-%.0f', ms, seq + 1))
end
return {current, trimmed}
