// The official clients in a real browser: headless Chromium (the Debian package, driven over the
// DevTools protocol by puppeteer-core; no browser download) loads the pinned @supabase/supabase-js
// and @supabase/realtime-js, bundled here with esbuild, and uses the browser's own WebSocket.
// Then the server's own pages: the inspector (/inspector) and the status page (/status).
//
// Run by tests/browser.rs, which starts a throwaway PostgreSQL and the server and sets:
//   POWA_HTTP          http://127.0.0.1:PORT (what createClient() is given)
//   POWA_ANON_KEY, POWA_SERVICE_KEY, POWA_USER_A_TOKEN, POWA_USER_A_ID, POWA_USER_B_ID
//   POWA_PG_URL        for psql (public.todos with RLS; realtime.messages policies)
//   POWA_ARTIFACTS     where screenshots go
//   CHROMIUM           the browser binary
//   POWA_BINARY, POWA_JWT_SECRET  to run a server of its own for the restart test
// Every page is watched: a console error, an uncaught exception or a request to anything but
// the test's own loopback servers fails the run.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { createServer } from 'node:http'
import { execFile, spawn } from 'node:child_process'
import { promisify } from 'node:util'
import { mkdirSync } from 'node:fs'
import { join, dirname } from 'node:path'
import { fileURLToPath } from 'node:url'

import * as esbuild from 'esbuild'
import puppeteer from 'puppeteer-core'

const execFileP = promisify(execFile)
const here = dirname(fileURLToPath(import.meta.url))

function requireEnv(name) {
  const value = process.env[name]
  if (!value) throw new Error(`environment variable ${name} is not set; run through \`cargo test --test browser\``)
  return value
}

const env = {
  http: requireEnv('POWA_HTTP'),
  anon: requireEnv('POWA_ANON_KEY'),
  service: requireEnv('POWA_SERVICE_KEY'),
  userA: requireEnv('POWA_USER_A_TOKEN'),
  userAId: requireEnv('POWA_USER_A_ID'),
  userBId: requireEnv('POWA_USER_B_ID'),
  pg: requireEnv('POWA_PG_URL'),
  artifacts: requireEnv('POWA_ARTIFACTS'),
  chromium: requireEnv('CHROMIUM'),
  binary: requireEnv('POWA_BINARY'),
  secret: requireEnv('POWA_JWT_SECRET'),
}

const DESKTOP = { width: 1280, height: 800 }
const PHONE = { width: 390, height: 844, isMobile: true, hasTouch: true, deviceScaleFactor: 2 }
const WAIT_MS = 10000
// Poll on a timer: tabs in the background get no animation frames, the default polling.
const WAIT = { timeout: WAIT_MS, polling: 100 }

let browser
let pageServer
let pageOrigin
const problems = []
const pages = []

async function psql(sql) {
  await execFileP('psql', [env.pg, '-v', 'ON_ERROR_STOP=1', '-qAt', '-c', sql])
}

/** Serves the page that loads the bundled clients (another loopback origin than the server's). */
async function startPageServer() {
  const result = await esbuild.build({
    stdin: {
      contents: "export { createClient } from '@supabase/supabase-js'; export { RealtimeClient } from '@supabase/realtime-js';",
      resolveDir: join(here, '..'),
      loader: 'js',
    },
    bundle: true,
    format: 'esm',
    platform: 'browser',
    target: 'chrome120',
    write: false,
    logLevel: 'error',
  })
  const bundle = result.outputFiles[0].text
  const html = `<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,"><title>clients</title>
<script type="module">import * as lib from '/clients.js'; window.lib = lib; window.libReady = true;</script>`
  pageServer = createServer((request, response) => {
    if (request.url === '/clients.js') {
      response.writeHead(200, { 'content-type': 'text/javascript' })
      response.end(bundle)
    } else {
      response.writeHead(200, { 'content-type': 'text/html' })
      response.end(html)
    }
  })
  await new Promise((resolve) => pageServer.listen(0, '127.0.0.1', resolve))
  pageOrigin = `http://127.0.0.1:${pageServer.address().port}`
}

