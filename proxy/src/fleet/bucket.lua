-- One fleet rate limit key's token bucket, in thousandths of a token (see redis.rs).
-- KEYS[1]: the bucket. ARGV: perSecond, capacity, debt (tokens spent on credit, charged
-- unconditionally), delta (tokens wanted if > 0, given back if < 0).
-- Returns {tokens granted, whole tokens left (negative while in debt)}.
local rate = tonumber(ARGV[1])
local cap = tonumber(ARGV[2]) * 1000
local debt = tonumber(ARGV[3]) * 1000
local delta = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local s = redis.call('HMGET', KEYS[1], 'm', 'at')
local m = tonumber(s[1])
local at = tonumber(s[2])
if m == nil or at == nil then
  m = cap
  at = now
end
if now > at then
  m = math.min(cap, m + (now - at) * rate)
end
m = m - debt
local granted = 0
if delta < 0 then
  m = math.min(cap, m - delta * 1000)
elseif delta > 0 and m >= 1000 then
  granted = math.min(delta, math.floor(m / 1000))
  m = m - granted * 1000
end
redis.call('HSET', KEYS[1], 'm', m, 'at', now)
redis.call('PEXPIRE', KEYS[1], math.floor((cap - m) / rate) + 1000)
return {granted, math.floor(m / 1000)}
