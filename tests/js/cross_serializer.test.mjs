// A vsn 1.0.0 client and a vsn 2.0.0 client on one channel exchange
// broadcasts in both directions (PROTOCOL.md §3.3: the server converts
// between the JSON and binary shapes).
import { test, afterEach } from 'node:test'
import assert from 'node:assert/strict'

import {
  createClient,
  closeAllClients,
  subscribeOk,
  collectBroadcasts,
  uniqueTopic,
  sleep,
  dumpFrames,
  decodeBinaryFrame,
  incomingTextFrames,
} from './helpers.mjs'

afterEach(async () => {
  await closeAllClients()
})

async function mixedPair(config = {}) {
  const topic = uniqueTopic('mixed')
  const v1 = createClient({ vsn: '1.0.0', label: 'v1-client' })
  const v2 = createClient({ vsn: '2.0.0', label: 'v2-client' })
  assert.equal(v1.vsn, '1.0.0')
  assert.equal(v2.vsn, '2.0.0')
  const v1Channel = v1.channel(topic, { config })
  const v2Channel = v2.channel(topic, { config })
  const v1Got = collectBroadcasts(v1Channel, '*')
  const v2Got = collectBroadcasts(v2Channel, '*')
  await Promise.all([subscribeOk(v1Channel), subscribeOk(v2Channel)])
  return { topic, v1, v2, v1Channel, v2Channel, v1Got, v2Got }
}

test('V2 client -> V1 client: binary broadcast arrives as JSON', async () => {
  const payload = { from: 'v2', list: [1, 'two', { three: 3 }], text: 'ünïcødé ✓' }
  const { topic, v1, v2, v2Channel, v1Got, v2Got } = await mixedPair()
  assert.equal(await v2Channel.send({ type: 'broadcast', event: 'from-v2', payload }), 'ok')
  const got = await v1Got.waitFor(1).catch((err) => {
    throw new Error(`${err.message}\n${dumpFrames(v1)}\n${dumpFrames(v2)}`)
  })
  assert.deepEqual(got, [{ type: 'broadcast', event: 'from-v2', payload }])
  const wire = incomingTextFrames(v1).filter((m) => m.event === 'broadcast')
  assert.deepEqual(wire, [
    {
      topic: `realtime:${topic}`,
      event: 'broadcast',
      payload: { type: 'broadcast', event: 'from-v2', payload },
      ref: null,
    },
  ])
  await sleep(200)
  assert.equal(v2Got.messages.length, 0, 'sender (self false) got its own broadcast')
})

test('V1 client -> V2 client: JSON broadcast arrives with the same event and payload', async () => {
  const payload = { from: 'v1', n: 3.5, ok: false, nothing: null }
  const { topic, v1, v2, v1Channel, v1Got, v2Got } = await mixedPair()
  assert.equal(await v1Channel.send({ type: 'broadcast', event: 'from-v1', payload }), 'ok')
  const got = await v2Got.waitFor(1).catch((err) => {
    throw new Error(`${err.message}\n${dumpFrames(v2)}\n${dumpFrames(v1)}`)
  })
  assert.deepEqual(got, [{ type: 'broadcast', event: 'from-v1', payload }])
  // PROTOCOL.md §3.3: a JSON-origin broadcast reaches V2 receivers as a text
  // frame [null, null, topic, "broadcast", <payload as sent>].
  const textFrames = incomingTextFrames(v2).filter((m) => Array.isArray(m) && m[3] === 'broadcast')
  const binaryFrames = v2.frames.filter((f) => f.dir === 'in' && f.binary).map((f) => decodeBinaryFrame(f.bytes))
  assert.equal(textFrames.length + binaryFrames.length, 1, dumpFrames(v2))
  if (textFrames.length === 1) {
    assert.deepEqual(textFrames[0], [
      null,
      null,
      `realtime:${topic}`,
      'broadcast',
      { type: 'broadcast', event: 'from-v1', payload },
    ])
  } else {
    assert.fail(`expected a V2 text frame for a JSON-origin broadcast, got binary kind ${binaryFrames[0].kind}`)
  }
  await sleep(200)
  assert.equal(v1Got.messages.length, 0, 'sender (self false) got its own broadcast')
})

test('V1 and V2 clients exchange broadcasts both ways, many in a row, in order', async () => {
  const { v1, v2, v1Channel, v2Channel, v1Got, v2Got } = await mixedPair()
  const rounds = 25
  for (let i = 0; i < rounds; i++) {
    await v1Channel.send({ type: 'broadcast', event: 'ping', payload: { i, from: 'v1' } })
    await v2Channel.send({ type: 'broadcast', event: 'pong', payload: { i, from: 'v2' } })
  }
  const atV2 = await v2Got.waitFor(rounds, 10000).catch((err) => {
    throw new Error(`${err.message}\n${dumpFrames(v2, 10)}`)
  })
  const atV1 = await v1Got.waitFor(rounds, 10000).catch((err) => {
    throw new Error(`${err.message}\n${dumpFrames(v1, 10)}`)
  })
  await sleep(200)
  assert.equal(v2Got.messages.length, rounds)
  assert.equal(v1Got.messages.length, rounds)
  assert.deepEqual(
    atV2.map((m) => [m.event, m.payload.from, m.payload.i]),
    Array.from({ length: rounds }, (_, i) => ['ping', 'v1', i])
  )
  assert.deepEqual(
    atV1.map((m) => [m.event, m.payload.from, m.payload.i]),
    Array.from({ length: rounds }, (_, i) => ['pong', 'v2', i])
  )
})

test('self:true works across serializers: each sender hears itself and the other', async () => {
  const { v1, v2, v1Channel, v2Channel, v1Got, v2Got } = await mixedPair({ broadcast: { self: true } })
  await v1Channel.send({ type: 'broadcast', event: 'hello', payload: { from: 'v1' } })
  await v2Channel.send({ type: 'broadcast', event: 'hello', payload: { from: 'v2' } })
  await v1Got.waitFor(2).catch((err) => {
    throw new Error(`${err.message}\n${dumpFrames(v1)}`)
  })
  await v2Got.waitFor(2).catch((err) => {
    throw new Error(`${err.message}\n${dumpFrames(v2)}`)
  })
  await sleep(200)
  const sortFrom = (msgs) => msgs.map((m) => m.payload.from).sort()
  assert.deepEqual(sortFrom(v1Got.messages), ['v1', 'v2'])
  assert.deepEqual(sortFrom(v2Got.messages), ['v1', 'v2'])
})
