-- reserve: reserve up to `want` more seconds on every payer at once (all the same seconds
-- or none); the first reservation of a session opens it (after the concurrency check).
-- KEYS: session, outbox, live sessions of the agency, the agency's marker, the payers'
-- wallets (in payer order), then, when opening, the client's set of open voice sessions.
-- ARGV: common, session id, agency id, want seconds, lease until (the session's
-- expires_at once something is reserved), epoch (a renewal: the owner's; 0 when
-- opening), payer count, then per payer (account, rate, carry, offset) (SliceTerms),
-- then opening (0 | 1) and, when 1: client, channel, direction, provider, max
-- concurrent, authorized until.
-- Reply: {'LOST'} | {'CONC'} | {'NOTOPEN'} | {'STALE'} | {'NOTFOUND', account}
-- | {'BOUNDS', account, anchor...}
-- | {'OK', granted, total granted, headroom seconds | '', limited account | '',
--    limited constraint | '', reserved count, account, micros...}.
-- A renewal by an owner whose epoch is not the session's (another replica took the
-- session over, see claim) is STALE and changes nothing.
local session_key, outbox, live, marker = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local session_id, agency_id, want, lease_until, epoch = arg(), arg(), narg(), arg(), narg()
local payers = {}
for i = 1, narg() do
  payers[i] = {account = arg(), rate = narg(), carry = narg(), offset = narg(), key = KEYS[4 + i]}
end
local opening = narg() == 1
local open = nil
if opening then
  open = {client = arg(), ch = narg(), dir = narg(), prov = arg(), cap = narg(), ax = arg()}
  open.key = KEYS[5 + #payers]
end

local s = load_session(session_key)
if opening then
  if s ~= nil then
    return map_reply({'OK', '0', fmt(s.gr), '', '', ''}, s.payers, s.reserved)
  end
  if open.cap ~= 0 and redis.call('SCARD', open.key) >= open.cap then
    return {'CONC'}
  end
elseif s == nil and lost(marker) then
  return {'LOST'}
elseif s == nil or s.st ~= 'open' then
  return {'NOTOPEN'}
elseif s.ep ~= epoch then
  return {'STALE'}
end

local wallets = {}
for i, payer in ipairs(payers) do
  local w = load_wallet(payer.key)
  if w == nil then
    if lost(marker) then
      return {'LOST'}
    end
    return {'NOTFOUND', payer.account}
  end
  wallets[i] = w
end
local need = missing_bounds(wallets)
if need then
  return need
end
for _, w in ipairs(wallets) do
  roll(w)
end

local granted = 0
if s ~= nil then
  granted = s.gr
end
-- SliceTerms.affordable of each bounded payer; the first smallest one binds
local headroom_seconds, limited = nil, nil
for i, payer in ipairs(payers) do
  local value, constraint = headroom(wallets[i])
  if value ~= nil and payer.rate > 0 then
    local seconds = math.max(0, muldiv_floor(value + payer.carry, 60, payer.rate) - payer.offset)
    if headroom_seconds == nil or seconds < headroom_seconds then
      headroom_seconds = seconds
      limited = {account = payer.account, constraint = constraint, wallet = wallets[i]}
    end
  end
end
local seconds = want
if headroom_seconds ~= nil then
  seconds = math.min(seconds, headroom_seconds)
end
local limited_account, limited_constraint = '', ''
if headroom_seconds ~= nil and headroom_seconds < want then
  limited_account, limited_constraint = limited.account, limited.constraint
  if limited.constraint == 'limit' then
    limit_reached(limited.wallet)
  end
end
local headroom_text = ''
if headroom_seconds ~= nil then
  headroom_text = fmt(headroom_seconds)
end

if seconds <= 0 then
  commit(outbox)
  local reply = {'OK', '0', fmt(granted), headroom_text, limited_account, limited_constraint}
  if s == nil then
    return map_reply(reply, {}, {})
  end
  return map_reply(reply, s.payers, s.reserved)
end

local part = 'reserve'
if s == nil then
  part = 'all'
  s = {
    id = session_id, agency = agency_id, client = open.client, ch = open.ch, dir = open.dir, prov = open.prov,
    st = 'open', gr = 0, exp = lease_until, bil = 0, cut = 0, payers = {}, reserved = {}, charged_order = {},
    charged = {}, ep = 1, ax = open.ax, sa = '0', tariffs = {},
  }
end
for i, payer in ipairs(payers) do
  local w = wallets[i]
  local micros = muldiv_ceil(payer.rate, payer.offset + seconds, 60) - payer.carry -- SliceTerms.needed
  local before = alert_level(w)
  w.rs = w.rs + micros
  if s.reserved[payer.account] == nil then
    s.payers[#s.payers + 1] = payer.account
    s.reserved[payer.account] = 0
  end
  s.reserved[payer.account] = s.reserved[payer.account] + micros
  s.tariffs[payer.account] = price_from(s.tariffs[payer.account] or '', granted, payer.rate)
  alerts(w, before)
end
s.gr = granted + seconds
s.exp = lease_until
save_session(session_key, s, part)
if opening then
  redis.call('SADD', live, session_id)
  if s.ch == 1 then
    redis.call('SADD', open.key, session_id)
  end
end
emit(session_record(s))
commit(outbox)
return map_reply({'OK', fmt(seconds), fmt(s.gr), headroom_text, limited_account, limited_constraint}, s.payers, s.reserved)
