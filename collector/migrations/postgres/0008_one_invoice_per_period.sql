-- One finalised invoice per account and period start, whatever its id says: replicas of two
-- versions finalising the same period at once (ids once named the UTC instant of the start,
-- now its local time) store one invoice, never two.
DROP INDEX invoices_by_account;
CREATE UNIQUE INDEX invoices_one_per_period ON invoices (account, period_start_ms);
