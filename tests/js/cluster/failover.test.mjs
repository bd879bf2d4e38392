// A node dies under a realtime-js client: the client reaches another node through the load
// balancer (a TCP proxy in tests/cluster.rs that sends each connection to the first live node),
// rejoins by itself, and the other nodes drop the dead node's presence within the node timeout.
// tests/cluster.rs kills the node once this file writes POWA_READY_FILE.

import { test } from 'node:test'
import assert from 'node:assert/strict'
import { writeFileSync } from 'node:fs'
import { RealtimeClient } from '@supabase/realtime-js'
import WebSocket from 'ws'

function requireEnv(name) {
  const value = process.env[name]
  if (!value) throw new Error(`${name} is not set; run through \`cargo test --test cluster\``)
  return value
}

const balanced = requireEnv('POWA_ENDPOINT_LB')
const direct = requireEnv('POWA_ENDPOINT_B')
const anon = requireEnv('POWA_ANON_KEY')
const readyFile = requireEnv('POWA_READY_FILE')
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

async function until(what, check, ms = 15000) {
  const deadline = Date.now() + ms
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await sleep(25)
  }
}

test('a client of a killed node comes back through another node and rejoins', async (t) => {
  const mover = new RealtimeClient(balanced, { params: { apikey: anon }, transport: WebSocket, reconnectAfterMs: () => 300 })
  const watcher = new RealtimeClient(direct, { params: { apikey: anon }, transport: WebSocket })
  t.after(() => {
    mover.disconnect()
    watcher.disconnect()
  })
  const topic = `failover-${Date.now()}`
  const moving = mover.channel(topic, { config: { presence: { key: 'mover' } } })
  const watching = watcher.channel(topic, { config: { presence: { key: 'watcher' } } })
  const heard = []
  const statuses = []
  moving.on('broadcast', { event: 'ping' }, ({ payload }) => heard.push(payload.n))
  moving.on('presence', { event: 'sync' }, () => {})
  watching.on('presence', { event: 'sync' }, () => {})
  await new Promise((resolve) => watching.subscribe((s) => s === 'SUBSCRIBED' && resolve()))
  await watching.track({ watching: true })
  moving.subscribe(async (status) => {
    statuses.push(status)
    // realtime-js tracks again after each (re)subscribe only if asked: do as apps do.
    if (status === 'SUBSCRIBED') await moving.track({ at: Date.now() })
  })
  await until('first subscription', () => statuses.includes('SUBSCRIBED'))
  const present = () => Object.keys(watching.presenceState()).sort().join(',')
  await until('the mover seen from node b', () => present() === 'mover,watcher')
  const refsBefore = JSON.stringify(watching.presenceState().mover)

  writeFileSync(readyFile, 'kill node a now')
  // The node dies: the old presence leaves within the node timeout, and the rejoined client's
  // new presence appears (from node b now).
  await until('a second SUBSCRIBED after the node died', () => statuses.filter((s) => s === 'SUBSCRIBED').length >= 2)
  await until('the mover seen again, with a new presence', () => present() === 'mover,watcher' && JSON.stringify(watching.presenceState().mover) !== refsBefore)
  await until('exactly one presence for the mover', () => watching.presenceState().mover?.length === 1)

  // Broadcasts reach the moved client.
  await watching.send({ type: 'broadcast', event: 'ping', payload: { n: 1 } })
  await until('the broadcast after the move', () => heard.includes(1))
  assert.deepEqual(heard, [1])
})
