-- Layer 1: capture. Every span, every normalised turn and tool call.
-- Keys are the span identity, so a replay of otlp_spans rewrites the same rows
-- (ReplacingMergeTree collapses them; count with FINAL or uniqExact).

CREATE TABLE IF NOT EXISTS spans
(
    trace_id            String,
    span_id             String,
    parent_span_id      String,
    conversation_id     String,
    name                String,
    span_kind           LowCardinality(String),
    service_name        LowCardinality(String),
    scope_name          LowCardinality(String),
    start_ns            UInt64,
    end_ns              UInt64,
    duration_ms         Float64,
    status_code         LowCardinality(String),
    status_message      String,
    resource_attributes Map(String, String),
    attributes          Map(String, String),
    events              String,               -- JSON array of {name, time_ns, attributes}
    redactions          UInt32,
    ingested_ns         UInt64,
    start_time          DateTime64(9, 'UTC') MATERIALIZED fromUnixTimestamp64Nano(toInt64(start_ns))
)
ENGINE = ReplacingMergeTree(ingested_ns)
ORDER BY (trace_id, span_id);

CREATE TABLE IF NOT EXISTS turns
(
    conversation_id     String,
    trace_id            String,
    span_id             String,
    parent_span_id      String,
    span_kind           LowCardinality(String),   -- llm | tool | agent | other
    operation           LowCardinality(String),
    provider            LowCardinality(String),
    request_model       LowCardinality(String),
    response_model      LowCardinality(String),
    agent_name          LowCardinality(String),
    agent_version       String,
    prompt_version      String,
    system_instructions String,
    input_messages      String,                   -- JSON array of messages (redacted)
    output_messages     String,
    input_tokens        UInt32,
    output_tokens       UInt32,
    start_ns            UInt64,
    end_ns              UInt64,
    duration_ms         Float64,
    status              LowCardinality(String),
    error_type          String,
    error_message       String,
    redactions          UInt32,
    start_time          DateTime64(9, 'UTC') MATERIALIZED fromUnixTimestamp64Nano(toInt64(start_ns))
)
ENGINE = ReplacingMergeTree
ORDER BY (conversation_id, span_id);

CREATE TABLE IF NOT EXISTS tool_calls
(
    conversation_id     String,
    trace_id            String,
    span_id             String,
    call_id             String,
    name                LowCardinality(String),
    arguments           String,
    result              String,
    error_type          String,
    error_message       String,
    start_ns            UInt64,
    duration_ms         Float64,
    agent_version       String,
    prompt_version      String,
    start_time          DateTime64(9, 'UTC') MATERIALIZED fromUnixTimestamp64Nano(toInt64(start_ns))
)
ENGINE = ReplacingMergeTree
ORDER BY (conversation_id, span_id, call_id);

-- Inputs a stage could not process; key = where the input came from, so a replay does not double count.
CREATE TABLE IF NOT EXISTS deadletter
(
    stage               LowCardinality(String),
    reason              String,
    detail              String,
    topic               String,
    partition           Int32,
    offset              Int64,
    key                 String,
    original_b64        String,
    ts_ns               UInt64,
    ts                  DateTime64(9, 'UTC') MATERIALIZED fromUnixTimestamp64Nano(toInt64(ts_ns))
)
ENGINE = ReplacingMergeTree
ORDER BY (stage, topic, partition, offset, reason);

-- Per-stage counters written by the workers every few seconds (ops dashboards).
CREATE TABLE IF NOT EXISTS stage_stats
(
    ts_ns               UInt64,
    worker              String,
    stage               LowCardinality(String),
    records_in          UInt64,
    records_out         UInt64,
    deadletters         UInt64,
    write_errors        UInt64,
    ts                  DateTime64(9, 'UTC') MATERIALIZED fromUnixTimestamp64Nano(toInt64(ts_ns))
)
ENGINE = ReplacingMergeTree
ORDER BY (stage, worker, ts_ns);
