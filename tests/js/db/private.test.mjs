// Private channels, REST broadcast, broadcasts from SQL, replay and the token
// lifecycle through the official realtime-js client (V2, its default), against
// a server attached to a real PostgreSQL (PROTOCOL.md §3.2–3.6, §6, §7.3–7.4, §8).
//
// Run by tests/realtime_js_private.rs, which starts a throwaway cluster and the
// server (DATABASE_URL, JWT_JWKS), then creates:
//   public.acl(user_id, topic, can_write)  read / write grants the policies use
//     acl_read   SELECT on realtime.messages for authenticated: a row for
//                (auth.uid(), realtime.topic())
//     acl_write  INSERT, the same row with can_write
//   public.room_members + the product docs' only_room_members policy, verbatim
//     (users A and C are members of room-42, B of room-7)
//   public.todos + the todos_notify trigger of PROTOCOL.md §7.4
// Tokens are signed here (HS256 with POWA_JWT_SECRET) so that short-lived ones
// are fresh when a test starts; RS256 tokens come from the Rust side.
//
// Each test uses its own topics (the server caches policy results per claims
// and topic for 30 s). To assert that something did NOT arrive, a test waits
// for a later "end" message on the same path, then a little longer.
import { test, afterEach } from 'node:test'
import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { promisify } from 'node:util'
import { createHmac } from 'node:crypto'

import {
  env,
  requireEnv,
  createClient,
  closeAllClients,
  subscribeRecording,
  subscribeOk,
  waitForStatus,
  collectBroadcasts,
  sleep,
  dumpFrames,
  uniqueTopic,
  incomingTextFrames,
} from '../helpers.mjs'

const execFileP = promisify(execFile)

const pg = { url: requireEnv('POWA_PG_URL'), psql: process.env.POWA_PSQL || 'psql' }
const secret = requireEnv('POWA_JWT_SECRET')
const user = {
  a: requireEnv('POWA_USER_A_ID'),
  b: requireEnv('POWA_USER_B_ID'),
  c: requireEnv('POWA_USER_C_ID'),
  d: requireEnv('POWA_USER_D_ID'),
}
const rs256TokenA = requireEnv('POWA_RS256_TOKEN')
const unknownKid = requireEnv('POWA_UNKNOWN_KID')
const unknownKidToken = requireEnv('POWA_UNKNOWN_KID_TOKEN')
const restBase = env.endpoint.replace(/^ws/i, 'http') // http://host:port/realtime/v1

const ARRIVE_MS = 5000
const SETTLE_MS = 500
const FINAL = ['SUBSCRIBED', 'CHANNEL_ERROR', 'TIMED_OUT', 'CLOSED']

afterEach(async () => {
  await closeAllClients()
})

// ---------------------------------------------------------------------------
// Tokens, SQL, clients
// ---------------------------------------------------------------------------

function signToken(claims) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString('base64url')
  const unsigned = `${part({ alg: 'HS256', typ: 'JWT' })}.${part(claims)}`
  const signature = createHmac('sha256', secret).update(unsigned).digest('base64url')
  return `${unsigned}.${signature}`
}

/** A signed-in user's access token valid for `lifetime` seconds. */
function userToken(id, lifetime = 3600) {
  const now = Math.floor(Date.now() / 1000)
  return signToken({ role: 'authenticated', sub: id, iat: now, exp: now + lifetime })
}

function unauthorized(sub) {
  return `Unauthorized: You do not have permissions to read from this Channel topic: ${sub}`
}

/** Runs SQL as the superuser (session in UTC); returns psql's -At output. */
async function sql(text) {
  const { PGTZ, PGOPTIONS, PGSERVICE, ...rest } = process.env
  try {
    const { stdout } = await execFileP(pg.psql, ['-X', '-q', '-v', 'ON_ERROR_STOP=1', '-At', '-d', pg.url, '-c', text], {
      env: { ...rest, PGTZ: 'UTC' },
      timeout: 20000,
    })
    return stdout.trim()
  } catch (err) {
    throw new Error(`SQL failed: ${text}\n${err.stderr ?? err.message}`)
  }
}

