-- llmq_leases_v1: fleet-wide caps on simultaneous provider calls, one atomic script.
--
-- Called by worker/src/admission/mod.rs (`Admission::lease` and `Lease`); change both
-- together and bump the version in this file's name when the calling convention changes.
--
-- Each capped budget has a sorted set of leases: member = the call's reservation id,
-- score = when the lease lapses (Redis time, ms). A replica that dies without giving its
-- leases back loses them when they lapse; a live call renews its lease while it runs.
--
-- KEYS[1..]  the lease sets, e.g. "{llmq:rl:openai}:leases:key" (one hash tag)
-- ARGV[1]    op: take | renew | give
-- ARGV[2]    member
-- ARGV[3]    lease_ms (take, renew)
-- ARGV[4..]  take: the cap of each set, in KEYS order
--   take  -> {1} taken in every set, or {0, retry_ms}: a set is full, nothing taken;
--            retry_ms is when its first lease lapses (at most 100)
--   renew -> {1}
--   give  -> {1}

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local op = ARGV[1]
local member = ARGV[2]

if op == 'take' then
  local lease_ms = tonumber(ARGV[3])
  for k = 1, #KEYS do
    redis.call('ZREMRANGEBYSCORE', KEYS[k], '-inf', now)
    local cap = tonumber(ARGV[3 + k])
    if redis.call('ZSCORE', KEYS[k], member) == false and redis.call('ZCARD', KEYS[k]) >= cap then
      local first = redis.call('ZRANGE', KEYS[k], 0, 0, 'WITHSCORES')
      local lapse = first[2] and (tonumber(first[2]) - now) or 100
      return {0, math.max(1, math.min(100, math.ceil(lapse)))}
    end
  end
  for k = 1, #KEYS do
    redis.call('ZADD', KEYS[k], now + lease_ms, member)
    redis.call('PEXPIRE', KEYS[k], lease_ms * 2)
  end
  return {1}

elseif op == 'renew' then
  local lease_ms = tonumber(ARGV[3])
  for k = 1, #KEYS do
    -- Added again if missing: a Redis that restarted meanwhile counts the call again.
    redis.call('ZADD', KEYS[k], now + lease_ms, member)
    redis.call('PEXPIRE', KEYS[k], lease_ms * 2)
  end
  return {1}

elseif op == 'give' then
  for k = 1, #KEYS do
    redis.call('ZREM', KEYS[k], member)
  end
  return {1}
end

return redis.error_reply('llmq_leases_v1: unknown op ' .. tostring(op))
