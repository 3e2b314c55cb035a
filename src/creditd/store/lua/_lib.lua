-- creditd Redis hot store: the rules every script shares.
--
-- This file is not a script of its own: creditd.store.redis prepends it to each
-- operation's file, so every EVALSHA body is one self-contained chunk. The functions
-- below apply the rules of creditd.domain.wallet.WalletState and
-- creditd.domain.tariff.SliceTerms to the same fields, with the same integers.
--
-- Numbers: Lua numbers are doubles, exact for integers below 2^53. Amounts and their
-- sums stay far below it (see the MAX_* ceilings of creditd.domain.money). The two
-- billing formulas, floor((headroom + carry) * 60 / rate) and ceil(rate * n / 60),
-- multiply before they divide: muldiv_floor / muldiv_ceil split the numerator so that
-- no intermediate value reaches 2^53, and idiv / cdiv correct the rounding of a / b.
-- Numbers are stored and returned as decimal integer strings written by fmt ('%d'),
-- never by tostring (which may print 1e+15).
--
-- Atomicity: a script first reads and checks everything (session, wallets, period
-- bounds, declared keys) and computes the whole change in memory; it writes only at the
-- end (commit). A script that returns an error status has written nothing.
--
-- Loss: Redis without persistence can lose everything it held (a restart, FLUSHALL), and
-- a cluster shard can come back empty alone. Each agency's marker key (P{a}:m) is there
-- while its state is; a script that does not find what it needs (a wallet, a session)
-- checks the marker in the same atomic step, and answers LOST rather than a not-found
-- when it is gone: the agency's state is being rebuilt, nothing is missing for good.
--
-- ARGV of every script: [1] record id prefix, [2] now (epoch seconds, Python repr),
-- [3] number of period bounds, then (anchor day, start, end) for each, then the
-- operation's own arguments (read with arg() / narg()).

local fmt = function(x) return string.format('%d', x) end
local BALANCE_NAMES = {[1] = 'voice', [2] = 'sms'}

local ID_PREFIX = ARGV[1]
local NOW_TEXT = ARGV[2]
local NOW = tonumber(NOW_TEXT)
local BOUNDS = {}
local argi = 4
do
  local count = tonumber(ARGV[3])
  for _ = 1, count do
    BOUNDS[tonumber(ARGV[argi])] = {tonumber(ARGV[argi + 1]), tonumber(ARGV[argi + 2])}
    argi = argi + 3
  end
end

local function arg()
  local value = ARGV[argi]
  argi = argi + 1
  return value
end

local function narg()
  return tonumber(arg())
end

-- floor(a / b) for b > 0, exact while |a| and |b| stay below 2^53.
local function idiv(a, b)
  local q = math.floor(a / b)
  if q * b > a then
    q = q - 1
  end
  if (q + 1) * b <= a then
    q = q + 1
  end
  return q
end

-- ceil(a / b) for b > 0.
local function cdiv(a, b)
  return -idiv(-a, b)
end

-- floor(x * k / d) and ceil(x * k / d) for d > 0 and a small k, exact whenever the result
-- is below 2^53 even if x * k is not: with x = q * d + r (0 <= r < d), x * k / d is
-- q * k + r * k / d, and r * k stays small.
local function muldiv_floor(x, k, d)
  local q = idiv(x, d)
  return q * k + idiv((x - q * d) * k, d)
end

local function muldiv_ceil(x, k, d)
  local q = idiv(x, d)
  return q * k + cdiv((x - q * d) * k, d)
end

