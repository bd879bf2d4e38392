// The inspector page: join channels through the public protocol and watch what arrives.
import { Socket } from '/assets/phoenix.js';

const MESSAGES_MAX = 500;
const $ = (id) => document.getElementById(id);

let socket = null;
const bindings = [];

// A key may be handed over in the URL fragment (never sent to the server), then it is removed
// from the address bar. It lives only in this tab's memory.
function keyFromFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  const key = params.get('apikey');
  if (key) {
    $('key').value = key;
    history.replaceState(null, '', location.pathname);
  }
}

function setSocketStatus(text) {
  const badge = $('socket-status');
  badge.textContent = text;
  badge.dataset.state = text.startsWith('open') ? 'ok' : text.startsWith('closed') || text.startsWith('reconnecting') ? 'error' : 'pending';
  $('join-button').disabled = !text.startsWith('open');
}

$('connect-form').addEventListener('submit', (event) => {
  event.preventDefault();
  if (socket) socket.disconnect();
  socket = new Socket($('key').value.trim(), setSocketStatus);
  socket.connect();
  $('disconnect').disabled = false;
});

$('disconnect').addEventListener('click', () => {
  if (socket) socket.disconnect();
  $('disconnect').disabled = true;
});

function renderBindings() {
  const list = $('pg-bindings');
  list.replaceChildren();
  bindings.forEach((binding, index) => {
    const item = document.createElement('li');
    item.textContent = JSON.stringify(binding) + ' ';
    const remove = document.createElement('button');
    remove.type = 'button';
    remove.textContent = 'remove';
    remove.addEventListener('click', () => { bindings.splice(index, 1); renderBindings(); });
    item.append(remove);
    list.append(item);
  });
}

$('pg-add').addEventListener('click', () => {
  const binding = { event: $('pg-event').value, schema: $('pg-schema').value.trim() || 'public' };
  const table = $('pg-table').value.trim();
  const filter = $('pg-filter').value.trim();
  if (table) binding.table = table;
  if (filter) binding.filter = filter;
  bindings.push(binding);
  renderBindings();
});

$('join-form').addEventListener('submit', (event) => {
  event.preventDefault();
  const name = $('channel-name').value.trim();
  if (!name || !socket) return;
  const topic = name.startsWith('realtime:') ? name : `realtime:${name}`;
  if (socket.channels.has(topic)) return;
  const config = {
    broadcast: { self: $('self').checked, ack: $('ack').checked },
    presence: { enabled: $('presence').checked, key: $('presence-key').value.trim() },
    postgres_changes: bindings.slice(),
    private: $('private').checked,
  };
  openChannel(topic, { config, access_token: socket.key });
});

function time() {
  return new Date().toISOString().slice(11, 23);
}

function compact(value) {
  const text = typeof value === 'string' ? value : JSON.stringify(value);
  return text.length > 400 ? text.slice(0, 400) + '…' : text;
}

