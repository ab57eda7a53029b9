-- Which incarnation of its input topics a checkpoint covers: JSON {"cluster_id", "topic_ids":
-- {topic: id}, "seen": {"topic:partition": [first offset read, next offset]}, "resets": [...]}.
-- A memory broker restarted (or a topic made again) starts its offsets at 0: a checkpoint
-- whose topic id changed, or whose offsets lie beyond the topic's end, is reset to the start
-- of the topic with a warning (worker log, `closeloop status`) instead of skipping new records.
ALTER TABLE checkpoints ADD COLUMN IF NOT EXISTS incarnation String DEFAULT '' AFTER data;
