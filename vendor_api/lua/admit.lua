-- Admission, before the vendor does any real work for a request (decoding, tokenising,
-- embedding): the key, the rate limit, an idempotent replay and whether the balance can cover
-- the request's price. Besides reaping dead leases (below), it writes one thing, the rate
-- limiter's state, and only once every check that can fail has passed: a request refused for
-- its balance (402) still spends its rate-limit slot, so a key with no balance cannot make the
-- vendor parse at full speed.
-- The exact, atomic debit happens later (debit.lua), after validation.
--
-- Debits whose lease expired (their replica died) are reaped first, as in debit.lua, so that a
-- retry under the same Idempotency-Key finds the dead request's slot released. The reaper and
-- the key and idempotency checks are request_prelude.lua's, prepended when the script is loaded.
--
-- KEYS[1..5] as in request_prelude.lua (account, ledger, in-flight, pending, idempotency)
-- KEYS[6] GCRA tat  KEYS[7] index of stored answers (zset "idem digest|request id|bytes" -> expiry ms)
-- ARGV[1] units  ARGV[2] has idempotency key (0/1)  ARGV[3] request fingerprint
-- ARGV[4] idempotency key digest (for the ledger)  ARGV[5] most bytes of stored answers (0: no bound)
--
-- Size bound of the replay store: the bytes of a key's stored answers are counted in the account
-- hash (`idem_bytes`) and indexed by expiry; expired ones are subtracted here. A request with a
-- new Idempotency-Key while the count is at the bound is refused ('idem_store_full', spending
-- nothing): running it without storing its answer would let its retry be charged twice.
-- Answers in flight are not counted yet, so the bound can be passed by the answers of the
-- requests admitted at the same moment.
-- Returns {status, ...}; see vendor_api/metering.py for each shape.

local units = tonumber(ARGV[1])
local has_idem = ARGV[2] == '1'

reap_expired_leases()

local refusal, acct = active_account('quota', 'spent', 'rate_per_s', 'burst')
if refusal then return refusal end
local quota, spent = tonumber(acct[2]), tonumber(acct[3])
local rate, burst = tonumber(acct[4]), tonumber(acct[5])
-- a record the arithmetic below cannot handle exactly is refused before anything is written
if not (quota and spent and rate and burst) or rate < 0.001 or rate > 1000000 or burst < 1
   or burst > 1000000 or quota > 1e15 or quota < 0 then
  return {'account_invalid'}
end
local remaining = quota - spent

-- a finished answer is replayed for free, but it spends a rate-limit slot like any request (a
-- stored answer can be megabytes: replaying one at full speed must not be free for the vendor)
local replay, replay_rid = nil, ''
if has_idem then
  local state, stored = idempotency_state(ARGV[3])
  if state == 'done' then
    replay, replay_rid = stored[3], stored[4] or ''
  elseif state ~= 'new' then
    return {state}
  else
    local now_ms = math.floor(now_us / 1000)
    local gone = redis.call('ZRANGEBYSCORE', KEYS[7], '-inf', fmt(now_ms), 'LIMIT', 0, 256)
    if #gone > 0 then
      local freed = 0
      for _, member in ipairs(gone) do freed = freed + (tonumber(string.match(member, '|(%d+)$')) or 0) end
      redis.call('ZREM', KEYS[7], unpack(gone))
      redis.call('HINCRBY', KEYS[1], 'idem_bytes', -freed)
    end
    local cap = tonumber(ARGV[5]) or 0
    if cap > 0 and (tonumber(redis.call('HGET', KEYS[1], 'idem_bytes') or '0') or 0) >= cap then
      local oldest = redis.call('ZRANGE', KEYS[7], 0, 0, 'WITHSCORES')
      local wait_ms = 1000
      if oldest[2] then wait_ms = math.max(1000, tonumber(oldest[2]) - now_ms) end
      return {'idem_store_full', fmt(wait_ms), fmt(remaining)}
    end
  end
end

-- GCRA: `burst` requests at once, then one per 1/rate seconds
local interval = 1000000 / rate
local tat = tonumber(redis.call('GET', KEYS[6]) or '0') or 0
if tat < now_us then tat = now_us end
local new_tat = tat + interval
local allow_at = new_tat - burst * interval
if now_us < allow_at then
  return {'rate_limited', fmt(allow_at - now_us), fmt(remaining), fmt(burst), fmt(tat - now_us),
          fmt(burst * interval)}
end
local ttl_ms = math.ceil((new_tat - now_us) / 1000) + 1000
local rate_remaining = math.floor((now_us - (new_tat - burst * interval)) / interval)
redis.call('SET', KEYS[6], fmt(new_tat), 'PX', ttl_ms)
if replay then
  redis.call('XADD', KEYS[2], '*', 'event', 'replay', 'units', 0, 'request_id', replay_rid, 'idempotency', ARGV[4])
  return {'replay', replay, fmt(remaining)}
end
if units > remaining then
  return {'insufficient', fmt(remaining), fmt(rate_remaining), fmt(burst), fmt(new_tat - now_us),
          fmt(burst * interval)}
end
return {'ok', fmt(remaining), fmt(rate_remaining), fmt(burst), fmt(new_tat - now_us), fmt(burst * interval)}
