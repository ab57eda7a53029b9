-- Where each answer is, by its gen_ai.response.id: an evaluation known only by that id, taken by
-- a capture process that did not see the answer, finds its conversation here
-- (processors/feedback.py answers_of). Filled by the store itself from every span insert.
CREATE TABLE IF NOT EXISTS responses
(
    response_id         String,
    conversation_id     String,
    trace_id            String,
    span_id             String,
    ingested_ns         UInt64
)
ENGINE = ReplacingMergeTree(ingested_ns)
ORDER BY response_id;

CREATE MATERIALIZED VIEW IF NOT EXISTS responses_from_spans TO responses AS
SELECT attributes['gen_ai.response.id'] AS response_id, conversation_id, trace_id, span_id, ingested_ns
FROM spans
WHERE response_id != '';

-- the answers stored before this migration
INSERT INTO responses
SELECT attributes['gen_ai.response.id'] AS response_id, conversation_id, trace_id, span_id, ingested_ns
FROM spans
WHERE response_id != '';
