-- The SQLite side's migration 5 drops the per-record index on batch_id, which its planner
-- never used. PostgreSQL keeps it (its ingest is one statement per batch, and late usage may
-- be planned from the batches received after a cut): this migration only keeps the two lists
-- of migrations the same.
SELECT 1;
