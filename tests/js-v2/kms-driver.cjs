// The AWS SDK for JavaScript v2 (`aws-sdk`, pinned by package-lock.json) driven by
// tests/other_sdks.rs: the six calls of tests/go/README.md, one JSON line each.
//
//   node kms-driver.cjs <dir holding node_modules>
//
// KMS_DRIVER_ENDPOINT: the endpoint (modes A and B); KMS_DRIVER_PROXY: an hpagent
// HttpsProxyAgent to this proxy as httpOptions.agent (mode C); KMS_DRIVER_HTTP_OPTIONS_PROXY:
// the SDK's own httpOptions.proxy (clear text: the test shows it). Credentials from the
// environment; trust from NODE_EXTRA_CA_CERTS.
"use strict";
const path = require("path");
const modules = path.join(process.argv[2], "node_modules");
const AWS = require(path.join(modules, "aws-sdk"));
const { HttpsProxyAgent } = require(path.join(modules, "hpagent"));

const options = { region: "us-east-1", maxRetries: 0 };
if (process.env.KMS_DRIVER_ENDPOINT) options.endpoint = process.env.KMS_DRIVER_ENDPOINT;
if (process.env.KMS_DRIVER_PROXY) {
  options.httpOptions = {
    agent: new HttpsProxyAgent({ proxy: process.env.KMS_DRIVER_PROXY, keepAlive: true }),
  };
}
if (process.env.KMS_DRIVER_HTTP_OPTIONS_PROXY) {
  options.httpOptions = { proxy: process.env.KMS_DRIVER_HTTP_OPTIONS_PROXY, timeout: 5000 };
}
const kms = new AWS.KMS(options);
const keyId = process.env.KMS_DRIVER_KEY_ID;
const plaintext = "hello from js v2";
const tags = (...pairs) => {
  const out = [];
  for (let i = 0; i < pairs.length; i += 2) out.push({ TagKey: pairs[i], TagValue: pairs[i + 1] });
  return out;
};

async function call(id, fn) {
  const line = { id, ok: true };
  let result = null;
  try {
    result = await fn();
  } catch (e) {
    Object.assign(line, { ok: false, code: e.code, message: e.message });
    if (e.statusCode !== undefined) line.status = e.statusCode;
    if (e.requestId) line.request_id = e.requestId;
  }
  process.stdout.write(JSON.stringify(line) + "\n");
  return result;
}

(async () => {
  const enc = await call("encrypt", () => kms.encrypt({ KeyId: keyId, Plaintext: plaintext }).promise());
  if (enc) {
    await call("decrypt", async () => {
      const dec = await kms.decrypt({ CiphertextBlob: enc.CiphertextBlob }).promise();
      if (dec.Plaintext.toString() !== plaintext) throw new Error(`decrypted ${dec.Plaintext}`);
      return dec;
    });
  }
  await call("tag-allowed", () =>
    kms.tagResource({ KeyId: keyId, Tags: tags("team:app", "ledger", "cost:center", "4711") }).promise());
  await call("tag-denied", () => kms.tagResource({ KeyId: keyId, Tags: tags("Project", "apollo") }).promise());
  await call("create-tagged", () =>
    kms.createKey({ Description: "js v2", Tags: tags("team:owner", "payments") }).promise());
  await call("create-untagged", () => kms.createKey({ Description: "js v2, no tags" }).promise());
})();
