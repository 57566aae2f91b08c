'use strict';
// Kiln DPS emulator compatibility: the service API end to end with the
// official, unmodified ProvisioningServiceClient (azure-iot-provisioning-
// service, exact version in package.json): individual enrollments and
// enrollment groups created, read, queried page by page, updated with
// If-Match (a stale etag → 412), deleted (a stale etag → 412); bulk
// operations (create, update, updateIfMatchEtag with per-item errors,
// delete, and a bulk of 11 refused); attestation mechanisms; registration
// states read, queried by group and deleted after a device registered.
//
// The Node service client has no call for the bulk operation on enrollment
// groups (POST /enrollmentGroups, in the DPS REST API since 2021-10-01): that
// case goes through the SDK's own RestApiClient (azure-iot-http-base, the
// transport ProvisioningServiceClient itself uses), with the same
// connection string and the same SAS token, unmodified.
//
// Run by scripts/e2e-node.sh (KILN_GLOBAL_ENDPOINT, KILN_ID_SCOPE,
// KILN_SERVICE_CS; NODE_EXTRA_CA_CERTS = kiln serve's trust bundle).
// Prints one line per case ("ok    NAME" or "FAIL  NAME: why") and exits 1
// if any case failed.

const crypto = require('crypto');
const { env, runCase, errText, assert, cb, finish, crash } = require('./harness');

const { ProvisioningServiceClient } = require('azure-iot-provisioning-service');
const { RestApiClient } = require('azure-iot-http-base');
const { ConnectionString, SharedAccessSignature } = require('azure-iot-common');
const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const { Http } = require('azure-iot-provisioning-device-http');

const globalEndpoint = env('KILN_GLOBAL_ENDPOINT');
const idScope = env('KILN_ID_SCOPE');
const serviceCS = env('KILN_SERVICE_CS');

const run = crypto.randomBytes(3).toString('hex'); // ids of this run only
const statusOf = (err) => err && err.response && err.response.statusCode;

// expectStatus runs fn, which must fail with the HTTP status want.
async function expectStatus(want, fn) {
  try {
    const r = await fn();
    throw new Error(`succeeded (${JSON.stringify(r && (r.responseBody || r)).slice(0, 200)}), want HTTP ${want}`);
  } catch (err) {
    if (statusOf(err) !== want) throw new Error(`want HTTP ${want}, got ${errText(err)}`);
    return `${err.name}, HTTP ${want}`;
  }
}

// allPages runs a query to its end and returns its items and page sizes.
async function allPages(query) {
  const items = [];
  const sizes = [];
  do {
    // Query.next() without arguments in its promise form starts over (it
    // reads the continuation token only from its callback form's first
    // argument), so the token is passed explicitly.
    const { responseBody: page } = await query.next(query.continuationToken);
    assert(Array.isArray(page), `a page is not a JSON array: ${JSON.stringify(page).slice(0, 200)}`);
    items.push(...page);
    sizes.push(page.length);
    assert(sizes.length < 1000, 'the query does not end');
  } while (query.hasMoreResults);
  return { items, sizes };
}

// bulk runs runBulkEnrollmentOperation in its callback form: the promise
// form of azure-iot-provisioning-service 1.11.2 never settles (it calls back
// only when a callback was given).
const bulk = (service, op) => cb((done) => service.runBulkEnrollmentOperation(op, done));

const symEnrollment = (id, extra) => ({
  registrationId: id,
  attestation: { type: 'symmetricKey', symmetricKey: {} },
  provisioningStatus: 'enabled',
  ...extra,
});
const symGroup = (id, extra) => ({
  enrollmentGroupId: id,
  attestation: { type: 'symmetricKey', symmetricKey: {} },
  provisioningStatus: 'enabled',
  ...extra,
});

// rawClient is the SDK's RestApiClient with the service connection string,
// as ProvisioningServiceClient.fromConnectionString builds its own.
function rawClient() {
  const cn = ConnectionString.parse(serviceCS);
  return new RestApiClient({
    host: cn.HostName,
    sharedAccessSignature: SharedAccessSignature.create(cn.HostName, cn.SharedAccessKeyName, cn.SharedAccessKey, Date.now()),
  }, 'kiln-e2e-node');
}

