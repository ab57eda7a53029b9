-- Layer 2: understand. Conversations (a late span rewrites the row with a higher version),
-- the learned intent taxonomy and the per-conversation tags.

CREATE TABLE IF NOT EXISTS conversations
(
    conversation_id     String,
    version             UInt64,
    start_ns            UInt64,
    end_ns              UInt64,
    closed_reason       LowCardinality(String),
    prompt_version      String,
    model               LowCardinality(String),
    agent_name          LowCardinality(String),
    agent_version       String,
    trace_ids           Array(String),
    messages            String,               -- JSON array of messages in order (redacted)
    n_messages          UInt32,
    n_user_turns        UInt32,
    n_tool_calls        UInt32,
    llm_calls           UInt32,
    errors              UInt32,
    input_tokens        UInt64,
    output_tokens       UInt64,
    latency_ms          Float64,
    start_time          DateTime64(9, 'UTC') MATERIALIZED fromUnixTimestamp64Nano(toInt64(start_ns))
)
ENGINE = ReplacingMergeTree(version)
ORDER BY conversation_id;

CREATE TABLE IF NOT EXISTS intents
(
    intent_id           String,               -- stable: kept as the intent grows
    name                String,
    description         String,
    keywords            Array(String),
    examples            Array(String),        -- redacted; empty while size < understand.min_examples_shown
    size                UInt64,
    status              LowCardinality(String),   -- active | merged | split
    parent_id           String,               -- the intent this one was merged into / split from
    taxonomy_version    UInt64,
    created_ns          UInt64,
    updated_ns          UInt64,
    updated_time        DateTime64(9, 'UTC') MATERIALIZED fromUnixTimestamp64Nano(toInt64(updated_ns))
)
ENGINE = ReplacingMergeTree(taxonomy_version)
ORDER BY intent_id;

-- Every taxonomy change (new, renamed, merged, split), never rewritten.
CREATE TABLE IF NOT EXISTS intent_changes
(
    taxonomy_version    UInt64,
    intent_id           String,
    change              LowCardinality(String),   -- created | renamed | merged | split
    name                String,
    other_id            String,
    ts_ns               UInt64,
    ts                  DateTime64(9, 'UTC') MATERIALIZED fromUnixTimestamp64Nano(toInt64(ts_ns))
)
ENGINE = ReplacingMergeTree
ORDER BY (taxonomy_version, intent_id, change);

CREATE TABLE IF NOT EXISTS conversation_tags
(
    conversation_id     String,
    conversation_version UInt64,
    intent_id           String,
    intent_name         String,
    taxonomy_version    UInt64,
    signals             Array(LowCardinality(String)),
    outcome             LowCardinality(String),   -- resolved | abandoned | escalated | errored
    outcome_turn        Int32,
    failed              UInt8,
    prompt_version      String,
    model               LowCardinality(String),
    agent_version       String,
    ts_ns               UInt64,
    ts                  DateTime64(9, 'UTC') MATERIALIZED fromUnixTimestamp64Nano(toInt64(ts_ns))
)
ENGINE = ReplacingMergeTree(conversation_version)
ORDER BY conversation_id;
