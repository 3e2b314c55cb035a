-- read_wallet: the wallet as of now; a period that ended is rolled over first (a write).
-- KEYS: wallet, outbox, the agency's marker.  ARGV: common.
-- Reply: {'LOST'} | {'NONE'} | {'BOUNDS', account, anchor} | {'OK', wallet...}.
local wallet_key, outbox, marker = KEYS[1], KEYS[2], KEYS[3]
local w = load_wallet(wallet_key)
if w == nil then
  if lost(marker) then
    return {'LOST'}
  end
  return {'NONE'}
end
local need = missing_bounds({w})
if need then
  return need
end
roll(w)
commit(outbox)
return wallet_reply({'OK'}, w)
