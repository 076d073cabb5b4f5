// Drives @aws-sdk/client-kms (the AWS SDK for JavaScript v3) through scenarios given as JSON,
// and prints one JSON line per call. tests/node_sdk.rs runs it; see tests/js/README.md for the
// scenario format and how to run it by hand.
//
//   node tests/js/kms-driver.mjs scenario.json     # or the scenario on standard input
//
// Packages are resolved from $KMS_DRIVER_NODE_MODULES (a directory holding node_modules/; the
// Rust tests install there, under target/) or else from tests/js/node_modules (`npm ci`).

import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { Duplex } from "node:stream";
import { setTimeout as sleep } from "node:timers/promises";
import http from "node:http";
import https from "node:https";
import net from "node:net";
import tls from "node:tls";

const require = createRequire(
  process.env.KMS_DRIVER_NODE_MODULES
    ? join(process.env.KMS_DRIVER_NODE_MODULES, "package.json")
    : import.meta.url,
);
const kms = require("@aws-sdk/client-kms");
const { NodeHttpHandler, NodeHttp2Handler } = require("@smithy/node-http-handler");

function fail(message) {
  process.stderr.write(`kms-driver: ${message}\n`);
  process.exit(2);
}

function emit(record) {
  process.stdout.write(JSON.stringify(record) + "\n");
}

// ------------------------------------------------------------------------------ values

// JSON cannot hold bytes: {"$utf8": "text"} and {"$base64": "..."} are Uint8Arrays, and
// {"$output": "<call id>", "field": "KeyMetadata.KeyId"} is a field (a dotted path) of an
// earlier successful call's output.
function decodeInput(value, outputs) {
  if (Array.isArray(value)) return value.map((v) => decodeInput(v, outputs));
  if (value === null || typeof value !== "object") return value;
  if ("$utf8" in value) return new TextEncoder().encode(value.$utf8);
  if ("$base64" in value) return new Uint8Array(Buffer.from(value.$base64, "base64"));
  if ("$output" in value) {
    const output = outputs.get(value.$output);
    if (!output) throw new Error(`no successful earlier call ${JSON.stringify(value.$output)}`);
    return String(value.field)
      .split(".")
      .reduce((v, key) => v?.[key], output);
  }
  return Object.fromEntries(
    Object.entries(value).map(([k, v]) => [k, decodeInput(v, outputs)]),
  );
}

// Uint8Arrays become {"$base64": ...}; $metadata is reported separately.
function encodeOutput(value) {
  if (value instanceof Uint8Array) return { $base64: Buffer.from(value).toString("base64") };
  if (Array.isArray(value)) return value.map(encodeOutput);
  if (value instanceof Date) return value.toISOString();
  if (value === null || typeof value !== "object") return value;
  return Object.fromEntries(
    Object.entries(value)
      .filter(([k]) => k !== "$metadata")
      .map(([k, v]) => [k, encodeOutput(v)]),
  );
}

// ------------------------------------------------------------------------------ transports

// A CONNECT tunnel through an HTTP proxy as a Duplex that can be written to at once (writes
// wait for the proxy's 200): what http2.connect's createConnection must return synchronously.
class ConnectTunnel extends Duplex {
  constructor(proxy, target) {
    super();
    this.ready = false;
    this.pending = [];
    this.socket = net.connect(Number(proxy.port || 80), proxy.hostname);
    this.socket.write(`CONNECT ${target} HTTP/1.1\r\nHost: ${target}\r\n\r\n`);
    let head = Buffer.alloc(0);
    const onHead = (chunk) => {
      head = Buffer.concat([head, chunk]);
      const end = head.indexOf("\r\n\r\n");
      if (end < 0) return;
      this.socket.off("data", onHead);
      const statusLine = head.subarray(0, head.indexOf("\r\n")).toString("latin1");
      if (statusLine.split(" ")[1] !== "200") {
        this.destroy(new Error(`CONNECT ${target} refused: ${statusLine}`));
        return;
      }
      this.ready = true;
      const rest = head.subarray(end + 4);
      if (rest.length > 0) this.push(rest);
      this.socket.on("data", (data) => {
        if (!this.push(data)) this.socket.pause();
      });
      this.socket.on("end", () => this.push(null));
      for (const [data, encoding, callback] of this.pending) {
        this.socket.write(data, encoding, callback);
      }
      this.pending = [];
    };
    this.socket.on("data", onHead);
    this.socket.on("error", (error) => this.destroy(error));
  }
  _read() {
    if (this.ready) this.socket.resume();
  }
  _write(data, encoding, callback) {
    if (this.ready) this.socket.write(data, encoding, callback);
    else this.pending.push([data, encoding, callback]);
  }
  _final(callback) {
    this.socket.end(callback);
  }
  _destroy(error, callback) {
    this.socket.destroy();
    callback(error);
  }
}

