-- LLM steps (processors/llm_work.py): where every name, judgement, diagnosis and proposal came
-- from, the answers kept by content hash (no second call for work already answered, across
-- redeliveries and restarts) and each step's counters for `closeloop status`.

-- llm: the LLM's answer; keyphrases / rules / structural / template: the deterministic path
ALTER TABLE intents ADD COLUMN IF NOT EXISTS source LowCardinality(String) DEFAULT 'keyphrases';
ALTER TABLE conversation_tags ADD COLUMN IF NOT EXISTS source LowCardinality(String) DEFAULT 'structural';
ALTER TABLE diagnoses ADD COLUMN IF NOT EXISTS source LowCardinality(String) DEFAULT 'rules';
ALTER TABLE proposals ADD COLUMN IF NOT EXISTS source LowCardinality(String) DEFAULT 'template';

CREATE TABLE IF NOT EXISTS llm_answers
(
    key                 String,               -- sha256 of the model and everything it was sent
    step                LowCardinality(String),
    answer              String,               -- the JSON object it answered
    ts_ns               UInt64
)
ENGINE = ReplacingMergeTree(ts_ns)
ORDER BY key;

-- Cumulative counters per worker process and step, the newest row kept.
CREATE TABLE IF NOT EXISTS llm_stats
(
    ts_ns               UInt64,
    worker              String,
    step                LowCardinality(String),
    calls               UInt64,
    failures            UInt64,
    cached              UInt64,
    skipped             UInt64,
    tokens              UInt64,
    median_latency_s    Float64,
    queued              UInt64,
    breaker             LowCardinality(String)   -- closed | open | half-open
)
ENGINE = ReplacingMergeTree(ts_ns)
ORDER BY (step, worker);