/** A new tab, watched for console errors, exceptions and requests that leave the machine. */
async function newPage(label, viewport = DESKTOP, inBrowser = browser) {
  const page = await inBrowser.newPage()
  await page.setViewport(viewport)
  page.on('console', (message) => {
    if (process.env.POWA_TRACE === '1') console.error(`[${label}] console ${message.type()}: ${message.text().slice(0, 300)}`)
    // While a test stops the server on purpose, the browser reports the refused reconnects.
    const expected = page.serverDown && /WebSocket connection to .* failed/.test(message.text())
    if (message.type() === 'error' && !expected) problems.push(`${label}: console error: ${message.text()}`)
  })
  page.on('pageerror', (error) => problems.push(`${label}: uncaught: ${error.message}`))
  page.on('request', (request) => {
    const url = new URL(request.url())
    if (url.protocol !== 'data:' && url.hostname !== '127.0.0.1') problems.push(`${label}: external request ${request.url()}`)
  })
  // Frames on the wire, as the browser saw them (opcode 1 text, 2 binary).
  const frames = { sent: [], received: [] }
  const cdp = await page.createCDPSession()
  await cdp.send('Network.enable')
  const trace = process.env.POWA_TRACE === '1'
  cdp.on('Network.webSocketFrameSent', ({ response }) => {
    frames.sent.push(response.opcode)
    if (trace) console.error(`[${label}] sent ${response.payloadData.slice(0, 300)}`)
  })
  cdp.on('Network.webSocketFrameReceived', ({ response }) => {
    frames.received.push(response.opcode)
    if (trace) console.error(`[${label}] received ${response.payloadData.slice(0, 300)}`)
  })
  page.frames = frames
  pages.push(page)
  return page
}

async function clientsPage(label, inBrowser = browser) {
  const page = await newPage(label, DESKTOP, inBrowser)
  await page.goto(pageOrigin, { waitUntil: 'load' })
  await page.waitForFunction(() => window.libReady === true, WAIT)
  return page
}

async function screenshot(page, name) {
  await page.bringToFront()
  await page.evaluate(() => window.scrollTo(0, 0))
  await page.screenshot({ path: join(env.artifacts, `${name}.png`), fullPage: false })
  await page.screenshot({ path: join(env.artifacts, `${name}-full.png`), fullPage: true })
}

function launchBrowser() {
  return puppeteer.launch({
    executablePath: env.chromium,
    headless: true,
    // Tabs in the background keep running at full speed (several tabs act at once here).
    args: [
      '--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu', '--no-first-run', '--no-default-browser-check',
      '--disable-background-timer-throttling', '--disable-renderer-backgrounding', '--disable-backgrounding-occluded-windows',
    ],
  })
}

before(async () => {
  mkdirSync(env.artifacts, { recursive: true })
  await startPageServer()
  browser = await launchBrowser()
})

after(async () => {
  if (browser) await browser.close()
  if (pageServer) pageServer.close()
})

test('supabase-js createClient(http://127.0.0.1:PORT): broadcast between two tabs, V2 binary frames', async () => {
  const [a, b] = [await clientsPage('tab-a'), await clientsPage('tab-b')]
  const setup = async (page) =>
    page.evaluate(async (http, anon) => {
      const client = window.lib.createClient(http, anon)
      window.client = client
      window.received = []
      const channel = client.channel('browser-room', { config: { broadcast: { self: false, ack: true } } })
      channel.on('broadcast', { event: 'hello' }, (message) => window.received.push(message.payload))
      window.channel = channel
      return await new Promise((resolve) => channel.subscribe((status) => status !== 'CLOSED' && resolve(status)))
    }, env.http, env.anon)
  assert.equal(await setup(a), 'SUBSCRIBED')
  assert.equal(await setup(b), 'SUBSCRIBED')
  const ack = await a.evaluate(() => window.channel.send({ type: 'broadcast', event: 'hello', payload: { from: 'a', n: 1 } }))
  assert.equal(ack, 'ok')
  await b.waitForFunction(() => window.received.length === 1, WAIT)
  assert.deepEqual(await b.evaluate(() => window.received), [{ from: 'a', n: 1 }])
  assert.ok(a.frames.sent.includes(2), `tab A sent a binary (kind 3) frame; opcodes sent: ${a.frames.sent}`)
  assert.ok(b.frames.received.includes(2), `tab B received a binary (kind 4) frame; opcodes received: ${b.frames.received}`)
  assert.equal(await a.evaluate(() => window.received.length), 0, 'self: false')
  for (const page of [a, b]) await page.evaluate(() => window.client.removeAllChannels())
})

