#!/usr/bin/env node
// Scripted driver for the real `@supabase/realtime-js` (and supabase-js), used by
// walcast's Rust integration tests (tests/support/js.rs).
//
// Protocol: one JSON object per line on stdin (commands), one JSON object per
// line on stdout (events). Nothing else is ever written to stdout: console.*
// output of the libraries is turned into `console` events. Diagnostics of the
// driver itself go to stderr.
//
// ── Common fields ─────────────────────────────────────────────────────────────
// Every command may carry:
//   "id":     any JSON value, echoed in its ack / error
//   "client": name of the client it acts on (default "main"); several clients
//             can live in one driver process
//   "async":  true = do not hold back later commands while this one's promise
//             is pending (commands otherwise run strictly one after another)
// When a command has been carried out:   {"ev":"ack","id":…,"cmd":…,"result":…}
// ("result" only for commands that have one). When it failed:
//   {"ev":"error","id":…,"cmd":…,"message":"…","stack":"…"}
// Every event about a client carries "client"; events about a channel carry
// "channel" (the name given to `subscribe`, without the "realtime:" prefix).
//
// ── Commands ──────────────────────────────────────────────────────────────────
// {"cmd":"connect","url":"ws://127.0.0.1:PORT/realtime/v1","apikey":"…",
//  "vsn":"1.0.0"|"2.0.0",            (omitted: realtime-js default, 2.0.0)
//  "params":{…},                     (extra URL params, after apikey)
//  "heartbeat_interval_ms":500,      (optional; realtime-js default 25000)
//  "timeout_ms":10000,               (optional push timeout)
//  "access_token":"jwt",             (optional: options.accessToken = async () => jwt)
//  "log_level":"info",               (optional: realtime-js logLevel)
//  "options":{…},                    (optional: merged raw into RealtimeClient options)
//  "trace_frames":true,              (optional: emit every WebSocket frame)
//  "logger":true,                    (optional: emit realtime-js logger calls)
//  "lazy":true}                      (optional: do not call connect(); subscribe will)
//    → new RealtimeClient(url, {transport: <ws WebSocket>, params:{apikey,…}, vsn, …}).connect()
//    ack result: {"endpoint": <the full websocket URL the client uses>}
// {"cmd":"connect_supabase_js","url":"http://127.0.0.1:PORT","apikey":"…",
//  "realtime":{…},                   (merged into createClient's realtime options;
//                                     "vsn", "heartbeat_interval_ms", "trace_frames",
//                                     "logger" as above are also accepted at top level)
//  "connect":true,                   (optional: connect now rather than on subscribe)
//  "access_token_deferred":true}     (optional: createClient's accessToken option, a
//                                     callback whose promise resolves only on
//                                     "resolve_token": the user's token arrives late)
//    → createClient(url, apikey, {realtime:{transport, …}, auth:{persistSession:false,…}})
//    ack result: {"endpoint": …}
// {"cmd":"resolve_token","token":"jwt"}            → the deferred accessToken resolves
// {"cmd":"rest_select","table":"t"}                → supabase.from(t).select();
//    ack result {"status":…, "data":…, "error":…}
// {"cmd":"subscribe","channel":"room1",
//  "config":{…},                     (RealtimeChannel config: broadcast, presence, private)
//  "postgres_changes":[{"event":"*","schema":"public","table":"t","filter":"id=eq.1"}],
//  "broadcast":[{"event":"*"}],
//  "presence":true,                  (registers sync/join/leave listeners)
//  "resume":true,                    (the resume idiom: each callback sets its
//                                     binding's replay.since to the change's
//                                     commit_timestamp; realtime-js resends the
//                                     same binding object on every rejoin)
//  "timeout_ms":10000}               (optional subscribe timeout)
//    → client.channel(name,{config}).on('postgres_changes',b,cb)…
//      .on('broadcast',b,cb)….on('presence',…).on('system',{},cb).subscribe(statusCb)
//    ack as soon as subscribe() returned (the join is pushed); wait for "status".
// {"cmd":"send","channel":"room1","event":"e","payload":{…},
//  "type":"broadcast",               (optional, default broadcast)
//  "payload_base64":"…",             (optional: send an ArrayBuffer payload instead)
//  "timeout_ms":…}                   → channel.send(…); ack result "ok"|"error"|"timed out"
// {"cmd":"track","channel":"room1","payload":{…}}  → ack result "ok"|"error"|"timed out"
// {"cmd":"untrack","channel":"room1"}              → ack result likewise
// {"cmd":"presence_state","channel":"room1"}       → ack result channel.presenceState()
// {"cmd":"unsubscribe","channel":"room1","remove":true}
//    → channel.unsubscribe() (or client.removeChannel when "remove"); ack result
// {"cmd":"set_auth","token":"jwt"|null}            → await client.setAuth(token)
// {"cmd":"heartbeat"}                              → client.sendHeartbeat() now
// {"cmd":"state"}  → ack result {"connection":"open"|…,"channels":{"room1":"joined",…}}
// {"cmd":"raw","text":"…"} or {"cmd":"raw","base64":"…"}
//    → send a raw frame on the client's current WebSocket (client must be open)
// {"cmd":"disconnect","code":1000,"reason":"…"}    → ack result "ok"|"timeout"
// {"cmd":"drop"}   → close the client's WebSocket under realtime-js (as a lost
//    network does): it reconnects and rejoins its channels by itself
// {"cmd":"exit","code":0}                          → ack, then the process exits
//
// ── Events ────────────────────────────────────────────────────────────────────
// {"ev":"ready","versions":{"realtime_js":…,"supabase_js":…,"phoenix":…,"ws":…,"node":…}}
// {"ev":"socket","client","state":"open"}
// {"ev":"socket","client","state":"close","code":1006,"reason":"…","was_clean":false}
// {"ev":"socket","client","state":"error","message":"…"}
// {"ev":"heartbeat","client","status":"sent"|"ok"|"error"|"timeout"|"disconnected","latency":ms?}
// {"ev":"status","client","channel","status":"SUBSCRIBED"|"CHANNEL_ERROR"|"TIMED_OUT"|"CLOSED",
//  "error":"message"?, "cause":…?}
// {"ev":"postgres_changes","client","channel","binding":i,"payload":<callback payload>}
// {"ev":"broadcast","client","channel","binding":i,"payload":<callback payload>}
// {"ev":"presence","client","channel","event":"sync","state":<presenceState()>}
// {"ev":"presence","client","channel","event":"join"|"leave","key":…,
//  "current":[…],"new":[…] | "left":[…],"state":<presenceState()>}
// {"ev":"system","client","channel","payload":<callback payload>}
// {"ev":"frame","client","dir":"in"|"out","text":"…"} or {…,"base64":"…"}   (trace_frames)
// {"ev":"log","client","kind":…,"msg":…,"data":…}                          (logger)
// {"ev":"console","level":"log"|"info"|"warn"|"error"|"debug","text":"…"}
// {"ev":"uncaught","kind":"exception"|"rejection","message":"…","stack":"…"}
// {"ev":"eof"}  stdin closed; the process then exits
//
// Binary values (ArrayBuffer, typed arrays, Buffers) inside payloads are written
// as {"$binary":"<base64>"}; Errors as {"$error":"message", …}.

