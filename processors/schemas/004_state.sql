-- Checkpoints of the ordered stages' models (intent model, tagger, diagnoser).
-- ClickHouse is the store of record for state: a worker restores the newest checkpoint and
-- skips the input offsets it already covers, so a restart neither loses nor double counts.
-- (Kafka changelogs are not trusted for this: tansu misreports end offsets.)

CREATE TABLE IF NOT EXISTS checkpoints
(
    name                String,
    seq                 UInt64,               -- increases with every checkpoint of this name
    offsets             String,               -- JSON {"topic:partition": next offset}
    data                String,               -- base64 snapshot
    ts_ns               UInt64
)
ENGINE = ReplacingMergeTree(seq)
ORDER BY name;
