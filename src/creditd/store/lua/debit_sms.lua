-- debit_sms: debit one message on every payer at once, or deny it. Exactly once per
-- message id of the client: an allowed debit's result is kept with its parameters (a
-- denial is not); the same id with other parameters is refused.
-- KEYS: message result, outbox, the agency's marker, then the payers' SMS wallets (in cost order).
-- ARGV: common, message id, session id, client id, destination country, segments, ttl seconds
-- of the kept result (0: none), payer count, then (account, micros) per payer.
-- Reply: {'DUP', count, account, micros...} | {'REUSED'} | {'LOST'} | {'NOTFOUND', account}
-- | {'BOUNDS', account, anchor...} | {'DENY', account, constraint} | {'OK'}.
local result_key, outbox, marker = KEYS[1], KEYS[2], KEYS[3]
local message_id, session_id, client, country = arg(), arg(), arg(), arg()
local segments, ttl = narg(), narg()
local parameters = country .. ':' .. fmt(segments) -- what makes a retry the same message
local payers = {}
for i = 1, narg() do
  payers[i] = {account = arg(), cost = narg(), key = KEYS[3 + i]}
end

local seen = hgetall(result_key)
if seen ~= nil then
  if seen.p ~= nil and seen.p ~= parameters then -- (results kept by older versions have none)
    return {'REUSED'}
  end
  local order = split(seen.o)
  local charged = {}
  for _, account in ipairs(order) do
    charged[account] = tonumber(seen['c:' .. account])
  end
  return map_reply({'DUP'}, order, charged)
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

for i, payer in ipairs(payers) do
  local value, constraint = headroom(wallets[i])
  if value ~= nil and value < payer.cost then
    if constraint == 'limit' then
      limit_reached(wallets[i])
    end
    commit(outbox)
    return {'DENY', payer.account, constraint}
  end
end

local fields = {'o', '', 'p', parameters}
local order = {}
for i, payer in ipairs(payers) do
  local w = wallets[i]
  local before = alert_level(w)
  local free, purchased = debit(w, payer.cost)
  if free == nil then
    return {'VALUE', 'debit beyond the wallet'}
  end
  emit(ledger(w, 3, -free, -purchased, payer.cost, session_id, message_id, segments, {client = client, country = country})) -- SMS_USAGE
  alerts(w, before)
  order[#order + 1] = payer.account
  fields[#fields + 1] = 'c:' .. payer.account
  fields[#fields + 1] = fmt(payer.cost)
end
fields[2] = table.concat(order, ',')
redis.call('HSET', result_key, unpack(fields))
if ttl > 0 then
  redis.call('EXPIRE', result_key, ttl)
end
commit(outbox)
return {'OK'}