function quote(text) {
  return `'${String(text).replace(/'/g, "''")}'`
}

/** Lets `id` read `topic` (and send on it when `write`). */
async function grant(id, topic, write = false) {
  await sql(`INSERT INTO public.acl VALUES (${quote(id)}, ${quote(topic)}, ${write})`)
}

/** A client as supabase-js makes one: the anon key as apikey, the user's token via setAuth. */
async function userClient(label, token, options = {}) {
  const client = createClient({ label, ...options })
  if (token) await client.setAuth(token)
  return client
}

function privateChannel(client, topic, config = {}) {
  return client.channel(topic, { config: { ...config, private: true } })
}

/** Subscribes and returns the final status entry (SUBSCRIBED or an error). */
async function subscribeResult(channel) {
  subscribeRecording(channel)
  return waitForStatus(channel, FINAL, 8000)
}

/** Collects every broadcast; `until(event)` waits for one with that event, then settles. */
function collectAll(channel) {
  const collector = collectBroadcasts(channel, '*')
  collector.events = () => collector.messages.map((m) => m.event)
  collector.until = async (event, ms = ARRIVE_MS) => {
    const deadline = Date.now() + ms
    while (!collector.messages.some((m) => m.event === event)) {
      if (Date.now() > deadline) {
        throw new Error(`no '${event}' broadcast on ${channel.topic} within ${ms} ms; got ${JSON.stringify(collector.events())}`)
      }
      await sleep(20)
    }
    await sleep(SETTLE_MS)
    return collector.messages
  }
  return collector
}

/** POSTs a REST batch with `key` as apikey and bearer; returns {status, body}. */
async function restBatch(key, messages) {
  const headers = { 'Content-Type': 'application/json' }
  if (key) {
    headers.apikey = key
    headers.Authorization = `Bearer ${key}`
  }
  const response = await fetch(`${restBase}/api/broadcast`, { method: 'POST', headers, body: JSON.stringify({ messages }) })
  return { status: response.status, body: await response.text() }
}

async function restEnd(sub, isPrivate) {
  const answer = await restBatch(env.serviceKey, [{ topic: sub, event: 'end', payload: {}, private: isPrivate }])
  assert.equal(answer.status, 202, `REST sentinel: ${answer.body}`)
}

// ---------------------------------------------------------------------------
// Joins and sends
// ---------------------------------------------------------------------------

test('a private join is refused without a policy (anon and signed in) and allowed with one', async () => {
  const locked = uniqueTopic('locked')
  const anon = createClient({ label: 'anon' })
  let entry = await subscribeResult(privateChannel(anon, locked))
  assert.equal(entry.status, 'CHANNEL_ERROR', dumpFrames(anon))
  assert.equal(entry.err?.message, unauthorized(locked))

  const clientA = await userClient('user-a', userToken(user.a))
  entry = await subscribeResult(privateChannel(clientA, locked))
  assert.equal(entry.status, 'CHANNEL_ERROR', dumpFrames(clientA))
  assert.equal(entry.err?.message, unauthorized(locked))

  // The join frame realtime-js sent carried private: true and the user's token.
  const join = clientA.frames
    .filter((f) => f.dir === 'out' && !f.binary)
    .map((f) => JSON.parse(f.text))
    .find((m) => m[3] === 'phx_join')
  assert.equal(join[4].config.private, true)
  assert.equal(typeof join[4].access_token, 'string')

  const open = uniqueTopic('open')
  await grant(user.a, open)
  await subscribeOk(privateChannel(clientA, open), 8000)
  const anon2 = createClient({ label: 'anon-2' })
  entry = await subscribeResult(privateChannel(anon2, open))
  assert.equal(entry.status, 'CHANNEL_ERROR')
  assert.equal(entry.err?.message, unauthorized(open))
  const clientB = await userClient('user-b', userToken(user.b))
  entry = await subscribeResult(privateChannel(clientB, open))
  assert.equal(entry.err?.message, unauthorized(open))
})

