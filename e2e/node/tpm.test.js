'use strict';
// Kiln DPS emulator compatibility: the TPM slice, driven by the official,
// unmodified Azure IoT Node SDK clients (exact versions in package.json).
//
// Run by scripts/e2e-node.sh, which starts `kiln -v serve` on 127.0.0.1:443
// and swtpm on 127.0.0.1:2323, and passes:
//   KILN_GLOBAL_ENDPOINT  the DPS host name (no port: the SDK's HTTP transport uses 443)
//   KILN_ID_SCOPE         the ID scope
//   KILN_SERVICE_CS       the service connection string (HostName without :443)
//   KILN_SERVE_LOG        kiln serve's stderr (debug log), to see what the hub recorded
// NODE_EXTRA_CA_CERTS must name kiln serve's trust bundle.
//
// Prints one line per case ("ok    NAME" or "FAIL  NAME: why") and exits 1
// if any case failed.

const { env, exchangesFor, describe, runCase, errText, assert, cb, finish, crash } = require('./harness');
const fs = require('fs');

const { Tpm } = require('tss.js');
const { TpmSecurityClient, TpmAuthenticationProvider } = require('azure-iot-security-tpm');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const { Http } = require('azure-iot-provisioning-device-http');
const { ProvisioningServiceClient } = require('azure-iot-provisioning-service');
const { Client, Message } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');

const globalEndpoint = env('KILN_GLOBAL_ENDPOINT');
const idScope = env('KILN_ID_SCOPE');
const serviceCS = env('KILN_SERVICE_CS');
const serveLog = env('KILN_SERVE_LOG');

const state = {};

// A TPM security client whose connection to swtpm this script owns (the
// SDK's customTpm argument, the same tss.js Tpm the SDK builds by default),
// so it can be closed: swtpm serves one client at a time.
function newSecurityClient(registrationId) {
  const tpm = new Tpm(false);
  return { tpm, security: new TpmSecurityClient(registrationId, tpm) };
}

// A different TPM's EK: the device's EK TPM2B_PUBLIC with the last 32 bytes of
// the RSA modulus changed.
function otherEK(ek) {
  const b = Buffer.from(ek);
  for (let i = b.length - 32; i < b.length; i++) b[i] ^= 0x5a;
  return b;
}

function register(security) {
  const client = ProvisioningDeviceClient.create(globalEndpoint, idScope, new Http(), security);
  return cb((done) => client.register(done));
}

