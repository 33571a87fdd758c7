-- Atomically: reap expired in-flight debits, check the key, replay/guard idempotency, check the
-- balance, debit, and write the ledger. The rate limit was spent by admit.lua, before the
-- request's inputs were decoded, so a request is counted against it once.
-- Every key shares the account's hash tag, so the script is Redis Cluster safe. Every check
-- that can refuse runs before the first write of the debit itself, so a refusal writes nothing
-- but the (complete, self-contained) refunds of step 1. A replay found here (its answer was
-- stored after this request was admitted) is served free and recorded as a 'replay' event. The
-- same request id debited twice (a retry after a lost reply) is debited once. The reaper and the
-- key and idempotency checks are request_prelude.lua's, prepended when the script is loaded.
--
-- KEYS[1..5] as in request_prelude.lua: account hash, ledger stream, in-flight zset, pending
-- hash, idempotency hash (or a dummy)
-- ARGV[1] units  ARGV[2] images  ARGV[3] texts  ARGV[4] request id
-- ARGV[5] has idempotency key (0/1)  ARGV[6] request fingerprint  ARGV[7] idempotency ttl ms
-- ARGV[8] in-flight lease ms  ARGV[9] idempotency key digest (for the ledger)
-- Returns {status, ...}; see vendor_api/metering.py for each shape.

local units = tonumber(ARGV[1])
local has_idem = ARGV[5] == '1'

-- 1. reap debits whose request is no longer renewed (a crashed replica): refund them.
reap_expired_leases()

-- 2. the key
local refusal, acct = active_account('quota', 'spent')
if refusal then return refusal end
local quota, spent = tonumber(acct[2]), tonumber(acct[3])
if not (quota and spent) or not units or units < 0 then return {'account_invalid'} end
local remaining = quota - spent

-- the same request debited again (its first reply was lost): nothing more to do
if redis.call('HEXISTS', KEYS[4], ARGV[4]) == 1 then return {'ok', fmt(remaining)} end

-- 3. idempotency: replay a finished answer, refuse a mismatch or a duplicate in flight
if has_idem then
  local state, stored = idempotency_state(ARGV[6])
  if state == 'done' then
    redis.call('XADD', KEYS[2], '*', 'event', 'replay', 'units', 0, 'request_id', stored[4] or '',
               'idempotency', ARGV[9])
    return {'replay', stored[3], fmt(remaining)}
  elseif state ~= 'new' then
    return {state}
  end
end

-- 4. balance
if units > remaining then
  return {'insufficient', fmt(remaining), fmt(quota)}
end

-- 5. commit: debit, ledger, lease, idempotency record
local lease_until = fmt(now_us + tonumber(ARGV[8]) * 1000)
spent = redis.call('HINCRBY', KEYS[1], 'spent', units)
redis.call('XADD', KEYS[2], '*', 'event', 'debit', 'units', units, 'images', ARGV[2],
           'texts', ARGV[3], 'request_id', ARGV[4], 'idempotency', ARGV[9])
redis.call('ZADD', KEYS[3], lease_until, ARGV[4])
local idem_ref = ''
if has_idem then
  idem_ref = KEYS[5]
  redis.call('HSET', KEYS[5], 'fp', ARGV[6], 'state', 'inflight', 'request_id', ARGV[4])
  redis.call('PEXPIRE', KEYS[5], ARGV[7])
end
redis.call('HSET', KEYS[4], ARGV[4], units .. '|' .. idem_ref)
return {'ok', fmt(quota - spent)}
