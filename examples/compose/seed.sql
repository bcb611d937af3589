-- Sample rows for the example model (syncctl model example), loaded by the `seed`
-- service of docker-compose.yml after `init` has created the tables.
--
-- User 1 is Alice, a technician (init gives her the role); user 2 is Dave, another one.
-- Rows that exist are left alone (ON CONFLICT DO NOTHING), so running this on every
-- `docker compose up` keeps changes made since the first one.
BEGIN;

INSERT INTO technician (id, name, user_id) VALUES
    (1, 'Alice', 1),
    (2, 'Dave', 2)
ON CONFLICT (id) DO NOTHING;

INSERT INTO customer (id, name, phone, credit_limit) VALUES
    (1, 'Acme Pumps', '+31 20 555 0101', 25000),
    (2, 'Bolt & Co', '+31 20 555 0102', 5000)
ON CONFLICT (id) DO NOTHING;

-- 1 and 2 are Alice's, 3 is Dave's, 4 is autocommitted (half entered, never synced).
INSERT INTO work_order
    (id, title, status, due, amount, internal_note, technician_id, customer_id, autocommitted)
VALUES
    (1, 'Replace pump seal', 'Open', now() + interval '1 day', 480.00, 'bill extra', 1, 1, false),
    (2, 'Annual inspection', 'Open', now() + interval '3 days', 150.00, NULL, 1, 2, false),
    (3, 'Fix valve', 'Planned', now() + interval '2 days', 90.00, NULL, 2, 1, false),
    (4, 'Half-entered order', 'Draft', NULL, NULL, NULL, 1, NULL, true)
ON CONFLICT (id) DO NOTHING;

INSERT INTO invoice (id, number, total) VALUES (1, 'INV-001', 480.00)
ON CONFLICT (id) DO NOTHING;

-- The ids above were given explicitly; move the identity sequences past them so rows
-- the app inserts later get fresh ids.
SELECT
    setval(pg_get_serial_sequence('technician', 'id'), (SELECT max(id) FROM technician)),
    setval(pg_get_serial_sequence('customer', 'id'), (SELECT max(id) FROM customer)),
    setval(pg_get_serial_sequence('work_order', 'id'), (SELECT max(id) FROM work_order)),
    setval(pg_get_serial_sequence('invoice', 'id'), (SELECT max(id) FROM invoice));

COMMIT;
