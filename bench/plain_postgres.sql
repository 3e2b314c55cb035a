-- The wallets and ledger of the plain-Postgres design (SPEC §8): used by the
-- plain-postgres servicer (bench/servers.py) and by bench/pgbench.sh.
CREATE TABLE wallets (
  account_id text PRIMARY KEY,
  free_micros bigint NOT NULL CHECK (free_micros >= 0),
  purchased_micros bigint NOT NULL CHECK (purchased_micros >= 0)
);
CREATE TABLE ledger (
  seq bigserial PRIMARY KEY,
  account_id text NOT NULL,
  session_id text NOT NULL,
  amount_micros bigint NOT NULL,
  free_micros bigint NOT NULL,
  purchased_micros bigint NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON ledger (account_id, seq);
