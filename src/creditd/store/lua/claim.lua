-- claim: serve a voice session from the replica that calls this (SessionStart, on any
-- replica). The session's epoch goes up by one: from now on the previous owner's
-- renewals and settlement are STALE (fencing), so two replicas never serve one call. The
-- first claim records when the call was answered, which is what every later owner counts
-- the grant from.
-- KEYS: session, the agency's marker.
-- ARGV: common, client id, lease until.
-- Reply: {'LOST'} | {'NOSESSION'} | {'NOTYOURS'} | {'EXPIRED', epoch} (an authorization that was
-- never answered and has expired: to be released, not served)
-- | {'DONE', billed, cutoff, charged count, account, micros...}
-- | {'OK'} (the caller reads the claimed session).
local session_key, marker = KEYS[1], KEYS[2]
local client, lease_until = arg(), arg()

local s = load_session(session_key)
if s == nil and lost(marker) then
  return {'LOST'}
end
if s == nil or s.ch ~= 1 then
  return {'NOSESSION'}
end
if s.client ~= client then
  return {'NOTYOURS'}
end
if s.st == 'settled' then
  return map_reply({'DONE', fmt(s.bil), fmt(s.cut)}, s.charged_order, s.charged)
end
if s.sa == '0' and NOW > tonumber(s.ax) then
  return {'EXPIRED', fmt(s.ep)}
end
s.ep = s.ep + 1
if s.sa == '0' then
  s.sa = NOW_TEXT
end
if tonumber(lease_until) > tonumber(s.exp) then
  s.exp = lease_until
end
redis.call('HSET', session_key, 'ep', fmt(s.ep), 'sa', s.sa, 'exp', s.exp)
return {'OK'}