function openChannel(topic, params) {
  const channel = socket.channel(topic, params);
  const card = $('channel-template').content.firstElementChild.cloneNode(true);
  const q = (selector) => card.querySelector(selector);
  card.dataset.topic = topic;
  q('.topic').textContent = topic + (params.config.private ? ' (private)' : '');
  $('channels').prepend(card);

  const presence = new Map();
  let count = 0;

  const setState = (text, state) => {
    q('.state').textContent = text;
    q('.state').dataset.state = state;
  };
  const notice = (text, state) => {
    q('.notice').textContent = text;
    q('.notice').dataset.state = state;
  };

  const renderPresence = () => {
    const list = q('.presence-list');
    list.replaceChildren();
    let members = 0;
    for (const [key, metas] of presence) {
      for (const meta of metas) {
        members += 1;
        const item = document.createElement('li');
        const { phx_ref: _ref, ...rest } = meta;
        item.textContent = `${key}: ${compact(rest)}`;
        list.append(item);
      }
    }
    q('.presence-count').textContent = String(members);
  };

  const applyPresence = (event, payload) => {
    if (event === 'presence_state') {
      presence.clear();
      for (const [key, value] of Object.entries(payload || {})) presence.set(key, value.metas || []);
    } else {
      for (const [key, value] of Object.entries(payload.joins || {})) {
        presence.set(key, (presence.get(key) || []).concat(value.metas || []));
      }
      for (const [key, value] of Object.entries(payload.leaves || {})) {
        const gone = new Set((value.metas || []).map((meta) => meta.phx_ref));
        const left = (presence.get(key) || []).filter((meta) => !gone.has(meta.phx_ref));
        if (left.length) presence.set(key, left); else presence.delete(key);
      }
    }
    renderPresence();
  };

  const addRow = (message) => {
    const tbody = q('tbody');
    const row = document.createElement('tr');
    let label = message.event;
    let payload = message.payload;
    if (message.event === 'broadcast' && payload && payload.event !== undefined) {
      label = `broadcast: ${payload.event}`;
      payload = payload.payload;
    } else if (message.event === 'postgres_changes' && payload && payload.data) {
      label = `postgres_changes: ${payload.data.type || payload.data.eventType || ''}`;
    }
    row.dataset.event = message.event;
    for (const text of [time(), label, compact(payload), `${message.size} B${message.binary ? ' (binary)' : ''}`]) {
      const cell = document.createElement('td');
      cell.textContent = text;
      row.append(cell);
    }
    tbody.prepend(row);
    while (tbody.rows.length > MESSAGES_MAX) tbody.deleteRow(-1);
    count += 1;
    q('.message-count').textContent = String(count);
    applyFilter();
  };

  const applyFilter = () => {
    const needle = q('.filter').value.trim().toLowerCase();
    for (const row of q('tbody').rows) {
      row.hidden = needle !== '' && !row.textContent.toLowerCase().includes(needle);
    }
  };

  channel.onMessage((message) => {
    switch (message.event) {
      case 'presence_state':
      case 'presence_diff':
        applyPresence(message.event, message.payload);
        addRow(message);
        break;
      case 'phx_reply':
        if (message.ref !== null && message.joinRef === channel.joinRef && message.payload.status !== 'ok') addRow(message);
        break;
      case 'phx_close':
        setState('closed', 'error');
        addRow(message);
        break;
      case 'socket_close':
        setState('disconnected', 'error');
        break;
      case 'join_result':
        if (message.payload.status === 'ok') {
          setState('joined', 'ok');
          notice('', '');
        } else {
          setState('error', 'error');
          notice(`join refused: ${message.payload.response && message.payload.response.reason}`, 'error');
        }
        break;
      case 'system':
        notice(`${message.payload.status}: ${message.payload.message}`, message.payload.status === 'ok' ? 'ok' : 'error');
        addRow(message);
        break;
      default:
        addRow(message);
    }
  });

  channel.join().catch(() => {});

  q('.filter').addEventListener('input', applyFilter);
  q('.clear').addEventListener('click', () => { q('tbody').replaceChildren(); count = 0; q('.message-count').textContent = '0'; });
  q('.leave').addEventListener('click', () => {
    channel.leave().catch(() => {});
    card.remove();
  });
  q('.send').addEventListener('submit', (event) => {
    event.preventDefault();
    let payload;
    try {
      payload = JSON.parse(q('.send-payload').value);
    } catch (error) {
      q('.send-result').textContent = `not JSON: ${error.message}`;
      return;
    }
    const body = { type: 'broadcast', event: q('.send-event').value.trim(), payload };
    const started = performance.now();
    const sent = channel.push('broadcast', body);
    if (!params.config.broadcast.ack) {
      // Without ack the server sends no reply: the push's timeout means nothing here.
      sent.catch(() => {});
      q('.send-result').textContent = 'sent';
      return;
    }
    sent.then(
      (reply) => { q('.send-result').textContent = `${reply.status} in ${Math.round(performance.now() - started)} ms`; },
      (error) => { q('.send-result').textContent = error.message; },
    );
  });
  q('.track').addEventListener('submit', (event) => {
    event.preventDefault();
    let state;
    try { state = JSON.parse(q('.track-payload').value); } catch (error) { notice(`not JSON: ${error.message}`, 'error'); return; }
    channel.push('presence', { type: 'presence', event: 'track', payload: state }).catch((error) => notice(error.message, 'error'));
  });
  q('.untrack').addEventListener('click', () => {
    channel.push('presence', { type: 'presence', event: 'untrack' }).catch((error) => notice(error.message, 'error'));
  });
}

keyFromFragment();
setSocketStatus('not connected');
