// Presence with realtime-js (PROTOCOL.md §4, Appendix A.1).
//
// Every test uses its own topic and fresh clients. The server coalesces the
// presence diffs of a topic over a short window and runs several shards, so
// the tests wait for the presence state realtime-js builds (never for a fixed
// sequence of frames) and only then look at events and wire frames.
import { test, afterEach } from 'node:test'
import assert from 'node:assert/strict'

import {
  createClient,
  closeAllClients,
  subscribeOk,
  uniqueTopic,
  sleep,
  dumpFrames,
  incomingTextFrames,
  recordPresence,
  describePresenceEvents,
  disconnectUnreffed,
} from './helpers.mjs'
import { normalizeMessage } from './broadcast_suite.mjs'

afterEach(async () => {
  await closeAllClients()
})

/** How long a leave may take to reach the other member ("promptly"). */
const LEAVE_WITHIN_MS = 2000

/** The keys of a presence state whose single meta has `field === value`. */
function keysWith(state, field, value) {
  return Object.keys(state).filter((key) => state[key].some((meta) => meta[field] === value))
}

/** One subscribed presence channel: { client, channel, presence }. */
async function presenceMember(topic, { label, vsn, key } = {}) {
  const client = createClient({ label, vsn })
  const params = key === undefined ? undefined : { config: { presence: { key } } }
  const channel = client.channel(topic, params)
  const presence = recordPresence(channel)
  await subscribeOk(channel).catch((err) => {
    throw new Error(`${err.message}\n${dumpFrames(client)}`)
  })
  return { client, channel, presence }
}

async function trackOk(member, payload) {
  const status = await member.channel.track(payload)
  assert.equal(status, 'ok', `track ${JSON.stringify(payload)} answered ${status}\n${dumpFrames(member.client)}`)
}

/** Asserts the realtime-js shape of one presence: presence_ref + tracked fields, nothing else. */
function assertPresence(presence, expected, context) {
  assert.equal(typeof presence.presence_ref, 'string', `presence_ref missing: ${JSON.stringify(presence)} (${context})`)
  assert.ok(presence.presence_ref.length > 0, context)
  const { presence_ref, ...rest } = presence
  assert.deepEqual(rest, expected, context)
}

/** Both members see both tracked payloads; returns the key of each. */
async function trackBoth(a, b, payloadA, payloadB) {
  await trackOk(a, payloadA)
  await trackOk(b, payloadB)
  const both = (state) => keysWith(state, 'name', payloadA.name).length === 1 && keysWith(state, 'name', payloadB.name).length === 1
  await a.presence.waitUntil(both, 5000, `${a.client.label} to see both members`)
  await b.presence.waitUntil(both, 5000, `${b.client.label} to see both members`)
  const keyA = keysWith(a.channel.presenceState(), 'name', payloadA.name)[0]
  const keyB = keysWith(a.channel.presenceState(), 'name', payloadB.name)[0]
  return { keyA, keyB }
}

