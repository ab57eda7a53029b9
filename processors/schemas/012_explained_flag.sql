-- A conversation a diagnosis no longer explains (a later analysis grouped it elsewhere, or
-- found it no more) gets a row with `explained = 0` for its (diagnosis, conversation), at the
-- diagnosis version it no longer belongs to: the key's newest row says whether it is listed
-- (at an equal version, the one inserted last; rows change in the order the stage decides).
-- Readers keep `explained = 1` after FINAL.
ALTER TABLE diagnosis_conversations ADD COLUMN IF NOT EXISTS explained UInt8 DEFAULT 1 AFTER detail;