local function split(text)
  local items = {}
  if text == nil or text == '' then
    return items
  end
  for item in string.gmatch(text, '[^,]+') do
    items[#items + 1] = item
  end
  return items
end

local function hgetall(key)
  local raw = redis.call('HGETALL', key)
  if #raw == 0 then
    return nil
  end
  local t = {}
  for i = 1, #raw, 2 do
    t[raw[i]] = raw[i + 1]
  end
  return t
end

-- Whether the agency's state is gone (its marker with it): see "Loss" above.
local function lost(marker)
  return redis.call('EXISTS', marker) == 0
end

-- -- JSON of outbox records (the schema of creditd.store.redis.encode_record) -----------

local jstr = cjson.encode -- a Lua string becomes a quoted, escaped JSON string

local OUT = {}
local record_seq = 0

local function next_id()
  record_seq = record_seq + 1
  return ID_PREFIX .. '-' .. record_seq
end

local function emit(json)
  OUT[#OUT + 1] = json
end

-- {"k": v, ...} of account ids (in `order`) to integers in `values`.
local function jmap(order, values)
  local parts = {}
  for i, key in ipairs(order) do
    parts[i] = jstr(key) .. ':' .. fmt(values[key])
  end
  return '{' .. table.concat(parts, ',') .. '}'
end

-- for_: nil, or what a usage entry was for: {client =, provider =, country =}.
local function ledger(w, kind, free, purchased, usage, session_id, message_id, seconds, for_)
  for_ = for_ or {}
  local parts = {
    '{"k":"L","entry_id":', jstr(next_id()),
    ',"account_id":', jstr(w.a),
    ',"balance_type":', fmt(w.bt),
    ',"kind":', fmt(kind),
    ',"amount_micros":', fmt(free + purchased),
    ',"free_micros":', fmt(free),
    ',"purchased_micros":', fmt(purchased),
    ',"usage_micros":', fmt(usage),
    ',"created_at":', NOW_TEXT,
    ',"session_id":', jstr(session_id or ''),
    ',"message_id":', jstr(message_id or ''),
    ',"seconds":', fmt(seconds or 0),
    ',"client_id":', jstr(for_.client or ''),
    ',"provider":', jstr(for_.provider or ''),
    ',"destination_country":', jstr(for_.country or ''),
    '}',
  }
  return table.concat(parts)
end

-- attributes: nil or a JSON object text.
local function event(account, bt, etype, amount, key, session_id, reason, attributes)
  local parts = {
    '{"k":"E","event_id":', jstr(next_id()),
    ',"account_id":', jstr(account),
    ',"type":', fmt(etype),
    ',"balance_type":', fmt(bt),
    ',"created_at":', NOW_TEXT,
    ',"amount_micros":', fmt(amount or 0),
    ',"idempotency_key":', jstr(key or ''),
    ',"session_id":', jstr(session_id or ''),
    ',"reason":', fmt(reason or 0),
    ',"attributes":', attributes or '{}',
    '}',
  }
  return table.concat(parts)
end

-- s: a session table as read by load_session (and changed by the caller).
local function session_record(s)
  local parts = {
    '{"k":"S","session_id":', jstr(s.id),
    ',"client_id":', jstr(s.client),
    ',"agency_id":', jstr(s.agency),
    ',"channel":', fmt(s.ch),
    ',"direction":', fmt(s.dir),
    ',"provider":', jstr(s.prov),
    ',"status":', jstr(s.st),
    ',"granted_seconds":', fmt(s.gr),
    ',"billed_seconds":', fmt(s.bil),
    ',"reserved":', jmap(s.payers, s.reserved),
    ',"charged":', jmap(s.charged_order, s.charged),
    ',"updated_at":', NOW_TEXT,
    ',"cutoff_reason":', fmt(s.cut),
    ',"started_at":', s.sa, -- '0', or NOW_TEXT of the claim that answered the call
    '}',
  }
  return table.concat(parts)
end

-- -- sessions ----------------------------------------------------------------------------
-- Hash fields: id agency client ch dir prov st gr exp bil cut, ep (epoch: the session's
-- owner changes with it, see claim), ax (authorized until), sa (started at, 0 before the
-- first SessionStart), rp (payers in order, comma-separated account ids) with
-- r:<account> reserved micros and t:<account> the payer's tariff ("start:rate,..."), cp
-- (charged accounts in order) with c:<account> charged micros.

local function load_session(key)
  local raw = hgetall(key)
  if raw == nil then
    return nil
  end
  local s = {
    id = raw.id, agency = raw.agency, client = raw.client, prov = raw.prov, st = raw.st, exp = raw.exp,
    ch = tonumber(raw.ch), dir = tonumber(raw.dir), gr = tonumber(raw.gr), bil = tonumber(raw.bil),
    cut = tonumber(raw.cut), payers = split(raw.rp), reserved = {}, charged_order = split(raw.cp), charged = {},
    ep = tonumber(raw.ep or '1'), ax = raw.ax or '0', sa = raw.sa or '0', tariffs = {},
  }
  for _, account in ipairs(s.payers) do
    s.reserved[account] = tonumber(raw['r:' .. account])
    s.tariffs[account] = raw['t:' .. account] or ''
  end
  for _, account in ipairs(s.charged_order) do
    s.charged[account] = tonumber(raw['c:' .. account])
  end
  return s
end

-- part: 'all' (a new session), 'reserve' (what reserving changes) or 'settle'.
local function save_session(key, s, part)
  local fields
  if part == 'all' then
    fields = {
      'id', s.id, 'agency', s.agency, 'client', s.client, 'ch', fmt(s.ch), 'dir', fmt(s.dir), 'prov', s.prov,
      'st', s.st, 'bil', fmt(s.bil), 'cut', fmt(s.cut), 'cp', table.concat(s.charged_order, ','),
      'ep', fmt(s.ep), 'ax', s.ax, 'sa', s.sa,
    }
  else
    fields = {}
  end
  if part ~= 'settle' then
    fields[#fields + 1] = 'gr'
    fields[#fields + 1] = fmt(s.gr)
    fields[#fields + 1] = 'exp'
    fields[#fields + 1] = s.exp
    fields[#fields + 1] = 'rp'
    fields[#fields + 1] = table.concat(s.payers, ',')
    for _, account in ipairs(s.payers) do
      fields[#fields + 1] = 'r:' .. account
      fields[#fields + 1] = fmt(s.reserved[account])
      fields[#fields + 1] = 't:' .. account
      fields[#fields + 1] = s.tariffs[account]
    end
  end
  if part == 'settle' then
    fields = {'st', s.st, 'bil', fmt(s.bil), 'cut', fmt(s.cut), 'cp', table.concat(s.charged_order, ',')}
    for _, account in ipairs(s.charged_order) do
      fields[#fields + 1] = 'c:' .. account
      fields[#fields + 1] = fmt(s.charged[account])
    end
  end
  redis.call('HSET', key, unpack(fields))
end

-- Tariff.price_from: charge `rate` from second `granted` on. A tariff is "start:rate,...".
local function price_from(tariff, granted, rate)
  local segments = split(tariff)
  local last = segments[#segments]
  if last ~= nil then
    local start, last_rate = string.match(last, '^(%d+):(%d+)$')
    if tonumber(start) == granted then
      segments[#segments] = nil -- it priced no second yet: replace it
      last = segments[#segments]
      last_rate = last and string.match(last, ':(%d+)$')
    end
    if last ~= nil and tonumber(last_rate) == rate then
      return table.concat(segments, ',')
    end
  end
  segments[#segments + 1] = fmt(granted) .. ':' .. fmt(rate)
  return table.concat(segments, ',')
end

-- Reply items for an ordered account -> micros map: count, then account, micros pairs.
local function map_reply(reply, order, values)
  reply[#reply + 1] = fmt(#order)
  for _, account in ipairs(order) do
    reply[#reply + 1] = account
    reply[#reply + 1] = fmt(values[account])
  end
  return reply
end

-- -- wallets -----------------------------------------------------------------------------
-- Hash fields: a (account id), bt (balance type); the configuration: hw (has wallet),
-- fa (free allowance), ul (usage limit), ad (anchor day), rf (refill set), re (refill
-- enabled), rt (refill threshold), ra (refill amount), rg (refill target), rm (refills
-- per period), lb (low-balance threshold); the state: ps, pe (period start and end),
-- fr (free), pu (purchased), rs (reserved), us (used), rn (refills this period),
-- ln (limit notified).

local WALLET_FIELDS = {
  'bt', 'hw', 'fa', 'ul', 'ad', 'rf', 're', 'rt', 'ra', 'rg', 'rm', 'lb', 'ps', 'pe', 'fr', 'pu', 'rs', 'us', 'rn', 'ln',
}
local STATE_FIELDS = {'ps', 'pe', 'fr', 'pu', 'rs', 'us', 'rn', 'ln'}

local WALLETS = {} -- key -> wallet, each loaded once per script
local WALLET_ORDER = {}

local function load_wallet(key)
  local w = WALLETS[key]
  if w ~= nil then
    return w
  end
  local raw = redis.call('HGETALL', key)
  if #raw == 0 then
    return nil
  end
  w = {key = key}
  for i = 1, #raw, 2 do
    local field = raw[i]
    if field == 'a' then
      w.a = raw[i + 1]
    else
      w[field] = tonumber(raw[i + 1])
    end
  end
  local saved = {}
  for i, field in ipairs(STATE_FIELDS) do
    saved[i] = w[field]
  end
  w.saved = saved -- the state as stored: commit writes the fields that differ
  WALLETS[key] = w
  WALLET_ORDER[#WALLET_ORDER + 1] = w
  return w
end

-- The wallet as a reply: account id, then WALLET_FIELDS in order.
local function wallet_reply(reply, w)
  reply[#reply + 1] = w.a
  for _, field in ipairs(WALLET_FIELDS) do
    reply[#reply + 1] = fmt(w[field])
  end
  return reply
end

-- A BOUNDS reply if a wallet must roll to a period whose bounds the caller did not pass
-- (they are calendar math, done in Python): account, anchor day pairs.
local function missing_bounds(wallets)
  local reply = nil
  for _, w in ipairs(wallets) do
    if NOW >= w.pe and BOUNDS[w.ad] == nil then
      reply = reply or {'BOUNDS'}
      reply[#reply + 1] = w.a
      reply[#reply + 1] = fmt(w.ad)
    end
  end
  return reply
end

local function wallet_available(w)
  if w.hw ~= 1 then
    return nil
  end
  return w.fr + w.pu - w.rs
end

local function limit_available(w)
  if w.ul <= 0 then
    return nil
  end
  return w.ul - w.us - w.rs
end

-- WalletState.headroom: (value >= 0, 'wallet' | 'limit') or nil, nil. A tie goes to the limit.
local function headroom(w)
  local wallet, limit = wallet_available(w), limit_available(w)
  local value, constraint
  if wallet == nil and limit == nil then
    return nil, nil
  elseif wallet == nil then
    value, constraint = limit, 'limit'
  elseif limit == nil then
    value, constraint = wallet, 'wallet'
  elseif limit <= wallet then
    value, constraint = limit, 'limit'
  else
    value, constraint = wallet, 'wallet'
  end
  if value < 0 then
    value = 0
  end
  return value, constraint
end

local function alert_level(w)
  if w.hw == 1 then
    return wallet_available(w)
  end
  return limit_available(w)
end

-- WalletState.roll_period, with the bounds of NOW's period for the wallet's anchor day.
local function roll(w)
  if NOW < w.pe then
    return
  end
  local bounds = BOUNDS[w.ad] -- present: checked by missing_bounds before any change
  if w.hw == 1 then
    local allowance = w.fa
    local needed = w.rs - w.pu - allowance
    local carried = math.max(0, math.min(w.fr, needed))
    local expired = w.fr - carried
    if expired ~= 0 then
      emit(ledger(w, 4, -expired, 0, 0)) -- FREE_EXPIRY
      emit(event(w.a, w.bt, 6, expired)) -- FREE_CREDITS_EXPIRED
    end
    if allowance ~= 0 then
      emit(ledger(w, 5, allowance, 0, 0)) -- FREE_ALLOWANCE
    end
    w.fr = carried + allowance
  end
  w.ps, w.pe = bounds[1], bounds[2]
  w.us = 0
  w.rn = 0
  w.ln = 0
end

-- WalletState.alerts: events for thresholds crossed downward since `before`.
local function alerts(w, before)
  local after = alert_level(w)
  if before == nil or after == nil then
    return
  end
  local low = w.lb
  if low > 0 and before >= low and low > after then
    emit(event(w.a, w.bt, 1, math.max(0, after))) -- LOW_BALANCE
  end
  if w.rf == 1 and w.re == 1 and w.rt > 0 and before >= w.rt and w.rt > after and w.rn < w.rm then
    w.rn = w.rn + 1
    local amount = w.ra
    if w.rg > 0 then
      amount = math.max(0, w.rg - math.max(0, after))
    end
    local key = 'refill:' .. w.a .. ':' .. BALANCE_NAMES[w.bt] .. ':' .. fmt(w.ps) .. ':' .. fmt(w.rn)
    emit(event(w.a, w.bt, 2, amount, key)) -- REFILL_REQUESTED
  end
end

-- WalletState.limit_reached: one LIMIT_REACHED event per period.
local function limit_reached(w)
  if w.ln == 1 then
    return
  end
  w.ln = 1
  emit(event(w.a, w.bt, 3, w.ul))
end

-- WalletState.debit: (free, purchased) split, or nil when it would go beyond the wallet.
local function debit(w, cost)
  if w.hw ~= 1 then
    w.us = w.us + cost
    return 0, 0
  end
  local from_free = math.min(w.fr, cost)
  local from_purchased = cost - from_free
  if from_purchased > w.pu then
    return nil
  end
  w.us = w.us + cost
  w.fr = w.fr - from_free
  w.pu = w.pu - from_purchased
  return from_free, from_purchased
end

-- Write the changed fields of every wallet and append the records to the outbox stream.
local function commit(outbox)
  for _, w in ipairs(WALLET_ORDER) do
    local fields = nil
    for i, field in ipairs(STATE_FIELDS) do
      if w[field] ~= w.saved[i] then
        fields = fields or {}
        fields[#fields + 1] = field
        fields[#fields + 1] = fmt(w[field])
      end
    end
    if fields ~= nil then
      redis.call('HSET', w.key, unpack(fields))
    end
  end
  for _, record in ipairs(OUT) do
    redis.call('XADD', outbox, '*', 'r', record)
  end
  return #OUT
end

-- -- the operation ---------------------------------------------------------------------
