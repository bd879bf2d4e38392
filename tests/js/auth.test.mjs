// Token failures as realtime-js experiences them.
import { test, afterEach } from 'node:test'
import assert from 'node:assert/strict'
import WebSocket from 'ws'

import {
  env,
  createClient,
  closeAllClients,
  subscribeRecording,
  waitForStatus,
  uniqueTopic,
  sleep,
  withTimeout,
  dumpFrames,
} from './helpers.mjs'

afterEach(async () => {
  await closeAllClients()
})

/**
 * Opens a bare `ws` connection to the upgrade URL realtime-js would use and
 * reports how the server answered: {opened: true} or {status, body}.
 */
function rawUpgrade(apikey, vsn = '2.0.0') {
  const url = `${env.endpoint}/websocket?apikey=${encodeURIComponent(apikey)}&vsn=${vsn}`
  return withTimeout(
    new Promise((resolve, reject) => {
      const ws = new WebSocket(url)
      ws.on('open', () => {
        ws.close()
        resolve({ opened: true })
      })
      ws.on('unexpected-response', (req, res) => {
        const chunks = []
        res.on('data', (c) => chunks.push(c))
        res.on('end', () => {
          resolve({
            status: res.statusCode,
            contentType: res.headers['content-type'],
            body: Buffer.concat(chunks).toString('utf8'),
          })
          req.destroy()
        })
        res.on('error', reject)
      })
      ws.on('error', (err) => reject(err))
    }),
    5000,
    'the upgrade response'
  )
}

test('a token with a bad signature cannot connect: realtime-js never subscribes and reports the error', async () => {
  const client = createClient({ label: 'bad-token', apikey: env.badToken })
  const channel = client.channel(uniqueTopic('bad'))
  subscribeRecording(channel)
  await sleep(3000)
  const statuses = channel.statusLog.map((e) => e.status)
  assert.ok(!statuses.includes('SUBSCRIBED'), `channel subscribed with a bad token: ${JSON.stringify(statuses)}`)
  assert.notEqual(channel.state, 'joined')
  assert.equal(client.isConnected(), false)
  const problems = client.socketEvents.filter((e) => e.type === 'error' || e.type === 'close')
  assert.ok(problems.length > 0, `no socket error/close was reported: ${JSON.stringify(client.socketEvents)}`)
  assert.equal(client.socketEvents.filter((e) => e.type === 'open').length, 0, 'the socket opened')
  // ws reports a refused upgrade as "Unexpected server response: <status>".
  const errors = client.socketEvents.filter((e) => e.type === 'error').map((e) => e.message)
  assert.ok(
    errors.some((m) => /\b401\b/.test(m)),
    `expected the transport error to name HTTP 401, saw ${JSON.stringify(errors)}`
  )
  assert.ok(statuses.includes('CHANNEL_ERROR'), `channel did not report CHANNEL_ERROR: ${JSON.stringify(statuses)}`)
  // No server frames ever arrived.
  assert.deepEqual(client.frames.filter((f) => f.dir === 'in'), [], dumpFrames(client))
})

test('the upgrade with a bad-signature token is answered HTTP 401 (PROTOCOL.md §1.4 row 8)', async () => {
  const answer = await rawUpgrade(env.badToken)
  assert.equal(answer.opened, undefined, 'the server accepted the WebSocket upgrade')
  assert.equal(answer.status, 401)
  assert.match(answer.contentType ?? '', /^application\/json/)
  assert.deepEqual(JSON.parse(answer.body), { error: 'Failed to validate JWT signature' })
})

test('the upgrade with an expired token is answered HTTP 401 (PROTOCOL.md §1.4 row 9)', async () => {
  const answer = await rawUpgrade(env.expiredToken)
  assert.equal(answer.status, 401)
  assert.deepEqual(JSON.parse(answer.body), { error: 'Token has expired' })
})

test('the upgrade with the anon key succeeds (control for the two checks above)', async () => {
  const answer = await rawUpgrade(env.anonKey)
  assert.deepEqual(answer, { opened: true })
})

test('an expired access token in the join yields CHANNEL_ERROR "InvalidJWTToken: Token has expired ..."', async () => {
  const client = createClient({ label: 'expired-join' })
  await client.setAuth(env.expiredToken)
  const channel = client.channel(uniqueTopic('expired'))
  subscribeRecording(channel)
  const entry = await waitForStatus(channel, ['SUBSCRIBED', 'CHANNEL_ERROR', 'TIMED_OUT', 'CLOSED'], 8000).catch(
    (err) => {
      throw new Error(`${err.message}\n${dumpFrames(client)}`)
    }
  )
  assert.equal(entry.status, 'CHANNEL_ERROR', `got ${entry.status}\n${dumpFrames(client)}`)
  assert.ok(entry.err instanceof Error)
  assert.ok(
    entry.err.message.startsWith('InvalidJWTToken: Token has expired'),
    `unexpected error message: ${JSON.stringify(entry.err.message)}`
  )
  // PROTOCOL.md §2.5: "InvalidJWTToken: Token has expired <N> seconds ago", N = now - exp.
  const match = /^InvalidJWTToken: Token has expired (\d+) seconds ago$/.exec(entry.err.message)
  assert.ok(match, `message does not follow "Token has expired <N> seconds ago": ${entry.err.message}`)
  assert.ok(Number(match[1]) >= 29, `N=${match[1]} but the token expired at least 30 s ago`)
  // The join carried the expired token and the socket itself stayed up.
  const join = client.frames
    .filter((f) => f.dir === 'out' && !f.binary)
    .map((f) => JSON.parse(f.text))
    .find((m) => m[3] === 'phx_join')
  assert.equal(join[4].access_token, env.expiredToken)
  assert.equal(client.isConnected(), true)
  assert.ok(!channel.statusLog.some((e) => e.status === 'SUBSCRIBED'))
})
