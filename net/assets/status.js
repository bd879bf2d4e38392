// The status page: polls GET /api/status every second with the service-role key.
import { drawLine } from '/assets/chart.js';

const $ = (id) => document.getElementById(id);
const REFRESH_MS = 1000;
let key = '';
let timer = null;

function setFetchStatus(text, state) {
  $('fetch-status').textContent = text;
  $('fetch-status').dataset.state = state;
}

function duration(seconds) {
  const d = Math.floor(seconds / 86400);
  const h = Math.floor((seconds % 86400) / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  const s = seconds % 60;
  return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : m ? `${m}m ${s}s` : `${s}s`;
}

function fillTable(id, rows) {
  const tbody = $(id).tBodies[0];
  tbody.replaceChildren();
  for (const cells of rows) {
    const row = document.createElement('tr');
    for (const text of cells) {
      const cell = document.createElement('td');
      cell.textContent = String(text);
      row.append(cell);
    }
    tbody.append(row);
  }
}

function render(status) {
  $('connections').textContent = status.totals.connections;
  $('channels').textContent = status.totals.channels;
  $('topics').textContent = status.totals.topics;
  $('presence').textContent = status.totals.presence_members;
  $('deliveries').textContent = status.totals.deliveries_per_second;
  $('uptime').textContent = duration(status.uptime_seconds);
  $('version').textContent = `version ${status.version}`;
  drawLine($('chart-deliveries'), status.history.deliveries_per_second, 'deliveries per second');
  drawLine($('chart-connections'), status.history.connections, 'connections');
  $('lag-panel').hidden = !status.postgres;
  if (status.postgres) drawLine($('chart-lag'), status.history.replication_lag_bytes, 'replication lag in bytes');
  fillTable('shards', status.shards.map((s) => [s.id, s.connections, s.channels, s.owned_topics, s.deliveries_per_second]));
  fillTable('top-topics', status.top_topics.map((t) => [t.topic + (t.private ? ' (private)' : ''), t.subscribers]));
  const list = $('postgres-state');
  list.replaceChildren();
  const entries = status.postgres ? Object.entries(status.postgres) : [['database', 'not configured']];
  for (const [name, value] of entries) {
    list.append(Object.assign(document.createElement('dt'), { textContent: name.replaceAll('_', ' ') }));
    list.append(Object.assign(document.createElement('dd'), { textContent: typeof value === 'object' ? JSON.stringify(value) : String(value) }));
  }
}

async function refresh() {
  try {
    const response = await fetch('/api/status', { headers: { Authorization: `Bearer ${key}` }, cache: 'no-store' });
    if (response.status === 401) {
      setFetchStatus('the key is not a valid service-role key', 'error');
      return;
    }
    if (!response.ok) {
      setFetchStatus(`HTTP ${response.status}`, 'error');
      return;
    }
    render(await response.json());
    setFetchStatus(`live, updated ${new Date().toLocaleTimeString()}`, 'ok');
  } catch (error) {
    setFetchStatus(`unreachable: ${error.message}`, 'error');
  }
}

$('key-form').addEventListener('submit', (event) => {
  event.preventDefault();
  key = $('key').value.trim();
  clearInterval(timer);
  refresh();
  timer = setInterval(refresh, REFRESH_MS);
});

const fragment = new URLSearchParams(location.hash.slice(1)).get('apikey');
if (fragment) {
  $('key').value = fragment;
  history.replaceState(null, '', location.pathname);
  $('key-form').requestSubmit();
}