test('presence syncs between two tabs', async () => {
  const [a, b] = [await clientsPage('presence-a'), await clientsPage('presence-b')]
  const join = (page, who) =>
    page.evaluate(async (http, anon, who) => {
      const client = window.lib.createClient(http, anon)
      window.client = client
      const channel = client.channel('browser-presence', { config: { presence: { key: who } } })
      channel.on('presence', { event: 'sync' }, () => { window.members = Object.keys(channel.presenceState()).sort() })
      window.channel = channel
      const status = await new Promise((resolve) => channel.subscribe((s) => s !== 'CLOSED' && resolve(s)))
      await channel.track({ who, at: 'browser' })
      return status
    }, env.http, env.anon, who)
  assert.equal(await join(a, 'alice'), 'SUBSCRIBED')
  assert.equal(await join(b, 'bob'), 'SUBSCRIBED')
  for (const page of [a, b]) {
    await page.waitForFunction(() => JSON.stringify(window.members) === JSON.stringify(['alice', 'bob']), WAIT)
  }
  await b.evaluate(() => window.client.removeAllChannels())
  await a.waitForFunction(() => JSON.stringify(window.members) === JSON.stringify(['alice']), WAIT)
  await a.evaluate(() => window.client.removeAllChannels())
})

test('a Postgres change reaches the page through supabase.channel().on("postgres_changes") with RLS', async () => {
  const page = await clientsPage('postgres')
  const status = await page.evaluate(async (http, anon, token) => {
    // A signed-in user's token, as an app using its own auth gives it to supabase-js.
    const supabase = window.lib.createClient(http, anon, { accessToken: async () => token })
    await supabase.realtime.setAuth() // takes the token from accessToken before the first join
    window.client = supabase
    window.changes = []
    const channel = supabase
      .channel('browser-todos')
      .on('postgres_changes', { event: 'INSERT', schema: 'public', table: 'todos' }, (change) => window.changes.push(change.new.title))
    return await new Promise((resolve) => channel.subscribe((s) => s !== 'CLOSED' && resolve(s)))
  }, env.http, env.anon, env.userA)
  assert.equal(status, 'SUBSCRIBED')
  // The subscription is live once the server says so ("Subscribed to PostgreSQL"): wait for a
  // row of our own to arrive before writing the ones the test is about.
  const deadline = Date.now() + WAIT_MS
  let seen = false
  while (!seen && Date.now() < deadline) {
    await psql(`INSERT INTO public.todos (title, owner_id) VALUES ('probe', '${env.userAId}')`)
    seen = await page.waitForFunction(() => window.changes.includes('probe'), { timeout: 1000, polling: 100 }).then(() => true, () => false)
  }
  assert.ok(seen, 'the page receives changes of its own rows')
  await psql(`INSERT INTO public.todos (title, owner_id) VALUES ('someone else''s', '${env.userBId}')`)
  await psql(`INSERT INTO public.todos (title, owner_id) VALUES ('mine', '${env.userAId}')`)
  // Generous: on a loaded 2-core machine the debug build has been seen to take several seconds.
  const arrived = await page.waitForFunction(() => window.changes.includes('mine'), { timeout: 30000, polling: 100 }).then(() => true, () => false)
  const titles = await page.evaluate(() => window.changes)
  assert.ok(arrived, `the user's own row arrives: got ${JSON.stringify(titles)}`)
  assert.ok(!titles.includes("someone else's"), `RLS hides other users' rows: ${JSON.stringify(titles)}`)
  await page.evaluate(() => window.client.removeAllChannels())
})

test('a private channel is denied without a policy and joined with one', async () => {
  const page = await clientsPage('private')
  const result = await page.evaluate(async (http, anon, token) => {
    const supabase = window.lib.createClient(http, anon, { accessToken: async () => token })
    await supabase.realtime.setAuth()
    window.client = supabase
    const join = (name) =>
      new Promise((resolve) => {
        supabase.channel(name, { config: { private: true } }).subscribe((status, error) => {
          if (status === 'SUBSCRIBED') resolve({ status })
          if (status === 'CHANNEL_ERROR') resolve({ status, error: error && error.message })
        })
      })
    return { denied: await join('browser-denied'), allowed: await join('browser-allowed') }
  }, env.http, env.anon, env.userA)
  assert.equal(result.denied.status, 'CHANNEL_ERROR')
  assert.match(result.denied.error, /Unauthorized: You do not have permissions to read from this Channel topic: browser-denied/)
  assert.deepEqual(result.allowed, { status: 'SUBSCRIBED' })
  await page.evaluate(() => window.client.removeAllChannels())
})

/** Opens the inspector with a key, connects, joins `room` with presence key `who`. */
async function openInspector(label, viewport, room, who) {
  const page = await newPage(label, viewport)
  await page.goto(`${env.http}/inspector#apikey=${env.anon}`, { waitUntil: 'load' })
  assert.equal(await page.$eval('#key', (input) => input.value), env.anon, 'the key is taken from the fragment')
  assert.ok(!page.url().includes('apikey'), 'and removed from the address bar')
  await page.click('#connect')
  await page.waitForFunction(() => document.querySelector('#socket-status').textContent === 'open', WAIT)
  await page.type('#channel-name', room)
  await page.type('#presence-key', who)
  await page.click('#join-button')
  await page.waitForFunction(() => document.querySelector('.channel .state')?.textContent === 'joined', WAIT)
  await page.click('.channel .track button[type="submit"]')
  return page
}

