// Multi-tenant mode through the official realtime-js client: two tenants of one server, chosen
// by the Host header, using the same channel name. Run by tests/multi_tenant.rs, which starts the
// server with a tenants file and passes the endpoint and each tenant's anon key.

import { test } from 'node:test'
import assert from 'node:assert/strict'
import { RealtimeClient } from '@supabase/realtime-js'
import WebSocket from 'ws'

function requireEnv(name) {
  const value = process.env[name]
  if (!value) throw new Error(`${name} is not set; run through \`cargo test --test multi_tenant\``)
  return value
}

const endpoint = requireEnv('POWA_ENDPOINT')
const keys = { acme: requireEnv('POWA_ACME_ANON'), globex: requireEnv('POWA_GLOBEX_ANON') }

/** A `ws` WebSocket that names `tenant` in the Host header (what a DNS name would do). */
function tenantTransport(tenant) {
  return class TenantWebSocket extends WebSocket {
    constructor(address, protocols) {
      super(address, protocols, { headers: { host: `${tenant}.localhost` } })
    }
  }
}

const clients = []
function client(tenant) {
  const c = new RealtimeClient(endpoint, { params: { apikey: keys[tenant] }, transport: tenantTransport(tenant), reconnectAfterMs: () => 1000 })
  clients.push(c)
  return c
}

function subscribed(channel) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${channel.topic} did not subscribe`)), 10000)
    channel.subscribe((status, err) => {
      if (status === 'SUBSCRIBED') {
        clearTimeout(timer)
        resolve()
      } else if (status === 'CHANNEL_ERROR' || status === 'TIMED_OUT') {
        clearTimeout(timer)
        reject(err ?? new Error(status))
      }
    })
  })
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

test('broadcast and presence stay inside their tenant', async (t) => {
  t.after(() => clients.forEach((c) => c.disconnect()))
  const heard = { acme: [], globex: [] }
  const channels = {}
  for (const [name, tenant] of [['acmeA', 'acme'], ['acmeB', 'acme'], ['globex', 'globex']]) {
    const channel = client(tenant).channel('room', { config: { broadcast: { self: false }, presence: { key: name } } })
    channel.on('broadcast', { event: 'msg' }, ({ payload }) => {
      if (name !== 'acmeA') heard[tenant].push(payload.text)
    })
    channel.on('presence', { event: 'sync' }, () => {})
    channels[name] = channel
    await subscribed(channel)
  }
  await channels.acmeA.send({ type: 'broadcast', event: 'msg', payload: { text: 'hello acme' } })
  await channels.globex.send({ type: 'broadcast', event: 'msg', payload: { text: 'hello globex' } })
  await channels.acmeA.track({ who: 'acmeA' })
  const deadline = Date.now() + 10000
  while (Date.now() < deadline) {
    const state = channels.acmeB.presenceState()
    if (heard.acme.length >= 1 && state.acmeA) break
    await sleep(50)
  }
  await sleep(500)
  assert.deepEqual(heard.acme, ['hello acme'], 'acme hears acme only')
  assert.deepEqual(heard.globex, [], 'globex never hears acme (and does not hear itself: self is off)')
  assert.ok(channels.acmeB.presenceState().acmeA, 'acme sees the acme member')
  assert.equal(channels.globex.presenceState().acmeA, undefined, 'globex never sees acme presence')
})

test('a token of one tenant is refused at the other tenant', async () => {
  const wrong = new RealtimeClient(endpoint, { params: { apikey: keys.acme }, transport: tenantTransport('globex'), reconnectAfterMs: () => 60000 })
  clients.push(wrong)
  const closed = new Promise((resolve) => {
    wrong.socketAdapter.onError(() => resolve('error'))
    wrong.socketAdapter.onClose(() => resolve('close'))
  })
  wrong.connect()
  assert.ok(['error', 'close'].includes(await closed))
  wrong.disconnect()
})
