-- Layers 3-5: diagnoses, proposals, human reviews and measured outcomes.
-- Ids are content hashes (one diagnosis per intent and root cause, one proposal per diagnosis),
-- rows are updated by writing a higher version.

CREATE TABLE IF NOT EXISTS diagnoses
(
    diagnosis_id        String,
    intent_id           String,
    intent_name         String,
    rule                LowCardinality(String),
    summary             String,
    root_cause          String,
    component           String,               -- JSON {type, target, detail}
    confidence          Float64,
    evidence            String,               -- JSON
    trace_ids           Array(String),
    support             UInt64,
    failures            UInt64,
    failure_rate        Float64,
    baseline_rate       Float64,
    prompt_version      String,
    agent_version       String,
    window_from_ns      UInt64,
    window_to_ns        UInt64,
    status              LowCardinality(String),
    version             UInt64,
    updated_ns          UInt64,
    updated_time        DateTime64(9, 'UTC') MATERIALIZED fromUnixTimestamp64Nano(toInt64(updated_ns))
)
ENGINE = ReplacingMergeTree(version)
ORDER BY diagnosis_id;

CREATE TABLE IF NOT EXISTS proposals
(
    proposal_id         String,
    diagnosis_id        String,
    intent_id           String,
    backend             LowCardinality(String),
    repo                String,
    base                String,
    branch              String,
    title               String,
    body                String,
    diff                String,
    files               Array(String),
    commit              String,
    pr_number           UInt32,
    pr_url              String,
    status              LowCardinality(String),
    version             UInt64,
    created_ns          UInt64,
    updated_ns          UInt64,
    created_time        DateTime64(9, 'UTC') MATERIALIZED fromUnixTimestamp64Nano(toInt64(created_ns))
)
ENGINE = ReplacingMergeTree(version)
ORDER BY proposal_id;

CREATE TABLE IF NOT EXISTS reviews
(
    review_id           String,
    proposal_id         String,
    diagnosis_id        String,
    intent_id           String,
    decision            LowCardinality(String),
    reviewer            String,
    comment             String,
    merged_commit       String,
    before_prompt_version String,
    before_agent_version  String,
    evidence_trace_ids  Array(String),
    window_from_ns      UInt64,
    window_to_ns        UInt64,
    ts_ns               UInt64,
    ts                  DateTime64(9, 'UTC') MATERIALIZED fromUnixTimestamp64Nano(toInt64(ts_ns))
)
ENGINE = ReplacingMergeTree
ORDER BY review_id;

CREATE TABLE IF NOT EXISTS outcomes
(
    proposal_id         String,
    intent_id           String,
    before_version      String,
    after_version       String,
    before_n            UInt64,
    before_failures     UInt64,
    after_n             UInt64,
    after_failures      UInt64,
    rate_before         Float64,
    rate_after          Float64,
    diff_low            Float64,
    diff_high           Float64,
    p_value             Float64,
    verdict             LowCardinality(String),
    ts_ns               UInt64,
    ts                  DateTime64(9, 'UTC') MATERIALIZED fromUnixTimestamp64Nano(toInt64(ts_ns))
)
ENGINE = ReplacingMergeTree(ts_ns)
ORDER BY (proposal_id, intent_id);