test('broadcast send on a private channel needs an INSERT policy', async () => {
  const topic = uniqueTopic('talk')
  await grant(user.a, topic) // read only
  await grant(user.b, topic, true) // read and write
  await grant(user.c, topic) // read only: the observer
  const a = await userClient('reader-a', userToken(user.a))
  const b = await userClient('writer-b', userToken(user.b))
  const c = await userClient('observer-c', userToken(user.c))
  const chA = privateChannel(a, topic, { broadcast: { ack: true } })
  const chB = privateChannel(b, topic, { broadcast: { ack: true } })
  const chC = privateChannel(c, topic)
  const atA = collectAll(chA)
  const atB = collectAll(chB)
  const atC = collectAll(chC)
  await Promise.all([subscribeOk(chA, 8000), subscribeOk(chB, 8000), subscribeOk(chC, 8000)])

  // Without INSERT: no reply at all, so the push times out (2 s here instead of 10 s).
  const denied = await chA.send({ type: 'broadcast', event: 'from-a', payload: { n: 1 } }, { timeout: 2000 })
  assert.equal(denied, 'timed out', dumpFrames(a))
  // With INSERT: ok, and the members receive it.
  const granted = await chB.send({ type: 'broadcast', event: 'from-b', payload: { n: 2 } })
  assert.equal(granted, 'ok', dumpFrames(b))
  await atA.until('from-b')
  await atC.until('from-b')
  assert.deepEqual(atA.messages, [{ type: 'broadcast', event: 'from-b', payload: { n: 2 } }])
  assert.deepEqual(atC.events(), ['from-b'], 'the observer got only the permitted message')
  assert.deepEqual(atB.events(), [], 'self: false, and nothing of A')
})

test("the product docs' only_room_members policy works as written", async () => {
  const member = await userClient('member-a', userToken(user.a))
  await subscribeOk(privateChannel(member, 'chat:room-42'), 8000)
  const otherRoom = await userClient('member-of-room-7', userToken(user.b))
  const entry = await subscribeResult(privateChannel(otherRoom, 'chat:room-42'))
  assert.equal(entry.status, 'CHANNEL_ERROR')
  assert.equal(entry.err?.message, unauthorized('chat:room-42'))
  const anon = createClient({ label: 'anon' })
  const anonEntry = await subscribeResult(privateChannel(anon, 'chat:room-42'))
  assert.equal(anonEntry.err?.message, unauthorized('chat:room-42'))
  // B may join its own room.
  await subscribeOk(privateChannel(otherRoom, 'chat:room-7'), 8000)
})

// ---------------------------------------------------------------------------
// REST
// ---------------------------------------------------------------------------

