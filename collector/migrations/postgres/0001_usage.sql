-- Usage batches and their records. A batch id is stored once: the primary key is the
-- idempotency check, taken in the same transaction as the records. Concurrent inserts of
-- one id from two replicas: the second waits for the first and then inserts nothing.
CREATE TABLE batches (
    batch_id    TEXT PRIMARY KEY,
    instance    TEXT NOT NULL,
    sequence    BIGINT NOT NULL,
    records     BIGINT NOT NULL,
    created_ms  BIGINT NOT NULL,
    received_ms BIGINT NOT NULL
);

CREATE TABLE usage_records (
    id              BIGSERIAL PRIMARY KEY,
    batch_id        TEXT NOT NULL REFERENCES batches (batch_id),
    account         TEXT NOT NULL,
    license         TEXT NOT NULL,
    feature         TEXT NOT NULL,
    outcome         TEXT NOT NULL,
    meter           TEXT NOT NULL,
    units           BIGINT NOT NULL CHECK (units >= 0),
    window_start_ms BIGINT NOT NULL,
    window_end_ms   BIGINT NOT NULL
);

CREATE INDEX usage_records_by_account ON usage_records (account, window_start_ms);
CREATE INDEX usage_records_by_window ON usage_records (window_start_ms);
