-- Shared by admit.lua and debit.lua: prepended to each when it is loaded (vendor_api/lua_scripts.py),
-- since a Redis script is one source text and cannot load another. Redis' clock, the reaper of dead
-- leases, and the checks of the key and of its Idempotency-Key.
--
-- Both scripts take the same first five keys, so everything here names its keys as KEYS[i] (every
-- key a script touches is declared, in the account's hash slot: Redis Cluster safe):
-- KEYS[1] account hash  KEYS[2] ledger stream  KEYS[3] in-flight zset  KEYS[4] pending hash
-- KEYS[5] idempotency hash (or a dummy)

local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function fmt(x) return string.format('%.0f', x) end

-- Refund every debit whose lease expired (its request is no longer renewed: its replica died),
-- and release its Idempotency-Key, so that a retry under the same key finds the slot free.
-- Each refund is complete and self-contained, so a script that refuses afterwards may keep them.
local function reap_expired_leases()
  local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', fmt(now_us))
  for _, rid in ipairs(expired) do
    local entry = redis.call('HGET', KEYS[4], rid)
    if entry then
      local sep = string.find(entry, '|', 1, true)
      local owed = tonumber(string.sub(entry, 1, sep - 1))
      local idem_key = string.sub(entry, sep + 1)
      redis.call('HINCRBY', KEYS[1], 'spent', -owed)
      redis.call('XADD', KEYS[2], '*', 'event', 'refund', 'units', owed, 'request_id', rid,
                 'reason', 'lease_expired')
      if idem_key ~= '' then redis.call('DEL', idem_key) end
      redis.call('HDEL', KEYS[4], rid)
    end
    redis.call('ZREM', KEYS[3], rid)
  end
end

-- nil and the account's fields ('active' first, then the ones asked for, in HMGET order), or the
-- refusal of an unknown or revoked key.
local function active_account(...)
  local fields = redis.call('HMGET', KEYS[1], 'active', ...)
  if not fields[1] then return {'unknown_key'} end
  if fields[1] ~= '1' then return {'revoked'} end
  return nil, fields
end

-- What the request's Idempotency-Key holds, and its record {fp, state, body, request id}: 'new'
-- (nothing), 'done' (a finished answer to replay), or the refusals 'idem_mismatch' (it was used
-- with another request body) and 'idem_inflight' (its first request is still running).
local function idempotency_state(fingerprint)
  local stored = redis.call('HMGET', KEYS[5], 'fp', 'state', 'body', 'request_id')
  if not stored[1] then return 'new', stored end
  if stored[1] ~= fingerprint then return 'idem_mismatch', stored end
  if stored[2] ~= 'done' then return 'idem_inflight', stored end
  return 'done', stored
end