import { readFileSync } from 'node:fs';
import readline from 'node:readline';
import util from 'node:util';
import { WebSocket } from 'ws';
import realtimePkg from '@supabase/realtime-js';
import { createClient } from '@supabase/supabase-js';

const { RealtimeClient } = realtimePkg;

// ── output ────────────────────────────────────────────────────────────────────

function toJsonSafe(value) {
  const seen = new WeakSet();
  return JSON.stringify(value, function (key, v) {
    // `v` is the value after toJSON (a Buffer's is {type, data}); this[key] is the original.
    const orig = this[key];
    if (orig instanceof ArrayBuffer) return { $binary: Buffer.from(orig).toString('base64') };
    if (ArrayBuffer.isView(orig)) {
      return { $binary: Buffer.from(orig.buffer, orig.byteOffset, orig.byteLength).toString('base64') };
    }
    if (typeof v === 'bigint') return v.toString();
    if (v instanceof Error) {
      const out = { $error: v.message, name: v.name };
      if (v.cause !== undefined) out.cause = v.cause;
      return out;
    }
    if (typeof v === 'function') return undefined;
    if (v !== null && typeof v === 'object') {
      if (seen.has(v)) return '[Circular]';
      seen.add(v);
    }
    return v;
  });
}

// stdout is a pipe: writes are synchronous on Linux, so each line is out at once.
function emit(obj) {
  let line;
  try {
    line = toJsonSafe(obj);
  } catch (e) {
    line = JSON.stringify({ ev: 'error', message: `cannot serialise event: ${e.message}` });
  }
  process.stdout.write(line + '\n');
}

