-- append_records: add records that change no balance (an SMS cutoff event) to the outbox.
-- KEYS: outbox.  ARGV: common (unused), then the records' JSON, written in Python.
for i = argi, #ARGV do
  emit(ARGV[i])
end
return commit(KEYS[1])
