// A small client for the Realtime wire protocol (Phoenix channels, serializer 2.0.0), written for
// the built-in pages. It speaks exactly what any client speaks: one WebSocket to this origin,
// V2 text arrays, binary kind-4 user broadcasts in, heartbeats every 25 s, and rejoins after a
// reconnect. Nothing here is specific to the server's internals.

const HEARTBEAT_MS = 25000;
const RECONNECT_DELAYS_MS = [1000, 2000, 5000, 10000];
const PUSH_TIMEOUT_MS = 10000;

/** Decodes a binary kind-4 user broadcast (PROTOCOL.md §1.6.2). Returns null for other kinds. */
export function decodeUserBroadcast(buffer) {
  const bytes = new Uint8Array(buffer);
  if (bytes.length < 5 || bytes[0] !== 4) return null;
  const [topicLen, eventLen, metaLen, encoding] = [bytes[1], bytes[2], bytes[3], bytes[4]];
  let at = 5;
  const text = (len) => {
    const value = new TextDecoder().decode(bytes.subarray(at, at + len));
    at += len;
    return value;
  };
  const topic = text(topicLen);
  const event = text(eventLen);
  const meta = text(metaLen);
  const raw = bytes.subarray(at);
  let payload;
  if (encoding === 0) {
    payload = { binary: Array.from(raw.subarray(0, 64)), bytes: raw.length };
  } else {
    const body = new TextDecoder().decode(raw);
    try { payload = JSON.parse(body); } catch { payload = body; }
  }
  const message = { type: 'broadcast', event, payload };
  if (meta) { try { message.meta = JSON.parse(meta); } catch { message.meta = meta; } }
  return { topic, event: 'broadcast', payload: message, size: bytes.length, binary: true };
}

export class Channel {
  constructor(socket, topic, params) {
    this.socket = socket;
    this.topic = topic;
    this.params = params;
    this.joinRef = null;
    this.state = 'closed';
    this.listeners = [];
  }

  /** Calls `listener(message)` for every frame on this topic (replies included). */
  onMessage(listener) { this.listeners.push(listener); }

  dispatch(message) { for (const listener of this.listeners) listener(message); }

  join() {
    this.joinRef = this.socket.makeRef();
    this.state = 'joining';
    return this.socket.push(this.joinRef, this.topic, 'phx_join', this.params).then(
      (reply) => {
        this.state = reply.status === 'ok' ? 'joined' : 'errored';
        this.dispatch({ topic: this.topic, event: 'join_result', payload: reply, size: 0 });
        return reply;
      },
      (error) => {
        this.state = 'errored';
        this.dispatch({ topic: this.topic, event: 'join_result', payload: { status: 'error', response: { reason: error.message } }, size: 0 });
        throw error;
      },
    );
  }

  /** A client event on this channel (`broadcast`, `presence`, `access_token`). */
  push(event, payload) { return this.socket.push(this.joinRef, this.topic, event, payload); }

  leave() {
    this.state = 'leaving';
    return this.socket.push(this.joinRef, this.topic, 'phx_leave', {}).finally(() => {
      this.state = 'closed';
      this.socket.channels.delete(this.topic);
    });
  }
}

export class Socket {
  /** `key`: the token sent as `apikey`. `onStatus(text)`: connection state changes. */
  constructor(key, onStatus = () => {}) {
    this.key = key;
    this.onStatus = onStatus;
    this.ref = 0;
    this.pending = new Map();
    this.channels = new Map();
    this.attempt = 0;
    this.closedByUser = false;
  }

  makeRef() { this.ref += 1; return String(this.ref); }

  url() {
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    return `${scheme}//${location.host}/realtime/v1/websocket?apikey=${encodeURIComponent(this.key)}&vsn=2.0.0`;
  }

  connect() {
    this.closedByUser = false;
    this.ws = new WebSocket(this.url());
    this.ws.binaryType = 'arraybuffer';
    this.onStatus('connecting');
    this.ws.onopen = () => {
      this.attempt = 0;
      this.onStatus('open');
      this.heartbeat = setInterval(() => this.push(null, 'phoenix', 'heartbeat', {}).catch(() => {}), HEARTBEAT_MS);
      for (const channel of this.channels.values()) {
        if (channel.state !== 'leaving') channel.join().catch(() => {});
      }
    };
    this.ws.onmessage = (event) => this.receive(event.data);
    this.ws.onclose = (event) => {
      clearInterval(this.heartbeat);
      for (const { reject } of this.pending.values()) reject(new Error('connection closed'));
      this.pending.clear();
      for (const channel of this.channels.values()) {
        channel.dispatch({ topic: channel.topic, event: 'socket_close', payload: { code: event.code, reason: event.reason }, size: 0 });
      }
      this.onStatus(`closed (${event.code}${event.reason ? ' ' + event.reason : ''})`);
      if (!this.closedByUser) {
        const delay = RECONNECT_DELAYS_MS[Math.min(this.attempt, RECONNECT_DELAYS_MS.length - 1)];
        this.attempt += 1;
        this.onStatus(`reconnecting in ${delay / 1000} s`);
        this.retry = setTimeout(() => this.connect(), delay);
      }
    };
  }

  disconnect() {
    this.closedByUser = true;
    clearTimeout(this.retry);
    if (this.ws) this.ws.close(1000);
  }

  channel(topic, params) {
    const channel = new Channel(this, topic, params);
    this.channels.set(topic, channel);
    return channel;
  }

  push(joinRef, topic, event, payload) {
    const ref = this.makeRef();
    return new Promise((resolve, reject) => {
      if (!this.ws || this.ws.readyState !== WebSocket.OPEN) {
        reject(new Error('not connected'));
        return;
      }
      const timer = setTimeout(() => {
        this.pending.delete(ref);
        reject(new Error('timeout'));
      }, PUSH_TIMEOUT_MS);
      this.pending.set(ref, {
        resolve: (reply) => { clearTimeout(timer); resolve(reply); },
        reject: (error) => { clearTimeout(timer); reject(error); },
      });
      this.ws.send(JSON.stringify([joinRef, ref, topic, event, payload]));
    });
  }

  receive(data) {
    let message;
    if (typeof data === 'string') {
      const size = new TextEncoder().encode(data).length;
      let frame;
      try { frame = JSON.parse(data); } catch { return; }
      if (!Array.isArray(frame) || frame.length < 5) return;
      const [joinRef, ref, topic, event, payload] = frame;
      message = { joinRef, ref, topic, event, payload, size, binary: false };
      if (event === 'phx_reply' && ref !== null && this.pending.has(ref)) {
        this.pending.get(ref).resolve(payload);
        this.pending.delete(ref);
      }
    } else {
      message = decodeUserBroadcast(data);
      if (!message) return;
    }
    const channel = this.channels.get(message.topic);
    if (channel) channel.dispatch(message);
  }
}
