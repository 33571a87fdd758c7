-- Atomically: reap expired in-flight debits, authenticate, replay/guard idempotency,
-- rate-limit (GCRA on Redis' clock), check the balance, debit, and write the ledger.
-- Every key shares the account's hash tag, so the script is Redis Cluster safe.
--
-- KEYS[1] account hash     KEYS[2] GCRA tat      KEYS[3] ledger stream
-- KEYS[4] in-flight zset   KEYS[5] pending hash  KEYS[6] idempotency hash (or a dummy)
-- ARGV[1] units  ARGV[2] images  ARGV[3] texts  ARGV[4] request id
-- ARGV[5] has idempotency key (0/1)  ARGV[6] request fingerprint  ARGV[7] idempotency ttl ms
-- ARGV[8] in-flight lease ms  ARGV[9] idempotency key digest (for the ledger)
-- Returns {status, ...}; see vendor_api/metering.py for each shape.

local units = tonumber(ARGV[1])
local has_idem = ARGV[5] == '1'

local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function fmt(x) return string.format('%.0f', x) end

-- 1. reap debits whose request never finished (a crashed replica): refund them.
local expired = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', fmt(now_us))
for _, rid in ipairs(expired) do
  local entry = redis.call('HGET', KEYS[5], rid)
  if entry then
    local sep = string.find(entry, '|', 1, true)
    local owed = tonumber(string.sub(entry, 1, sep - 1))
    local idem_key = string.sub(entry, sep + 1)
    redis.call('HINCRBY', KEYS[1], 'spent', -owed)
    redis.call('XADD', KEYS[3], '*', 'event', 'refund', 'units', owed, 'request_id', rid,
               'reason', 'lease_expired')
    if idem_key ~= '' then redis.call('DEL', idem_key) end
    redis.call('HDEL', KEYS[5], rid)
  end
  redis.call('ZREM', KEYS[4], rid)
end

-- 2. the key
local acct = redis.call('HMGET', KEYS[1], 'active', 'quota', 'spent', 'rate_per_s', 'burst')
if not acct[1] then return {'unknown_key'} end
if acct[1] ~= '1' then return {'revoked'} end
local quota = tonumber(acct[2])
local spent = tonumber(acct[3])
local remaining = quota - spent

-- 3. idempotency: replay a finished answer, refuse a mismatch or a duplicate in flight
if has_idem then
  local prior = redis.call('HMGET', KEYS[6], 'fp', 'state', 'body')
  if prior[1] then
    if prior[1] ~= ARGV[6] then return {'idem_mismatch'} end
    if prior[2] ~= 'done' then return {'idem_inflight'} end
    return {'replay', prior[3], fmt(remaining)}
  end
end

-- 4. rate limit (GCRA): `burst` requests at once, then one per 1/rate seconds
local interval = 1000000 / tonumber(acct[4])
local burst = tonumber(acct[5])
local tat = tonumber(redis.call('GET', KEYS[2]) or '0')
if tat < now_us then tat = now_us end
local new_tat = tat + interval
local allow_at = new_tat - burst * interval
if now_us < allow_at then
  local wait_us = allow_at - now_us
  return {'rate_limited', fmt(wait_us), fmt(remaining), fmt(burst)}
end

-- 5. balance
if units > remaining then
  return {'insufficient', fmt(remaining), fmt(quota)}
end

-- 6. commit: debit, rate state, ledger, lease, idempotency record
spent = redis.call('HINCRBY', KEYS[1], 'spent', units)
redis.call('SET', KEYS[2], fmt(new_tat), 'PX', math.ceil((new_tat - now_us) / 1000) + 1000)
redis.call('XADD', KEYS[3], '*', 'event', 'debit', 'units', units, 'images', ARGV[2],
           'texts', ARGV[3], 'request_id', ARGV[4], 'idempotency', ARGV[9])
redis.call('ZADD', KEYS[4], fmt(now_us + tonumber(ARGV[8]) * 1000), ARGV[4])
local idem_ref = ''
if has_idem then
  idem_ref = KEYS[6]
  redis.call('HSET', KEYS[6], 'fp', ARGV[6], 'state', 'inflight', 'request_id', ARGV[4])
  redis.call('PEXPIRE', KEYS[6], ARGV[7])
end
redis.call('HSET', KEYS[5], ARGV[4], units .. '|' .. idem_ref)
local rate_remaining = math.floor((now_us - (new_tat - burst * interval)) / interval)
local reset_us = new_tat - now_us
return {'ok', fmt(quota - spent), fmt(rate_remaining), fmt(burst), fmt(reset_us)}
