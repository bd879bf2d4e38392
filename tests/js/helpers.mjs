// Shared plumbing for the realtime-js compatibility tests.
//
// Every test talks to a real powa-realtime server through the official
// @supabase/realtime-js client. The server address and the tokens come from
// the environment (set by tests/realtime_js.rs); a missing variable is a hard
// failure, never a skip.
//
// Each client is built with a recording WebSocket transport (a thin subclass
// of `ws`), so tests can also look at the raw frames that crossed the wire.
// Set POWA_TRACE=1 to print every frame and realtime-js's own log lines.

import { RealtimeClient } from '@supabase/realtime-js'
import WebSocket from 'ws'

const TRACE = process.env.POWA_TRACE === '1'

/** Returns the value of an environment variable or throws. */
export function requireEnv(name) {
  const value = process.env[name]
  if (value === undefined || value === '') {
    throw new Error(
      `environment variable ${name} is not set; run these tests through ` +
        '`cargo test --test realtime_js` (or export POWA_ENDPOINT, POWA_ANON_KEY, ' +
        'POWA_SERVICE_KEY, POWA_USER_TOKEN, POWA_EXPIRED_TOKEN, POWA_BAD_TOKEN)'
    )
  }
  return value
}

/** All settings, read eagerly so that a missing variable fails the run at once. */
export const env = {
  endpoint: requireEnv('POWA_ENDPOINT'),
  anonKey: requireEnv('POWA_ANON_KEY'),
  serviceKey: requireEnv('POWA_SERVICE_KEY'),
  userToken: requireEnv('POWA_USER_TOKEN'),
  expiredToken: requireEnv('POWA_EXPIRED_TOKEN'),
  badToken: requireEnv('POWA_BAD_TOKEN'),
}

let connectionCounter = 0
let clientCounter = 0
let topicCounter = 0

/** A topic name that no other test uses (tests must not hear each other). */
export function uniqueTopic(prefix = 'room') {
  topicCounter += 1
  return `${prefix}-${process.pid}-${Date.now().toString(36)}-${topicCounter}`
}

function trace(line) {
  if (TRACE) console.error(`[trace] ${line}`)
}

/** Turns raw frame data (string, Buffer, ArrayBuffer, typed array) into a Buffer or string. */
function normalizeFrame(data, isBinary) {
  if (typeof data === 'string') return { binary: false, text: data }
  let buf
  if (Buffer.isBuffer(data)) buf = data
  else if (data instanceof ArrayBuffer) buf = Buffer.from(data)
  else if (ArrayBuffer.isView(data)) buf = Buffer.from(data.buffer, data.byteOffset, data.byteLength)
  else if (Array.isArray(data)) buf = Buffer.concat(data)
  else buf = Buffer.from(String(data))
  if (isBinary === false) return { binary: false, text: buf.toString('utf8') }
  return { binary: true, bytes: buf }
}

/**
 * Decodes a V2 binary frame into its fields (kinds 3 and 4 per PROTOCOL.md
 * §1.6.2); anything else is returned as `{kind}` only.
 */
export function decodeBinaryFrame(bytes) {
  const kind = bytes[0]
  const utf8 = (start, len) => bytes.subarray(start, start + len).toString('utf8')
  if (kind === 4 && bytes.length >= 5) {
    const [topicLen, eventLen, metaLen, encoding] = [bytes[1], bytes[2], bytes[3], bytes[4]]
    let at = 5
    const topic = utf8(at, topicLen)
    at += topicLen
    const event = utf8(at, eventLen)
    at += eventLen
    const metadata = utf8(at, metaLen)
    at += metaLen
    return { kind, topic, event, metadata, encoding, payload: bytes.subarray(at) }
  }
  if (kind === 3 && bytes.length >= 7) {
    const lens = [bytes[1], bytes[2], bytes[3], bytes[4], bytes[5]]
    const encoding = bytes[6]
    let at = 7
    const fields = lens.map((len) => {
      const value = utf8(at, len)
      at += len
      return value
    })
    const [joinRef, ref, topic, event, metadata] = fields
    return { kind, joinRef, ref, topic, event, metadata, encoding, payload: bytes.subarray(at) }
  }
  return { kind }
}

