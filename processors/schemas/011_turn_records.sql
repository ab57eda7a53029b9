-- Every turn record capture sends to assemble (span and content records, as sent), so assemble
-- can rebuild its open conversations from the store when the broker lost its topics (a clean
-- stop or a crash of the whole tree with `memory://` storage). Only recent records are read
-- (assemble.recover_horizon_s); older ones expire.
CREATE TABLE IF NOT EXISTS turn_records
(
    conversation_id     String,
    span_id             String,
    span_kind           LowCardinality(String),
    record              String,               -- the TurnRecord's JSON (redacted)
    ingested_ns         UInt64,
    ingested            DateTime('UTC') MATERIALIZED toDateTime(intDiv(ingested_ns, 1000000000))
)
ENGINE = ReplacingMergeTree(ingested_ns)
ORDER BY (conversation_id, span_id, span_kind)
TTL ingested + INTERVAL 7 DAY;
