-- The plain-Postgres design of one Authorize (SPEC §8): reserve a 60 s slice at 1 credit
-- a minute on a client wallet and on its agency's wallet in one row-locking transaction.
-- Lock both rows (client first, then agency: one order everywhere, no deadlocks), check
-- both can pay, debit free credits before purchased ones on both, write one ledger row
-- per wallet with the split. The agency row is shared by its 100 clients, as an agency's
-- pool is in creditd. Driven by bench/pgbench.sh (which creates the tables of
-- bench/plain_postgres.sql).
\set client random(1, :clients)
\set agency 1000000 + (:client - 1) / 100
\set cost 1000000
BEGIN;
SELECT free_micros AS cf, purchased_micros AS cp FROM wallets WHERE account_id = :client::text FOR UPDATE \gset
SELECT free_micros AS af, purchased_micros AS ap FROM wallets WHERE account_id = :agency::text FOR UPDATE \gset
\if :cf + :cp >= :cost and :af + :ap >= :cost
\set cfree least(:cf, :cost)
\set cpaid :cost - :cfree
\set afree least(:af, :cost)
\set apaid :cost - :afree
\set amount 0 - :cost
\set cfree_neg 0 - :cfree
\set cpaid_neg 0 - :cpaid
\set afree_neg 0 - :afree
\set apaid_neg 0 - :apaid
UPDATE wallets SET free_micros = free_micros - :cfree, purchased_micros = purchased_micros - :cpaid WHERE account_id = :client::text;
UPDATE wallets SET free_micros = free_micros - :afree, purchased_micros = purchased_micros - :apaid WHERE account_id = :agency::text;
INSERT INTO ledger (account_id, session_id, amount_micros, free_micros, purchased_micros)
  VALUES (:client::text, :client_id::text, :amount, :cfree_neg, :cpaid_neg), (:agency::text, :client_id::text, :amount, :afree_neg, :apaid_neg);
\endif
COMMIT;