test('two clients see sync and join events and both keys in presenceState', async () => {
  const topic = uniqueTopic('presence-pair')
  const a = await presenceMember(topic, { label: 'pair-a' })
  const b = await presenceMember(topic, { label: 'pair-b' })
  const { keyA, keyB } = await trackBoth(a, b, { name: 'A' }, { name: 'B' })

  // Without a configured key the server generates one per join (a UUID string, §4.1).
  assert.notEqual(keyA, keyB)
  for (const key of [keyA, keyB]) {
    assert.match(key, /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/, `generated key ${key}`)
  }

  for (const member of [a, b]) {
    const state = member.channel.presenceState()
    const context = `${member.client.label}: ${JSON.stringify(state)}`
    assert.deepEqual(Object.keys(state).sort(), [keyA, keyB].sort(), context)
    assert.equal(state[keyA].length, 1, context)
    assert.equal(state[keyB].length, 1, context)
    assertPresence(state[keyA][0], { name: 'A' }, context)
    assertPresence(state[keyB][0], { name: 'B' }, context)

    const events = member.presence.events
    const described = `${member.client.label} events: ${describePresenceEvents(events)}`
    assert.ok(events.some((e) => e.event === 'sync'), `no sync event; ${described}`)
    for (const [key, name] of [[keyA, 'A'], [keyB, 'B']]) {
      const join = events.find((e) => e.event === 'join' && e.key === key)
      assert.ok(join, `no join event for ${name} (${key}); ${described}`)
      assert.equal(join.newPresences.length, 1, described)
      assertPresence(join.newPresences[0], { name }, described)
    }
    assert.equal(events.filter((e) => e.event === 'leave').length, 0, `unexpected leave; ${described}`)
  }

  // The presence_ref each side sees for a member is the same server-issued phx_ref.
  assert.equal(a.channel.presenceState()[keyB][0].presence_ref, b.channel.presenceState()[keyB][0].presence_ref)

  // Wire shapes (§4.2, §4.4, §1.9): presence_state is a channel push carrying the join ref;
  // presence_diff is a fan-out with null refs and always both `joins` and `leaves`.
  for (const member of [a, b]) {
    const frames = incomingTextFrames(member.client).map(normalizeMessage).filter((m) => m.topic === member.channel.topic)
    const states = frames.filter((m) => m.event === 'presence_state')
    assert.equal(states.length, 1, `expected one presence_state\n${dumpFrames(member.client)}`)
    assert.equal(states[0].join_ref, member.channel.joinPush.ref, dumpFrames(member.client))
    assert.equal(states[0].ref, null, dumpFrames(member.client))
    const diffs = frames.filter((m) => m.event === 'presence_diff')
    assert.ok(diffs.length >= 1, dumpFrames(member.client))
    for (const diff of diffs) {
      assert.equal(diff.join_ref, null, dumpFrames(member.client))
      assert.equal(diff.ref, null, dumpFrames(member.client))
      assert.deepEqual(Object.keys(diff.payload).sort(), ['joins', 'leaves'], dumpFrames(member.client))
      for (const entry of [...Object.values(diff.payload.joins), ...Object.values(diff.payload.leaves)]) {
        assert.ok(Array.isArray(entry.metas), dumpFrames(member.client))
        for (const meta of entry.metas) assert.equal(typeof meta.phx_ref, 'string', dumpFrames(member.client))
      }
    }
  }
})

test('a V1 (vsn 1.0.0) and a V2 client see each other', async () => {
  const topic = uniqueTopic('presence-mixed')
  const v1 = await presenceMember(topic, { label: 'mixed-v1', vsn: '1.0.0' })
  const v2 = await presenceMember(topic, { label: 'mixed-v2', vsn: '2.0.0' })
  const { keyA, keyB } = await trackBoth(v1, v2, { name: 'one' }, { name: 'two' })
  for (const member of [v1, v2]) {
    const state = member.channel.presenceState()
    assert.deepEqual(Object.keys(state).sort(), [keyA, keyB].sort())
    assertPresence(state[keyA][0], { name: 'one' }, member.client.label)
    assertPresence(state[keyB][0], { name: 'two' }, member.client.label)
  }
})

test('leave when the other member untracks', async () => {
  const topic = uniqueTopic('presence-untrack')
  const a = await presenceMember(topic, { label: 'untrack-a' })
  const b = await presenceMember(topic, { label: 'untrack-b' })
  const { keyA, keyB } = await trackBoth(a, b, { name: 'A' }, { name: 'B' })

  const status = await b.channel.untrack()
  assert.equal(status, 'ok', dumpFrames(b.client))
  await a.presence.waitUntil(
    (state, events) => !(keyB in state) && events.some((e) => e.event === 'leave' && e.key === keyB),
    LEAVE_WITHIN_MS,
    'a leave for the untracked member'
  )
  const leave = a.presence.events.find((e) => e.event === 'leave' && e.key === keyB)
  assert.equal(leave.leftPresences.length, 1)
  assertPresence(leave.leftPresences[0], { name: 'B' }, describePresenceEvents(a.presence.events))
  assert.deepEqual(leave.currentPresences, [])
  assert.deepEqual(Object.keys(a.channel.presenceState()), [keyA])
  // The untracking member's own view follows too, and its channel stays joined.
  await b.presence.waitUntil((state) => !(keyB in state) && keyA in state, LEAVE_WITHIN_MS, 'B to drop itself')
  assert.equal(b.channel.state, 'joined')
})

