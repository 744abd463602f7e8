// An MCP client built on the official TypeScript SDK, as TypeScript hosts build theirs.
//
//   node client.mjs --sdk v1|v2 [--mode legacy|auto] (--stdio CMD [--arg A ...] | --url URL | --remote URL)
//                   [--header 'Name: value' ...] SCENARIO ...
//
// --stdio spawns CMD (the bridge) with this process's environment; --url speaks streamable HTTP;
// --remote spawns mcp-remote in front of URL, as desktop users do for remote servers, and talks to
// it over stdio. --mode is the version negotiation of SDK v2, or of mcp-remote towards the bridge
// ("auto" picks 2026-07-28 when offered; "legacy", the default of both, the handshake era).
// --header goes on every HTTP request (the gateway's "Authorization: Bearer KEY"): set on the
// transport with --url, handed to mcp-remote as its own --header with --remote, as desktop users do.
//
// Scenarios, each printing JSON lines on stdout (the last one is the outcome):
//   stream --tool T --calls N   N calls with progress; counts those whose messages do not
//                               concatenate to the result, and the SDK's "unknown token" errors;
//                               `ms` has each call's duration as this client saw it; --busy-ms
//                               blocks on each progress message, as a host drawing it would
//   list-changed --tool T       prints {"ready"} once T is listed, then waits for a list_changed
//                               that brings a tool other than T
//   cancel --tool T             aborts a call after its first progress message, then stays
//                               connected until a line (or EOF) on stdin, so the test can see the
//                               bridge drop the upstream request while the connection still stands
//   again --tool T              a call ({"called"}), then another once a line arrives on stdin
//                               ({"called_again"}), each with its result or error, so the test can
//                               change the server in between (a gateway replica restarted)
import { createRequire } from 'node:module';
import { parseArgs } from 'node:util';

const { values: opts, positionals } = parseArgs({
  options: {
    sdk: { type: 'string', default: 'v1' },
    mode: { type: 'string', default: 'legacy' },
    stdio: { type: 'string' },
    arg: { type: 'string', multiple: true, default: [] },
    url: { type: 'string' },
    remote: { type: 'string' },
    header: { type: 'string', multiple: true, default: [] },
    tool: { type: 'string' },
    calls: { type: 'string', default: '1' },
    'busy-ms': { type: 'string', default: '0' },
  },
  allowPositionals: true,
});
const scenario = positionals[0];
const say = (record) => process.stdout.write(JSON.stringify(record) + '\n');

async function load(sdk) {
  if (sdk === 'v1') {
    const { Client } = await import('@modelcontextprotocol/sdk/client/index.js');
    const { StdioClientTransport } = await import('@modelcontextprotocol/sdk/client/stdio.js');
    const { StreamableHTTPClientTransport } = await import('@modelcontextprotocol/sdk/client/streamableHttp.js');
    return {
      Client, StdioClientTransport, StreamableHTTPClientTransport,
      options: {},
      callTool: (client, params, options) => client.callTool(params, undefined, options),
    };
  }
  if (sdk === 'v2') {
    const { Client, StreamableHTTPClientTransport } = await import('@modelcontextprotocol/client');
    const { StdioClientTransport } = await import('@modelcontextprotocol/client/stdio');
    return {
      Client, StdioClientTransport, StreamableHTTPClientTransport,
      options: { versionNegotiation: { mode: opts.mode } },
      callTool: (client, params, options) => client.callTool(params, options),
    };
  }
  throw new Error(`unknown --sdk ${sdk}`);
}

function transportFor(sdk) {
  if (opts.stdio) {
    return new sdk.StdioClientTransport({ command: opts.stdio, args: opts.arg, env: { ...process.env }, stderr: 'inherit' });
  }
  if (opts.url) {
    const headers = Object.fromEntries(opts.header.map((h) => {
      const colon = h.indexOf(':');
      return [h.slice(0, colon).trim(), h.slice(colon + 1).trim()];
    }));
    return new sdk.StreamableHTTPClientTransport(new URL(opts.url), { requestInit: { headers } });
  }
  if (opts.remote) {
    const proxy = createRequire(import.meta.url).resolve('mcp-remote/dist/proxy.js');
    // http-only: the bridge and the gateway speak streamable HTTP only, so no fallback to the old SSE transport.
    const args = [proxy, opts.remote, '--transport', 'http-only', '--protocol', opts.mode, '--silent'];
    for (const header of opts.header) args.push('--header', header);
    return new sdk.StdioClientTransport({ command: process.execPath, args, env: { ...process.env }, stderr: 'inherit' });
  }
  throw new Error('give --stdio, --url or --remote');
}