// Keep stdout clean: library console output becomes events.
for (const level of ['log', 'info', 'warn', 'error', 'debug', 'trace']) {
  console[level] = (...args) => emit({ ev: 'console', level, text: util.format(...args) });
}

process.on('uncaughtException', (e) => {
  emit({ ev: 'uncaught', kind: 'exception', message: String(e?.message ?? e), stack: e?.stack });
});
process.on('unhandledRejection', (e) => {
  emit({ ev: 'uncaught', kind: 'rejection', message: String(e?.message ?? e), stack: e?.stack });
});

// Versions as installed (package.json files are read directly: not every package
// exports its package.json).
function versionOf(pkg) {
  try {
    const url = new URL(`./node_modules/${pkg}/package.json`, import.meta.url);
    return JSON.parse(readFileSync(url, 'utf8')).version;
  } catch {
    return null;
  }
}

// ── clients ───────────────────────────────────────────────────────────────────

/** name → {rt: RealtimeClient, supabase?: SupabaseClient, channels: Map<name, RealtimeChannel>} */
const clients = new Map();

function frameEvent(client, dir, data) {
  if (typeof data === 'string') return { ev: 'frame', client, dir, text: data };
  let buf;
  if (Buffer.isBuffer(data)) buf = data;
  else if (data instanceof ArrayBuffer) buf = Buffer.from(data);
  else if (ArrayBuffer.isView(data)) buf = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  else if (Array.isArray(data)) buf = Buffer.concat(data);
  else return { ev: 'frame', client, dir, text: String(data) };
  return { ev: 'frame', client, dir, base64: buf.toString('base64') };
}

/** A `ws` WebSocket class that optionally reports every frame of client `name`. */
function transportFor(name, trace) {
  if (!trace) return WebSocket;
  return class TracedWebSocket extends WebSocket {
    constructor(address, protocols, options) {
      super(address, protocols, options);
      this.on('message', (data, isBinary) => {
        const buf = Array.isArray(data) ? Buffer.concat(data) : Buffer.from(data);
        emit(frameEvent(name, 'in', isBinary ? buf : buf.toString('utf8')));
      });
    }
    send(data, ...rest) {
      emit(frameEvent(name, 'out', data));
      return super.send(data, ...rest);
    }
  };
}

function watchClient(name, rt) {
  const socket = rt.socketAdapter;
  socket.onOpen(() => emit({ ev: 'socket', client: name, state: 'open' }));
  socket.onClose((e) =>
    emit({
      ev: 'socket',
      client: name,
      state: 'close',
      code: e?.code,
      reason: e?.reason === undefined ? undefined : String(e.reason),
      was_clean: e?.wasClean,
    }),
  );
  socket.onError((e) =>
    emit({ ev: 'socket', client: name, state: 'error', message: String(e?.message ?? e?.error?.message ?? e) }),
  );
  rt.onHeartbeat((status, latency) => emit({ ev: 'heartbeat', client: name, status, latency }));
}

function commonRealtimeOptions(name, cmd) {
  const opts = { transport: transportFor(name, !!cmd.trace_frames) };
  if (cmd.vsn !== undefined) opts.vsn = cmd.vsn;
  if (cmd.heartbeat_interval_ms !== undefined) opts.heartbeatIntervalMs = cmd.heartbeat_interval_ms;
  if (cmd.timeout_ms !== undefined) opts.timeout = cmd.timeout_ms;
  if (cmd.log_level !== undefined) opts.logLevel = cmd.log_level;
  if (cmd.logger) opts.logger = (kind, msg, data) => emit({ ev: 'log', client: name, kind, msg, data });
  return opts;
}

function getClient(cmd) {
  const name = cmd.client ?? 'main';
  const c = clients.get(name);
  if (!c) throw new Error(`no client "${name}": send connect first`);
  return c;
}

function getChannel(cmd) {
  const c = getClient(cmd);
  if (typeof cmd.channel !== 'string') throw new Error('"channel" (string) is required');
  const ch = c.channels.get(cmd.channel);
  if (!ch) throw new Error(`no channel "${cmd.channel}" on client "${c.name}": subscribe first`);
  return ch;
}

function replaceClient(name) {
  const old = clients.get(name);
  if (old) {
    old.rt.disconnect().catch(() => {});
    clients.delete(name);
  }
}