test('REST with the service key reaches public and private topics', async () => {
  const topic = uniqueTopic('svc')
  await grant(user.a, topic)
  const member = await userClient('member', userToken(user.a))
  const memberCh = privateChannel(member, topic)
  const atMember = collectAll(memberCh)
  const twin = createClient({ label: 'public-twin' })
  const twinCh = twin.channel(topic)
  const atTwin = collectAll(twinCh)
  await Promise.all([subscribeOk(memberCh, 8000), subscribeOk(twinCh)])

  const service = createClient({ label: 'service', apikey: env.serviceKey })
  const svcPrivate = privateChannel(service, topic) // never subscribed: send() goes through REST
  assert.equal(await svcPrivate.send({ type: 'broadcast', event: 'svc-batch', payload: { x: 1 } }), 'ok')
  assert.deepEqual(await svcPrivate.httpSend('svc-single', { x: 2 }), { success: true })
  // realtime-js returns the existing channel for a topic it already has: a second client.
  const service2 = createClient({ label: 'service-public', apikey: env.serviceKey })
  const svcPublic = service2.channel(topic)
  assert.equal(await svcPublic.send({ type: 'broadcast', event: 'svc-public', payload: { x: 3 } }), 'ok')
  assert.deepEqual(await svcPublic.httpSend('svc-public-single', { x: 4 }), { success: true })
  await restEnd(topic, true)
  await restEnd(topic, false)

  await atMember.until('end')
  assert.deepEqual(
    atMember.messages.filter((m) => m.event !== 'end'),
    [
      { type: 'broadcast', event: 'svc-batch', payload: { x: 1 } },
      { type: 'broadcast', event: 'svc-single', payload: { x: 2 } },
    ],
    dumpFrames(member)
  )
  await atTwin.until('end')
  assert.deepEqual(atTwin.events().filter((e) => e !== 'end'), ['svc-public', 'svc-public-single'], dumpFrames(twin))
  for (const client of [service, service2]) {
    assert.equal(client.frames.filter((f) => f.dir === 'out').length, 0, `${client.label} never used a socket`)
  }
})

test('REST with the anon key to a private topic is refused and delivers nothing', async () => {
  const topic = uniqueTopic('guarded')
  await grant(user.a, topic)
  await grant(user.b, topic) // may read, not write
  const member = await userClient('member', userToken(user.a))
  const memberCh = privateChannel(member, topic)
  const atMember = collectAll(memberCh)
  await subscribeOk(memberCh, 8000)

  const anon = createClient({ label: 'anon' })
  const anonPrivate = privateChannel(anon, topic)
  // Batch endpoint (send() fallback): accepted, silently dropped (PROTOCOL.md §8.2).
  assert.equal(await anonPrivate.send({ type: 'broadcast', event: 'anon-batch', payload: {} }), 'ok')
  // Single endpoint (httpSend): 403 {"message":"Unauthorized"}.
  await assert.rejects(anonPrivate.httpSend('anon-single', {}), { message: 'Unauthorized' })
  // A signed-in reader without INSERT: the same.
  const reader = await userClient('reader', userToken(user.b))
  const readerPrivate = privateChannel(reader, topic)
  assert.equal(await readerPrivate.send({ type: 'broadcast', event: 'reader-batch', payload: {} }), 'ok')
  await assert.rejects(readerPrivate.httpSend('reader-single', {}), { message: 'Unauthorized' })

  await restEnd(topic, true)
  await atMember.until('end')
  assert.deepEqual(atMember.events(), ['end'], dumpFrames(member))
})

test('REST without a key, or with a foreign one, is 401 {"message":"Unauthorized"}', async () => {
  const topic = uniqueTopic('nokey')
  const listener = createClient({ label: 'listener' })
  const ch = listener.channel(topic)
  const got = collectAll(ch)
  await subscribeOk(ch)

  const bare = await restBatch(null, [{ topic, event: 'no-key', payload: {} }])
  assert.deepEqual(bare, { status: 401, body: '{"message":"Unauthorized"}' })
  const single = await fetch(`${restBase}/api/broadcast/${encodeURIComponent(topic)}/events/no-key`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: '{}',
  })
  assert.equal(single.status, 401)
  assert.deepEqual(await single.json(), { message: 'Unauthorized' })
  // realtime-js refuses to be built without a key; with a key signed by someone else (here a
  // service_role claim under another secret) send() resolves 'error' and httpSend() rejects.
  const now = Math.floor(Date.now() / 1000)
  const part = (value) => Buffer.from(JSON.stringify(value)).toString('base64url')
  const unsigned = `${part({ alg: 'HS256', typ: 'JWT' })}.${part({ role: 'service_role', iat: now, exp: now + 3600 })}`
  const foreign = `${unsigned}.${createHmac('sha256', 'another-secret-entirely-0123456789').update(unsigned).digest('base64url')}`
  const impostor = createClient({ label: 'impostor', apikey: foreign })
  const impostorCh = impostor.channel(topic)
  assert.equal(await impostorCh.send({ type: 'broadcast', event: 'no-key', payload: {} }), 'error')
  await assert.rejects(impostorCh.httpSend('no-key', {}), { message: 'Unauthorized' })

  await restEnd(topic, false)
  await got.until('end')
  assert.deepEqual(got.events(), ['end'])
})