const textOf = (result) => result.content.filter((c) => c.type === 'text').map((c) => c.text).join('');

async function main() {
  const sdk = await load(opts.sdk);
  const errors = [];
  let changed = null;
  const listChanged = { tools: { onChanged: (error, tools) => changed?.(error, tools) } };
  const client = new sdk.Client({ name: `llm-hub-test-${opts.sdk}`, version: '1.0.0' }, { ...sdk.options, listChanged });
  // The SDK reports a progress notification it could not match to a call here, and carries on.
  client.onerror = (error) => errors.push(String(error?.message ?? error));
  const transport = transportFor(sdk);
  await client.connect(transport);

  const names = async () => (await client.listTools()).tools.map((t) => t.name);
  // The bridge discovers models in the background after the handshake.
  let tools = await names();
  for (let tries = 0; !tools.includes(opts.tool) && tries < 200; tries++) {
    await new Promise((resolve) => setTimeout(resolve, 50));
    tools = await names();
  }
  // v1 has no accessor for the negotiated version; it only speaks the handshake era. childPid (the
  // bridge or mcp-remote, when this client spawned it) is for the benchmark's CPU figures.
  const protocolVersion = client.getNegotiatedProtocolVersion?.() ?? null;
  say({ event: 'connected', tools, protocolVersion, childPid: transport.pid ?? null });
  if (!tools.includes(opts.tool)) throw new Error(`${opts.tool} never listed: ${tools}`);

  if (scenario === 'stream') {
    const calls = Number(opts.calls);
    const incomplete = [];
    const ms = [];
    const texts = new Set();
    const busy = Number(opts['busy-ms']);
    let messages = 0;
    for (let i = 0; i < calls; i++) {
      const pieces = [];
      const started = performance.now();
      const result = await sdk.callTool(client, { name: opts.tool, arguments: { prompt: `call ${i}` } }, {
        onprogress: (p) => {
          if (p.message == null) return;
          pieces.push(p.message);
          for (const until = performance.now() + busy; performance.now() < until;);
        },
      });
      ms.push(Math.round((performance.now() - started) * 1000) / 1000);
      messages += pieces.length;
      const text = textOf(result);
      texts.add(text);
      const streamed = pieces.join('');
      if (result.isError || streamed !== text) {
        incomplete.push({ call: i, isError: !!result.isError, streamedChars: streamed.length, resultChars: text.length });
      }
    }
    const unknownToken = errors.filter((e) => e.includes('unknown token')).length;
    say({ event: 'done', calls, complete: calls - incomplete.length, incomplete: incomplete.slice(0, 10), messages, unknownToken, errors: errors.slice(0, 5), texts: [...texts], ms });
  } else if (scenario === 'list-changed') {
    const seen = new Promise((resolve, reject) => {
      changed = (error, latest) => {
        if (error) reject(error);
        else if (latest.some((t) => !tools.includes(t.name))) resolve(latest.map((t) => t.name));
      };
    });
    say({ event: 'ready' });
    say({ event: 'list_changed', tools: await seen });
  } else if (scenario === 'cancel') {
    const abort = new AbortController();
    let first = null;
    const call = sdk.callTool(client, { name: opts.tool, arguments: { prompt: 'a long answer' } }, {
      signal: abort.signal,
      onprogress: (p) => {
        if (p.message != null && first === null) {
          first = p.message;
          abort.abort('the user pressed stop');
        }
      },
    });
    const outcome = await call.then(() => 'completed', (error) => (abort.signal.aborted ? 'aborted' : `failed: ${error}`));
    say({ event: 'cancelled', outcome, first });
    await new Promise((resolve) => {
      process.stdin.once('data', resolve);
      process.stdin.once('end', resolve);
    });
  } else if (scenario === 'again') {
    const call = () => sdk.callTool(client, { name: opts.tool, arguments: { prompt: 'again' } }).then(
      (result) => ({ isError: !!result.isError, text: textOf(result) }),
      (error) => ({ error: String(error?.message ?? error) }),
    );
    say({ event: 'called', ...(await call()) });
    await new Promise((resolve) => process.stdin.once('data', resolve));
    say({ event: 'called_again', ...(await call()) });
  } else {
    throw new Error(`unknown scenario ${scenario}`);
  }
  await client.close();
}

main().then(
  () => process.exit(0),
  (error) => {
    say({ event: 'error', error: String(error?.stack ?? error) });
    process.exit(1);
  },
);
