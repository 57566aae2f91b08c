'use strict';
// Kiln DPS emulator compatibility: X.509 attestation (an enrollment group
// with a signing certificate, an individual enrollment with the device
// certificate), driven by the official, unmodified Azure IoT Node SDK
// clients (exact versions in package.json): X509Security with the HTTP
// transport, then the device client over MQTT with the same certificate.
//
// Run by scripts/e2e-node.sh, which starts `kiln -v serve` on 127.0.0.1:443
// and passes KILN_GLOBAL_ENDPOINT, KILN_ID_SCOPE, KILN_SERVICE_CS and
// KILN_SERVE_LOG (see symkey.test.js). NODE_EXTRA_CA_CERTS must name kiln
// serve's trust bundle. The test certificates are made with openssl.
//
// Prints one line per case ("ok    NAME" or "FAIL  NAME: why") and exits 1
// if any case failed.

const { env, exchangesFor, describe, runCase, errText, assert, cb, finish, crash } = require('./harness');
const fs = require('fs');
const os = require('os');
const path = require('path');
const { execFileSync } = require('child_process');

const { X509Security } = require('azure-iot-security-x509');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const { Http } = require('azure-iot-provisioning-device-http');
const { ProvisioningServiceClient } = require('azure-iot-provisioning-service');
const { Client, Message } = require('azure-iot-device');
const { RestApiClient } = require('azure-iot-http-base');
const { ConnectionString, SharedAccessSignature } = require('azure-iot-common');
const { Mqtt } = require('azure-iot-device-mqtt');

const globalEndpoint = env('KILN_GLOBAL_ENDPOINT');
const idScope = env('KILN_ID_SCOPE');
const serviceCS = env('KILN_SERVICE_CS');
const serveLog = env('KILN_SERVE_LOG');

// ---- test PKI (openssl, EC P-256) ----
const pki = fs.mkdtempSync(path.join(os.tmpdir(), 'kiln-x509-'));
process.on('exit', () => fs.rmSync(pki, { recursive: true, force: true }));
const ssl = (...args) => execFileSync('openssl', args, { cwd: pki, stdio: ['ignore', 'pipe', 'pipe'] });
const read = (f) => fs.readFileSync(path.join(pki, f), 'utf8');
let serial = 1000;

