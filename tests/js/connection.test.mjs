// Connecting, joining, topic naming and heartbeats with realtime-js.
import { test, afterEach } from 'node:test'
import assert from 'node:assert/strict'

import {
  env,
  createClient,
  closeAllClients,
  subscribeOk,
  collectBroadcasts,
  uniqueTopic,
  sleep,
  dumpFrames,
  incomingTextFrames,
} from './helpers.mjs'
import { normalizeMessage } from './broadcast_suite.mjs'

afterEach(async () => {
  await closeAllClients()
})

test('connect + subscribe reports SUBSCRIBED', async () => {
  const client = createClient({ label: 'subscriber' })
  const channel = client.channel(uniqueTopic('join'))
  const started = Date.now()
  await subscribeOk(channel).catch((err) => {
    throw new Error(`${err.message}\n${dumpFrames(client)}`)
  })
  assert.ok(Date.now() - started < 5000)
  assert.equal(client.isConnected(), true)
  assert.equal(channel.state, 'joined')
  // The join reply is the V2 array shape with postgres_changes always present
  // (PROTOCOL.md §2.6).
  const reply = incomingTextFrames(client)
    .map(normalizeMessage)
    .find((m) => m.event === 'phx_reply' && m.topic === channel.topic)
  assert.ok(reply, dumpFrames(client))
  assert.deepEqual(reply.payload, { status: 'ok', response: { postgres_changes: [] } })
  assert.equal(reply.ref, channel.joinPush.ref)
  assert.equal(reply.join_ref, channel.joinPush.ref)
})

test('connect + subscribe with vsn 1.0.0 reports SUBSCRIBED', async () => {
  const client = createClient({ label: 'subscriber-v1', vsn: '1.0.0' })
  const channel = client.channel(uniqueTopic('join-v1'))
  await subscribeOk(channel).catch((err) => {
    throw new Error(`${err.message}\n${dumpFrames(client)}`)
  })
  assert.equal(channel.state, 'joined')
  const reply = incomingTextFrames(client).find((m) => m.event === 'phx_reply' && m.topic === channel.topic)
  assert.deepEqual(reply, {
    topic: channel.topic,
    event: 'phx_reply',
    payload: { status: 'ok', response: { postgres_changes: [] } },
    ref: channel.joinPush.ref,
  })
})

test("client.channel('room1') joins topic realtime:room1 and members meet there", async () => {
  const a = createClient({ label: 'room1-a' })
  const b = createClient({ label: 'room1-b' })
  const channelA = a.channel('room1')
  const channelB = b.channel('room1')
  assert.equal(channelA.topic, 'realtime:room1')
  assert.equal(channelA.subTopic, 'room1')
  const got = collectBroadcasts(channelB, 'hello')
  await Promise.all([subscribeOk(channelA), subscribeOk(channelB)])
  // What went over the wire: the join names realtime:room1 and the reply echoes it.
  const join = a.frames
    .filter((f) => f.dir === 'out' && !f.binary)
    .map((f) => normalizeMessage(JSON.parse(f.text)))
    .find((m) => m.event === 'phx_join')
  assert.equal(join.topic, 'realtime:room1')
  const reply = incomingTextFrames(a)
    .map(normalizeMessage)
    .find((m) => m.event === 'phx_reply' && m.ref === join.ref)
  assert.ok(reply, dumpFrames(a))
  assert.equal(reply.topic, 'realtime:room1')
  assert.equal(reply.payload.status, 'ok')

  await channelA.send({ type: 'broadcast', event: 'hello', payload: { room: 1 } })
  const messages = await got.waitFor(1).catch((err) => {
    throw new Error(`${err.message}\n${dumpFrames(b)}`)
  })
  assert.deepEqual(messages, [{ type: 'broadcast', event: 'hello', payload: { room: 1 } }])
})

test("a sub-topic with a colon (client.channel('chat:room-42')) works too", async () => {
  const a = createClient({ label: 'colon-a' })
  const b = createClient({ label: 'colon-b' })
  const name = `chat:${uniqueTopic('room')}`
  const channelA = a.channel(name)
  const channelB = b.channel(name)
  assert.equal(channelA.topic, `realtime:${name}`)
  const got = collectBroadcasts(channelB, 'msg')
  await Promise.all([subscribeOk(channelA), subscribeOk(channelB)])
  await channelA.send({ type: 'broadcast', event: 'msg', payload: { text: 'hi' } })
  const messages = await got.waitFor(1).catch((err) => {
    throw new Error(`${err.message}\n${dumpFrames(b)}`)
  })
  assert.deepEqual(messages, [{ type: 'broadcast', event: 'msg', payload: { text: 'hi' } }])
})

