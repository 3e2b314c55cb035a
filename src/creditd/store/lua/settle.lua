-- settle: debit what the session used, release the rest of its reservation. Exactly once.
-- KEYS: session, outbox, live sessions of the agency, the agency's marker, then the voice
-- wallets of the accounts named in ARGV, then the open-voice-session sets of the clients
-- named in ARGV.
-- Which wallets and client a session needs is stored in the session itself; the caller
-- passes its best guess (the payers of `costs`), and the script answers MISSING, having
-- written nothing, if the session needs a key that was not declared.
-- ARGV: common, session id, epoch (the settling owner's; 0: whoever owns it, for the
-- rebuild), billed seconds, cutoff reason, ttl seconds of the settled session (0: none),
-- wallet count, accounts..., client count, clients..., cost count, (account, micros)...
-- Reply: {'LOST'} | {'NOSESSION'} | {'STALE'} | {'DONE', billed, cutoff, charged count, account, micros...}
-- | {'MISSING', accounts (comma-separated), clients} | {'NOTFOUND', account}
-- | {'BOUNDS', account, anchor...} | {'VALUE', message} | {'OK', charged count, account, micros...}.
local session_key, outbox, live, marker = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local session_id, epoch, billed, cutoff, ttl = arg(), narg(), narg(), narg(), narg()
local wallet_keys, client_keys = {}, {}
local k = 5
for _ = 1, narg() do
  wallet_keys[arg()] = KEYS[k]
  k = k + 1
end
for _ = 1, narg() do
  client_keys[arg()] = KEYS[k]
  k = k + 1
end
local costs = {}
for _ = 1, narg() do
  local account = arg()
  costs[account] = narg()
end

local s = load_session(session_key)
if s == nil then
  if lost(marker) then
    return {'LOST'}
  end
  return {'NOSESSION'}
end
if s.st == 'settled' then
  return map_reply({'DONE', fmt(s.bil), fmt(s.cut)}, s.charged_order, s.charged)
end
if epoch ~= 0 and s.ep ~= epoch then
  return {'STALE'}
end

local missing_accounts, missing_clients = {}, {}
for _, account in ipairs(s.payers) do
  if wallet_keys[account] == nil then
    missing_accounts[#missing_accounts + 1] = account
  end
end
if s.ch == 1 and client_keys[s.client] == nil then
  missing_clients[1] = s.client
end
if #missing_accounts > 0 or #missing_clients > 0 then
  return {'MISSING', table.concat(missing_accounts, ','), table.concat(missing_clients, ',')}
end

local wallets = {}
for i, account in ipairs(s.payers) do
  local w = load_wallet(wallet_keys[account])
  if w == nil then
    if lost(marker) then
      return {'LOST'}
    end
    return {'NOTFOUND', account}
  end
  wallets[i] = w
end
local need = missing_bounds(wallets)
if need then
  return need
end

for i, account in ipairs(s.payers) do
  local w = wallets[i]
  local reserved = s.reserved[account]
  local cost = math.min(costs[account] or 0, reserved)
  roll(w)
  local before = alert_level(w)
  -- WalletState.settle
  if not (0 <= cost and cost <= reserved and reserved <= w.rs) then
    return {'VALUE', 'settlement outside its reservation'}
  end
  w.rs = w.rs - reserved
  local free, purchased = debit(w, cost)
  if free == nil then
    return {'VALUE', 'debit beyond the wallet'}
  end
  s.charged_order[#s.charged_order + 1] = account
  s.charged[account] = cost
  emit(ledger(w, 2, -free, -purchased, cost, session_id, '', billed, {client = s.client, provider = s.prov})) -- VOICE_USAGE
  alerts(w, before)
end
if cutoff ~= 0 then
  local bt = 2
  if s.ch == 1 then
    bt = 1
  end
  emit(event(s.client, bt, 4, 0, '', s.id, cutoff, '{"billed_seconds":' .. jstr(fmt(billed)) .. '}')) -- CUTOFF
end
s.st = 'settled'
s.bil = billed
s.cut = cutoff
save_session(session_key, s, 'settle')
if ttl > 0 then
  redis.call('EXPIRE', session_key, ttl)
end
redis.call('SREM', live, s.id)
if s.ch == 1 then
  redis.call('SREM', client_keys[s.client], s.id)
end
emit(session_record(s))
commit(outbox)
return map_reply({'OK'}, s.charged_order, s.charged)
