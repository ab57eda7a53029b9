-- The LLM's per-conversation failure analyses (processors/diagnose/analysis.py), with the short
-- redacted quote that shows where the conversation went wrong: for people to read. The quote
-- never enters a diagnosis (diagnoses take only the kind, tool, turn and instruction number).
CREATE TABLE IF NOT EXISTS failure_analyses
(
    conversation_id     String,
    intent_id           String,
    failure_kind        LowCardinality(String),
    turn                Int32,                -- message index in the conversation
    trace_id            String,
    span_id             String,               -- the span of that message
    tool                String,
    instruction         Int32,                -- numbered line of the system prompt, -1: none
    relation            LowCardinality(String),  -- broken | lacking | none
    quote               String,               -- redacted, copied from one message
    ts_ns               UInt64
)
ENGINE = ReplacingMergeTree(ts_ns)
ORDER BY (intent_id, conversation_id);