// makeCert issues name.pem (key name.key) with subject CN cn, signed by
// issuer (self-signed when null); ca says whether it is a CA.
function makeCert(name, cn, issuer, ca) {
  ssl('ecparam', '-name', 'prime256v1', '-genkey', '-noout', '-out', `${name}.key`);
  fs.writeFileSync(path.join(pki, `${name}.ext`), ca
    ? 'basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n'
    : 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n');
  ssl('req', '-new', '-key', `${name}.key`, '-subj', `/CN=${cn}`, '-out', `${name}.csr`);
  const signer = issuer ? ['-CA', `${issuer}.pem`, '-CAkey', `${issuer}.key`] : ['-signkey', `${name}.key`];
  ssl('x509', '-req', '-in', `${name}.csr`, ...signer, '-set_serial', String(serial++), '-days', '2',
    '-extfile', `${name}.ext`, '-out', `${name}.pem`);
  return { cert: read(`${name}.pem`), key: read(`${name}.key`) };
}

// certAPI calls the devserver's CA certificate API (DPS's management-plane
// certificates resource on the service endpoint, docs/dps-compat.md) with the
// SDK's own RestApiClient and the service connection string: the Node SDK
// has no client for CA certificates.
function certAPI(method, name, action, body) {
  const cn = ConnectionString.parse(serviceCS);
  const rest = new RestApiClient({
    host: cn.HostName,
    sharedAccessSignature: SharedAccessSignature.create(cn.HostName, cn.SharedAccessKeyName, cn.SharedAccessKey, Date.now()),
  }, 'kiln-e2e-node');
  return cb((done) => rest.executeApiCall(method, `/certificates/${encodeURIComponent(name)}${action ? `/${action}` : ''}?api-version=2021-10-01`,
    { 'Accept': 'application/json', 'Content-Type': 'application/json; charset=utf-8' }, body, done));
}

// device returns the X509 object the SDK takes: the leaf then the chain.
const device = (leaf, ...chain) => ({ cert: leaf.cert + chain.map((c) => c.cert).join(''), key: leaf.key });

function register(regId, x509) {
  const client = ProvisioningDeviceClient.create(globalEndpoint, idScope, new Http(), new X509Security(regId, x509));
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

async function expectRefused(regId, x509) {
  const before = exchangesFor(regId).length;
  let result;
  try {
    result = await register(regId, x509);
  } catch (err) {
    const x = exchangesFor(regId).slice(before);
    assert(x.length && x.every((e) => e.status === 401), `not refused with 401 only: ${describe(x)}`);
    return `${err.name}: ${err.message}; ${describe(x)}`;
  }
  throw new Error(`registered: ${JSON.stringify(result)}`);
}

async function hubSend(hub, deviceId, x509, body) {
  const c = Client.fromConnectionString(`HostName=${hub};DeviceId=${deviceId};x509=true`, Mqtt);
  c.on('error', (err) => console.log(`      hub client error: ${errText(err)}`));
  try {
    await c.setOptions(x509);
    await c.open();
    const msg = new Message(body);
    const res = await c.sendEvent(msg);
    const name = res && res.constructor && res.constructor.name;
    assert(name === 'MessageEnqueued', `result ${name}`);
    return name;
  } finally {
    await c.close().catch(() => {});
  }
}

async function main() {
  const service = ProvisioningServiceClient.fromConnectionString(serviceCS);
  const root = makeCert('root', 'Kiln Node e2e X.509 root', null, true);
  const inter = makeCert('inter', 'Kiln Node e2e X.509 intermediate', 'root', true);
  const groupId = 'kiln-node-x509-group';
  const regId = 'kiln-node-x509-1';
  const leaf = makeCert('leaf1', regId, 'inter', false);
  const state = {};

  const grouped = await runCase('service: createOrUpdateEnrollmentGroup (x509, signing certificate = the root)', async () => {
    const { responseBody: g } = await service.createOrUpdateEnrollmentGroup({
      enrollmentGroupId: groupId,
      attestation: { type: 'x509', x509: { signingCertificates: { primary: { certificate: root.cert } } } },
      provisioningStatus: 'enabled',
    });
    assert(g.attestation && g.attestation.type === 'x509', `attestation ${JSON.stringify(g.attestation)}`);
    return `etag ${g.etag}`;
  });

  const assigned = grouped && await runCase('dps: register over HTTPS with X509Security (leaf + intermediate) → assigned through the group', async () => {
    const r = await register(regId, device(leaf, inter));
    const rs = r.registrationState || r;
    assert((r.status || rs.status) === 'assigned', `result ${JSON.stringify(r)}`);
    assert(rs.deviceId === regId, `deviceId ${rs.deviceId}, want the CN`);
    assert(rs.x509 && rs.x509.enrollmentGroupId === groupId, `x509 ${JSON.stringify(rs.x509)}`);
    state.hub = rs.assignedHub;
    const x = exchangesFor(regId);
    assert(x.length && x[0].status === 202, `the first exchange was not 202: ${describe(x)}`);
    return `hub ${state.hub}; ${describe(x)}`;
  });

  if (assigned) {
    state.body = JSON.stringify({ kiln: 'node-sdk-e2e-x509', at: new Date().toISOString() });
    const sent = await runCase('hub: Client.fromConnectionString(x509=true, Mqtt) with the same certificate: sendEvent is acknowledged',
      () => hubSend(state.hub, regId, device(leaf, inter), state.body));
    if (sent) {
      await runCase('hub: kiln serve recorded the telemetry (debug log)', async () => {
        const line = await waitForLog(new RegExp(`msg=telemetry .*device=${regId}\\b`), 5000);
        assert(line, `no "telemetry ... device=${regId}" line in ${serveLog}`);
        return line.replace(/^time=\S+ /, '');
      });
    }
    await runCase('hub: another certificate with the same CN is refused', async () => {
      const other = makeCert('leaf1b', regId, 'inter', false);
      try {
        await hubSend(state.hub, regId, device(other, inter), '{}');
      } catch (err) {
        return `${err.name}: ${err.message}`;
      }
      throw new Error('the hub accepted a certificate the device did not register with');
    });
  }

  // Individual enrollment by certificate (self-signed device certificate).
  const indId = 'kiln-node-x509-ind';
  const self = makeCert('self', indId, null, false);
  await runCase('dps: individual enrollment with the device certificate → assigned, x509 {}', async () => {
    await service.createOrUpdateIndividualEnrollment({
      registrationId: indId,
      attestation: { type: 'x509', x509: { clientCertificates: { primary: { certificate: self.cert } } } },
      provisioningStatus: 'enabled',
    });
    const r = await register(indId, device(self));
    const rs = r.registrationState || r;
    assert((r.status || rs.status) === 'assigned', `result ${JSON.stringify(r)}`);
    assert(rs.x509 && Object.keys(rs.x509).length === 0, `x509 ${JSON.stringify(rs.x509)}, want {}`);
    return `hub ${rs.assignedHub}`;
  });

  // Refusals.
  await runCase('dps: a certificate whose CN is not the registration ID → 401', () => expectRefused('kiln-node-x509-other', device(leaf, inter)));
  await runCase('dps: a chain to an unknown CA → 401', () => {
    makeCert('stranger', 'Kiln Node e2e stranger CA', null, true);
    const s = makeCert('leaf-stranger', 'kiln-node-x509-stranger', 'stranger', false);
    return expectRefused('kiln-node-x509-stranger', device(s, { cert: read('stranger.pem') }));
  });
  await runCase('dps: a disabled group → status disabled', async () => {
    makeCert('droot', 'Kiln Node e2e disabled root', null, true);
    await service.createOrUpdateEnrollmentGroup({
      enrollmentGroupId: 'kiln-node-x509-disabled',
      attestation: { type: 'x509', x509: { signingCertificates: { primary: { certificate: read('droot.pem') } } } },
      provisioningStatus: 'disabled',
    });
    const id = 'kiln-node-x509-disabled-1';
    const d = makeCert('dleaf', id, 'droot', false);
    let result;
    try {
      result = await register(id, device(d));
    } catch (err) {
      const status = err.result && (err.result.status || (err.result.registrationState && err.result.registrationState.status));
      assert(status === 'disabled', `${errText(err)}; ${describe(exchangesFor(id))}`);
      return `${err.name}: ${err.message}; ${describe(exchangesFor(id))}`;
    }
    throw new Error(`registered: ${JSON.stringify(result)}`);
  });

  // A group by caReferences: the CA is uploaded, proven by possession (a
  // certificate whose CN is the verification code, signed by the CA's key),
  // and only then does a device chain to it register.
  const caName = 'kiln-node-e2e-ca';
  const caGroupId = 'kiln-node-x509-ca-group';
  const caRoot = makeCert('caroot', 'Kiln Node e2e verified CA', null, true);
  const caInter = makeCert('cainter', 'Kiln Node e2e verified CA intermediate', 'caroot', true);
  const caDevice = 'kiln-node-x509-ca-1';
  const caLeaf = makeCert('caleaf', caDevice, 'cainter', false);
  const caGroup = await runCase('service: createOrUpdateEnrollmentGroup with caReferences, the CA uploaded but not verified', async () => {
    const up = await certAPI('PUT', caName, '', { properties: { certificate: caRoot.cert } });
    assert(up.properties && up.properties.isVerified === false, `upload ${JSON.stringify(up)}`);
    const { responseBody: g } = await service.createOrUpdateEnrollmentGroup({
      enrollmentGroupId: caGroupId,
      attestation: { type: 'x509', x509: { caReferences: { primary: caName } } },
      provisioningStatus: 'enabled',
    });
    assert(g.attestation.x509.caReferences && g.attestation.x509.caReferences.primary === caName, `group ${JSON.stringify(g.attestation)}`);
    return `thumbprint ${up.properties.thumbprint}`;
  });
  if (caGroup) {
    await runCase('dps: a chain to the referenced CA before its proof of possession → 401', () => expectRefused(caDevice, device(caLeaf, caInter)));
    const verified = await runCase('service: generateVerificationCode, then verify with a certificate of CN = code signed by the CA → isVerified', async () => {
      const code = await certAPI('POST', caName, 'generateVerificationCode', {});
      const vc = code.properties && code.properties.verificationCode;
      assert(vc, `no code: ${JSON.stringify(code)}`);
      const wrong = makeCert('popwrong', 'not-the-code', 'caroot', false);
      try {
        await certAPI('POST', caName, 'verify', { certificate: wrong.cert });
        throw new Error('a certificate with the wrong CN verified the CA');
      } catch (err) {
        assert(err.response && err.response.statusCode === 400, `wrong CN: ${errText(err)}`);
      }
      const pop = makeCert('pop', vc, 'caroot', false);
      const v = await certAPI('POST', caName, 'verify', { certificate: pop.cert });
      assert(v.properties && v.properties.isVerified === true, `verify ${JSON.stringify(v)}`);
      return `code ${vc.slice(0, 8)}…, the wrong CN refused with 400`;
    });
    if (verified) {
      await runCase('dps: register with X509Security (leaf + intermediate) → assigned through the verified CA', async () => {
        const r = await register(caDevice, device(caLeaf, caInter));
        const rs = r.registrationState || r;
        assert((r.status || rs.status) === 'assigned' && rs.deviceId === caDevice, `result ${JSON.stringify(r)}`);
        assert(rs.x509 && rs.x509.enrollmentGroupId === caGroupId, `x509 ${JSON.stringify(rs.x509)}`);
        return `hub ${rs.assignedHub}`;
      });
      await runCase('dps: a leaf without its intermediate → 401 (the chain must reach the CA)', () => expectRefused('kiln-node-x509-ca-2', device(makeCert('caleaf2', 'kiln-node-x509-ca-2', 'cainter', false))));
    }
  }

  await runCase('service: deleteEnrollmentGroup and deleteIndividualEnrollment', async () => {
    for (const id of [groupId, 'kiln-node-x509-disabled', caGroupId]) await service.deleteEnrollmentGroup(id);
    await service.deleteIndividualEnrollment(indId);
    await certAPI('DELETE', caName, '', null);
  });

  finish();
}

main().catch(crash);
