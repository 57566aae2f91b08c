-- 0002: enrollment groups (§7.2) and the group a registration came through.
--
-- As for enrollments, "id" is the lower-cased group ID (DPS IDs are
-- case-insensitive), "enrollment_group_id" the spelling of the service
-- call, "attestation" the sealed AttestationMechanism JSON and "doc" the
-- rest of the EnrollmentGroup without etag and times.

CREATE TABLE enrollment_groups (
	id                  TEXT PRIMARY KEY,
	enrollment_group_id TEXT NOT NULL,
	attestation_type    TEXT NOT NULL, -- symmetricKey or x509
	doc                 TEXT NOT NULL,
	attestation         BLOB NOT NULL, -- sealed
	etag                TEXT NOT NULL,
	created             TEXT NOT NULL,
	updated             TEXT NOT NULL
);

CREATE INDEX enrollment_groups_type ON enrollment_groups (attestation_type);

-- The lower-cased ID of the group a device registered through; '' for an
-- individual enrollment. POST /registrations/{groupId}/query lists by it.
ALTER TABLE registrations ADD COLUMN enrollment_group TEXT NOT NULL DEFAULT '';

CREATE INDEX registrations_group ON registrations (enrollment_group, id);
