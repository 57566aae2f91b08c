-- 0003: X.509 attestation. A device of an enrollment group has no
-- individual enrollment, so registrations lose their foreign key to
-- enrollments (a trigger keeps deleting the registration of a deleted
-- individual enrollment, as the cascade did). Registrations and operations
-- gain the thumbprints of the device's X.509 client certificate: the
-- operation holds those of the certificate that registered, the
-- registration those of its last assignment, which the hub accepts.
--
-- SQLite cannot drop a constraint: the tables are rebuilt. operations is
-- copied aside first, so that dropping registrations cascades into nothing.

CREATE TABLE operations_old AS SELECT * FROM operations;
DROP TABLE operations;

CREATE TABLE registrations_new (
	id               TEXT PRIMARY KEY,
	registration_id  TEXT    NOT NULL,
	status           TEXT    NOT NULL,
	substatus        TEXT    NOT NULL DEFAULT '',
	error_code       INTEGER NOT NULL DEFAULT 0,
	error_message    TEXT    NOT NULL DEFAULT '',
	assigned_hub     TEXT    NOT NULL DEFAULT '', -- lower case
	device_id        TEXT    NOT NULL DEFAULT '',
	device_key       BLOB,                        -- sealed; NULL without a SAS key
	twin             TEXT,                        -- desired properties (JSON object)
	enabled          INTEGER NOT NULL DEFAULT 0,  -- the hub lets the device in
	operation        TEXT    NOT NULL DEFAULT '', -- the latest operation
	etag             TEXT    NOT NULL,
	created          TEXT    NOT NULL,
	updated          TEXT    NOT NULL,
	enrollment_group TEXT    NOT NULL DEFAULT '', -- lower-cased group ID; '' for an individual enrollment
	thumbprints      TEXT    NOT NULL DEFAULT ''  -- upper-case hex SHA-1 and SHA-256, space-separated; '' for SAS
);

INSERT INTO registrations_new (id, registration_id, status, substatus, error_code, error_message, assigned_hub,
	device_id, device_key, twin, enabled, operation, etag, created, updated, enrollment_group)
SELECT id, registration_id, status, substatus, error_code, error_message, assigned_hub,
	device_id, device_key, twin, enabled, operation, etag, created, updated, enrollment_group
FROM registrations;

DROP TABLE registrations;
ALTER TABLE registrations_new RENAME TO registrations;

CREATE INDEX registrations_device ON registrations (assigned_hub, device_id);
CREATE INDEX registrations_group ON registrations (enrollment_group, id);

CREATE TRIGGER enrollments_delete_registration AFTER DELETE ON enrollments
BEGIN
	DELETE FROM registrations WHERE id = old.id AND enrollment_group = '';
END;

CREATE TABLE operations (
	id               TEXT PRIMARY KEY,
	registration     TEXT NOT NULL REFERENCES registrations (id) ON DELETE CASCADE,
	status           TEXT NOT NULL,
	result           TEXT, -- the final DeviceRegistrationState (JSON)
	created          TEXT NOT NULL,
	expires          TEXT NOT NULL,
	enrollment_group TEXT NOT NULL DEFAULT '', -- the group the device attested through
	thumbprints      TEXT NOT NULL DEFAULT ''  -- of the certificate the device registered with
);

INSERT INTO operations (id, registration, status, result, created, expires)
SELECT id, registration, status, result, created, expires FROM operations_old;
DROP TABLE operations_old;

CREATE INDEX operations_registration ON operations (registration);
CREATE INDEX operations_expires      ON operations (expires);
