-- When a job waiting for rate-limit budget is expected to start (state waiting_budget).
ALTER TABLE jobs ADD COLUMN expected_start_at timestamptz;
