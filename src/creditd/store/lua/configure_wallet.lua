-- configure_wallet: create the wallet, or change its configuration (then roll the period).
-- KEYS: wallet, outbox, the agency's marker.
-- ARGV: common (the bounds of now's period for the new anchor day), account, balance type,
-- new agency (1: this creates the agency, whose marker it sets; 0: the agency must be
-- there), then the configuration: hw fa ul ad rf re rt ra rg rm lb.
-- Reply: {'LOST'} (the agency's state is gone: the store lost its data) | {'OK', records...}
-- (records: the JSON the outbox received).
local wallet_key, outbox, marker = KEYS[1], KEYS[2], KEYS[3]
local account, bt, new_agency = arg(), narg(), narg()
if new_agency == 1 then
  redis.call('SET', marker, '1')
elseif redis.call('EXISTS', marker) == 0 then
  return {'LOST'}
end
local config = {}
for _, field in ipairs({'hw', 'fa', 'ul', 'ad', 'rf', 're', 'rt', 'ra', 'rg', 'rm', 'lb'}) do
  config[field] = narg()
end
local bounds = BOUNDS[config.ad]

local w = load_wallet(wallet_key)
if w == nil then
  -- new_wallet: the first period, before its allowance is granted (a top-up does that)
  local fields = {'a', account, 'bt', fmt(bt)}
  for field, value in pairs(config) do
    fields[#fields + 1] = field
    fields[#fields + 1] = fmt(value)
  end
  for _, pair in ipairs({{'ps', bounds[1]}, {'pe', bounds[2]}, {'fr', 0}, {'pu', 0}, {'rs', 0}, {'us', 0}, {'rn', 0}, {'ln', 0}}) do
    fields[#fields + 1] = pair[1]
    fields[#fields + 1] = fmt(pair[2])
  end
  redis.call('HSET', wallet_key, unpack(fields))
  return {'OK'}
end

local fields = {}
for field, value in pairs(config) do
  w[field] = value
  fields[#fields + 1] = field
  fields[#fields + 1] = fmt(value)
end
redis.call('HSET', wallet_key, unpack(fields))
if w.ul <= 0 or (limit_available(w) or 0) > 0 then
  w.ln = 0
end
roll(w)
commit(outbox)
local reply = {'OK'}
for _, record in ipairs(OUT) do
  reply[#reply + 1] = record
end
return reply