function describeFrame(frame) {
  if (!frame.binary) return frame.text
  const decoded = decodeBinaryFrame(frame.bytes)
  if (decoded.kind === 3 || decoded.kind === 4) {
    const header = frame.bytes
      .subarray(0, decoded.kind === 3 ? 7 : 5)
      .toString('hex')
      .replace(/(..)/g, '$1 ')
      .trim()
    const { payload, kind, encoding, ...rest } = decoded
    const body = encoding === 0 ? `<${payload.length} raw bytes>` : payload.toString('utf8')
    return `binary kind ${kind} [${header}] ${JSON.stringify(rest)} ${body}`
  }
  return `binary [${frame.bytes.toString('hex')}]`
}

/**
 * Builds a WebSocket class (what realtime-js calls `transport`) that records
 * every frame it sends and receives into `frames`.
 */
function recordingTransport(frames, label) {
  return class RecordingWebSocket extends WebSocket {
    constructor(address, protocols) {
      super(address, protocols)
      connectionCounter += 1
      const name = `${label}/${connectionCounter}`
      this.traceName = name
      trace(`${name} connect ${address}`)
      this.on('message', (data, isBinary) => {
        const frame = { dir: 'in', at: Date.now(), ...normalizeFrame(data, isBinary) }
        frames.push(frame)
        trace(`${name} <- ${describeFrame(frame)}`)
      })
      this.on('close', (code, reason) => {
        frames.push({ dir: 'close', at: Date.now(), code, reason: reason.toString() })
        trace(`${name} closed ${code} ${reason}`)
      })
      this.on('error', (err) => trace(`${name} error ${err.message}`))
    }

    send(data, ...rest) {
      const frame = { dir: 'out', at: Date.now(), ...normalizeFrame(data, typeof data !== 'string') }
      frames.push(frame)
      trace(`${this.traceName} -> ${describeFrame(frame)}`)
      return super.send(data, ...rest)
    }
  }
}

const openClients = new Set()

/**
 * Creates a RealtimeClient against the server under test.
 *
 * options:
 *   apikey     connection token (default: the anon key)
 *   vsn        '1.0.0' or '2.0.0' (default: the client's own default, 2.0.0)
 *   label      name used in traces
 *   ...rest    passed to RealtimeClient as is (heartbeatIntervalMs, heartbeatCallback, ...)
 *
 * Returns the client; `client.frames` holds the recorded frames and
 * `client.socketEvents` the socket-level open/close/error notifications.
 */
export function createClient(options = {}) {
  const { apikey = env.anonKey, vsn, label, ...rest } = options
  clientCounter += 1
  const name = label ?? `client${clientCounter}`
  const frames = []
  const clientOptions = {
    params: { apikey },
    transport: recordingTransport(frames, name),
    // Keep reconnect attempts slow and bounded in time; tests disconnect anyway.
    reconnectAfterMs: () => 1000,
    ...rest,
  }
  if (vsn !== undefined) clientOptions.vsn = vsn
  if (TRACE && clientOptions.logger === undefined) {
    clientOptions.logger = (kind, msg, data) => {
      let shown = ''
      if (data !== undefined) {
        try {
          shown = ' ' + JSON.stringify(data)
        } catch {
          shown = ' ' + String(data)
        }
      }
      console.error(`[realtime-js ${name}] ${kind}: ${msg}${shown ?? ''}`)
    }
  }
  const client = new RealtimeClient(env.endpoint, clientOptions)
  client.frames = frames
  client.label = name
  client.socketEvents = []
  const adapter = client.socketAdapter
  adapter.onOpen(() => client.socketEvents.push({ type: 'open', at: Date.now() }))
  adapter.onClose((event) =>
    client.socketEvents.push({ type: 'close', at: Date.now(), code: event?.code, event })
  )
  adapter.onError((error) =>
    client.socketEvents.push({
      type: 'error',
      at: Date.now(),
      message: error?.message ?? error?.error?.message ?? String(error),
      error,
    })
  )
  // Remember every push (broadcasts, presence, ...) so that closeClient can
  // cancel their 10 s reply timers, which would otherwise keep node running
  // long after the test is over. Behaviour is unchanged.
  client.pendingPushes = []
  const createChannel = client.channel.bind(client)
  client.channel = (topic, params) => {
    const channel = createChannel(topic, params)
    const phoenixChannel = channel.channelAdapter.getChannel()
    if (!phoenixChannel.powaRecordsPushes) {
      const push = phoenixChannel.push.bind(phoenixChannel)
      phoenixChannel.push = (...args) => {
        const pushed = push(...args)
        client.pendingPushes.push(pushed)
        return pushed
      }
      phoenixChannel.powaRecordsPushes = true
    }
    return channel
  }
  openClients.add(client)
  return client
}

