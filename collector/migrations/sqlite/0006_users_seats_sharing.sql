-- End users (pseudonymised at the edge: "<key id>.<HMAC>"; never a raw identifier), seats and
-- sharing detection.
ALTER TABLE usage_records ADD COLUMN user_ref TEXT NOT NULL DEFAULT '';

-- One row per seat a user took: named seats per (license, period start), floating seats with
-- period_start_ms 0. A seat is taken while until_ms is in the future (named: the period's end;
-- floating: the last time it was granted or renewed, plus the window). Seats are counted per
-- pseudonym key (key_id): after a key rotation users take new seats.
CREATE TABLE seats (
    license         TEXT NOT NULL,
    account         TEXT NOT NULL,
    kind            TEXT NOT NULL,
    period_start_ms INTEGER NOT NULL,
    user_ref        TEXT NOT NULL,
    key_id          TEXT NOT NULL,
    seat_limit      INTEGER NOT NULL,
    first_ms        INTEGER NOT NULL,
    last_ms         INTEGER NOT NULL,
    until_ms        INTEGER NOT NULL,
    PRIMARY KEY (license, kind, period_start_ms, user_ref)
);
CREATE INDEX seats_by_account ON seats (account, until_ms);

-- Distinct (pseudonymised) client addresses per license, with when each was last seen.
CREATE TABLE license_clients (
    license      TEXT NOT NULL,
    account      TEXT NOT NULL,
    client_ref   TEXT NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    PRIMARY KEY (license, client_ref)
);

-- The latest sharing detection per license: an alert (webhook and metric) and, when the plan
-- says so, a block until blocked_until_ms.
CREATE TABLE sharing_detections (
    license          TEXT PRIMARY KEY,
    account          TEXT NOT NULL,
    clients          INTEGER NOT NULL,
    max_clients      INTEGER NOT NULL,
    window_ms        INTEGER NOT NULL,
    detected_ms      INTEGER NOT NULL,
    blocked_until_ms INTEGER
);
