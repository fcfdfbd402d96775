-- Source database of the development stack (run once by the postgres
-- image's entrypoint). The tables the daemon's `load` command writes; every
-- table carries the tenant column the node routes by ([cdc] tenant_column).
CREATE TABLE accounts(
  tenant_id text NOT NULL, id bigint NOT NULL, name text, email text,
  balance numeric, updated_at timestamptz, PRIMARY KEY (tenant_id, id));
CREATE TABLE orders(
  tenant_id text NOT NULL, id bigint NOT NULL, account_id bigint, status text,
  amount numeric, payload jsonb, created_at timestamptz, PRIMARY KEY (tenant_id, id));
CREATE TABLE events(
  tenant_id text NOT NULL, id bigint NOT NULL, kind text, body text,
  created_at timestamptz, PRIMARY KEY (tenant_id, id));

-- A few rows so the initial copy has something to copy.
INSERT INTO accounts
SELECT 'tenant-' || t, g, 'account ' || g, 'user' || g || '@example.com', g * 10, now()
  FROM generate_series(1, 5) t, generate_series(1, 100) g;
INSERT INTO orders
SELECT 'tenant-' || t, g, g % 100 + 1, 'new', g * 1.5, jsonb_build_object('n', g), now()
  FROM generate_series(1, 5) t, generate_series(1, 200) g;
