-- The end-to-end check of a run: the DPS registration status, the hub and
-- device ID it assigned, and when the hub saw the unit's telemetry.
ALTER TABLE runs ADD COLUMN dps_status TEXT NOT NULL DEFAULT '';
ALTER TABLE runs ADD COLUMN assigned_hub TEXT NOT NULL DEFAULT '';
ALTER TABLE runs ADD COLUMN device_id TEXT NOT NULL DEFAULT '';
ALTER TABLE runs ADD COLUMN telemetry_at TEXT;
