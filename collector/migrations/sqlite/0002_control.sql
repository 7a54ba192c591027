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
    period_start_ms INTEGER NOT NULL,
    period_end_ms   INTEGER NOT NULL,
    limit_units     INTEGER NOT NULL,
    granted         INTEGER NOT NULL CHECK (granted >= 0),
    allocated_after INTEGER NOT NULL,
    expires_ms      INTEGER NOT NULL,
    created_ms      INTEGER NOT NULL,
    used            INTEGER,
    closed_ms       INTEGER
);

CREATE TABLE quota_allocations (
    license         TEXT NOT NULL,
    meter           TEXT NOT NULL,
    period_start_ms INTEGER NOT NULL,
    period_end_ms   INTEGER NOT NULL,
    allocated       INTEGER NOT NULL CHECK (allocated >= 0),
    PRIMARY KEY (license, meter, period_start_ms, period_end_ms)
);

CREATE TABLE revoked_licenses (
    license    TEXT PRIMARY KEY,
    reason     TEXT NOT NULL,
    revoked_ms INTEGER NOT NULL
);

CREATE TABLE suspended_accounts (
    account      TEXT PRIMARY KEY,
    reason       TEXT NOT NULL,
    suspended_ms INTEGER NOT NULL
);

-- A spend cap: amount (a decimal string, in the catalogue's currency) per calendar period.
CREATE TABLE budgets (
    account    TEXT PRIMARY KEY,
    period     TEXT NOT NULL,
    amount     TEXT NOT NULL,
    updated_ms INTEGER NOT NULL
);

-- The plan of each license filters served, for pricing its usage.
CREATE TABLE licenses (
    license      TEXT PRIMARY KEY,
    account      TEXT NOT NULL,
    plan         TEXT NOT NULL,
    last_seen_ms INTEGER NOT NULL
);
