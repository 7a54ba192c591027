-- Usage batches and their records. A batch id is stored once: the primary key is the
-- idempotency check, taken in the same transaction as the records.
CREATE TABLE batches (
    batch_id    TEXT PRIMARY KEY,
    instance    TEXT NOT NULL,
    sequence    INTEGER NOT NULL,
    records     INTEGER NOT NULL,
    created_ms  INTEGER NOT NULL,
    received_ms INTEGER NOT NULL
);

CREATE TABLE usage_records (
    id              INTEGER PRIMARY KEY,
    batch_id        TEXT NOT NULL REFERENCES batches (batch_id),
    account         TEXT NOT NULL,
    license         TEXT NOT NULL,
    feature         TEXT NOT NULL,
    outcome         TEXT NOT NULL,
    meter           TEXT NOT NULL,
    units           INTEGER NOT NULL CHECK (units >= 0),
    window_start_ms INTEGER NOT NULL,
    window_end_ms   INTEGER NOT NULL
);

CREATE INDEX usage_records_by_account ON usage_records (account, window_start_ms);
CREATE INDEX usage_records_by_window ON usage_records (window_start_ms);