function timeoutArg(cmd) {
  return cmd.timeout_ms === undefined ? undefined : cmd.timeout_ms;
}

// ── commands ──────────────────────────────────────────────────────────────────

const handlers = {
  connect(cmd) {
    const name = cmd.client ?? 'main';
    if (typeof cmd.url !== 'string') throw new Error('"url" (string) is required');
    replaceClient(name);
    const opts = {
      ...commonRealtimeOptions(name, cmd),
      params: { apikey: cmd.apikey, ...(cmd.params ?? {}) },
      ...(cmd.options ?? {}),
    };
    if (cmd.access_token !== undefined) {
      const token = cmd.access_token;
      opts.accessToken = async () => token;
    }
    const rt = new RealtimeClient(cmd.url, opts);
    clients.set(name, { name, rt, channels: new Map() });
    watchClient(name, rt);
    if (!cmd.lazy) rt.connect();
    return { endpoint: rt.endpointURL() };
  },

  connect_supabase_js(cmd) {
    const name = cmd.client ?? 'main';
    if (typeof cmd.url !== 'string') throw new Error('"url" (string) is required');
    replaceClient(name);
    const options = {
      realtime: { ...commonRealtimeOptions(name, cmd), ...(cmd.realtime ?? {}) },
      auth: { persistSession: false, autoRefreshToken: false, detectSessionInUrl: false },
    };
    let deferred = null;
    if (cmd.access_token_deferred) {
      deferred = {};
      deferred.promise = new Promise((resolve) => (deferred.resolve = resolve));
      options.accessToken = async () => deferred.promise;
    }
    const supabase = createClient(cmd.url, cmd.apikey, options);
    const rt = supabase.realtime;
    clients.set(name, { name, rt, supabase, deferred, channels: new Map() });
    watchClient(name, rt);
    if (cmd.connect) rt.connect();
    return { endpoint: rt.endpointURL() };
  },

  subscribe(cmd) {
    const c = getClient(cmd);
    const name = cmd.channel;
    if (typeof name !== 'string') throw new Error('"channel" (string) is required');
    const base = { client: c.name, channel: name };
    const opts = { config: cmd.config ?? {} };
    const ch = c.supabase ? c.supabase.channel(name, opts) : c.rt.channel(name, opts);
    (cmd.postgres_changes ?? []).forEach((binding, i) => {
      if (cmd.resume && binding.replay === undefined) binding.replay = { since: null };
      ch.on('postgres_changes', binding, (payload) => {
        if (cmd.resume) binding.replay.since = payload.commit_timestamp;
        emit({ ev: 'postgres_changes', ...base, binding: i, payload });
      });
    });
    (cmd.broadcast ?? []).forEach((binding, i) => {
      ch.on('broadcast', binding, (payload) => emit({ ev: 'broadcast', ...base, binding: i, payload }));
    });
    if (cmd.presence) {
      ch.on('presence', { event: 'sync' }, () =>
        emit({ ev: 'presence', ...base, event: 'sync', state: ch.presenceState() }),
      );
      ch.on('presence', { event: 'join' }, ({ key, currentPresences, newPresences }) =>
        emit({
          ev: 'presence',
          ...base,
          event: 'join',
          key,
          current: currentPresences,
          new: newPresences,
          state: ch.presenceState(),
        }),
      );
      ch.on('presence', { event: 'leave' }, ({ key, currentPresences, leftPresences }) =>
        emit({
          ev: 'presence',
          ...base,
          event: 'leave',
          key,
          current: currentPresences,
          left: leftPresences,
          state: ch.presenceState(),
        }),
      );
    }
    ch.on('system', {}, (payload) => emit({ ev: 'system', ...base, payload }));
    c.channels.set(name, ch);
    ch.subscribe((status, err) => {
      const ev = { ev: 'status', ...base, status };
      if (err) {
        ev.error = err.message ?? String(err);
        if (err.cause !== undefined) ev.cause = err.cause;
      }
      emit(ev);
    }, timeoutArg(cmd));
    return { topic: ch.topic };
  },

  async send(cmd) {
    const ch = getChannel(cmd);
    let payload = cmd.payload;
    if (cmd.payload_base64 !== undefined) {
      const b = Buffer.from(cmd.payload_base64, 'base64');
      payload = b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength);
    }
    const msg = { type: cmd.type ?? 'broadcast', event: cmd.event, payload };
    return await ch.send(msg, timeoutArg(cmd));
  },

  async track(cmd) {
    const ch = getChannel(cmd);
    const opts = cmd.timeout_ms === undefined ? {} : { timeout: cmd.timeout_ms };
    return await ch.track(cmd.payload ?? {}, opts);
  },

  async untrack(cmd) {
    const ch = getChannel(cmd);
    const opts = cmd.timeout_ms === undefined ? {} : { timeout: cmd.timeout_ms };
    return await ch.untrack(opts);
  },

  presence_state(cmd) {
    return getChannel(cmd).presenceState();
  },

  async unsubscribe(cmd) {
    const c = getClient(cmd);
    const ch = getChannel(cmd);
    c.channels.delete(cmd.channel);
    if (cmd.remove) return await c.rt.removeChannel(ch);
    return await ch.unsubscribe(timeoutArg(cmd));
  },

  resolve_token(cmd) {
    const c = getClient(cmd);
    if (!c.deferred) throw new Error('resolve_token needs connect_supabase_js with access_token_deferred');
    c.deferred.resolve(cmd.token);
    return null;
  },

  async rest_select(cmd) {
    const c = getClient(cmd);
    if (!c.supabase) throw new Error('rest_select needs connect_supabase_js');
    const r = await c.supabase.from(cmd.table).select();
    return { status: r.status, data: r.data, error: r.error };
  },

  async set_auth(cmd) {
    const c = getClient(cmd);
    await c.rt.setAuth(cmd.token);
    return null;
  },

  heartbeat(cmd) {
    getClient(cmd).rt.sendHeartbeat();
    return null;
  },

  state(cmd) {
    const c = getClient(cmd);
    const channels = {};
    for (const [name, ch] of c.channels) channels[name] = ch.state;
    return { connection: c.rt.connectionState(), channels };
  },

  drop(cmd) {
    const c = getClient(cmd);
    const conn = c.rt.socketAdapter?.getSocket?.()?.conn;
    if (!conn) throw new Error('the client has no WebSocket');
    conn.terminate ? conn.terminate() : conn.close(4000, 'dropped by the test');
  },

  raw(cmd) {
    const c = getClient(cmd);
    const conn = c.rt.socketAdapter?.getSocket?.()?.conn;
    if (!conn || conn.readyState !== WebSocket.OPEN) throw new Error('the client has no open WebSocket');
    if (cmd.base64 !== undefined) conn.send(Buffer.from(cmd.base64, 'base64'));
    else if (typeof cmd.text === 'string') conn.send(cmd.text);
    else throw new Error('raw needs "text" (string) or "base64"');
    return null;
  },

  async disconnect(cmd) {
    const c = getClient(cmd);
    return await c.rt.disconnect(cmd.code, cmd.reason);
  },

  exit(cmd) {
    setImmediate(() => process.exit(cmd.code ?? 0));
    return null;
  },
};

