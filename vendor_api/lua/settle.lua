-- Close a debit, exactly once per request id (a retry after a lost reply changes nothing):
--   'delivered': the answer is about to be written; keep it for idempotent replay. If the debit
--                is no longer pending because its lease expired and the reaper refunded it, the
--                answer is debited again here, atomically, if the key can still pay for it;
--                otherwise 'lapsed' and the answer must not be delivered (never served unpaid).
--   'failed':    refund the units, forget the idempotency key so a retry runs afresh.
--   'void':      refund a 'delivered' answer that the client hung up before receiving.
-- A request the reaper already refunded is never refunded twice.
--
-- KEYS[1] account hash  KEYS[2] ledger stream  KEYS[3] in-flight zset  KEYS[4] pending hash
-- KEYS[5] idempotency hash (or a dummy)  KEYS[6] this request's settlement marker
-- KEYS[7] index of stored answers (zset "idem digest|request id|bytes" -> expiry ms; see admit.lua)
-- ARGV[1] request id  ARGV[2] outcome  ARGV[3] has idempotency (0/1)  ARGV[4] response body
-- ARGV[5] idempotency ttl ms  ARGV[6] reason  ARGV[7] units  ARGV[8] marker ttl ms
-- ARGV[9] idempotency key digest (for the ledger)  ARGV[10] request fingerprint
-- Returns {status, remaining}: status 'settled' | 'redebited' | 'lapsed' | 'unknown'.

local rid, outcome, has_idem = ARGV[1], ARGV[2], ARGV[3] == '1'
local function remaining()
  local a = redis.call('HMGET', KEYS[1], 'quota', 'spent')
  return string.format('%.0f', (tonumber(a[1] or '0') or 0) - (tonumber(a[2] or '0') or 0))
end
local function mark(state) redis.call('SET', KEYS[6], state, 'PX', ARGV[8]) end
local function idem_is_ours()
  local owner = redis.call('HGET', KEYS[5], 'request_id')
  return owner == false or owner == rid
end
local function store_answer()
  if has_idem then
    redis.call('HSET', KEYS[5], 'fp', ARGV[10], 'state', 'done', 'body', ARGV[4], 'request_id', rid)
    redis.call('PEXPIRE', KEYS[5], ARGV[5])
    local t = redis.call('TIME')
    local expires_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[5])
    redis.call('ZADD', KEYS[7], string.format('%.0f', expires_ms), ARGV[9] .. '|' .. rid .. '|' .. #ARGV[4])
    redis.call('HINCRBY', KEYS[1], 'idem_bytes', #ARGV[4])
  end
end
local function forget_answer()  -- a stored answer deleted before its expiry leaves the count too
  local size = redis.call('HSTRLEN', KEYS[5], 'body')
  if redis.call('ZREM', KEYS[7], ARGV[9] .. '|' .. rid .. '|' .. size) == 1 then
    redis.call('HINCRBY', KEYS[1], 'idem_bytes', -size)
  end
  redis.call('DEL', KEYS[5])
end

local marker = redis.call('GET', KEYS[6])
if marker then
  if outcome == 'delivered' and (marker == 'delivered') then return {'settled', remaining()} end
  if outcome == 'void' and marker == 'delivered' then
    local units = tonumber(ARGV[7])
    redis.call('HINCRBY', KEYS[1], 'spent', -units)
    redis.call('XADD', KEYS[2], '*', 'event', 'refund', 'units', units, 'request_id', rid, 'reason', ARGV[6])
    if has_idem and idem_is_ours() then forget_answer() end
    mark('voided')
    return {'settled', remaining()}
  end
  if outcome == 'delivered' then return {'lapsed', remaining()} end
  return {'unknown', remaining()}
end

local entry = redis.call('HGET', KEYS[4], rid)
if not entry then
  if outcome ~= 'delivered' then return {'unknown', remaining()} end
  -- reaped while it was still running: debit again, or refuse to deliver
  local units = tonumber(ARGV[7])
  local a = redis.call('HMGET', KEYS[1], 'active', 'quota', 'spent')
  local quota, spent = tonumber(a[2] or ''), tonumber(a[3] or '')
  if a[1] ~= '1' or not quota or not spent or units > quota - spent or (has_idem and not idem_is_ours()) then
    return {'lapsed', remaining()}
  end
  redis.call('HINCRBY', KEYS[1], 'spent', units)
  redis.call('XADD', KEYS[2], '*', 'event', 'debit', 'units', units, 'images', '0', 'texts', '0',
             'request_id', rid, 'idempotency', ARGV[9], 'reason', 'redebit_after_lease_expired')
  store_answer()
  mark('delivered')
  return {'redebited', remaining()}
end

redis.call('HDEL', KEYS[4], rid)
redis.call('ZREM', KEYS[3], rid)
local sep = string.find(entry, '|', 1, true)
local units = tonumber(string.sub(entry, 1, sep - 1))
if outcome == 'delivered' then
  store_answer()
  mark('delivered')
else
  redis.call('HINCRBY', KEYS[1], 'spent', -units)
  redis.call('XADD', KEYS[2], '*', 'event', 'refund', 'units', units, 'request_id', rid, 'reason', ARGV[6])
  if has_idem and idem_is_ours() then redis.call('DEL', KEYS[5]) end
  mark('refunded')
end
return {'settled', remaining()}
