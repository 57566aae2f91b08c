'use strict';
// Kiln DPS emulator compatibility: several linked hubs served by the one
// embedded hub endpoint by host name (kiln serve --hubs
// hub1.localhost,hub2.localhost=2 --latency-map … --webhook-trust …), with
// the official, unmodified Azure IoT Node SDK clients: symmetric-key devices
// registered over HTTPS are spread over both hubs by hashed allocation,
// sent to the nearer hub by geoLatency (the latency map says hub2 from
// 127.0.0.0/8), to the named hub by static allocation and to the webhook's
// choice by custom allocation; each device then reaches the hub it was
// assigned by the hub's name (the harness resolves *.localhost to
// 127.0.0.1; TLS checks the name), and is refused by the other hub.
//
// Run by scripts/e2e-node.sh (KILN_GLOBAL_ENDPOINT, KILN_ID_SCOPE,
// KILN_SERVICE_CS, KILN_SERVE_LOG, KILN_HUBS = the hubs' names as kiln serve
// printed them, KILN_WEBHOOK_CERT and KILN_WEBHOOK_KEY = the webhook's TLS
// identity that kiln serve trusts). Prints one line per case and exits 1 if
// any case failed.

const crypto = require('crypto');
const fs = require('fs');
const https = require('https');
const { env, runCase, errText, assert, cb, finish, crash } = require('./harness');

const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const { Http } = require('azure-iot-provisioning-device-http');
const { ProvisioningServiceClient } = require('azure-iot-provisioning-service');
const { Client, Message } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');

const globalEndpoint = env('KILN_GLOBAL_ENDPOINT');
const idScope = env('KILN_ID_SCOPE');
const serviceCS = env('KILN_SERVICE_CS');
const serveLog = env('KILN_SERVE_LOG');
const hubs = env('KILN_HUBS').split(',');
const hub1 = hubs.find((h) => h.startsWith('hub1.localhost:'));
const hub2 = hubs.find((h) => h.startsWith('hub2.localhost:'));
const run = crypto.randomBytes(3).toString('hex');

async function enrollAndRegister(service, regId, extra) {
  const { responseBody: e } = await service.createOrUpdateIndividualEnrollment({
    registrationId: regId,
    attestation: { type: 'symmetricKey', symmetricKey: {} },
    provisioningStatus: 'enabled',
    ...extra,
  });
  const key = e.attestation.symmetricKey.primaryKey;
  const client = ProvisioningDeviceClient.create(globalEndpoint, idScope, new Http(), new SymmetricKeySecurityClient(regId, key));
  const r = await cb((done) => client.register(done));
  const rs = r.registrationState || r;
  assert((r.status || rs.status) === 'assigned', `${regId}: ${JSON.stringify(r)}`);
  return { id: rs.deviceId, hub: rs.assignedHub, key, state: rs };
}

async function hubSend(hub, d) {
  const c = Client.fromConnectionString(`HostName=${hub};DeviceId=${d.id};SharedAccessKey=${d.key}`, Mqtt);
  c.on('error', () => {});
  try {
    await c.open();
    const res = await c.sendEvent(new Message(JSON.stringify({ kiln: 'node-e2e-hubs', hub })));
    const name = res && res.constructor && res.constructor.name;
    assert(name === 'MessageEnqueued', `result ${name}`);
    return name;
  } finally {
    await c.close().catch(() => {});
  }
}

