-- A tenant's jobs newest first (ids are UUIDv7, so id order is creation order), for
-- GET /v1/jobs pages.
CREATE INDEX jobs_tenant_id ON jobs (tenant, id DESC);
