-- Ingest speed: each usage record used to be indexed by its batch id (for late usage, found
-- through the batches received after an invoice's cut): a fourth B-tree, keyed by text, to
-- update for every record stored. A batch's records are inserted in its own transaction by
-- the only writer, so their ids are consecutive: the batch keeps the first and last id, and
-- late usage reads that id range of the table instead of a per-record index.
ALTER TABLE batches ADD COLUMN first_record_id INTEGER;
ALTER TABLE batches ADD COLUMN last_record_id INTEGER;

UPDATE batches SET
    first_record_id = (SELECT MIN(id) FROM usage_records r WHERE r.batch_id = batches.batch_id),
    last_record_id  = (SELECT MAX(id) FROM usage_records r WHERE r.batch_id = batches.batch_id);

DROP INDEX usage_records_by_batch;