/** Disconnects one client and forgets it. Never throws. */
export async function closeClient(client) {
  openClients.delete(client)
  try {
    // A channel removal schedules a delayed disconnect (2 heartbeat intervals).
    client._cancelPendingDisconnect()
  } catch {
    // ignore: private API of realtime-js, best effort
  }
  for (const push of client.pendingPushes ?? []) {
    try {
      push.cancelTimeout()
    } catch {
      // ignore
    }
  }
  try {
    for (const channel of [...client.getChannels()]) {
      channel.teardown()
    }
    client.channels = []
  } catch {
    // ignore: teardown is best effort
  }
  // RealtimeClient.disconnect() leaves a 10 s timer behind that would keep
  // node alive; the underlying Phoenix socket's disconnect does the same work
  // (stop reconnecting, close the WebSocket) without it.
  try {
    const socket = client.socketAdapter.getSocket()
    await withTimeout(
      new Promise((resolve) => socket.disconnect(resolve, 1000, 'test finished')),
      3000,
      `${client.label} to disconnect`
    )
  } catch {
    // ignore: the socket may never have opened
  }
}

/** Disconnects every client created since the last call (use in afterEach). */
export async function closeAllClients() {
  const clients = [...openClients]
  await Promise.all(clients.map((c) => closeClient(c)))
}

/** Resolves/rejects like `promise`, or rejects after `ms` with a message naming `what`. */
export function withTimeout(promise, ms, what) {
  let timer
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms)
  })
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer))
}

export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms))
}

/**
 * Subscribes `channel` and records every status the callback reports in
 * `channel.statusLog` ({status, err, at}). Returns the channel.
 */
export function subscribeRecording(channel) {
  channel.statusLog = []
  channel.statusWaiters = []
  channel.subscribe((status, err) => {
    const entry = { status, err, at: Date.now() }
    channel.statusLog.push(entry)
    for (const waiter of [...channel.statusWaiters]) waiter(entry)
  })
  return channel
}

/**
 * Waits until the channel's subscribe callback reports one of `statuses`
 * (already-recorded statuses count). Resolves with the {status, err} entry.
 */
export function waitForStatus(channel, statuses, ms = 5000) {
  const wanted = Array.isArray(statuses) ? statuses : [statuses]
  const done = channel.statusLog.find((e) => wanted.includes(e.status))
  if (done) return Promise.resolve(done)
  const found = new Promise((resolve) => {
    const waiter = (entry) => {
      if (wanted.includes(entry.status)) {
        channel.statusWaiters = channel.statusWaiters.filter((w) => w !== waiter)
        resolve(entry)
      }
    }
    channel.statusWaiters.push(waiter)
  })
  return withTimeout(found, ms, `channel ${channel.topic} to report ${wanted.join(' or ')} ` +
    `(seen so far: ${JSON.stringify(channel.statusLog.map((e) => e.status))})`)
}

/**
 * Subscribes and waits for SUBSCRIBED; any other terminal status fails with
 * the error it carried.
 */
export async function subscribeOk(channel, ms = 5000) {
  if (!channel.statusLog) subscribeRecording(channel)
  const entry = await waitForStatus(channel, ['SUBSCRIBED', 'CHANNEL_ERROR', 'TIMED_OUT', 'CLOSED'], ms)
  if (entry.status !== 'SUBSCRIBED') {
    throw new Error(
      `channel ${channel.topic} reported ${entry.status}` +
        (entry.err ? `: ${entry.err.message}` : '') +
        ' instead of SUBSCRIBED'
    )
  }
  return entry
}

/**
 * Registers a broadcast listener for `event` on a (not yet subscribed)
 * channel and returns a collector: `.messages` (the payloads realtime-js
 * handed to the callback, in order) and `.waitFor(n, ms)`.
 */