async function main() {
  const service = ProvisioningServiceClient.fromConnectionString(serviceCS);
  const state = {};

  // ---- individual enrollments ----
  const indId = `kiln-node-svc-${run}`;
  const created = await runCase('enrollment: createOrUpdateIndividualEnrollment → etag and generated keys', async () => {
    const { responseBody: e } = await service.createOrUpdateIndividualEnrollment(symEnrollment(indId, { deviceId: 'first' }));
    assert(e.registrationId === indId && e.etag, `answer ${JSON.stringify(e)}`);
    assert(e.attestation.symmetricKey.primaryKey && e.attestation.symmetricKey.secondaryKey, 'no generated keys');
    state.etag = e.etag;
    return `etag ${e.etag}`;
  });
  if (created) {
    await runCase('enrollment: getIndividualEnrollment → the same enrollment and etag', async () => {
      const { responseBody: e } = await service.getIndividualEnrollment(indId);
      assert(e.registrationId === indId && e.deviceId === 'first' && e.etag === state.etag, `answer ${JSON.stringify(e)}`);
      state.enrollment = e;
    });
    await runCase('enrollment: getIndividualEnrollmentAttestationMechanism → symmetricKey with the keys', async () => {
      const { responseBody: a } = await service.getIndividualEnrollmentAttestationMechanism(indId);
      assert(a.type === 'symmetricKey' && a.symmetricKey.primaryKey === state.enrollment.attestation.symmetricKey.primaryKey, `answer ${JSON.stringify(a)}`);
    });
    await runCase('enrollment: update with If-Match (the current etag) → a new etag', async () => {
      const { responseBody: e } = await service.createOrUpdateIndividualEnrollment({ ...state.enrollment, deviceId: 'second' });
      assert(e.deviceId === 'second' && e.etag && e.etag !== state.etag, `answer ${JSON.stringify(e)}`);
      state.stale = state.etag;
      state.etag = e.etag;
      return `etag ${state.stale} → ${e.etag}`;
    });
    await runCase('enrollment: update with a stale etag → 412, the enrollment unchanged', async () => {
      const detail = await expectStatus(412, () => service.createOrUpdateIndividualEnrollment({ ...state.enrollment, etag: state.stale, deviceId: 'third' }));
      const { responseBody: e } = await service.getIndividualEnrollment(indId);
      assert(e.deviceId === 'second' && e.etag === state.etag, `changed: ${JSON.stringify(e)}`);
      return detail;
    });
    await runCase('enrollment: delete with a stale etag → 412; with the current etag → deleted, then get → 404', async () => {
      const stale = await expectStatus(412, () => service.deleteIndividualEnrollment(indId, state.stale));
      await service.deleteIndividualEnrollment(indId, state.etag);
      const gone = await expectStatus(404, () => service.getIndividualEnrollment(indId));
      return `${stale}; ${gone}`;
    });
  }

  // ---- bulk on individual enrollments ----
  const bulkIds = Array.from({ length: 5 }, (_, i) => `kiln-node-bulk-${run}-${i}`);
  const bulked = await runCase('bulk: create 5 individual enrollments → isSuccessful', async () => {
    const r = await bulk(service, { mode: 'create', enrollments: bulkIds.map((id) => symEnrollment(id)) });
    assert(r.isSuccessful === true && (!r.errors || r.errors.length === 0), `result ${JSON.stringify(r)}`);
  });
  if (bulked) {
    await runCase('bulk: create again → per-item errors (409), HTTP 200', async () => {
      const r = await bulk(service, { mode: 'create', enrollments: bulkIds.slice(0, 2).map((id) => symEnrollment(id)) });
      assert(r.isSuccessful === false && r.errors.length === 2, `result ${JSON.stringify(r)}`);
      assert(r.errors.every((e) => Math.floor(e.errorCode / 1000) === 409 && bulkIds.includes(e.registrationId)), `errors ${JSON.stringify(r.errors)}`);
      return `errorCode ${r.errors[0].errorCode}`;
    });
    await runCase('bulk: update (deviceId) → isSuccessful, and get shows it', async () => {
      const r = await bulk(service, { mode: 'update', enrollments: bulkIds.map((id) => symEnrollment(id, { deviceId: `${id}-dev` })) });
      assert(r.isSuccessful === true, `result ${JSON.stringify(r)}`);
      const { responseBody: e } = await service.getIndividualEnrollment(bulkIds[3]);
      assert(e.deviceId === `${bulkIds[3]}-dev`, `deviceId ${e.deviceId}`);
      state.bulkEtag = e.etag;
    });
    await runCase('bulk: updateIfMatchEtag, one current and one stale etag → one per-item 412', async () => {
      const { responseBody: cur } = await service.getIndividualEnrollment(bulkIds[4]);
      const r = await bulk(service, {
        mode: 'updateIfMatchEtag',
        enrollments: [
          { ...cur, deviceId: 'matched' },
          symEnrollment(bulkIds[0], { etag: '"stale-etag"', deviceId: 'never' }),
        ],
      });
      assert(r.isSuccessful === false && r.errors.length === 1, `result ${JSON.stringify(r)}`);
      assert(r.errors[0].registrationId === bulkIds[0] && Math.floor(r.errors[0].errorCode / 1000) === 412, `errors ${JSON.stringify(r.errors)}`);
      const { responseBody: a } = await service.getIndividualEnrollment(bulkIds[4]);
      const { responseBody: b } = await service.getIndividualEnrollment(bulkIds[0]);
      assert(a.deviceId === 'matched' && b.deviceId === `${bulkIds[0]}-dev`, `deviceIds ${a.deviceId}, ${b.deviceId}`);
      return `errorCode ${r.errors[0].errorCode}`;
    });
    await runCase('query: createIndividualEnrollmentQuery with pageSize 2 → every enrollment once, pages of at most 2, the last without a continuation', async () => {
      const q = service.createIndividualEnrollmentQuery({ query: 'SELECT * FROM enrollments' }, 2);
      const { items, sizes } = await allPages(q);
      const ids = items.map((e) => e.registrationId);
      assert(sizes.every((n) => n <= 2) && sizes.length >= 3, `page sizes ${sizes}`);
      assert(new Set(ids).size === ids.length, `an enrollment came twice: ${ids}`);
      for (const id of bulkIds) assert(ids.includes(id), `${id} missing from ${ids}`);
      assert(q.hasMoreResults === false && !q.continuationToken, 'the last page had a continuation');
      return `${items.length} enrollments in pages of ${sizes.join(', ')}`;
    });
  }
  await runCase('bulk: 11 enrollments → refused with 400, none created', async () => {
    const ids = Array.from({ length: 11 }, (_, i) => `kiln-node-bulk11-${run}-${i}`);
    const detail = await expectStatus(400, () => bulk(service, { mode: 'create', enrollments: ids.map((id) => symEnrollment(id)) }));
    await expectStatus(404, () => service.getIndividualEnrollment(ids[0]));
    return detail;
  });
  if (bulked) {
    await runCase('bulk: delete the 5 → isSuccessful, then get → 404', async () => {
      const r = await bulk(service, { mode: 'delete', enrollments: bulkIds.map((id) => ({ registrationId: id })) });
      assert(r.isSuccessful === true, `result ${JSON.stringify(r)}`);
      return expectStatus(404, () => service.getIndividualEnrollment(bulkIds[2]));
    });
  }

  // ---- enrollment groups ----
  const groupIds = Array.from({ length: 3 }, (_, i) => `kiln-node-svcgrp-${run}-${i}`);
  const grouped = await runCase('group: createOrUpdateEnrollmentGroup ×3 → etags and generated keys', async () => {
    state.groups = {};
    for (const id of groupIds) {
      const { responseBody: g } = await service.createOrUpdateEnrollmentGroup(symGroup(id, { initialTwin: { properties: { desired: { n: 1 } } } }));
      assert(g.enrollmentGroupId === id && g.etag && g.attestation.symmetricKey.primaryKey, `answer ${JSON.stringify(g)}`);
      state.groups[id] = g;
    }
  });
  if (grouped) {
    const gid = groupIds[0];
    await runCase('group: getEnrollmentGroup and getEnrollmentGroupAttestationMechanism', async () => {
      const { responseBody: g } = await service.getEnrollmentGroup(gid);
      assert(g.etag === state.groups[gid].etag, `etag ${g.etag}, created ${state.groups[gid].etag}`);
      const { responseBody: a } = await service.getEnrollmentGroupAttestationMechanism(gid);
      assert(a.type === 'symmetricKey' && a.symmetricKey.primaryKey === g.attestation.symmetricKey.primaryKey, `answer ${JSON.stringify(a)}`);
    });
    await runCase('group: update with If-Match → a new etag; a stale etag → 412, the group unchanged', async () => {
      const old = state.groups[gid];
      const { responseBody: g } = await service.createOrUpdateEnrollmentGroup({ ...old, provisioningStatus: 'disabled' });
      assert(g.provisioningStatus === 'disabled' && g.etag !== old.etag, `answer ${JSON.stringify(g)}`);
      const detail = await expectStatus(412, () => service.createOrUpdateEnrollmentGroup({ ...old, provisioningStatus: 'enabled' }));
      const { responseBody: now } = await service.getEnrollmentGroup(gid);
      assert(now.provisioningStatus === 'disabled' && now.etag === g.etag, `changed: ${JSON.stringify(now)}`);
      state.groups[gid] = now;
      state.staleGroup = old.etag;
      return detail;
    });
    await runCase('query: createEnrollmentGroupQuery with pageSize 1 → every group once', async () => {
      const q = service.createEnrollmentGroupQuery({ query: 'SELECT * FROM enrollmentGroups' }, 1);
      const { items, sizes } = await allPages(q);
      const ids = items.map((g) => g.enrollmentGroupId);
      assert(sizes.every((n) => n <= 1), `page sizes ${sizes}`);
      assert(new Set(ids).size === ids.length, `a group came twice: ${ids}`);
      for (const id of groupIds) assert(ids.includes(id), `${id} missing from ${ids}`);
      return `${items.length} groups in ${sizes.length} pages`;
    });
    await runCase('group: delete with a stale etag → 412; with the current one → deleted, then get → 404', async () => {
      const stale = await expectStatus(412, () => service.deleteEnrollmentGroup(gid, state.staleGroup));
      await service.deleteEnrollmentGroup(gid, state.groups[gid].etag);
      const gone = await expectStatus(404, () => service.getEnrollmentGroup(gid));
      return `${stale}; ${gone}`;
    });
  }

  // ---- bulk on groups (the SDK's RestApiClient: the service client has no call for it) ----
  const rest = rawClient();
  const groupBulk = (mode, groups) => cb((done) => rest.executeApiCall('POST', '/enrollmentGroups?api-version=2021-10-01',
    { 'Accept': 'application/json', 'Content-Type': 'application/json; charset=utf-8' }, { mode, enrollmentGroups: groups }, done));
  const bulkGroupIds = Array.from({ length: 3 }, (_, i) => `kiln-node-bulkgrp-${run}-${i}`);
  const groupsBulked = await runCase('group bulk: create 3 → isSuccessful; create again → per-item 409', async () => {
    const r = await groupBulk('create', bulkGroupIds.map((id) => symGroup(id)));
    assert(r.isSuccessful === true, `result ${JSON.stringify(r)}`);
    const again = await groupBulk('create', bulkGroupIds.slice(0, 1).map((id) => symGroup(id)));
    assert(again.isSuccessful === false && again.errors.length === 1 && again.errors[0].enrollmentGroupId === bulkGroupIds[0]
      && Math.floor(again.errors[0].errorCode / 1000) === 409, `result ${JSON.stringify(again)}`);
    const { responseBody: g } = await service.getEnrollmentGroup(bulkGroupIds[1]);
    assert(g.attestation.symmetricKey.primaryKey, 'no generated keys');
    return `errorCode ${again.errors[0].errorCode}`;
  });
  if (groupsBulked) {
    await runCase('group bulk: update, then updateIfMatchEtag with a stale etag → per-item 412', async () => {
      const r = await groupBulk('update', bulkGroupIds.map((id) => symGroup(id, { provisioningStatus: 'disabled' })));
      assert(r.isSuccessful === true, `result ${JSON.stringify(r)}`);
      const { responseBody: g } = await service.getEnrollmentGroup(bulkGroupIds[2]);
      assert(g.provisioningStatus === 'disabled', `status ${g.provisioningStatus}`);
      const m = await groupBulk('updateIfMatchEtag', [{ ...g, etag: '"stale-etag"', provisioningStatus: 'enabled' }]);
      assert(m.isSuccessful === false && m.errors.length === 1 && Math.floor(m.errors[0].errorCode / 1000) === 412, `result ${JSON.stringify(m)}`);
      return `errorCode ${m.errors[0].errorCode}`;
    });
  }
  await runCase('group bulk: 11 groups → refused with 400', async () => {
    const ids = Array.from({ length: 11 }, (_, i) => `kiln-node-bulkgrp11-${run}-${i}`);
    const refused = await expectStatus(400, () => groupBulk('create', ids.map((id) => symGroup(id))));
    const gone = await expectStatus(404, () => service.getEnrollmentGroup(ids[0]));
    return `${refused}; ${gone}`;
  });
  if (groupsBulked) {
    await runCase('group bulk: delete the 3 → isSuccessful, then get → 404', async () => {
      const r = await groupBulk('delete', bulkGroupIds.map((id) => ({ enrollmentGroupId: id })));
      assert(r.isSuccessful === true, `result ${JSON.stringify(r)}`);
      return expectStatus(404, () => service.getEnrollmentGroup(bulkGroupIds[0]));
    });
  }

  // ---- registration states ----
  const regGroup = groupIds[1];
  const devices = [`kiln-node-svcdev-${run}-a`, `kiln-node-svcdev-${run}-b`];
  const registered = grouped && await runCase('registration: two devices of a group register (HTTPS, derived keys)', async () => {
    const key = state.groups[regGroup].attestation.symmetricKey.primaryKey;
    for (const id of devices) {
      const derived = crypto.createHmac('SHA256', Buffer.from(key, 'base64')).update(id, 'utf8').digest('base64');
      const client = ProvisioningDeviceClient.create(globalEndpoint, idScope, new Http(), new SymmetricKeySecurityClient(id, derived));
      const r = await cb((done) => client.register(done));
      assert(r.status === 'assigned' || (r.registrationState && r.registrationState.status === 'assigned'), `result ${JSON.stringify(r)}`);
    }
  });
  if (registered) {
    await runCase('registration: getDeviceRegistrationState → assigned, in the group, with an etag', async () => {
      const { responseBody: s } = await service.getDeviceRegistrationState(devices[0]);
      assert(s.registrationId === devices[0] && s.status === 'assigned' && s.assignedHub && s.etag, `state ${JSON.stringify(s)}`);
      state.regEtag = s.etag;
      return `hub ${s.assignedHub}`;
    });
    await runCase('registration: createEnrollmentGroupDeviceRegistrationStateQuery with pageSize 1 → both devices', async () => {
      const q = service.createEnrollmentGroupDeviceRegistrationStateQuery({ query: 'SELECT * FROM registrations' }, regGroup, 1);
      const { items, sizes } = await allPages(q);
      const ids = items.map((s) => s.registrationId).sort();
      assert(JSON.stringify(ids) === JSON.stringify([...devices].sort()), `registrations ${ids}`);
      assert(sizes.every((n) => n <= 1), `page sizes ${sizes}`);
      return `${ids.length} in ${sizes.length} pages`;
    });
    await runCase('registration: deleteDeviceRegistrationState with a stale etag → 412; with its etag → deleted, then get → 404', async () => {
      const stale = await expectStatus(412, () => service.deleteDeviceRegistrationState(devices[0], '"stale-etag"'));
      await service.deleteDeviceRegistrationState(devices[0], state.regEtag);
      await service.deleteDeviceRegistrationState({ registrationId: devices[1] });
      const gone = await expectStatus(404, () => service.getDeviceRegistrationState(devices[0]));
      return `${stale}; ${gone}`;
    });
  }
  if (grouped) {
    await runCase('group: delete the remaining groups', async () => {
      for (const id of groupIds.slice(1)) await service.deleteEnrollmentGroup(id);
    });
  }

  finish();
}

main().catch(crash);
