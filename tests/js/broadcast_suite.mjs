// The broadcast checks, written once and run per serializer version
// (broadcast_v2.test.mjs uses the client's default, broadcast_v1.test.mjs
// forces vsn 1.0.0).

import { test, afterEach } from 'node:test'
import assert from 'node:assert/strict'

import {
  createClient,
  closeAllClients,
  subscribeOk,
  subscribeRecording,
  collectBroadcasts,
  uniqueTopic,
  sleep,
  dumpFrames,
  decodeBinaryFrame,
  incomingTextFrames,
} from './helpers.mjs'

/**
 * Defines the broadcast tests for one serializer.
 * @param {{vsn: '1.0.0' | '2.0.0' | undefined, name: string}} options
 *   vsn undefined means "whatever realtime-js defaults to" (2.0.0).
 */
export function defineBroadcastTests({ vsn, name }) {
  const clientOptions = (label) => (vsn === undefined ? { label } : { label, vsn })

  afterEach(async () => {
    await closeAllClients()
  })

  /** Two clients joined to one fresh topic; `setup(channel, who)` runs before subscribe. */
  async function twoMembers({ senderConfig = {}, receiverConfig = {}, setup = () => {} } = {}) {
    const topic = uniqueTopic('bcast')
    const sender = createClient(clientOptions(`${name}-sender`))
    const receiver = createClient(clientOptions(`${name}-receiver`))
    const senderChannel = sender.channel(topic, { config: { broadcast: senderConfig } })
    const receiverChannel = receiver.channel(topic, { config: { broadcast: receiverConfig } })
    const hooks = {
      sender: setup(senderChannel, 'sender'),
      receiver: setup(receiverChannel, 'receiver'),
    }
    subscribeRecording(senderChannel)
    subscribeRecording(receiverChannel)
    await Promise.all([subscribeOk(senderChannel), subscribeOk(receiverChannel)])
    return { topic, sender, receiver, senderChannel, receiverChannel, hooks }
  }

  test(`[${name}] client reports its serializer version`, () => {
    const client = createClient(clientOptions(`${name}-vsn`))
    assert.equal(client.vsn, vsn ?? '2.0.0')
    assert.match(client.endpointURL(), new RegExp(`[?&]vsn=${(vsn ?? '2.0.0').replace(/\./g, '\\.')}$`))
  })

  test(`[${name}] broadcast between two clients carries event and payload`, async () => {
    const payload = { text: 'hello', n: 42, ok: true, nested: { list: [1, 2, 3], none: null }, unicode: 'héllo wörld ✓ 🚀' }
    const { sender, receiver, senderChannel, hooks } = await twoMembers({
      setup: (channel) => collectBroadcasts(channel, 'greet'),
    })
    const result = await senderChannel.send({ type: 'broadcast', event: 'greet', payload })
    assert.equal(result, 'ok')
    const messages = await hooks.receiver.waitFor(1).catch((err) => {
      throw new Error(`${err.message}\n${dumpFrames(receiver)}\n${dumpFrames(sender)}`)
    })
    assert.equal(messages.length, 1)
    assert.deepEqual(messages[0], { type: 'broadcast', event: 'greet', payload })
  })

  test(`[${name}] listeners only get their own event name`, async () => {
    const topic = uniqueTopic('bcast-filter')
    const sender = createClient(clientOptions(`${name}-sender`))
    const receiver = createClient(clientOptions(`${name}-receiver`))
    const senderChannel = sender.channel(topic)
    const receiverChannel = receiver.channel(topic)
    const cursor = collectBroadcasts(receiverChannel, 'cursor')
    const chat = collectBroadcasts(receiverChannel, 'chat')
    const all = collectBroadcasts(receiverChannel, '*')
    await Promise.all([subscribeOk(senderChannel), subscribeOk(receiverChannel)])
    await senderChannel.send({ type: 'broadcast', event: 'cursor', payload: { x: 1, y: 2 } })
    await senderChannel.send({ type: 'broadcast', event: 'chat', payload: { msg: 'hi' } })
    await all.waitFor(2).catch((err) => {
      throw new Error(`${err.message}\n${dumpFrames(receiver)}`)
    })
    await sleep(200)
    assert.deepEqual(cursor.messages, [{ type: 'broadcast', event: 'cursor', payload: { x: 1, y: 2 } }])
    assert.deepEqual(chat.messages, [{ type: 'broadcast', event: 'chat', payload: { msg: 'hi' } }])
    assert.deepEqual(all.messages.map((m) => m.event), ['cursor', 'chat'])
  })

  test(`[${name}] self:false - the sender does not receive its own broadcast`, async () => {
    const { sender, senderChannel, hooks } = await twoMembers({
      senderConfig: { self: false },
      setup: (channel) => collectBroadcasts(channel, 'ping'),
    })
    await senderChannel.send({ type: 'broadcast', event: 'ping', payload: { n: 1 } })
    await hooks.receiver.waitFor(1)
    // Give a wrongly echoed copy time to arrive.
    await sleep(500)
    assert.equal(
      hooks.sender.messages.length,
      0,
      `sender got its own broadcast although self is false\n${dumpFrames(sender)}`
    )
  })

  test(`[${name}] self:true - the sender receives its own broadcast`, async () => {
    const payload = { n: 7, who: 'me' }
    const { sender, senderChannel, hooks } = await twoMembers({
      senderConfig: { self: true },
      setup: (channel) => collectBroadcasts(channel, 'echo'),
    })
    await senderChannel.send({ type: 'broadcast', event: 'echo', payload })
    const own = await hooks.sender.waitFor(1).catch((err) => {
      throw new Error(`${err.message}\n${dumpFrames(sender)}`)
    })
    const other = await hooks.receiver.waitFor(1)
    assert.deepEqual(own, [{ type: 'broadcast', event: 'echo', payload }])
    assert.deepEqual(other, [{ type: 'broadcast', event: 'echo', payload }])
    await sleep(300)
    assert.equal(hooks.sender.messages.length, 1, 'sender got its broadcast more than once')
    assert.equal(hooks.receiver.messages.length, 1, 'receiver got the broadcast more than once')
  })

  test(`[${name}] ack:true - send() resolves 'ok' from the server's reply`, async () => {
    const { sender, senderChannel, hooks } = await twoMembers({
      senderConfig: { ack: true },
      setup: (channel) => collectBroadcasts(channel, 'acked'),
    })
    const mark = sender.frames.length
    const started = Date.now()
    const results = await Promise.all(
      [1, 2, 3].map((n) => senderChannel.send({ type: 'broadcast', event: 'acked', payload: { n } }))
    )
    assert.deepEqual(results, ['ok', 'ok', 'ok'], dumpFrames(sender))
    assert.ok(Date.now() - started < 5000, 'acks took longer than 5 s')
    await hooks.receiver.waitFor(3)
    // The 'ok' must come from replies, not from the client resolving early:
    // one phx_reply with status ok per broadcast sent.
    const sentRefs = sender.frames
      .slice(mark)
      .filter((f) => f.dir === 'out')
      .map((f) => (f.binary ? decodeBinaryFrame(f.bytes) : normalizeMessage(JSON.parse(f.text))))
      .filter((m) => m.kind === 3 || m.event === 'broadcast')
      .map((m) => m.ref)
    assert.equal(sentRefs.length, 3)
    const replies = incomingTextFrames(sender)
      .map(normalizeMessage)
      .filter((m) => m.event === 'phx_reply' && sentRefs.includes(m.ref))
    assert.equal(replies.length, 3, `expected 3 ack replies\n${dumpFrames(sender)}`)
    for (const reply of replies) {
      assert.deepEqual(reply.payload, { status: 'ok', response: {} })
    }
  })

  test(`[${name}] 200 broadcasts from one sender arrive in order, none lost`, async () => {
    const total = 200
    const { sender, receiver, senderChannel, hooks } = await twoMembers({
      setup: (channel) => collectBroadcasts(channel, 'seq'),
    })
    const results = []
    for (let i = 0; i < total; i++) {
      results.push(senderChannel.send({ type: 'broadcast', event: 'seq', payload: { i, pad: 'x'.repeat(i % 50) } }))
    }
    assert.ok((await Promise.all(results)).every((r) => r === 'ok'))
    const messages = await hooks.receiver.waitFor(total, 15000).catch((err) => {
      throw new Error(`${err.message}\n${dumpFrames(receiver, 10)}\n${dumpFrames(sender, 10)}`)
    })
    await sleep(300)
    assert.equal(hooks.receiver.messages.length, total, 'receiver got extra broadcasts')
    const seen = messages.map((m) => m.payload.i)
    assert.deepEqual(seen, Array.from({ length: total }, (_, i) => i))
    for (const m of messages) {
      assert.equal(m.event, 'seq')
      assert.equal(m.payload.pad, 'x'.repeat(m.payload.i % 50))
    }
    assert.equal(hooks.sender.messages.length, 0, 'sender (self false) got its own broadcasts')
  })

  if ((vsn ?? '2.0.0') === '2.0.0') {
    test(`[${name}] wire: broadcasts go out as binary kind 3 and arrive as binary kind 4`, async () => {
      const payload = { x: 1, y: 2 }
      const { topic, sender, receiver, senderChannel, hooks } = await twoMembers({
        setup: (channel) => collectBroadcasts(channel, 'cursor'),
      })
      await senderChannel.send({ type: 'broadcast', event: 'cursor', payload })
      await hooks.receiver.waitFor(1)
      const out = sender.frames.filter((f) => f.dir === 'out' && f.binary).map((f) => decodeBinaryFrame(f.bytes))
      assert.equal(out.length, 1, `expected one binary frame from the sender\n${dumpFrames(sender)}`)
      assert.equal(out[0].kind, 3)
      const received = receiver.frames.filter((f) => f.dir === 'in' && f.binary)
      assert.equal(received.length, 1, `expected one binary frame at the receiver\n${dumpFrames(receiver)}`)
      const frame = decodeBinaryFrame(received[0].bytes)
      assert.equal(frame.kind, 4, `PROTOCOL.md §1.6.2: broadcasts from kind 3 must arrive as kind 4\n${dumpFrames(receiver)}`)
      assert.equal(frame.topic, `realtime:${topic}`)
      assert.equal(frame.event, 'cursor')
      assert.equal(frame.metadata, '')
      assert.equal(frame.encoding, 1)
      assert.deepEqual(JSON.parse(frame.payload.toString('utf8')), payload)
      // No JSON copy of the same broadcast.
      const textBroadcasts = incomingTextFrames(receiver).map(normalizeMessage).filter((m) => m.event === 'broadcast')
      assert.deepEqual(textBroadcasts, [])
    })
  } else {
    test(`[${name}] wire: V1 frames are JSON objects, server frames never carry join_ref`, async () => {
      const payload = { x: 1, y: 2 }
      const { topic, sender, receiver, senderChannel, hooks } = await twoMembers({
        setup: (channel) => collectBroadcasts(channel, 'cursor'),
      })
      await senderChannel.send({ type: 'broadcast', event: 'cursor', payload })
      await hooks.receiver.waitFor(1)
      for (const client of [sender, receiver]) {
        const binary = client.frames.filter((f) => (f.dir === 'in' || f.dir === 'out') && f.binary)
        assert.equal(binary.length, 0, `V1 must not use binary frames\n${dumpFrames(client)}`)
        for (const frame of incomingTextFrames(client)) {
          assert.ok(frame && typeof frame === 'object' && !Array.isArray(frame), `not a V1 object: ${JSON.stringify(frame)}`)
          for (const key of ['topic', 'event', 'payload', 'ref']) {
            assert.ok(key in frame, `V1 frame lacks ${key}: ${JSON.stringify(frame)}`)
          }
          assert.ok(!('join_ref' in frame), `V1 server frame carries join_ref: ${JSON.stringify(frame)}`)
        }
      }
      const broadcasts = incomingTextFrames(receiver).filter((m) => m.event === 'broadcast')
      assert.deepEqual(broadcasts, [
        {
          topic: `realtime:${topic}`,
          event: 'broadcast',
          payload: { type: 'broadcast', event: 'cursor', payload },
          ref: null,
        },
      ])
    })
  }
}

/** A V1 object or V2 array as {join_ref, ref, topic, event, payload}. */
export function normalizeMessage(frame) {
  if (Array.isArray(frame)) {
    const [join_ref, ref, topic, event, payload] = frame
    return { join_ref, ref, topic, event, payload }
  }
  return frame
}