test('inspector: join, send a broadcast from the form, see it arrive and see presence of both tabs', async () => {
  const desktop = await openInspector('inspector-desktop', DESKTOP, 'inspector-room', 'desk')
  const phone = await openInspector('inspector-phone', PHONE, 'inspector-room', 'phone')
  for (const page of [desktop, phone]) {
    await page.waitForFunction(() => document.querySelector('.channel .presence-count').textContent === '2', WAIT)
    const members = await page.$$eval('.channel .presence-list li', (items) => items.map((item) => item.textContent.split(':')[0]).sort())
    assert.deepEqual(members, ['desk', 'phone'])
  }
  await desktop.evaluate(() => {
    document.querySelector('.channel .send-event').value = 'greeting'
    document.querySelector('.channel .send-payload').value = '{"text": "hello-from-inspector"}'
  })
  await desktop.bringToFront()
  await desktop.click('.channel .send button[type="submit"]')
  await desktop.waitForFunction(() => /^ok in \d+ ms$/.test(document.querySelector('.channel .send-result').textContent), WAIT)
  for (const page of [desktop, phone]) {
    await page.waitForFunction(
      () => [...document.querySelectorAll('.channel tbody tr')].some((row) => row.textContent.includes('broadcast: greeting') && row.textContent.includes('hello-from-inspector')),
      WAIT,
    )
  }
  // The message filter hides rows that do not match.
  await phone.bringToFront()
  await phone.type('.channel .filter', 'greeting')
  const visible = await phone.$$eval('.channel tbody tr', (rows) => rows.filter((row) => !row.hidden).map((row) => row.children[1].textContent))
  assert.deepEqual(visible, ['broadcast: greeting'])
  await screenshot(desktop, 'inspector-desktop')
  await screenshot(phone, 'inspector-phone')
})

test('status page: service-role data, connection count matching reality; anon gets 401', async () => {
  // Only the two inspector tabs hold sockets now.
  for (const page of pages.filter((page) => !page.url().includes('/inspector'))) await page.close()
  const anonStatus = await fetch(`${env.http}/api/status`, { headers: { Authorization: `Bearer ${env.anon}` } })
  assert.equal(anonStatus.status, 401)
  assert.deepEqual(await anonStatus.json(), { message: 'A valid service_role key is required' })
  const noKey = await fetch(`${env.http}/api/status`)
  assert.equal(noKey.status, 401)

  const desktop = await newPage('status-desktop', DESKTOP)
  await desktop.goto(`${env.http}/status#apikey=${env.service}`, { waitUntil: 'load' })
  await desktop.waitForFunction(() => document.querySelector('#connections').textContent === '2', WAIT)
  await desktop.waitForFunction(() => document.querySelector('#channels').textContent === '2', WAIT)
  await desktop.waitForFunction(
    () => [...document.querySelectorAll('#top-topics tbody tr')].some((row) => row.textContent === 'inspector-room2'),
    WAIT,
  )
  assert.equal(await desktop.$$eval('#shards tbody tr', (rows) => rows.length), 2, 'one row per shard')
  assert.match(await desktop.$eval('#fetch-status', (badge) => badge.textContent), /^live/)
  assert.ok(await desktop.$('#chart-deliveries svg polyline'), 'the deliveries chart is drawn')

  const body = await (await fetch(`${env.http}/api/status`, { headers: { Authorization: `Bearer ${env.service}` } })).text()
  for (const secret of [env.anon, env.service, env.userA, 'hello-from-inspector']) {
    assert.ok(!body.includes(secret), 'the status data holds no tokens or payloads')
  }
  const status = JSON.parse(body)
  assert.equal(status.totals.connections, 2)
  assert.equal(status.postgres.connected, true)
  assert.equal(status.postgres.database_connected, true)
  assert.ok(status.postgres.rls_checks >= 1, `RLS checks counted: ${JSON.stringify(status.postgres)}`)
  assert.equal(typeof status.postgres.replication_lag_bytes, 'number')
  assert.equal(status.history.replication_lag_bytes.length, status.history.time.length)
  assert.ok(await desktop.$('#chart-lag svg'), 'the replication lag chart is drawn')
  assert.match(await desktop.$eval('#postgres-state', (list) => list.textContent), /subscriptions/)

  const phone = await newPage('status-phone', PHONE)
  await phone.goto(`${env.http}/status#apikey=${env.service}`, { waitUntil: 'load' })
  await phone.waitForFunction(() => document.querySelector('#connections').textContent === '2', WAIT)
  await screenshot(desktop, 'status-desktop')
  await screenshot(phone, 'status-phone')
})

