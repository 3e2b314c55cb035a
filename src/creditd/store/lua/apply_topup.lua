-- apply_topup: credit a durable top-up entry once (a set of applied entry ids per agency).
-- KEYS: wallet, the agency's set of applied entry ids, outbox, the agency's marker.
-- ARGV: common, entry id, free micros, purchased micros.
-- Reply: {'LOST'} | {'NOTFOUND'} | {'BOUNDS', account, anchor} | {'OK', wallet...}.
local wallet_key, applied, outbox, marker = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local entry_id, free, purchased = arg(), narg(), narg()
local w = load_wallet(wallet_key)
if w == nil then
  if lost(marker) then
    return {'LOST'}
  end
  return {'NOTFOUND'}
end
local need = missing_bounds({w})
if need then
  return need
end
roll(w)
if redis.call('SADD', applied, entry_id) == 1 then
  w.fr = w.fr + free
  w.pu = w.pu + purchased
  if (limit_available(w) or 0) > 0 then
    w.ln = 0
  end
end
commit(outbox)
return wallet_reply({'OK'}, w)