async function waitForLog(re, ms) {
  const until = Date.now() + ms;
  for (;;) {
    const text = fs.readFileSync(serveLog, 'utf8');
    const m = text.split('\n').find((l) => re.test(l));
    if (m) return m;
    if (Date.now() > until) return null;
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function main() {
  const service = ProvisioningServiceClient.fromConnectionString(serviceCS);
  const dev = newSecurityClient();

  // a. TPM over HTTPS.
  await runCase('tpm: the SDK reads the EK and derives the default registration ID', async () => {
    state.ek = await cb((d) => dev.security.getEndorsementKey(d));
    state.regId = await cb((d) => dev.security.getRegistrationId(d));
    assert(Buffer.isBuffer(state.ek) && state.ek.length > 256, `EK is ${state.ek && state.ek.length} bytes`);
    assert(/^[a-z2-7]{52}$/.test(state.regId), `registration ID ${state.regId} is not lower-case base32 of a SHA-256`);
    return `regId ${state.regId}`;
  });

  const enrolled = await runCase('service: createOrUpdateIndividualEnrollment (TPM attestation)', async () => {
    const { responseBody: e } = await service.createOrUpdateIndividualEnrollment({
      registrationId: state.regId,
      deviceId: 'node-tpm-1',
      attestation: { type: 'tpm', tpm: { endorsementKey: state.ek.toString('base64') } },
      provisioningStatus: 'enabled',
    });
    assert(e.registrationId === state.regId, `registrationId ${e.registrationId}`);
    assert(e.attestation && e.attestation.type === 'tpm', `attestation ${JSON.stringify(e.attestation)}`);
    assert(e.etag, 'no etag');
    return `etag ${e.etag}`;
  });

  const assigned = enrolled && await runCase('dps: register over HTTPS with TPM attestation → assigned', async () => {
    const r = await register(dev.security);
    state.result = r;
    assert(r.status === 'assigned' || r.registrationState, `result ${JSON.stringify(r)}`);
    const rs = r.registrationState || r;
    assert((r.status || rs.status) === 'assigned', `status ${r.status}`);
    assert(rs.assignedHub, 'no assignedHub');
    assert(rs.deviceId === 'node-tpm-1', `deviceId ${rs.deviceId}`);
    state.hub = rs.assignedHub;
    state.deviceId = rs.deviceId;
    return `hub ${state.hub}, device ${state.deviceId}; ${describe(exchangesFor(state.regId))}`;
  });

  if (assigned) {
    await runCase('service: getDeviceRegistrationState → assigned', async () => {
      const { responseBody: s } = await service.getDeviceRegistrationState(state.regId);
      assert(s.status === 'assigned', `status ${s.status}`);
      assert(s.deviceId === state.deviceId, `deviceId ${s.deviceId}`);
      return `assignedHub ${s.assignedHub}`;
    });
  }

  // b. Hub telemetry, authenticated with the TPM-held key (the SDK's TPM sample path).
  let hubClient;
  const connected = assigned && await runCase('hub: Client.fromAuthenticationProvider(TpmAuthenticationProvider) over MQTT connects', async () => {
    const auth = TpmAuthenticationProvider.fromTpmSecurityClient(state.deviceId, state.hub, dev.security);
    hubClient = Client.fromAuthenticationProvider(auth, Mqtt);
    hubClient.on('error', (err) => console.log(`      hub client error: ${errText(err)}`));
    await hubClient.open();
  });

  if (connected) {
    state.body = JSON.stringify({ kiln: 'node-sdk-e2e', at: new Date().toISOString() });
    await runCase('hub: sendEvent is acknowledged', async () => {
      const msg = new Message(state.body);
      msg.messageId = 'kiln-e2e-1';
      msg.properties.add('suite', 'kiln-node');
      const res = await hubClient.sendEvent(msg);
      const name = res && res.constructor && res.constructor.name;
      assert(name === 'MessageEnqueued', `result ${name}`);
      return name;
    });
    await runCase('hub: kiln serve recorded the telemetry (debug log)', async () => {
      const re = new RegExp(`msg=telemetry .*device=${state.deviceId}\\b`);
      const line = await waitForLog(re, 5000);
      assert(line, `no "telemetry ... device=${state.deviceId}" line in ${serveLog}`);
      const bytes = /bytes=(\d+)/.exec(line);
      assert(bytes && Number(bytes[1]) === Buffer.byteLength(state.body), `logged ${bytes && bytes[1]} bytes, sent ${Buffer.byteLength(state.body)}: ${line}`);
      return line.replace(/^time=\S+ /, '');
    });
  }
  if (hubClient) await hubClient.close().catch(() => {});

  // A second registration of the same TPM: a new challenge, assigned again.
  if (assigned) {
    await runCase('dps: the same TPM registers again → assigned (new challenge)', async () => {
      const before = exchangesFor(state.regId).length;
      const r = await register(dev.security);
      assert(r.status === 'assigned' && r.registrationState.deviceId === state.deviceId, `result ${JSON.stringify(r)}`);
      const x = exchangesFor(state.regId).slice(before);
      assert(x.length && x[0].status === 401, `first exchange was not the 401 challenge: ${describe(x)}`);
      return describe(x);
    });
  }
  dev.tpm.close();

  // c. Negative cases, each with the same TPM under another registration ID.
  await runCase('dps: an enrollment holding another EK → 401, the SDK fails', async () => {
    const regId = 'kiln-node-wrong-ek';
    await service.createOrUpdateIndividualEnrollment({
      registrationId: regId,
      attestation: { type: 'tpm', tpm: { endorsementKey: otherEK(state.ek).toString('base64') } },
      provisioningStatus: 'enabled',
    });
    const c = newSecurityClient(regId);
    try {
      let result;
      try {
        result = await register(c.security);
      } catch (err) {
        const x = exchangesFor(regId);
        assert(x.length && x.every((e) => e.status === 401), `not refused with 401 only: ${describe(x)}`);
        return `${err.name}: ${err.message}; ${describe(x)}`;
      }
      throw new Error(`registered: ${JSON.stringify(result)}`);
    } finally {
      c.tpm.close();
    }
  });

  await runCase('dps: a disabled enrollment → status disabled', async () => {
    const regId = 'kiln-node-disabled';
    await service.createOrUpdateIndividualEnrollment({
      registrationId: regId,
      attestation: { type: 'tpm', tpm: { endorsementKey: state.ek.toString('base64') } },
      provisioningStatus: 'disabled',
    });
    const c = newSecurityClient(regId);
    try {
      let result;
      try {
        result = await register(c.security);
      } catch (err) {
        // The Node SDK's polling state machine knows assigned, assigning,
        // registering and failed: any other status becomes SyntaxError("status is X")
        // carrying the body as err.result.
        const status = err.result && (err.result.status || (err.result.registrationState && err.result.registrationState.status));
        assert(status === 'disabled', `${errText(err)}; ${describe(exchangesFor(regId))}`);
        return `${err.name}: ${err.message}; ${describe(exchangesFor(regId))}`;
      }
      throw new Error(`registered: ${JSON.stringify(result)}`);
    } finally {
      c.tpm.close();
    }
  });

  await runCase('service: deleteIndividualEnrollment', async () => {
    for (const id of [state.regId, 'kiln-node-wrong-ek', 'kiln-node-disabled']) {
      if (id) await service.deleteIndividualEnrollment(id);
    }
  });

  finish();
}

main().catch(crash);
