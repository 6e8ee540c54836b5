-- written by bench/run.py: the raw-SQL floor, 1 job(s) per transaction
BEGIN;
SELECT id FROM floor_job WHERE status = 'pending' AND run_after <= now() ORDER BY priority DESC, run_after, id LIMIT 1 FOR NO KEY UPDATE SKIP LOCKED \gset job_
INSERT INTO floor_ledger (key, created_at) VALUES (:job_id, now());
UPDATE floor_job SET status = 'succeeded', attempts = 1, started_at = now(), finished_at = clock_timestamp() WHERE id = :job_id;
COMMIT;
