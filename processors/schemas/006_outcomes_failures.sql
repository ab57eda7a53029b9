-- Outcomes an agent states (evaluation events, the outcome attribute, late feedback) and the
-- failure analysis filed under one taxonomy (processors/records.py FAILURE_KINDS).

-- Where a conversation's outcome came from: `heuristic` (guessed from its structure) or
-- `stated` (an evaluation event, the closeloop.outcome attribute, or late feedback), and why.
ALTER TABLE conversation_tags ADD COLUMN IF NOT EXISTS outcome_source LowCardinality(String) DEFAULT 'heuristic' AFTER failed;
ALTER TABLE conversation_tags ADD COLUMN IF NOT EXISTS outcome_reason String DEFAULT '' AFTER outcome_source;

ALTER TABLE diagnoses ADD COLUMN IF NOT EXISTS failure_kind LowCardinality(String) DEFAULT 'other' AFTER rule;

-- Every conversation a diagnosis explains (not only a sample of trace ids): one row per
-- (diagnosis, conversation), rewritten by a newer diagnosis version.
CREATE TABLE IF NOT EXISTS diagnosis_conversations
(
    diagnosis_id        String,
    conversation_id     String,
    intent_id           String,
    failure_kind        LowCardinality(String),
    trace_id            String,               -- the trace holding the turn that went wrong
    turn                Int32,                -- message index in the conversation, -1: whole conversation
    tool                String,
    arguments           String,               -- redacted, as captured
    detail              String,
    version             UInt64,
    updated_ns          UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (diagnosis_id, conversation_id);

-- Late feedback and rewards as received (the audit trail of re-versioned outcomes).
CREATE TABLE IF NOT EXISTS feedback
(
    conversation_id     String,
    name                String,
    score               Nullable(Float64),
    label               String,
    explanation         String,               -- redacted
    source              LowCardinality(String),
    ts_ns               UInt64,
    ts                  DateTime64(9, 'UTC') MATERIALIZED fromUnixTimestamp64Nano(toInt64(ts_ns))
)
ENGINE = ReplacingMergeTree
ORDER BY (conversation_id, ts_ns, name);
