-- Ingest speed: each usage record was also indexed by its batch id (added for late usage):
-- a fourth B-tree, keyed by text, updated for every record stored. Late usage is found from
-- the per-account index and joins each record to its batch by the batches' primary key, so
-- SQLite's planner never used this index; dropping it makes each record cheaper to store.
DROP INDEX usage_records_by_batch;
