-- Jobs, their attempts and every state transition. The only schema source.

CREATE TABLE jobs (
    id              uuid PRIMARY KEY,
    tenant          text        NOT NULL,
    idempotency_key text,
    state           text        NOT NULL CHECK (state IN
                        ('queued', 'waiting_budget', 'running', 'retrying',
                         'succeeded', 'failed', 'cancelled', 'expired')),
    model           text        NOT NULL,
    priority        smallint    NOT NULL DEFAULT 0,
    attempts        integer     NOT NULL DEFAULT 0,
    max_attempts    integer     NOT NULL,
    envelope        jsonb       NOT NULL,
    result          jsonb,
    error_class     text,
    error_message   text,
    deadline        timestamptz,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    -- Set once the broker confirmed the job's message; a job left unpublished (a producer
    -- that died between insert and publish) is published by a worker's sweep.
    published_at    timestamptz,
    CONSTRAINT jobs_tenant_idempotency_key UNIQUE (tenant, idempotency_key)
);

CREATE INDEX jobs_tenant_created ON jobs (tenant, created_at DESC);
CREATE INDEX jobs_unpublished ON jobs (created_at) WHERE published_at IS NULL;
CREATE INDEX jobs_live_state ON jobs (state) WHERE state NOT IN ('succeeded', 'failed', 'cancelled', 'expired');

-- One row per provider call, with the evidence an operator needs. No secrets.
CREATE TABLE job_attempts (
    job_id              uuid        NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt             integer     NOT NULL,
    started_at          timestamptz NOT NULL,
    finished_at         timestamptz NOT NULL,
    provider            text        NOT NULL,
    base_url_host       text        NOT NULL,
    endpoint            text        NOT NULL,
    model               text        NOT NULL,
    http_status         integer,
    outcome             text        NOT NULL,
    error_class         text,
    failed_layer        text,
    error_type          text,
    error_code          text,
    error_message       text,
    provider_request_id text,
    latency_ms          integer     NOT NULL,
    prompt_tokens       bigint,
    completion_tokens   bigint,
    PRIMARY KEY (job_id, attempt)
);

-- Every transition, in order; the terminal one is written before the message is acked.
CREATE TABLE job_transitions (
    job_id  uuid        NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq     bigserial,
    state   text        NOT NULL,
    at      timestamptz NOT NULL DEFAULT now(),
    attempt integer     NOT NULL DEFAULT 0,
    detail  jsonb,
    PRIMARY KEY (job_id, seq)
);
