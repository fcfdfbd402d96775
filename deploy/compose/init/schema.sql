-- The tables of the development stack, on the source and on the target
-- (run once by the postgres image's entrypoint): the tables the daemon's
-- `load` command writes; every table carries the tenant column the node
-- routes by ([cdc] tenant_column). The daemon checks the target's at `init`
-- and creates its own schema (heliosdb_replication) beside them.
CREATE TABLE accounts(
  tenant_id text NOT NULL, id bigint NOT NULL, name text, email text,
  balance numeric, updated_at timestamptz, PRIMARY KEY (tenant_id, id));
CREATE TABLE orders(
  tenant_id text NOT NULL, id bigint NOT NULL, account_id bigint, status text,
  amount numeric, payload jsonb, created_at timestamptz, PRIMARY KEY (tenant_id, id));
CREATE TABLE events(
  tenant_id text NOT NULL, id bigint NOT NULL, kind text, body text,
  created_at timestamptz, PRIMARY KEY (tenant_id, id));