export function collectBroadcasts(channel, event) {
  const collector = {
    messages: [],
    waiters: [],
    waitFor(count, ms = 5000) {
      if (collector.messages.length >= count) return Promise.resolve(collector.messages)
      const reached = new Promise((resolve) => {
        collector.waiters.push({ count, resolve })
      })
      return withTimeout(
        reached,
        ms,
        `${count} '${event}' broadcast(s) on ${channel.topic} (got ${collector.messages.length})`
      )
    },
  }
  channel.on('broadcast', { event }, (message) => {
    collector.messages.push(message)
    collector.waiters = collector.waiters.filter((w) => {
      if (collector.messages.length >= w.count) {
        w.resolve(collector.messages)
        return false
      }
      return true
    })
  })
  return collector
}

/** Parsed incoming text frames of a client (V1 objects or V2 arrays). */
export function incomingTextFrames(client) {
  return client.frames
    .filter((f) => f.dir === 'in' && !f.binary)
    .map((f) => {
      try {
        return JSON.parse(f.text)
      } catch {
        return { unparsable: f.text }
      }
    })
}

/** A compact dump of a client's recorded frames, for assertion messages. */
export function dumpFrames(client, limit = 40) {
  const lines = client.frames.slice(-limit).map((f) => {
    if (f.dir === 'close') return `   close ${f.code} ${f.reason}`
    const arrow = f.dir === 'in' ? '<-' : '->'
    return `  ${arrow} ${describeFrame(f)}`
  })
  return `frames of ${client.label} (last ${lines.length}):\n${lines.join('\n')}`
}

// ---------------------------------------------------------------------------
// Presence helpers (used by presence.test.mjs)
// ---------------------------------------------------------------------------

/**
 * Registers `sync`, `join` and `leave` presence listeners on a (not yet
 * subscribed) channel — which also makes realtime-js join with
 * `presence.enabled: true` — and returns a recorder:
 *   .events          every callback payload in order, plus `at` (ms)
 *   .waitUntil(fn, ms, what)
 *                    resolves once `fn(channel.presenceState(), events)` is
 *                    truthy (checked now and after every presence event);
 *                    on timeout the error shows the current state and events.
 */
export function recordPresence(channel) {
  const recorder = {
    events: [],
    checks: [],
    waitUntil(predicate, ms = 5000, what = 'a presence condition') {
      const check = () => {
        try {
          return predicate(channel.presenceState(), recorder.events)
        } catch {
          return false
        }
      }
      if (check()) return Promise.resolve(channel.presenceState())
      const reached = new Promise((resolve) => {
        recorder.checks.push({ check, resolve })
      })
      return withTimeout(reached, ms, what).catch((err) => {
        recorder.checks = recorder.checks.filter((c) => c.check !== check)
        throw new Error(
          `${err.message} on ${channel.topic}\n  presenceState: ` +
            `${JSON.stringify(channel.presenceState())}\n  events: ${describePresenceEvents(recorder.events)}`
        )
      })
    },
  }
  const record = (payload) => {
    recorder.events.push({ ...payload, at: Date.now() })
    recorder.checks = recorder.checks.filter((c) => {
      if (c.check()) {
        c.resolve(channel.presenceState())
        return false
      }
      return true
    })
  }
  channel.on('presence', { event: 'sync' }, () => record({ event: 'sync' }))
  channel.on('presence', { event: 'join' }, (payload) => record(payload))
  channel.on('presence', { event: 'leave' }, (payload) => record(payload))
  return recorder
}

/** A one-line rendering of recorded presence events, for assertion messages. */
export function describePresenceEvents(events) {
  return JSON.stringify(
    events.map(({ event, key, newPresences, leftPresences, currentPresences }) => {
      if (event === 'sync') return 'sync'
      return { event, key, newPresences, leftPresences, currentPresences }
    })
  )
}

/**
 * `client.disconnect()`, but the 10 s safety timer realtime-js arms inside it
 * is unref'd so it cannot keep node alive after the tests. The socket-level
 * behaviour (close the WebSocket, stop reconnecting) is unchanged.
 */
export function disconnectUnreffed(client, code, reason) {
  const originalSetTimeout = globalThis.setTimeout
  globalThis.setTimeout = (...args) => {
    const timer = originalSetTimeout(...args)
    timer?.unref?.()
    return timer
  }
  try {
    return client.disconnect(code, reason)
  } finally {
    globalThis.setTimeout = originalSetTimeout
  }
}
