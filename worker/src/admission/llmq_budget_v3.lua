-- llmq_budget_v3: the fleet's shared budget, one atomic script.
--
-- Called by worker/src/admission/mod.rs (`Admission::eval`, replies decoded by the
-- methods beside it); change both together and bump the version in this file's name
-- when the calling convention changes.
--
-- Multi-dimension GCRA with reservations. A call is charged against one or more scope
-- hashes at once (its model's limits and its key's limits, when both are configured):
-- every dimension of every scope is charged, or none is. The answer is never "try
-- again": it is the start of the call's slot (now, or in Δ ms). Slots are handed out in
-- arrival order (FIFO), so a large job is never starved by small ones.
--
-- KEYS[1]   marker: "<scope>:settled:<job>:<attempt>" for settle, else any key of the slot
-- KEYS[2..] the scope hashes, all with one hash tag, e.g. "{llmq:rl:openai}:model:gpt-4o"
--           and "{llmq:rl:openai}:key"; fields:
--             tat:<dim>    theoretical arrival time of the dimension, ms (float)
--             adm:<dim>    units ever admitted (to tell what a provider header has not seen)
--             gen:<dim>    when adm:<dim> began counting (a restarted Redis starts anew)
--             big:<dim>    the largest amount admitted (while the state lives)
--             last:<dim>   the latest slot handed out, ms
--             probe:<dim>  until when calls wait for the probe's answer, ms
--             probeseq:<dim> the probe's adm (its settle frees the waiting calls)
--             pause_until  fleet pause after a provider 429, ms
-- ARGV[1]   op: acquire | settle | learn | pause | check | peek | charge
-- ARGV[2]   n, the number of dimensions; then 6 values per dimension:
--             hash (index into KEYS), name, limit per minute, burst (units the bucket
--             holds), amount, learn (1: the provider's headers, taken to this bucket's
--             units by the caller, may set it)
-- then, per op:
--   acquire: max_wait_ms, slack_ms, probe_ms
--                                -> {0, wait_ms, pause_ms, gen_1, seq_1, paced_1, ...}
--                                   go (charged) at now+wait; seq = adm after the charge;
--                                   paced = this dimension alone held it >= slack_ms, and
--                                   no call admitted before it has a later slot (1), nor
--                                   one within slack_ms before it (2)
--                                  {1, dim_index, 0}      amount > burst: never fits
--                                  {2, wait_ms, pause_ms} wait > max_wait: not charged
--                                  {3, retry_ms, pause_ms} a probe's answer is awaited:
--                                                         ask again in retry_ms
--   settle:  refund(0|1), call_ms (send to answer), slack_ms, then per dimension:
--            actual, remaining (-1 unknown), gen, seq (-1 unknown), paced (0|1|2)
--                                -> {1} applied, {0} already settled (idempotent)
--   learn:   call_ms, slack_ms, then per dimension: remaining, gen, seq, paced
--            (a streamed answer's headers, as soon as they arrive) -> {1}
--   pause:   pause_ms, then per dimension: drain(0|1), remaining (-1 unknown)
--                                -> {remaining pause ms}
--   check:                       -> {remaining pause ms}
--   peek:    ahead (jobs served first) -> {ms until a job of these amounts would start}
--   charge:  m, then m entries of (ms ago, amount per dimension): what was admitted
--            while Redis was unreachable (amounts in the dimension args unused) -> {1}
--
-- Time is Redis server time (TIME), so replicas' clocks do not matter. A dimension with
-- no state (first use, or Redis restarted empty) starts EMPTY: we cannot know what was
-- spent in the last minute. Where the headers can tell, the first call is a probe and
-- the rest wait for its answer, whose count sets the bucket (settle, `learn`), so an
-- idle account's minute is not thrown away.
-- State expires after a day idle.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local op = ARGV[1]
local n = tonumber(ARGV[2])

local dims = {}
for i = 1, n do
  local base = 2 + (i - 1) * 6
  local limit = tonumber(ARGV[base + 3])
  local d = {
    key = KEYS[tonumber(ARGV[base + 1])],
    name = ARGV[base + 2],
    interval = 60000 / limit,          -- ms per unit
    burst = tonumber(ARGV[base + 4]),
    amount = tonumber(ARGV[base + 5]),
    learn = ARGV[base + 6] == '1',
  }
  d.tau = d.burst * d.interval           -- ms of capacity the bucket holds
  local tat = redis.call('HGET', d.key, 'tat:' .. d.name)
  d.known = tat ~= false
  d.tat = tat and tonumber(tat) or (now + d.tau)
  dims[i] = d
end
local rest = 2 + n * 6

local pause_until = 0
for k = 2, #KEYS do
  pause_until = math.max(pause_until, tonumber(redis.call('HGET', KEYS[k], 'pause_until') or '0'))
end

-- Writes every dimension's state. A dimension the headers can set and that had no
-- state is left without one unless `begin` (a call admitted on it): the next call
-- probes it rather than start from a bucket only assumed empty.
local function save(begin)
  for i = 1, n do
    local d = dims[i]
    if d.known or begin or not d.learn then
      redis.call('HSET', d.key, 'tat:' .. d.name, string.format('%.3f', d.tat))
      if not d.known then
        -- The state begins now, empty (what was admitted before it counts as spent).
        redis.call('HSETNX', d.key, 'gen:' .. d.name, string.format('%d', now))
      end
    end
  end
  for k = 2, #KEYS do
    redis.call('PEXPIRE', KEYS[k], 86400000)
  end
end

local function pause_left()
  return math.max(0, math.ceil(pause_until - now))
end

-- Units the bucket holds now (negative: slots already promised beyond it).
local function level(d)
  return (now + d.tau - d.tat) / d.interval
end

local function set_level(d, units)
  d.tat = now + d.tau - units * d.interval
end

-- What a provider header says is left (`remaining`, -1 unknown) of a dimension, seen on
-- the answer to a call admitted as number `seq` of generation `gen`, `call_ms` after it
-- was sent.
local function observe(d, remaining, gen, seq, call_ms, slack_ms, paced)
  local loosen = paced > 0
  if remaining < 0 then
    return
  end
  if d.learn and seq >= 0 then
    -- The provider counted `remaining` when it took this call. What we admitted after
    -- this call it had not seen yet, nor calls admitted up to slack_ms before it that
    -- reached it later; what refilled since the call was sent is not counted
    -- (conservative). Its count may tighten our bucket, and loosen it when the call was
    -- paced on this dimension: calls admitted in one burst leave in any order, so the
    -- answer to one of them may not count the others admitted just before it.
    local my_gen = tonumber(redis.call('HGET', d.key, 'gen:' .. d.name) or '-1')
    local adm = tonumber(redis.call('HGET', d.key, 'adm:' .. d.name) or '0')
    if my_gen == gen and adm >= seq then
      -- Heard from the provider: calls waiting on a probe go on.
      redis.call('HDEL', d.key, 'probe:' .. d.name, 'probeseq:' .. d.name)
      local since = adm - seq
      -- One call admitted just before this one may have reached the provider after it:
      -- allow for the largest call admitted lately, beyond slack_ms of the rate.
      local big = tonumber(redis.call('HGET', d.key, 'big:' .. d.name) or '0')
      local lower = remaining - since - slack_ms / d.interval - big
      if paced == 2 then
        -- No call admitted before it had a slot within slack_ms: only one that left
        -- far later than its slot could have been missed (the largest, at most).
        lower = remaining - since - big
      end
      local upper = remaining - since + call_ms / d.interval
      local l = level(d)
      if loosen and l < lower then
        set_level(d, math.min(lower, d.burst))
      elseif l > upper then
        set_level(d, upper)
      end
    end
  elseif remaining < d.burst then
    -- A bucket the headers do not describe exactly (e.g. requests paced per second
    -- against a per-minute count): the count only ever lowers what we think is left.
    d.tat = math.max(d.tat, now + d.tau - remaining * d.interval)
  end
end

if op == 'acquire' then
  local max_wait = tonumber(ARGV[rest + 1])
  local slack_ms = tonumber(ARGV[rest + 2])
  local probe_ms = tonumber(ARGV[rest + 3])
  local start = math.max(now, pause_until)
  -- A dimension the headers can set, with no state yet: this call goes at once as the
  -- probe, and the calls after it wait for its answer to set the bucket (at most
  -- probe_ms, then they go on from the empty start), so no slot is promised from a
  -- bucket only assumed empty.
  for i = 1, n do
    if dims[i].amount > dims[i].burst then
      return {1, i, 0}
    end
  end
  local probe = {}
  for i = 1, n do
    local d = dims[i]
    if d.learn then
      local p = redis.call('HGET', d.key, 'probe:' .. d.name)
      if p then
        local left = tonumber(p) - now
        if left > 0 then
          return {3, math.ceil(math.min(left, 100)), pause_left()}
        end
      elseif not d.known then
        probe[i] = true
      end
    end
  end
  for i = 1, n do
    local d = dims[i]
    -- earliest instant this dimension has room: its TAT after the charge, less its burst
    if not probe[i] then
      start = math.max(start, math.max(d.tat, now) + d.amount * d.interval - d.tau)
    end
  end
  local wait = start - now
  if wait > max_wait then
    -- Nothing is charged, but a limit seen for the first time keeps its (empty) state,
    -- so it fills from now on; unsaved, every later ask would start empty again and a
    -- job whose first slot is past max_wait would be sent back forever (one the
    -- headers can set is probed instead).
    save(false)
    return {2, math.ceil(wait), pause_left()}
  end
  local reply = {0, math.ceil(wait), pause_left()}
  for i = 1, n do
    local d = dims[i]
    -- Paced on this dimension: it alone would have kept the call waiting at least
    -- slack_ms, so calls admitted before it were spread out ahead of it; and no call
    -- admitted before it has a later slot (one held by another dimension while this
    -- call used the bucket's room), or the provider's count for this call would miss
    -- calls our count says it has seen.
    -- Paced and alone: no call admitted before it has a slot within slack_ms of its
    -- own, so none can reach the provider after it (2: its count needs no allowance
    -- for such calls).
    local own_wait = math.max(d.tat, now) + d.amount * d.interval - d.tau - now
    local last = tonumber(redis.call('HGET', d.key, 'last:' .. d.name) or '0')
    local paced = 0
    if probe[i] then
      paced = 1
      redis.call('HSET', d.key, 'probe:' .. d.name, string.format('%.3f', start + probe_ms))
    elseif own_wait >= slack_ms and start >= last then
      paced = (last > 0 and start - last >= slack_ms) and 2 or 1
    end
    if start > last then
      redis.call('HSET', d.key, 'last:' .. d.name, string.format('%.3f', start))
    end
    d.tat = math.max(d.tat, start) + d.amount * d.interval
    local gen = redis.call('HGET', d.key, 'gen:' .. d.name)
    if not gen then
      gen = string.format('%d', now)
      redis.call('HSET', d.key, 'gen:' .. d.name, gen)
    end
    local adm = redis.call('HINCRBY', d.key, 'adm:' .. d.name, d.amount)
    local big = tonumber(redis.call('HGET', d.key, 'big:' .. d.name) or '0')
    if d.amount > big then
      redis.call('HSET', d.key, 'big:' .. d.name, d.amount)
    end
    if probe[i] then
      redis.call('HSET', d.key, 'probeseq:' .. d.name, adm)
    end
    reply[#reply + 1] = tonumber(gen)
    reply[#reply + 1] = adm
    reply[#reply + 1] = paced
  end
  save(true)
  return reply

elseif op == 'settle' then
  if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', 86400000) then
    return {0}
  end
  local refund = ARGV[rest + 1] == '1'
  local call_ms = tonumber(ARGV[rest + 2])
  local slack_ms = tonumber(ARGV[rest + 3])
  for i = 1, n do
    local d = dims[i]
    local a = rest + 3 + (i - 1) * 5
    -- The probe's own reservation settled (answered, failed or never sent): whatever
    -- it taught, the calls waiting on it go on.
    local probeseq = redis.call('HGET', d.key, 'probeseq:' .. d.name)
    if probeseq and tonumber(probeseq) == tonumber(ARGV[a + 4])
        and tonumber(redis.call('HGET', d.key, 'gen:' .. d.name) or '-1') == tonumber(ARGV[a + 3]) then
      redis.call('HDEL', d.key, 'probe:' .. d.name, 'probeseq:' .. d.name)
    end
    local delta = tonumber(ARGV[a + 1]) - d.amount
    if delta > 0 then
      d.tat = math.max(d.tat, now) + delta * d.interval      -- charge the excess
    elseif delta < 0 and refund then
      d.tat = math.max(d.tat + delta * d.interval, now)       -- give back, never past full
    end
    observe(d, tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), call_ms, slack_ms, tonumber(ARGV[a + 5]))
  end
  save(false)
  return {1}

elseif op == 'learn' then
  local call_ms = tonumber(ARGV[rest + 1])
  local slack_ms = tonumber(ARGV[rest + 2])
  for i = 1, n do
    local a = rest + 2 + (i - 1) * 4
    observe(dims[i], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), call_ms, slack_ms, tonumber(ARGV[a + 4]))
  end
  save(false)
  return {1}

elseif op == 'pause' then
  local until_ms = now + tonumber(ARGV[rest + 1])
  if until_ms > pause_until then
    pause_until = until_ms
    for k = 2, #KEYS do
      redis.call('HSET', KEYS[k], 'pause_until', string.format('%.3f', pause_until))
    end
  end
  -- Only the dimensions the provider named are drained, to what it says is left (0 when
  -- it does not say); the others keep their state. The provider has answered: no call
  -- waits on a probe any more.
  for i = 1, n do
    local d = dims[i]
    redis.call('HDEL', d.key, 'probe:' .. d.name, 'probeseq:' .. d.name)
    local a = rest + 1 + (i - 1) * 2
    if ARGV[a + 1] == '1' then
      local remaining = math.max(0, tonumber(ARGV[a + 2]))
      d.tat = math.max(d.tat, now + d.tau - math.min(remaining, d.burst) * d.interval)
    end
  end
  save(false)
  return {pause_left()}

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

elseif op == 'charge' then
  -- What a replica admitted on its local share while Redis was unreachable, as entries
  -- (ms ago, amount per dimension). Only what the bucket does not already count as spent
  -- is charged: what was admitted within the bucket's window (older has refilled since)
  -- and after its state began (a restarted Redis starts empty, which counts the window
  -- before as spent); at most a bucketful.
  local m = tonumber(ARGV[rest + 1])
  for i = 1, n do
    local d = dims[i]
    local gen = redis.call('HGET', d.key, 'gen:' .. d.name)
    if d.known then
      -- A state from before gen was kept has no start: only the window counts.
      local since = now - d.tau
      if gen then
        since = math.max(tonumber(gen), since)
      else
        redis.call('HSET', d.key, 'gen:' .. d.name, string.format('%d', now))
      end
      local spent = 0
      for e = 1, m do
        local a = rest + 1 + (e - 1) * (n + 1)
        if now - tonumber(ARGV[a + 1]) >= since then
          spent = spent + tonumber(ARGV[a + 1 + i])
        end
      end
      local charged = math.floor(math.min(spent, d.burst))
      d.tat = math.max(d.tat, now) + charged * d.interval
      -- Counted as admitted too: an answer to a call admitted before this charge must
      -- not loosen it away.
      redis.call('HINCRBY', d.key, 'adm:' .. d.name, charged)
    end
  end
  save(false)
  return {1}
end

return redis.error_reply('llmq_budget_v3: unknown op ' .. tostring(op))
