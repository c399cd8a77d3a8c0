-- Place in line: a ticket taken at enqueue. A queued job's position is its ticket minus
-- the smallest ticket still queued, plus one (an O(log n) lookup on the index below;
-- see README "Queue position and ETA").
ALTER TABLE jobs ADD COLUMN queue_seq bigserial;
CREATE INDEX jobs_queued_seq ON jobs (queue_seq) WHERE state = 'queued';