/** Starts `powa-realtime serve` on `addr` and waits for /healthz. */
async function startServer(addr) {
  const child = spawn(env.binary, ['serve'], {
    env: { PATH: process.env.PATH, REALTIME_ADDR: addr, JWT_SECRET: env.secret, REALTIME_SHARDS: '2', REALTIME_DRAIN_SECS: '1', RUST_LOG: 'warn' },
    stdio: ['ignore', 'inherit', 'inherit'],
  })
  const deadline = Date.now() + WAIT_MS
  while (Date.now() < deadline) {
    const healthy = await fetch(`http://${addr}/healthz`).then((r) => r.status === 200, () => false)
    if (healthy) return child
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
  child.kill('SIGKILL')
  throw new Error(`the server on ${addr} did not become healthy`)
}

async function freeAddr() {
  const probe = createServer()
  await new Promise((resolve) => probe.listen(0, '127.0.0.1', resolve))
  const { port } = probe.address()
  await new Promise((resolve) => probe.close(resolve))
  return `127.0.0.1:${port}`
}

test('after a server restart (graceful drain), supabase-js and the inspector reconnect and rejoin by themselves', async () => {
  const addr = await freeAddr()
  let server = await startServer(addr)
  // realtime-js does not reconnect while its page is hidden ("Not reconnecting as page is
  // hidden"), as in a real browser's background tab; so each client gets a browser of its own,
  // where its page is the visible one.
  const second = await launchBrowser()
  try {
    const js = await clientsPage('restart-supabase-js', second)
    const status = await js.evaluate(async (http, anon) => {
      const client = window.lib.createClient(http, anon)
      window.client = client
      window.subscribed = 0
      window.notices = []
      window.received = []
      const channel = client.channel('restart-room', { config: { broadcast: { self: true, ack: true } } })
      channel.on('system', {}, (payload) => window.notices.push(payload.message))
      channel.on('broadcast', { event: 'after' }, (message) => window.received.push(message.payload))
      window.channel = channel
      return await new Promise((resolve) => channel.subscribe((s) => {
        if (s === 'SUBSCRIBED') { window.subscribed += 1; resolve(s) }
      }))
    }, `http://${addr}`, env.anon)
    assert.equal(status, 'SUBSCRIBED')
    const inspector = await newPage('restart-inspector')
    await inspector.goto(`http://${addr}/inspector#apikey=${env.anon}`, { waitUntil: 'load' })
    await inspector.click('#connect')
    await inspector.waitForFunction(() => document.querySelector('#socket-status').textContent === 'open', WAIT)
    await inspector.type('#channel-name', 'restart-room')
    await inspector.click('#join-button')
    await inspector.waitForFunction(() => document.querySelector('.channel .state')?.textContent === 'joined', WAIT)

    for (const page of [js, inspector]) page.serverDown = true
    const exited = new Promise((resolve) => server.once('exit', (code, signal) => resolve({ code, signal })))
    server.kill('SIGTERM')
    assert.deepEqual(await exited, { code: 0, signal: null }, 'the drain ends with status 0')
    await js.waitForFunction(() => window.notices.includes('Server requested disconnect'), WAIT)
    await inspector.waitForFunction(() => document.querySelector('.channel .state').textContent === 'disconnected', WAIT)
    server = await startServer(addr)

    await js.waitForFunction(() => window.subscribed >= 2, { timeout: 30000, polling: 100 })
    await inspector.waitForFunction(
      () => document.querySelector('#socket-status').textContent === 'open' && document.querySelector('.channel .state').textContent === 'joined',
      { timeout: 30000, polling: 100 },
    )
    for (const page of [js, inspector]) page.serverDown = false
    const ack = await js.evaluate(() => window.channel.send({ type: 'broadcast', event: 'after', payload: { restarted: true } }))
    assert.equal(ack, 'ok')
    await js.waitForFunction(() => window.received.length === 1, WAIT)
    await inspector.waitForFunction(
      () => [...document.querySelectorAll('.channel tbody tr')].some((row) => row.textContent.includes('broadcast: after') && row.textContent.includes('restarted')),
      WAIT,
    )
    await js.evaluate(() => window.client.removeAllChannels())
  } finally {
    server.kill('SIGKILL')
    await second.close()
  }
})

test('no page logged an error or asked for anything outside this machine', () => {
  assert.deepEqual(problems, [])
})