async function run(cmd) {
  const id = cmd.id;
  const name = cmd.cmd;
  try {
    const handler = Object.hasOwn(handlers, name) ? handlers[name] : null;
    if (!handler) throw new Error(`unknown command ${JSON.stringify(name)}`);
    const result = await handler(cmd);
    const ack = { ev: 'ack', id, cmd: name };
    if (result !== null && result !== undefined) ack.result = result;
    emit(ack);
  } catch (e) {
    emit({ ev: 'error', id, cmd: name, message: String(e?.message ?? e), stack: e?.stack });
  }
}

// ── main loop ─────────────────────────────────────────────────────────────────

emit({
  ev: 'ready',
  versions: {
    realtime_js: versionOf('@supabase/realtime-js'),
    supabase_js: versionOf('@supabase/supabase-js'),
    phoenix: versionOf('@supabase/phoenix'),
    ws: versionOf('ws'),
    node: process.versions.node,
  },
});

let queue = Promise.resolve();
const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
rl.on('line', (line) => {
  if (line.trim() === '') return;
  let cmd;
  try {
    cmd = JSON.parse(line);
    if (cmd === null || typeof cmd !== 'object' || Array.isArray(cmd)) throw new Error('not a JSON object');
  } catch (e) {
    emit({ ev: 'error', id: null, message: `bad command line (${e.message}): ${line}` });
    return;
  }
  if (cmd.async) run(cmd);
  else queue = queue.then(() => run(cmd));
});
rl.on('close', () => {
  queue.then(() => {
    emit({ ev: 'eof' });
    process.exit(0);
  });
});