async function waitForLog(re, ms) {
  const until = Date.now() + ms;
  for (;;) {
    const line = fs.readFileSync(serveLog, 'utf8').split('\n').find((l) => re.test(l));
    if (line || Date.now() > until) return line;
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function main() {
  assert(hub1 && hub2 && hubs.length === 2, `KILN_HUBS ${hubs}: want hub1.localhost:PORT and hub2.localhost:PORT`);
  const service = ProvisioningServiceClient.fromConnectionString(serviceCS);
  const devices = [];

  await runCase('hashed: 18 devices registered at once → spread over both hubs by name', async () => {
    const got = await Promise.all(Array.from({ length: 18 }, (_, i) => enrollAndRegister(service, `kiln-node-hubs-${run}-${i}`)));
    const count = {};
    for (const d of got) count[d.hub] = (count[d.hub] || 0) + 1;
    assert(Object.keys(count).every((h) => hubs.includes(h)), `assigned to a hub not linked: ${JSON.stringify(count)}`);
    assert(count[hub1] > 0 && count[hub2] > 0, `not spread: ${JSON.stringify(count)}`);
    devices.push(got.find((d) => d.hub === hub1), got.find((d) => d.hub === hub2));
    return JSON.stringify(count);
  });

  for (const d of devices) {
    const other = d.hub === hub1 ? hub2 : hub1;
    await runCase(`hub: a device assigned ${d.hub.split(':')[0]} connects to it by name (Mqtt) and sendEvent is acknowledged`, async () => {
      const r = await hubSend(d.hub, d);
      const line = await waitForLog(new RegExp(`msg=telemetry .*hub=${d.hub.replace(/\./g, '\\.')} device=${d.id}\\b`), 5000);
      assert(line, `no "telemetry hub=${d.hub} device=${d.id}" line in ${serveLog}`);
      return r;
    });
    await runCase(`hub: the same device is refused by ${other.split(':')[0]}`, async () => {
      try {
        await hubSend(other, d);
      } catch (err) {
        return `${err.name}: ${err.message}`;
      }
      throw new Error(`${other} accepted a device assigned to ${d.hub}`);
    });
  }

  await runCase('geoLatency: → hub2, the nearer by the latency map', async () => {
    const d = await enrollAndRegister(service, `kiln-node-geo-${run}`, { allocationPolicy: 'geoLatency' });
    assert(d.hub === hub2, `assigned ${d.hub}, want ${hub2}`);
    return d.hub;
  });
  await runCase('static: iotHubs [hub1] → hub1', async () => {
    const d = await enrollAndRegister(service, `kiln-node-static-${run}`, { allocationPolicy: 'static', iotHubs: [hub1] });
    assert(d.hub === hub1, `assigned ${d.hub}, want ${hub1}`);
    return d.hub;
  });

  await runCase('custom: the webhook (HTTPS, trusted by --webhook-trust) gets both linked hubs and picks hub1; its payload reaches the device', async () => {
    const seen = [];
    const server = https.createServer({ cert: fs.readFileSync(env('KILN_WEBHOOK_CERT')), key: fs.readFileSync(env('KILN_WEBHOOK_KEY')) }, (req, res) => {
      let body = '';
      req.on('data', (c) => { body += c; });
      req.on('end', () => {
        const q = JSON.parse(body);
        seen.push(q);
        res.setHeader('Content-Type', 'application/json');
        res.end(JSON.stringify({ iotHubHostName: q.linkedHubs.find((h) => h.startsWith('hub1.')), payload: { from: 'webhook' } }));
      });
    });
    await new Promise((r) => server.listen(0, '127.0.0.1', r));
    try {
      const url = `https://127.0.0.1:${server.address().port}/api/allocate`;
      const id = `kiln-node-custom-${run}`;
      const d = await enrollAndRegister(service, id, { allocationPolicy: 'custom', customAllocationDefinition: { webhookUrl: url, apiVersion: '2021-10-01' } });
      assert(seen.length === 1 && seen[0].deviceRuntimeContext.registrationId === id, `webhook calls ${JSON.stringify(seen).slice(0, 300)}`);
      assert(JSON.stringify([...seen[0].linkedHubs].sort()) === JSON.stringify([...hubs].sort()), `linkedHubs ${seen[0].linkedHubs}`);
      assert(d.hub === hub1, `assigned ${d.hub}, want ${hub1}`);
      assert(d.state.payload && d.state.payload.from === 'webhook', `payload ${JSON.stringify(d.state.payload)}`);
      return `${d.hub}, payload ${JSON.stringify(d.state.payload)}`;
    } finally {
      server.close();
    }
  });

  finish();
}

main().catch(crash);
