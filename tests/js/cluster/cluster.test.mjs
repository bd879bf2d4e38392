// Cluster mode through the official realtime-js client: clients connected to two different
// nodes (one NATS between them) exchange broadcasts in both serializer versions, with `ack` and
// `self`, and see each other's presence. Run by tests/cluster.rs, which starts nats-server and
// the two nodes and passes their endpoints.

import { test } from 'node:test'
import assert from 'node:assert/strict'
import { RealtimeClient } from '@supabase/realtime-js'
import WebSocket from 'ws'

function requireEnv(name) {
  const value = process.env[name]
  if (!value) throw new Error(`${name} is not set; run through \`cargo test --test cluster\``)
  return value
}

const endpoints = { a: requireEnv('POWA_ENDPOINT_A'), b: requireEnv('POWA_ENDPOINT_B'), c: requireEnv('POWA_ENDPOINT_C') }
const anon = requireEnv('POWA_ANON_KEY')
const clients = []

function client(node, vsn) {
  const options = { params: { apikey: anon }, transport: WebSocket, reconnectAfterMs: () => 1000 }
  if (vsn) options.vsn = vsn
  const c = new RealtimeClient(endpoints[node], options)
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

async function until(what, check, ms = 10000) {
  const deadline = Date.now() + ms
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await sleep(20)
  }
}

for (const [senderVsn, receiverVsn] of [['1.0.0', '2.0.0'], ['2.0.0', '1.0.0'], ['2.0.0', '2.0.0']]) {
  test(`broadcast from node a (vsn ${senderVsn}) reaches nodes b and c (vsn ${receiverVsn}) in order, with ack and self`, async (t) => {
    t.after(() => clients.splice(0).forEach((c) => c.disconnect()))
    const topic = `cluster-${senderVsn}-${receiverVsn}-${Date.now()}`
    const sender = client('a', senderVsn).channel(topic, { config: { broadcast: { ack: true, self: true } } })
    const receiver = client('b', receiverVsn).channel(topic)
    const third = client('c', receiverVsn).channel(topic)
    const heardBySender = []
    const heardByReceiver = []
    const heardByThird = []
    sender.on('broadcast', { event: 'n' }, ({ payload }) => heardBySender.push(payload.i))
    receiver.on('broadcast', { event: 'n' }, ({ payload }) => heardByReceiver.push(payload.i))
    third.on('broadcast', { event: 'n' }, ({ payload }) => heardByThird.push(payload.i))
    await subscribed(receiver)
    await subscribed(third)
    await subscribed(sender)
    for (let i = 0; i < 200; i++) {
      const result = await sender.send({ type: 'broadcast', event: 'n', payload: { i } })
      assert.equal(result, 'ok', `ack of message ${i}`)
    }
    await until('200 messages on node b', () => heardByReceiver.length >= 200)
    await until('200 messages on node c', () => heardByThird.length >= 200)
    await until('200 own messages (self) on node a', () => heardBySender.length >= 200)
    await sleep(300)
    const expected = Array.from({ length: 200 }, (_, i) => i)
    assert.deepEqual(heardByReceiver, expected, 'every message once, in order, on node b')
    assert.deepEqual(heardByThird, expected, 'every message once, in order, on node c')
    assert.deepEqual(heardBySender, expected, 'self: the sender hears itself exactly once')
  })
}

test('presence of members on three nodes converges', async (t) => {
  t.after(() => clients.splice(0).forEach((c) => c.disconnect()))
  const topic = `cluster-presence-${Date.now()}`
  const onA = client('a').channel(topic, { config: { presence: { key: 'ann' } } })
  const onB = client('b').channel(topic, { config: { presence: { key: 'bob' } } })
  const onC = client('c').channel(topic, { config: { presence: { key: 'cat' } } })
  for (const channel of [onA, onB, onC]) channel.on('presence', { event: 'sync' }, () => {})
  await subscribed(onA)
  await subscribed(onB)
  await subscribed(onC)
  await onA.track({ who: 'ann' })
  await onB.track({ who: 'bob' })
  await onC.track({ who: 'cat' })
  const keys = (channel) => Object.keys(channel.presenceState()).sort().join(',')
  for (const [name, channel] of [['a', onA], ['b', onB], ['c', onC]]) {
    await until(`every member on node ${name}`, () => keys(channel) === 'ann,bob,cat')
  }
  await onB.untrack()
  await until('bob gone on node a', () => keys(onA) === 'ann,cat')
  await until('bob gone on node c', () => keys(onC) === 'ann,cat')
})
