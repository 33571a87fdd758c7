-- Heartbeat of a live request: push its in-flight lease forward, so that only a request whose
-- replica stopped renewing it (died, or lost Redis for a whole lease) is ever reaped.
-- KEYS[1] in-flight zset  KEYS[2] pending hash   ARGV[1] request id  ARGV[2] lease ms
-- Returns 1 if the debit is still pending (renewed), 0 if it was settled or refunded.
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return 0 end
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZADD', KEYS[1], 'XX', string.format('%.0f', now_us + tonumber(ARGV[2]) * 1000), ARGV[1])
return 1