// Counts the connections an agent opens (for a proxy agent: its tunnels) in `counter.sockets`.
function counted(agent, counter) {
  const createConnection = agent.createConnection;
  agent.createConnection = function (...args) {
    counter.sockets++;
    return createConnection.apply(this, args);
  };
  return agent;
}

// The request handler for a scenario's client settings, what to destroy afterwards, and the
// count of connections its agents opened (null for http2, which has no agent).
async function requestHandler(client) {
  const handler = client.handler ?? "http1";
  const proxy = client.proxy;
  const keepAlive = client.keepAlive ?? true;
  const timeouts = { requestTimeout: client.requestTimeoutMs ?? 10000, connectionTimeout: 5000 };
  const counter = { sockets: 0 };
  // client.tls = {cert, key, ca} (PEM file paths): a client certificate and extra trust for the
  // TLS the client opens to the proxy itself (mode B: the endpoint; mode C: the https:// proxy).
  const tlsOptions = {};
  for (const name of ["cert", "key", "ca"]) {
    if (client.tls?.[name]) tlsOptions[name] = readFileSync(client.tls[name]);
  }
  if (handler === "http2") {
    const options = { ...timeouts, disableConcurrentStreams: client.disableConcurrentStreams };
    if (client.tls) {
      if (proxy) fail("client.tls with http2 works without a proxy only");
      options.nodeHttp2ConnectOptions = tlsOptions;
    }
    if (proxy) {
      if (proxy.agent !== "connect") fail(`http2 goes through a proxy with agent "connect" only`);
      const proxyUrl = new URL(proxy.url);
      options.nodeHttp2ConnectOptions = {
        createConnection: (authority) =>
          tls.connect({
            socket: new ConnectTunnel(proxyUrl, `${authority.hostname}:${authority.port || 443}`),
            servername: authority.hostname,
            ALPNProtocols: ["h2"],
          }),
      };
    }
    return { handler: new NodeHttp2Handler(options), agents: [], counter: null };
  }
  if (handler !== "http1") fail(`unknown handler ${JSON.stringify(handler)}`);
  // What NodeHttpHandler would build itself (keepAlive, maxSockets 50), and an agent `timeout`
  // only when asked for: Node applies a server's `Keep-Alive: timeout=N` hint only to an agent
  // that has one (it can only shorten it).
  const agentOptions = { keepAlive, maxSockets: client.maxSockets ?? 50 };
  if (client.agentTimeoutMs !== undefined) agentOptions.timeout = client.agentTimeoutMs;
  if (!proxy) {
    const httpAgent = counted(new http.Agent(agentOptions), counter);
    const httpsAgent = counted(new https.Agent({ ...agentOptions, ...tlsOptions }), counter);
    return {
      handler: new NodeHttpHandler({ ...timeouts, httpAgent, httpsAgent }),
      agents: [httpAgent, httpsAgent],
      counter,
    };
  }
  let agent;
  switch (proxy.agent ?? "hpagent") {
    case "hpagent": {
      const { HttpsProxyAgent } = require("hpagent");
      // proxyRequestOptions go to the TLS connection to an https:// proxy.
      const proxyRequestOptions = client.tls ? tlsOptions : undefined;
      agent = new HttpsProxyAgent({ ...agentOptions, proxy: proxy.url, proxyRequestOptions });
      break;
    }
    case "https-proxy-agent": {
      // ESM-only package: import it from where require would find it.
      const url = pathToFileURL(require.resolve("https-proxy-agent")).href;
      const { HttpsProxyAgent } = await import(url);
      agent = new HttpsProxyAgent(proxy.url, agentOptions);
      break;
    }
    default:
      fail(`unknown proxy agent ${JSON.stringify(proxy.agent)}`);
  }
  counted(agent, counter);
  return { handler: new NodeHttpHandler({ ...timeouts, httpsAgent: agent }), agents: [agent], counter };
}

// ------------------------------------------------------------------------------ calls

// Request headers set (a string) or removed (null) after the SDK built the request and before
// it is signed: what a user's middleware could do.
function setHeaders(command, headers) {
  command.middlewareStack.add(
    (next) => (args) => {
      const request = args.request;
      for (const [name, value] of Object.entries(headers)) {
        for (const key of Object.keys(request.headers)) {
          if (key.toLowerCase() === name.toLowerCase()) delete request.headers[key];
        }
        if (value !== null) request.headers[name] = value;
      }
      return next(args);
    },
    { step: "build", priority: "low", name: "kmsDriverSetHeaders" },
  );
}

