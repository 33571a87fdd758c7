-- Close an in-flight debit: either delivered (store the answer for idempotent replay) or
-- failed (refund the units, forget the idempotency key so a retry is charged afresh).
-- A request the reaper already refunded (lease expired) is left alone: never refund twice.
--
-- KEYS[1] account hash  KEYS[2] ledger stream  KEYS[3] in-flight zset  KEYS[4] pending hash
-- KEYS[5] idempotency hash (or a dummy)
-- ARGV[1] request id  ARGV[2] outcome: 'delivered' | 'failed'  ARGV[3] has idempotency (0/1)
-- ARGV[4] response body (delivered)  ARGV[5] idempotency ttl ms  ARGV[6] reason (failed)
-- Returns {'settled', remaining} or {'unknown', remaining} when nothing was pending.

local entry = redis.call('HGET', KEYS[4], ARGV[1])
local function remaining()
  local a = redis.call('HMGET', KEYS[1], 'quota', 'spent')
  return string.format('%.0f', tonumber(a[1] or '0') - tonumber(a[2] or '0'))
end
if not entry then return {'unknown', remaining()} end
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
local sep = string.find(entry, '|', 1, true)
local units = tonumber(string.sub(entry, 1, sep - 1))

if ARGV[2] == 'delivered' then
  if ARGV[3] == '1' then
    redis.call('HSET', KEYS[5], 'state', 'done', 'body', ARGV[4])
    redis.call('PEXPIRE', KEYS[5], ARGV[5])
  end
else
  redis.call('HINCRBY', KEYS[1], 'spent', -units)
  redis.call('XADD', KEYS[2], '*', 'event', 'refund', 'units', units, 'request_id', ARGV[1],
             'reason', ARGV[6])
  if ARGV[3] == '1' then redis.call('DEL', KEYS[5]) end
end
return {'settled', remaining()}
