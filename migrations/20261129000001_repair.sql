-- The repair sweep: a live job whose message is gone (lost in a broker failure) is
-- republished, at most a few times (`repairs` counts them), then failed with the reason.
ALTER TABLE jobs ADD COLUMN repairs integer NOT NULL DEFAULT 0;
-- Live jobs by last change, for the sweep's "nothing happened for N seconds" scan.
CREATE INDEX jobs_live_updated ON jobs (updated_at)
    WHERE state IN ('queued', 'waiting_budget', 'running', 'retrying');