test('send() on a channel that is not joined falls back to REST and a joined member receives it', async () => {
  const topic = uniqueTopic('fallback')
  await grant(user.a, topic)
  await grant(user.c, topic, true)
  const member = await userClient('member', userToken(user.a))
  const memberCh = privateChannel(member, topic)
  const atMember = collectAll(memberCh)
  const publicListener = createClient({ label: 'public-listener' })
  const publicCh = publicListener.channel(topic)
  const atPublic = collectAll(publicCh)
  await Promise.all([subscribeOk(memberCh, 8000), subscribeOk(publicCh)])

  // A signed-in writer (apikey = anon key, its token via setAuth): private, through REST.
  const writer = await userClient('writer', userToken(user.c))
  const writerCh = privateChannel(writer, topic)
  assert.equal(await writerCh.send({ type: 'broadcast', event: 'via-rest', payload: { hello: 'members' } }), 'ok')
  // The anon key on the public channel of the same name.
  const anon = createClient({ label: 'anon-sender' })
  assert.equal(await anon.channel(topic).send({ type: 'broadcast', event: 'via-rest-public', payload: { hello: 'all' } }), 'ok')

  await atMember.until('via-rest')
  assert.deepEqual(atMember.messages, [{ type: 'broadcast', event: 'via-rest', payload: { hello: 'members' } }])
  await atPublic.until('via-rest-public')
  assert.deepEqual(atPublic.events(), ['via-rest-public'], 'the private message stayed private')
  for (const client of [writer, anon]) {
    assert.equal(client.frames.filter((f) => f.dir === 'out').length, 0, `${client.label} sent nothing over a socket`)
  }
})

// ---------------------------------------------------------------------------
// Broadcasts from SQL
// ---------------------------------------------------------------------------

test('realtime.send() reaches public and private subscribers; a rolled-back one never arrives', async () => {
  const topic = uniqueTopic('sql')
  await grant(user.a, topic)
  const member = await userClient('member', userToken(user.a))
  const memberCh = privateChannel(member, topic)
  const atMember = collectAll(memberCh)
  const anon = createClient({ label: 'public' })
  const publicCh = anon.channel(topic)
  const atPublic = collectAll(publicCh)
  await Promise.all([subscribeOk(memberCh, 8000), subscribeOk(publicCh)])

  await sql(`SELECT realtime.send('{"n":1}', 'sql-public', ${quote(topic)}, false)`)
  await sql(`SELECT realtime.send('{"n":2}', 'sql-private', ${quote(topic)}, true)`)
  await sql(`BEGIN; SELECT realtime.send('{"n":3}', 'rolled-back', ${quote(topic)}, false);
             SELECT realtime.send('{"n":4}', 'rolled-back', ${quote(topic)}, true); ROLLBACK;`)
  await sql(`SELECT realtime.send('{}', 'end', ${quote(topic)}, false); SELECT realtime.send('{}', 'end', ${quote(topic)}, true);`)
  const ids = Object.fromEntries(
    (await sql(`SELECT event || '/' || private, id FROM realtime.messages WHERE topic = ${quote(topic)}`))
      .split('\n')
      .map((line) => line.split('|'))
  )

  await atPublic.until('end', 10000)
  await atMember.until('end', 10000)
  assert.deepEqual(atPublic.events(), ['sql-public', 'end'], dumpFrames(anon))
  assert.deepEqual(atMember.events(), ['sql-private', 'end'], dumpFrames(member))
  const id1 = ids['sql-public/false']
  const id2 = ids['sql-private/true']
  assert.deepEqual(atPublic.messages[0], { type: 'broadcast', event: 'sql-public', payload: { n: 1, id: id1 }, meta: { id: id1 } })
  assert.deepEqual(atMember.messages[0], { type: 'broadcast', event: 'sql-private', payload: { n: 2, id: id2 }, meta: { id: id2 } })
})

