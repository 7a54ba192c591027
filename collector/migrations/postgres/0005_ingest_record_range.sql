-- Ingest speed, the SQLite side's migration 5: there, a batch's records get consecutive ids
-- (one writer), so the batch keeps its id range and the per-record index on batch_id is
-- dropped. Here concurrent transactions (replicas) interleave their BIGSERIAL ids, so a batch's
-- records are not a range: usage_records_by_batch stays, and this migration changes nothing.
SELECT 1;
