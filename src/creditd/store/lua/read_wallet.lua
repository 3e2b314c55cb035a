-- read_wallet: the wallet as of now; a period that ended is rolled over first (a write).
-- KEYS: wallet, outbox.  ARGV: common.
-- Reply: {'NONE'} | {'BOUNDS', account, anchor} | {'OK', wallet...}.
local wallet_key, outbox = KEYS[1], KEYS[2]
local w = load_wallet(wallet_key)
if w == nil then
  return {'NONE'}
end
local need = missing_bounds({w})
if need then
  return need
end
roll(w)
commit(outbox)
return wallet_reply({'OK'}, w)