test('a broadcast_changes trigger reaches the private subscriber and not the public channel of the same name', async () => {
  const topic = `todos:${user.a}`
  await grant(user.a, topic)
  const owner = await userClient('owner', userToken(user.a))
  const ownerCh = privateChannel(owner, topic)
  const atOwner = collectAll(ownerCh)
  const anon = createClient({ label: 'public' })
  const publicCh = anon.channel(topic)
  const atPublic = collectAll(publicCh)
  await Promise.all([subscribeOk(ownerCh, 8000), subscribeOk(publicCh)])

  await sql(`INSERT INTO public.todos (id, title, owner_id) VALUES (7, 'from a trigger', ${quote(user.a)})`)
  const record = JSON.parse(await sql('SELECT to_jsonb(t) FROM public.todos t WHERE id = 7'))
  const id = await sql(`SELECT id FROM realtime.messages WHERE topic = ${quote(topic)} AND event = 'INSERT'`)
  await sql(`SELECT realtime.send('{}', 'end', ${quote(topic)}, false); SELECT realtime.send('{}', 'end', ${quote(topic)}, true);`)

  await atOwner.until('end', 10000)
  assert.deepEqual(atOwner.messages[0], {
    type: 'broadcast',
    event: 'INSERT',
    payload: { id, operation: 'INSERT', table: 'todos', schema: 'public', record, old_record: null },
    meta: { id },
  })
  assert.deepEqual(atOwner.events(), ['INSERT', 'end'])
  await atPublic.until('end', 10000)
  assert.deepEqual(atPublic.events(), ['end'], 'the public channel got the private change')
})

// ---------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------

test('setAuth with a fresh token keeps the private channel', async () => {
  const topic = uniqueTopic('refresh')
  await grant(user.a, topic, true)
  await grant(user.b, topic)
  const client = await userClient('user-a', userToken(user.a))
  const ch = privateChannel(client, topic, { broadcast: { ack: true } })
  await subscribeOk(ch, 8000)
  const peer = await userClient('peer', userToken(user.b))
  const peerCh = privateChannel(peer, topic)
  const atPeer = collectAll(peerCh)
  const atClient = collectAll(ch)
  await subscribeOk(peerCh, 8000)

  const fresh = userToken(user.a, 7200)
  await client.setAuth(fresh)
  await sleep(1000)
  const pushed = client.frames
    .filter((f) => f.dir === 'out' && !f.binary)
    .map((f) => JSON.parse(f.text))
    .filter((m) => m[3] === 'access_token')
  assert.equal(pushed.length, 1, dumpFrames(client))
  assert.deepEqual(pushed[0][4], { access_token: fresh })
  assert.equal(ch.state, 'joined')
  assert.deepEqual(ch.statusLog.map((e) => e.status), ['SUBSCRIBED'])
  // Still receives and may still send (write re-checked with the new claims).
  await restEnd(topic, true)
  await atClient.until('end')
  assert.equal(await ch.send({ type: 'broadcast', event: 'after-refresh', payload: {} }), 'ok', dumpFrames(client))
  await atPeer.until('after-refresh')
})

