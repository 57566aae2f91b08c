-- 0001: the devserver's state: settings, individual enrollments, TPM
-- challenges, device registrations and their operations.
--
-- Registration IDs are case-insensitive in DPS: the key column "id" holds
-- the lower-cased ID, "registration_id" the spelling the enrollment used.
-- Times are UTC text in a fixed-width layout (2006-01-02T15:04:05.000000000Z),
-- so they sort and compare as text. Columns named "sealed" or holding keys
-- are AES-256-GCM ciphertexts (nonce || ciphertext || tag) under the data key.

CREATE TABLE settings (
	name   TEXT PRIMARY KEY,
	value  BLOB NOT NULL,
	sealed INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE enrollments (
	id               TEXT PRIMARY KEY,
	registration_id  TEXT NOT NULL,
	attestation_type TEXT NOT NULL,
	doc              TEXT NOT NULL, -- IndividualEnrollment JSON without attestation, state, etag and times
	attestation      BLOB NOT NULL, -- AttestationMechanism JSON, sealed (it may hold symmetric keys)
	etag             TEXT NOT NULL,
	created          TEXT NOT NULL,
	updated          TEXT NOT NULL
);

-- The key a TPM device was sent in its last challenge, with the EK and SRK
-- it was wrapped to: the second register and the polls are verified with it.
CREATE TABLE tpm_challenges (
	id      TEXT PRIMARY KEY REFERENCES enrollments (id) ON DELETE CASCADE,
	ek      BLOB NOT NULL,
	srk     BLOB NOT NULL,
	key     BLOB NOT NULL, -- sealed
	created TEXT NOT NULL
);

CREATE TABLE registrations (
	id              TEXT PRIMARY KEY REFERENCES enrollments (id) ON DELETE CASCADE,
	registration_id TEXT    NOT NULL,
	status          TEXT    NOT NULL,
	substatus       TEXT    NOT NULL DEFAULT '',
	error_code      INTEGER NOT NULL DEFAULT 0,
	error_message   TEXT    NOT NULL DEFAULT '',
	assigned_hub    TEXT    NOT NULL DEFAULT '', -- lower case
	device_id       TEXT    NOT NULL DEFAULT '',
	device_key      BLOB,                        -- sealed; NULL without a SAS key
	twin            TEXT,                        -- desired properties (JSON object)
	enabled         INTEGER NOT NULL DEFAULT 0,  -- the hub lets the device in
	operation       TEXT    NOT NULL DEFAULT '', -- the latest operation
	etag            TEXT    NOT NULL,
	created         TEXT    NOT NULL,
	updated         TEXT    NOT NULL
);

CREATE INDEX registrations_device ON registrations (assigned_hub, device_id);

CREATE TABLE operations (
	id           TEXT PRIMARY KEY,
	registration TEXT NOT NULL REFERENCES registrations (id) ON DELETE CASCADE,
	status       TEXT NOT NULL,
	result       TEXT, -- the final DeviceRegistrationState (JSON)
	created      TEXT NOT NULL,
	expires      TEXT NOT NULL
);

CREATE INDEX operations_registration ON operations (registration);
CREATE INDEX operations_expires      ON operations (expires);
