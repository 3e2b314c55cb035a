-- claim: serve a voice session from the replica that calls this (SessionStart, on any
-- replica). The session's epoch goes up by one: from now on the previous owner's
-- renewals and settlement are STALE (fencing), so two replicas never serve one call. The
-- first claim records when the call was answered, which is what every later owner counts
-- the grant from, and writes the session's record (the database learns that the call was
-- answered: a rebuild releases a session that never was).
-- KEYS: session, the agency's marker, outbox.
-- ARGV: common, client id, lease until.
-- Reply: {'LOST'} | {'NOSESSION'} | {'NOTYOURS'}
-- | {status, field, value, ...}: the session's hash as it now stands, after 'OK' (claimed),
-- 'DONE' (settled already) or 'EXPIRED' (an authorization that was never answered and has
-- expired: to be released, not served). One round trip: the caller needs the whole session.
local session_key, marker, outbox = KEYS[1], KEYS[2], KEYS[3]
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
local function with_session(status)
  local reply = redis.call('HGETALL', session_key)
  table.insert(reply, 1, status)
  return reply
end

if s.st == 'settled' then
  return with_session('DONE')
end
if s.sa == '0' and NOW > tonumber(s.ax) then
  return with_session('EXPIRED')
end
s.ep = s.ep + 1
local answered = s.sa == '0'
if answered then
  s.sa = NOW_TEXT
end
if tonumber(lease_until) > tonumber(s.exp) then
  s.exp = lease_until
end
redis.call('HSET', session_key, 'ep', fmt(s.ep), 'sa', s.sa, 'exp', s.exp)
if answered then
  emit(session_record(s))
  commit(outbox)
end
return with_session('OK')
