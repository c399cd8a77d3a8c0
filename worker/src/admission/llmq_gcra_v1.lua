-- llmq_gcra_v1: the fleet's shared RPM/TPM budget, one atomic script.
--
-- Multi-dimension GCRA with reservations. Every dimension of one limit scope (e.g.
-- requests and tokens of (openai, gpt-4o-mini)) lives in ONE hash, so one call sees and
-- charges all of them atomically: a job asks for (1 request, N tokens) at once and either
-- every dimension is charged or none is. The answer is never "try again": it is the start
-- of the job's slot (now, or in Δ ms). Slots are handed out in arrival order (FIFO), so a
-- large job is never starved by small ones.
--
-- Decoded by worker/src/admission/redis.rs (`GcraScript`); change both together and bump
-- the version in this file's name when the calling convention changes.
--
-- KEYS[1]  the scope's hash, e.g. "{llmq:rl:openai:gpt-4o-mini}"; fields:
--            tat:<dim>     theoretical arrival time of the dimension, ms (float)
--            pause_until   fleet pause after a provider 429, ms
-- KEYS[2]  settle marker "<KEYS[1]>:settled:<job>" (op settle only; same hash tag)
-- ARGV[1]  op: acquire | settle | pause | tighten | check | peek
-- ARGV[2]  n, the number of dimensions; then 4 values per dimension:
--            name, limit per minute, burst (units the bucket holds), amount
-- then, per op:
--   acquire: max_wait_ms                -> {0, wait_ms, pause_ms} go (charged) at now+wait
--                                          {1, dim_index, 0}      amount > burst: never fits
--                                          {2, wait_ms, pause_ms} wait > max_wait: not charged
--   settle:  refund(0|1), then n actual amounts (amount = what was reserved), then n
--            provider-reported remaining values (-1 = unknown; they only tighten)
--                                       -> {1} applied, {0} already settled (idempotent)
--   pause:   pause_ms                   -> {remaining pause ms}
--   tighten: n remaining values (-1 = unknown)   -> {1}
--   check:                              -> {remaining pause ms}
--   peek:    ahead (jobs served first)  -> {ms until a job of these amounts would start}
--            (read only: the queue ETA)
--
-- Time is Redis server time (TIME), so replicas' clocks do not matter. A dimension with
-- no state (first use, or Redis restarted empty) starts EMPTY, never full: we cannot know
-- what was spent in the last minute. State expires after a day idle.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local key = KEYS[1]
local op = ARGV[1]
local n = tonumber(ARGV[2])

local dims = {}
for i = 1, n do
  local base = 2 + (i - 1) * 4
  local limit = tonumber(ARGV[base + 2])
  local d = {
    name = ARGV[base + 1],
    interval = 60000 / limit,          -- ms per unit
    burst = tonumber(ARGV[base + 3]),
    amount = tonumber(ARGV[base + 4]),
  }
  d.tau = d.burst * d.interval           -- ms of capacity the bucket holds
  local tat = redis.call('HGET', key, 'tat:' .. d.name)
  d.tat = tat and tonumber(tat) or (now + d.tau)
  dims[i] = d
end
local rest = 2 + n * 4
local pause_until = tonumber(redis.call('HGET', key, 'pause_until') or '0')

local function save()
  for i = 1, n do
    redis.call('HSET', key, 'tat:' .. dims[i].name, string.format('%.3f', dims[i].tat))
  end
  redis.call('PEXPIRE', key, 86400000)
end

local function pause_left()
  return math.max(0, math.ceil(pause_until - now))
end

if op == 'acquire' then
  local max_wait = tonumber(ARGV[rest + 1])
  local start = math.max(now, pause_until)
  for i = 1, n do
    local d = dims[i]
    if d.amount > d.burst then
      return {1, i, 0}
    end
    -- earliest instant this dimension has room: its TAT after the charge, less its burst
    start = math.max(start, math.max(d.tat, now) + d.amount * d.interval - d.tau)
  end
  local wait = start - now
  if wait > max_wait then
    -- Nothing is charged, but a limit seen for the first time keeps its (empty) state,
    -- so it fills from now on; unsaved, every later ask would start empty again and a
    -- job whose first slot is past max_wait would be sent back forever.
    save()
    return {2, math.ceil(wait), pause_left()}
  end
  for i = 1, n do
    local d = dims[i]
    d.tat = math.max(d.tat, start) + d.amount * d.interval
  end
  save()
  return {0, math.ceil(wait), pause_left()}

elseif op == 'settle' then
  if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', 86400000) then
    return {0}
  end
  local refund = ARGV[rest + 1] == '1'
  for i = 1, n do
    local d = dims[i]
    local delta = tonumber(ARGV[rest + 1 + i]) - d.amount
    if delta > 0 then
      d.tat = math.max(d.tat, now) + delta * d.interval      -- charge the excess
    elseif delta < 0 and refund then
      d.tat = math.max(d.tat + delta * d.interval, now)       -- give back, never past full
    end
    local remaining = tonumber(ARGV[rest + 1 + n + i] or '-1')
    if remaining >= 0 then
      d.tat = math.max(d.tat, now + d.tau - remaining * d.interval)
    end
  end
  save()
  return {1}

elseif op == 'pause' then
  local until_ms = now + tonumber(ARGV[rest + 1])
  if until_ms > pause_until then
    pause_until = until_ms
    redis.call('HSET', key, 'pause_until', string.format('%.3f', pause_until))
  end
  -- Resume at the steady rate with no burst: every bucket is empty when the pause ends.
  for i = 1, n do
    local d = dims[i]
    d.tat = math.max(d.tat, pause_until + d.tau)
  end
  save()
  return {pause_left()}

elseif op == 'tighten' then
  -- The provider's remaining count only ever lowers what we think is left.
  for i = 1, n do
    local d = dims[i]
    local remaining = tonumber(ARGV[rest + i])
    if remaining >= 0 then
      d.tat = math.max(d.tat, now + d.tau - remaining * d.interval)
    end
  end
  save()
  return {1}

elseif op == 'check' then
  return {pause_left()}

elseif op == 'peek' then
  -- Read only: when would a job of these amounts start if `ahead` jobs like it were
  -- served first? Nothing is charged.
  local ahead = tonumber(ARGV[rest + 1])
  local start = math.max(now, pause_until)
  for i = 1, n do
    local d = dims[i]
    start = math.max(start, math.max(d.tat, now) + (ahead + 1) * d.amount * d.interval - d.tau)
  end
  return {math.ceil(start - now)}
end

return redis.error_reply('llmq_gcra_v1: unknown op ' .. tostring(op))
