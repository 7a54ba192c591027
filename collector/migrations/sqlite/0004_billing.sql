-- Finalised invoices (frozen: later usage or price changes do not alter them) and the
-- webhook outbox: events to deliver, each with a stable id that is also its idempotency
-- key, and a log of every delivery attempt.
CREATE TABLE invoices (
    invoice_id      TEXT PRIMARY KEY,
    account         TEXT NOT NULL,
    period_start_ms INTEGER NOT NULL,
    period_end_ms   INTEGER NOT NULL,
    currency        TEXT NOT NULL,
    total           TEXT NOT NULL,
    body            TEXT NOT NULL,
    finalized_ms    INTEGER NOT NULL,
    -- Usage received up to this instant is billed in this invoice or an earlier one; usage
    -- received later for this period is late, and billed in the next invoice.
    cut_ms          INTEGER NOT NULL
);

CREATE INDEX invoices_by_account ON invoices (account, period_start_ms);

-- Late usage is found through the batches received after an invoice's cut.
CREATE INDEX batches_by_received ON batches (received_ms);
CREATE INDEX usage_records_by_batch ON usage_records (batch_id);

CREATE TABLE webhook_events (
    event_id        TEXT PRIMARY KEY,
    type            TEXT NOT NULL,
    payload         TEXT NOT NULL,
    created_ms      INTEGER NOT NULL,
    next_attempt_ms INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    delivered_ms    INTEGER,
    failed_ms       INTEGER
);

CREATE INDEX webhook_events_due ON webhook_events (next_attempt_ms) WHERE delivered_ms IS NULL AND failed_ms IS NULL;

CREATE TABLE webhook_deliveries (
    id          INTEGER PRIMARY KEY,
    event_id    TEXT NOT NULL REFERENCES webhook_events (event_id),
    attempt     INTEGER NOT NULL,
    at_ms       INTEGER NOT NULL,
    status      INTEGER,
    error       TEXT,
    duration_ms INTEGER NOT NULL
);

CREATE INDEX webhook_deliveries_by_event ON webhook_deliveries (event_id, attempt);
