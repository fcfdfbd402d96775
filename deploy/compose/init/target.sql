-- Target database of the development stack: the same tables, empty. The
-- daemon checks them at `init` and creates its own schema
-- (heliosdb_replication) beside them.
CREATE TABLE accounts(
  tenant_id text NOT NULL, id bigint NOT NULL, name text, email text,
  balance numeric, updated_at timestamptz, PRIMARY KEY (tenant_id, id));
CREATE TABLE orders(
  tenant_id text NOT NULL, id bigint NOT NULL, account_id bigint, status text,
  amount numeric, payload jsonb, created_at timestamptz, PRIMARY KEY (tenant_id, id));
CREATE TABLE events(
  tenant_id text NOT NULL, id bigint NOT NULL, kind text, body text,
  created_at timestamptz, PRIMARY KEY (tenant_id, id));
