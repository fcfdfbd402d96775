-- The source's first rows (after schema.sql), so the initial copy has
-- something to copy.
INSERT INTO accounts
SELECT 'tenant-' || t, g, 'account ' || g, 'user' || g || '@example.com', g * 10, now()
  FROM generate_series(1, 5) t, generate_series(1, 100) g;
INSERT INTO orders
SELECT 'tenant-' || t, g, g % 100 + 1, 'new', g * 1.5, jsonb_build_object('n', g), now()
  FROM generate_series(1, 5) t, generate_series(1, 200) g;