// Keeps the headers of each HTTP response the command gets (the last attempt's win) in
// `seen.headers`, before the SDK deserialises it, errors included.
function keepResponseHeaders(command, seen) {
  command.middlewareStack.add(
    (next) => async (args) => {
      const result = await next(args);
      seen.headers = { ...(result?.response?.headers ?? {}) };
      return result;
    },
    { step: "deserialize", priority: "low", name: "kmsDriverResponseHeaders" },
  );
}

async function runCall(scenario, client, call, id, outputs, counter) {
  const Command = kms[`${call.op}Command`];
  const base = { scenario: scenario.name, id, operation: call.op };
  if (typeof Command !== "function") {
    return { ...base, ok: false, error: "DriverError", message: `no ${call.op}Command` };
  }
  let input;
  try {
    input = decodeInput(call.input ?? {}, outputs);
  } catch (error) {
    return { ...base, ok: false, error: "DriverError", message: error.message };
  }
  const command = new Command(input);
  if (call.headers) setHeaders(command, call.headers);
  const seen = { headers: null };
  keepResponseHeaders(command, seen);
  // After the call: the response's headers, the connections opened so far.
  const transport = () => ({ headers: seen.headers, sockets: counter?.sockets ?? null });
  try {
    const output = await client.send(command);
    outputs.set(id, output);
    const meta = output.$metadata ?? {};
    return {
      ...base,
      ...transport(),
      ok: true,
      status: meta.httpStatusCode ?? null,
      requestId: meta.requestId ?? null,
      attempts: meta.attempts ?? null,
      totalRetryDelay: meta.totalRetryDelay ?? null,
      output: encodeOutput(output),
    };
  } catch (error) {
    const meta = error?.$metadata ?? {};
    return {
      ...base,
      ...transport(),
      ok: false,
      error: error?.name ?? String(error),
      // Whether the SDK raised its modeled exception class of that name (a typed error), not a
      // generic service exception that only carries the name.
      modeled: typeof kms[error?.name] === "function" && error instanceof kms[error.name],
      fault: error?.$fault ?? null,
      code: error?.code ?? null,
      status: meta.httpStatusCode ?? null,
      requestId: meta.requestId ?? null,
      attempts: meta.attempts ?? null,
      totalRetryDelay: meta.totalRetryDelay ?? null,
      message: error?.message ?? null,
    };
  }
}

async function runScenario(scenario) {
  const settings = scenario.client ?? {};
  const { handler, agents, counter } = await requestHandler(settings);
  const config = {
    region: settings.region ?? "us-east-1",
    credentials: settings.credentials,
    maxAttempts: settings.maxAttempts ?? 3,
    requestHandler: handler,
  };
  // No endpoint: the SDK resolves one itself (AWS_ENDPOINT_URL_KMS, or the real KMS name).
  if (settings.endpoint) config.endpoint = settings.endpoint;
  const client = new kms.KMSClient(config);
  const outputs = new Map();
  const calls = [];
  for (const call of scenario.calls ?? []) {
    const repeat = call.repeat ?? 1;
    for (let i = 0; i < repeat; i++) {
      calls.push([call, repeat === 1 ? call.id : `${call.id}#${i}`]);
    }
  }
  let count = 0;
  const run = async ([call, id]) => {
    if (call.delayMs) await sleep(call.delayMs);
    emit(await runCall(scenario, client, call, id, outputs, counter));
    count++;
  };
  try {
    if (scenario.parallel) await Promise.all(calls.map(run));
    else for (const c of calls) await run(c);
  } finally {
    client.destroy();
    for (const agent of agents) agent.destroy();
  }
  return count;
}

const source = process.argv[2] ? readFileSync(process.argv[2], "utf8") : readFileSync(0, "utf8");
let input;
try {
  input = JSON.parse(source);
} catch (error) {
  fail(`the scenario is not JSON: ${error.message}`);
}
const scenarios = Array.isArray(input) ? input : (input.scenarios ?? [input]);
let calls = 0;
for (const scenario of scenarios) calls += await runScenario(scenario);
// Keep-alive sockets, h2 sessions and timers must not keep the process alive.
process.stdout.write(JSON.stringify({ done: true, scenarios: scenarios.length, calls }) + "\n", () =>
  process.exit(0),
);
