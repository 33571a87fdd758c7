-- Reserve one class list for each image of a classification request, for one account.
-- KEYS[j] = vendor:{digest}:lists:<perceptual code>, a SET of the class-list hashes this account
--           asked of images with that code (all in the account's slot); an image has several codes;
-- ARGV[1] = the request's class-list hash, ARGV[2] = the limit per image, ARGV[3] = TTL in seconds,
-- ARGV[3 + j] = the (1-based) index of the image KEYS[j] belongs to.
-- All or nothing: when any code of an image already holds `limit` other lists, nothing is written
-- and the reply is {index of that image}; otherwise {0, added_1, ..., added_n}, added_j = 1 where
-- the list is new for KEYS[j] (what a failed request gives back: `release`).
local list, limit, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
for j = 1, #KEYS do
  if redis.call('SISMEMBER', KEYS[j], list) == 0 and redis.call('SCARD', KEYS[j]) >= limit then
    return {tonumber(ARGV[3 + j])}
  end
end
local reply = {0}
for j = 1, #KEYS do
  reply[j + 1] = redis.call('SADD', KEYS[j], list)
  redis.call('EXPIRE', KEYS[j], ttl)
end
return reply
