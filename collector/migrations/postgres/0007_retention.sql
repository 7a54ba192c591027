-- Retention: raw usage records older than the configured age are rolled up into hourly
-- aggregates (no end user, no batch) and deleted, in one transaction, so that every unit is
-- counted once: in a record or in an aggregate, never both. received_ms is the latest receipt
-- among the records an aggregate took (late usage of a period whose raw records are gone is
-- attributed by it).
CREATE TABLE usage_rollups (
    account      TEXT NOT NULL,
    license      TEXT NOT NULL,
    feature      TEXT NOT NULL,
    outcome      TEXT NOT NULL,
    meter        TEXT NOT NULL,
    hour_start_ms BIGINT NOT NULL,
    units        BIGINT NOT NULL CHECK (units >= 0),
    records      BIGINT NOT NULL,
    received_ms  BIGINT NOT NULL,
    PRIMARY KEY (account, license, feature, outcome, meter, hour_start_ms)
);
CREATE INDEX usage_rollups_by_hour ON usage_rollups (hour_start_ms);

-- What billing and usage queries read: raw records and aggregates alike.
CREATE VIEW usage_facts AS
    SELECT r.account, r.license, r.feature, r.outcome, r.meter, r.units, r.window_start_ms, b.received_ms
    FROM usage_records r JOIN batches b ON b.batch_id = r.batch_id
    UNION ALL
    SELECT account, license, feature, outcome, meter, units, hour_start_ms, received_ms
    FROM usage_rollups;

-- Seats and clients are looked up by end user and client for erasure.
CREATE INDEX seats_by_user ON seats (user_ref);
CREATE INDEX license_clients_by_client ON license_clients (client_ref);