test('leaving a channel (removeChannel) is acknowledged', async () => {
  const client = createClient({ label: 'leaver' })
  const channel = client.channel(uniqueTopic('leave'))
  await subscribeOk(channel)
  const status = await client.removeChannel(channel)
  assert.equal(status, 'ok', dumpFrames(client))
  assert.equal(client.getChannels().length, 0)
})

for (const vsn of ['2.0.0', '1.0.0']) {
  test(`heartbeats are answered (vsn ${vsn}, every 500 ms) and the socket stays up`, async () => {
    const statuses = []
    const client = createClient({
      label: `heartbeat-${vsn}`,
      vsn,
      heartbeatIntervalMs: 500,
      heartbeatCallback: (status, latency) => statuses.push({ status, latency }),
    })
    const channel = client.channel(uniqueTopic('hb'))
    await subscribeOk(channel)
    const opened = client.socketEvents.filter((e) => e.type === 'open').length
    await sleep(2200)
    const names = statuses.map((s) => s.status)
    const oks = names.filter((s) => s === 'ok').length
    assert.ok(oks >= 3, `expected at least 3 'ok' heartbeat replies in 2.2 s, saw ${JSON.stringify(names)}\n${dumpFrames(client)}`)
    assert.deepEqual(
      names.filter((s) => s !== 'ok' && s !== 'sent'),
      [],
      `unexpected heartbeat statuses: ${JSON.stringify(names)}\n${dumpFrames(client)}`
    )
    assert.equal(client.isConnected(), true, 'socket is no longer connected')
    assert.deepEqual(
      client.socketEvents.filter((e) => e.type !== 'open').map((e) => e.type),
      [],
      'the socket saw an error or close during the heartbeats'
    )
    assert.equal(client.socketEvents.filter((e) => e.type === 'open').length, opened, 'the socket reconnected')
    assert.equal(channel.state, 'joined')

    // Wire shape (PROTOCOL.md §1.8): topic phoenix, same ref, status ok, empty response.
    const sent = client.frames
      .filter((f) => f.dir === 'out' && !f.binary)
      .map((f) => normalizeMessage(JSON.parse(f.text)))
      .filter((m) => m.topic === 'phoenix' && m.event === 'heartbeat')
    assert.ok(sent.length >= 3)
    const replies = incomingTextFrames(client)
      .map(normalizeMessage)
      .filter((m) => m.topic === 'phoenix' && m.event === 'phx_reply')
    for (const hb of sent.slice(0, -1)) {
      const reply = replies.find((r) => r.ref === hb.ref)
      assert.ok(reply, `no reply to heartbeat ref ${hb.ref}\n${dumpFrames(client)}`)
      assert.deepEqual(reply.payload, { status: 'ok', response: {} })
      if (vsn === '2.0.0') assert.equal(reply.join_ref, null)
      else assert.ok(!('join_ref' in reply), 'V1 reply carries join_ref')
    }
  })
}

test('a user token (role authenticated) as the channel token joins', async () => {
  const client = createClient({ label: 'user' })
  await client.setAuth(env.userToken)
  const channel = client.channel(uniqueTopic('user'))
  await subscribeOk(channel).catch((err) => {
    throw new Error(`${err.message}\n${dumpFrames(client)}`)
  })
  const join = client.frames
    .filter((f) => f.dir === 'out' && !f.binary)
    .map((f) => normalizeMessage(JSON.parse(f.text)))
    .find((m) => m.event === 'phx_join')
  assert.equal(join.payload.access_token, env.userToken)
})

test('the service-role key connects and joins', async () => {
  const client = createClient({ label: 'service', apikey: env.serviceKey })
  const channel = client.channel(uniqueTopic('service'))
  await subscribeOk(channel).catch((err) => {
    throw new Error(`${err.message}\n${dumpFrames(client)}`)
  })
  assert.equal(client.isConnected(), true)
})