test('a token that expires without refresh closes the channel, not the socket', async () => {
  const topic = uniqueTopic('expiring')
  await grant(user.a, topic)
  const client = await userClient('short-lived', userToken(user.a, 3))
  const ch = privateChannel(client, topic)
  const system = []
  ch.on('system', {}, (payload) => system.push({ at: Date.now(), payload }))
  await subscribeOk(ch, 8000)
  await waitForStatus(ch, ['CLOSED'], 9000)
  const errors = system.filter((s) => s.payload.status === 'error')
  assert.equal(errors.length, 1, JSON.stringify(system))
  const { message, ...rest } = errors[0].payload
  assert.match(message, /^Token has expired \d+ seconds ago$/)
  assert.deepEqual(rest, { extension: 'system', status: 'error', channel: topic })
  assert.equal(client.isConnected(), true, 'the socket stays open')
  assert.equal(client.socketEvents.filter((e) => e.type === 'close').length, 0, dumpFrames(client))
  // The frames: system, then phx_close with the join ref.
  const frames = incomingTextFrames(client).filter((m) => Array.isArray(m) && m[2] === `realtime:${topic}`)
  const closeAt = frames.findIndex((m) => m[3] === 'phx_close')
  assert.ok(closeAt > 0 && frames[closeAt - 1][3] === 'system', dumpFrames(client))
})

test('an RS256 token verified through the JWKS is accepted; an unknown kid is refused', async () => {
  const topic = uniqueTopic('jwks')
  await grant(user.a, topic)
  // As the channel token (setAuth) beside the HS256 anon key...
  const viaSetAuth = await userClient('rs256-setauth', rs256TokenA)
  const ch = privateChannel(viaSetAuth, topic)
  const got = collectAll(ch)
  await subscribeOk(ch, 8000)
  // ...and as the connection token.
  const viaApikey = createClient({ label: 'rs256-apikey', apikey: rs256TokenA })
  await subscribeOk(privateChannel(viaApikey, topic), 8000)
  await restEnd(topic, true)
  await got.until('end')

  const refused = await userClient('unknown-kid', unknownKidToken)
  const entry = await subscribeResult(privateChannel(refused, topic))
  assert.equal(entry.status, 'CHANNEL_ERROR')
  assert.equal(
    entry.err?.message,
    `JwtSignerError: Failed to generate JWT signer for key ID (kid) "${unknownKid}", check your JWT secret or JWKS configuration`
  )
})

// ---------------------------------------------------------------------------
// Replay
// ---------------------------------------------------------------------------

test('replay on a private channel pushes the newest stored messages, oldest first, marked replayed', async () => {
  const topic = uniqueTopic('replay')
  await grant(user.a, topic)
  await sql(`SELECT realtime.send('{"n":0}', 'stored', ${quote(topic)}, true)`)
  await sleep(20)
  const since = Number(await sql('SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint'))
  await sleep(20)
  for (const n of [1, 2, 3]) {
    await sql(`SELECT realtime.send('{"n":${n}}', 'stored', ${quote(topic)}, true)`)
  }
  const rows = (await sql(`SELECT id FROM realtime.messages WHERE topic = ${quote(topic)} ORDER BY inserted_at`)).split('\n')
  assert.equal(rows.length, 4)

  const client = await userClient('replayer', userToken(user.a))
  const ch = privateChannel(client, topic, { broadcast: { replay: { since, limit: 2 } } })
  const got = collectAll(ch)
  await subscribeOk(ch, 8000)
  await got.waitFor(2, ARRIVE_MS)
  await sleep(SETTLE_MS)
  assert.deepEqual(got.messages, [
    { type: 'broadcast', event: 'stored', payload: { n: 2, id: rows[2] }, meta: { replayed: true, id: rows[2] } },
    { type: 'broadcast', event: 'stored', payload: { n: 3, id: rows[3] }, meta: { replayed: true, id: rows[3] } },
  ], dumpFrames(client))

  // realtime-js refuses replay on a public channel before anything is sent.
  assert.throws(() => client.channel(uniqueTopic('public-replay'), { config: { broadcast: { replay: { since, limit: 1 } } } }), /private channel/)
})
