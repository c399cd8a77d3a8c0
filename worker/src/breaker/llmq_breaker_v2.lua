-- llmq_breaker_v2: one circuit breaker per (provider, key), shared by the fleet.
--
-- Decoded by worker/src/breaker/mod.rs; change both together and bump the version.
--
-- KEYS[1]  the breaker's hash, e.g. "{llmq:cb:openai}"; fields: state (closed | open |
--          half_open), open_until (ms), win_start (ms), calls, fails, probes, oks,
--          streak, probe_lease (ms), round (count of half-open rounds)
-- ARGV     op, window_ms, min_calls, failure_ratio, cooldown_ms, fatal_cooldown_ms,
--          max_probes, close_after, max_consecutive, probe_lease_ms [, outcome]
--   allow              -> {1, 0, state, round}      call; round > 0 when it is a probe of
--                                                   that half-open round, which must come
--                                                   back (record or release)
--                         {0, retry_in_ms, state, 0} do not call
--   record <outcome>   -> {state}   outcome: success | failure | fatal | neutral
--   release <round>    -> {state}   a probe of that round given back without a call (a
--                                   probe of an earlier round is ignored)
--   state              -> {state, open_ms_left}
-- Probes are leased: a holder that died without giving its probe back (a crash) stops
-- counting once probe_lease_ms passed since the last probe was let through, so a lost
-- probe cannot keep the provider blocked for the fleet.
-- closed: failures/calls over the window at or above failure_ratio (with at least
-- min_calls), or max_consecutive failures in a row (a sudden outage after a busy,
-- healthy window), opens it; fatal (quota, auth) opens it at once for fatal_cooldown.
-- open: no calls until open_until; then half_open lets max_probes calls through;
-- close_after successes close it, one failure opens it again.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local key = KEYS[1]
local op = ARGV[1]
local window = tonumber(ARGV[2])
local min_calls = tonumber(ARGV[3])
local ratio = tonumber(ARGV[4])
local cooldown = tonumber(ARGV[5])
local fatal_cooldown = tonumber(ARGV[6])
local max_probes = tonumber(ARGV[7])
local close_after = tonumber(ARGV[8])
local max_consecutive = tonumber(ARGV[9])
local lease = tonumber(ARGV[10])

local raw = redis.call('HGETALL', key)
local s = {}
for i = 1, #raw, 2 do s[raw[i]] = raw[i + 1] end
local state = s.state or 'closed'
local open_until = tonumber(s.open_until or '0')
local win_start = tonumber(s.win_start or '0')
local calls = tonumber(s.calls or '0')
local fails = tonumber(s.fails or '0')
local probes = tonumber(s.probes or '0')
local oks = tonumber(s.oks or '0')
local streak = tonumber(s.streak or '0')
local probe_lease = tonumber(s.probe_lease or '0')
local round = tonumber(s.round or '0')

local function save()
  redis.call('HSET', key, 'state', state, 'open_until', string.format('%.0f', open_until),
    'win_start', string.format('%.0f', win_start), 'calls', calls, 'fails', fails,
    'probes', probes, 'oks', oks, 'streak', streak,
    'probe_lease', string.format('%.0f', probe_lease), 'round', round)
  redis.call('PEXPIRE', key, 86400000)
end

local function open(ms)
  state = 'open'
  open_until = now + ms
  calls, fails, probes, oks, streak = 0, 0, 0, 0, 0
end

if op == 'allow' then
  if state == 'open' then
    if now < open_until then
      return {0, math.ceil(open_until - now), state, 0}
    end
    state, probes, oks = 'half_open', 0, 0
    round = round + 1
  end
  if state == 'half_open' then
    if probes >= max_probes and now >= probe_lease then
      probes = 0
    end
    if probes >= max_probes then
      save()
      return {0, math.max(1, math.min(1000, math.ceil(probe_lease - now))), state, 0}
    end
    probes = probes + 1
    probe_lease = now + lease
    save()
    return {1, 0, state, round}
  end
  return {1, 0, state, 0}

elseif op == 'record' then
  local outcome = ARGV[11]
  if outcome == 'fatal' then
    open(fatal_cooldown)
  elseif state == 'half_open' then
    if outcome == 'success' then
      oks = oks + 1
      if oks >= close_after then
        state, win_start, calls, fails, probes, oks = 'closed', now, 0, 0, 0, 0
      end
    elseif outcome == 'failure' then
      open(cooldown)
    elseif probes > 0 then
      probes = probes - 1
    end
  elseif state == 'closed' then
    if now - win_start > window then
      win_start, calls, fails = now, 0, 0
    end
    if outcome ~= 'neutral' then calls = calls + 1 end
    if outcome == 'failure' then
      fails = fails + 1
      streak = streak + 1
    elseif outcome == 'success' then
      streak = 0
    end
    if (calls >= min_calls and fails / calls >= ratio) or streak >= max_consecutive then
      open(cooldown)
    end
  end
  save()
  return {state}

elseif op == 'release' then
  if state == 'half_open' and probes > 0 and tonumber(ARGV[11]) == round then
    probes = probes - 1
    save()
  end
  return {state}

elseif op == 'state' then
  return {state, math.max(0, math.ceil(open_until - now))}
end

return redis.error_reply('llmq_breaker_v2: unknown op ' .. tostring(op))
