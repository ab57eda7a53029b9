-- CPU time of each stage's own work (cores, inserts), cumulative per worker process like the
-- other counters: rate(cpu_s) is the cores a stage uses. Read by `bench.ingest` and the
-- pipeline dashboard.
ALTER TABLE stage_stats ADD COLUMN IF NOT EXISTS cpu_s Float64 DEFAULT 0 AFTER write_errors;
