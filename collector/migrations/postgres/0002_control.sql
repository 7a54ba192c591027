-- Quota leases and the state filters must obey (revoked licenses, suspended accounts, budgets).
-- A lease is a slice of a license's quota for one meter and calendar period, handed to one
-- filter. quota_allocations holds, per quota and period, the units handed out: the sum of the
-- open leases' grants and of the closed leases' use. A lease id is stored once: a retried
-- request gets the stored grant, a retried return changes nothing.
CREATE TABLE leases (
    lease_id        TEXT PRIMARY KEY,
    holder          TEXT NOT NULL,
    account         TEXT NOT NULL,
    license         TEXT NOT NULL,
    meter           TEXT NOT NULL,
    period_start_ms BIGINT NOT NULL,
    period_end_ms   BIGINT NOT NULL,
    limit_units     BIGINT NOT NULL,
    granted         BIGINT NOT NULL CHECK (granted >= 0),
    allocated_after BIGINT NOT NULL,
    expires_ms      BIGINT NOT NULL,
    created_ms      BIGINT NOT NULL,
    used            BIGINT,
    closed_ms       BIGINT
);

CREATE TABLE quota_allocations (
    license         TEXT NOT NULL,
    meter           TEXT NOT NULL,
    period_start_ms BIGINT NOT NULL,
    period_end_ms   BIGINT NOT NULL,
    allocated       BIGINT NOT NULL CHECK (allocated >= 0),
    PRIMARY KEY (license, meter, period_start_ms, period_end_ms)
);

CREATE TABLE revoked_licenses (
    license    TEXT PRIMARY KEY,
    reason     TEXT NOT NULL,
    revoked_ms BIGINT NOT NULL
);

CREATE TABLE suspended_accounts (
    account      TEXT PRIMARY KEY,
    reason       TEXT NOT NULL,
    suspended_ms BIGINT NOT NULL
);

-- A spend cap: amount (a decimal string, in the catalogue's currency) per calendar period.
CREATE TABLE budgets (
    account    TEXT PRIMARY KEY,
    period     TEXT NOT NULL,
    amount     TEXT NOT NULL,
    updated_ms BIGINT NOT NULL
);

-- The plan of each license filters served, for pricing its usage.
CREATE TABLE licenses (
    license      TEXT PRIMARY KEY,
    account      TEXT NOT NULL,
    plan         TEXT NOT NULL,
    last_seen_ms BIGINT NOT NULL
);