test("leave when the other member's channel unsubscribes", async () => {
  const topic = uniqueTopic('presence-unsub')
  const a = await presenceMember(topic, { label: 'unsub-a' })
  const b = await presenceMember(topic, { label: 'unsub-b' })
  const { keyA, keyB } = await trackBoth(a, b, { name: 'A' }, { name: 'B' })

  const started = Date.now()
  const status = await b.channel.unsubscribe()
  assert.equal(status, 'ok', dumpFrames(b.client))
  await a.presence.waitUntil(
    (state, events) => !(keyB in state) && events.some((e) => e.event === 'leave' && e.key === keyB),
    LEAVE_WITHIN_MS,
    'a leave after the other channel unsubscribed'
  )
  assert.ok(Date.now() - started < LEAVE_WITHIN_MS)
  const leave = a.presence.events.find((e) => e.event === 'leave' && e.key === keyB)
  assertPresence(leave.leftPresences[0], { name: 'B' }, describePresenceEvents(a.presence.events))
  assert.deepEqual(Object.keys(a.channel.presenceState()), [keyA])
})

test("leave when the other member's socket closes (client.disconnect())", async () => {
  const topic = uniqueTopic('presence-disconnect')
  const a = await presenceMember(topic, { label: 'disconnect-a' })
  const b = await presenceMember(topic, { label: 'disconnect-b' })
  const { keyA, keyB } = await trackBoth(a, b, { name: 'A' }, { name: 'B' })

  const started = Date.now()
  const status = await disconnectUnreffed(b.client)
  assert.equal(status, 'ok')
  assert.equal(b.client.isConnected(), false)
  await a.presence.waitUntil(
    (state, events) => !(keyB in state) && events.some((e) => e.event === 'leave' && e.key === keyB),
    LEAVE_WITHIN_MS,
    'a leave after the other socket closed'
  )
  const elapsed = Date.now() - started
  assert.ok(elapsed < LEAVE_WITHIN_MS, `leave took ${elapsed} ms`)
  const leave = a.presence.events.find((e) => e.event === 'leave' && e.key === keyB)
  assertPresence(leave.leftPresences[0], { name: 'B' }, describePresenceEvents(a.presence.events))
  assert.deepEqual(Object.keys(a.channel.presenceState()), [keyA])
})

test('re-tracking with a different payload replaces the meta', async () => {
  const topic = uniqueTopic('presence-retrack')
  const a = await presenceMember(topic, { label: 'retrack-a', key: 'retracker' })
  const b = await presenceMember(topic, { label: 'retrack-b' })

  await trackOk(a, { name: 'A', status: 'online' })
  await b.presence.waitUntil((state) => state.retracker?.[0]?.status === 'online', 5000, "B to see A's first payload")
  const firstRef = b.channel.presenceState().retracker[0].presence_ref

  await trackOk(a, { name: 'A', status: 'away' })
  const onlyAway = (state) =>
    state.retracker?.length === 1 && state.retracker[0].status === 'away'
  await b.presence.waitUntil(onlyAway, 5000, "B to see only A's new payload")
  await a.presence.waitUntil(onlyAway, 5000, 'A to see only its new payload')
  // Give any late (coalesced or cross-shard) diff time to arrive, then look again.
  await sleep(300)
  for (const member of [a, b]) {
    const state = member.channel.presenceState()
    const context = `${member.client.label}: ${JSON.stringify(state)} events ${describePresenceEvents(member.presence.events)}`
    assert.deepEqual(Object.keys(state), ['retracker'], context)
    assert.equal(state.retracker.length, 1, context)
    assertPresence(state.retracker[0], { name: 'A', status: 'away' }, context)
    assert.notEqual(state.retracker[0].presence_ref, firstRef, `the new meta has a fresh ref; ${context}`)
  }
  // On the wire (§4.3): the new meta is announced in `joins` with phx_ref_prev = the old ref,
  // and the old meta goes away in `leaves` (possibly in the same diff).
  const diffs = incomingTextFrames(b.client)
    .map(normalizeMessage)
    .filter((m) => m.topic === b.channel.topic && m.event === 'presence_diff')
  const replacing = diffs.find((d) => d.payload.joins.retracker?.metas?.some((m) => m.status === 'away'))
  assert.ok(replacing, dumpFrames(b.client))
  assert.equal(replacing.payload.joins.retracker.metas.find((m) => m.status === 'away').phx_ref_prev, firstRef, dumpFrames(b.client))
  assert.ok(
    diffs.some((d) => d.payload.leaves.retracker?.metas?.some((m) => m.phx_ref === firstRef)),
    `no leave of the old meta ${firstRef}\n${dumpFrames(b.client)}`
  )
  // An identical re-track changes nothing (§4.3): still one meta with the same ref.
  const refBefore = b.channel.presenceState().retracker[0].presence_ref
  const eventsBefore = b.presence.events.length
  await trackOk(a, { status: 'away', name: 'A' })
  await sleep(300)
  assert.deepEqual(b.channel.presenceState().retracker.map((p) => p.presence_ref), [refBefore])
  assert.equal(b.presence.events.length, eventsBefore, describePresenceEvents(b.presence.events.slice(eventsBefore)))
})

