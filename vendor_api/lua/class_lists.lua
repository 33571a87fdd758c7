-- Reserve one class list for each image of a classification request, for one account.
-- KEYS[i] = vendor:{digest}:lists:<image signature>, a SET of the class-list hashes this account
--           asked of that image (all in the account's slot);
-- ARGV[1] = the request's class-list hash, ARGV[2] = the limit per image, ARGV[3] = TTL in seconds.
-- All or nothing: when any image already holds `limit` other lists, nothing is written and the
-- reply is {index of that image (1-based)}; otherwise {0, added_1, ..., added_n}, added_i = 1
-- where the list is new for image i (what a failed request gives back: `release`).
local list, limit, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 1, #KEYS do
  if redis.call('SISMEMBER', KEYS[i], list) == 0 and redis.call('SCARD', KEYS[i]) >= limit then
    return {i}
  end
end
local reply = {0}
for i = 1, #KEYS do
  reply[i + 1] = redis.call('SADD', KEYS[i], list)
  redis.call('EXPIRE', KEYS[i], ttl)
end
return reply