test("config.presence.key 'user-1' is the presence key", async () => {
  const topic = uniqueTopic('presence-key')
  const keyed = await presenceMember(topic, { label: 'key-user-1', key: 'user-1' })
  const observer = await presenceMember(topic, { label: 'key-observer' })
  // The join frame carries the key as configured.
  const join = keyed.client.frames
    .filter((f) => f.dir === 'out' && !f.binary)
    .map((f) => normalizeMessage(JSON.parse(f.text)))
    .find((m) => m.event === 'phx_join')
  assert.deepEqual(join.payload.config.presence, { key: 'user-1', enabled: true })

  await trackOk(keyed, { name: 'Ann' })
  for (const member of [observer, keyed]) {
    await member.presence.waitUntil((state) => 'user-1' in state, 5000, `${member.client.label} to see key user-1`)
    const state = member.channel.presenceState()
    assert.deepEqual(Object.keys(state), ['user-1'], JSON.stringify(state))
    assert.equal(state['user-1'].length, 1)
    assertPresence(state['user-1'][0], { name: 'Ann' }, JSON.stringify(state))
    const join = member.presence.events.find((e) => e.event === 'join' && e.key === 'user-1')
    assert.ok(join, describePresenceEvents(member.presence.events))
  }
})

test('two channels with the same key give two metas under one key', async () => {
  const topic = uniqueTopic('presence-same-key')
  const tab1 = await presenceMember(topic, { label: 'tab-1', key: 'same-user' })
  const tab2 = await presenceMember(topic, { label: 'tab-2', key: 'same-user' })
  const observer = await presenceMember(topic, { label: 'tabs-observer' })
  await trackOk(tab1, { tab: 1 })
  await trackOk(tab2, { tab: 2 })

  const twoMetas = (state) => state['same-user']?.length === 2
  for (const member of [observer, tab1, tab2]) {
    await member.presence.waitUntil(twoMetas, 5000, `${member.client.label} to see two metas under same-user`)
    const state = member.channel.presenceState()
    const context = `${member.client.label}: ${JSON.stringify(state)}`
    assert.deepEqual(Object.keys(state), ['same-user'], context)
    const metas = state['same-user']
    assert.deepEqual(metas.map((m) => m.tab).sort(), [1, 2], context)
    assert.notEqual(metas[0].presence_ref, metas[1].presence_ref, context)
    for (const meta of metas) assertPresence(meta, { tab: meta.tab }, context)
  }

  // One tab leaves: the key stays with the other meta (leave event with one current presence).
  await disconnectUnreffed(tab1.client)
  await observer.presence.waitUntil(
    (state) => state['same-user']?.length === 1 && state['same-user'][0].tab === 2,
    LEAVE_WITHIN_MS,
    'the observer to keep only tab 2'
  )
  const leave = observer.presence.events.find((e) => e.event === 'leave' && e.key === 'same-user')
  assert.ok(leave, describePresenceEvents(observer.presence.events))
  assert.deepEqual(leave.leftPresences.map((p) => p.tab), [1])
  assert.deepEqual(leave.currentPresences.map((p) => p.tab), [2])
})
