// Postgres Changes through the official realtime-js client (V2, its default)
// against a server attached to a real PostgreSQL 15 (PROTOCOL.md §5).
//
// Run by tests/realtime_js_postgres.rs, which starts a throwaway cluster,
// creates the tables, grants, publication and RLS policy, starts the server with
// DATABASE_URL and sets POWA_PG_URL (plus POWA_PSQL, the psql to use) and the
// tokens of two users. SQL runs through `psql` as the superuser, in UTC.
//
// Tables (see tests/realtime_js_postgres.rs):
//   todos          typed columns, no RLS, in the publication
//   private_todos  RLS on, policy "FOR SELECT TO authenticated USING (owner_id = auth.uid())"
//   fast           for the "committed right after the ok" loop
//   later          not in the publication until a test adds it
//
// Each test uses its own range of ids, and waits for a later "sentinel" change
// instead of sleeping when it asserts that something did not arrive (changes
// arrive in commit order, §5.9).
import { test, afterEach } from 'node:test'
import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { promisify } from 'node:util'

import {
  requireEnv,
  createClient,
  closeAllClients,
  subscribeOk,
  withTimeout,
  dumpFrames,
  uniqueTopic,
} from '../helpers.mjs'

const execFileP = promisify(execFile)

const pg = {
  url: requireEnv('POWA_PG_URL'),
  psql: process.env.POWA_PSQL || 'psql',
}
const userA = { id: requireEnv('POWA_USER_A_ID'), token: requireEnv('POWA_USER_A_TOKEN') }
const userB = { id: requireEnv('POWA_USER_B_ID'), token: requireEnv('POWA_USER_B_TOKEN') }

const SUBSCRIBED = 'Subscribed to PostgreSQL'
const CHANGE_MS = 5000
const SYSTEM_MS = 10000

afterEach(async () => {
  await closeAllClients()
})

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

/** Runs SQL and returns the local wall-clock window (ms) around it. */
async function timedSql(text) {
  const from = Date.now()
  const out = await sql(text)
  return { out, window: [from, Date.now()] }
}

/** `to_jsonb(row)` of one row, parsed (the values §5.5 puts on the wire). */
async function rowJson(table, id) {
  const text = await sql(`SELECT to_jsonb(r) FROM public.${table} r WHERE id = ${id}`)
  assert.notEqual(text, '', `no row ${id} in ${table}`)
  return JSON.parse(text)
}

/**
 * Registers a `postgres_changes` listener on a (not yet subscribed) channel and
 * returns a collector: `.events` (payloads in arrival order) and
 * `.waitFor(n, ms, what)`.
 */
function collectChanges(channel, filter, label = JSON.stringify(filter)) {
  const collector = {
    events: [],
    waiters: [],
    waitFor(count, ms = CHANGE_MS) {
      if (collector.events.length >= count) return Promise.resolve(collector.events)
      const reached = new Promise((resolve) => collector.waiters.push({ count, resolve }))
      return withTimeout(
        reached,
        ms,
        `${count} postgres_changes on ${channel.topic} for ${label} (got ${collector.events.length}: ` +
          `${JSON.stringify(collector.events.map(summary))})`
      )
    },
  }
  channel.on('postgres_changes', filter, (payload) => {
    collector.events.push(payload)
    collector.waiters = collector.waiters.filter((w) => {
      if (collector.events.length >= w.count) {
        w.resolve(collector.events)
        return false
      }
      return true
    })
  })
  return collector
}

/** Records the channel's `system` messages; `.waitFor(pred, ms, what)` resolves with the first matching one not taken yet. */
function recordSystem(channel) {
  const recorder = {
    messages: [],
    used: [],
    checks: [],
    waitFor(pred, ms = SYSTEM_MS, what = 'a system message') {
      const take = () => {
        for (let i = 0; i < recorder.messages.length; i++) {
          if (!recorder.used[i] && pred(recorder.messages[i])) {
            recorder.used[i] = true
            return recorder.messages[i]
          }
        }
        return undefined
      }
      const now = take()
      if (now) return Promise.resolve(now)
      const found = new Promise((resolve) => recorder.checks.push({ take, resolve }))
      return withTimeout(found, ms, `${what} on ${channel.topic} (seen: ${JSON.stringify(recorder.messages)})`)
    },
  }
  channel.on('system', {}, (payload) => {
    recorder.messages.push(payload)
    recorder.used.push(false)
    recorder.checks = recorder.checks.filter((c) => {
      const hit = c.take()
      if (hit) c.resolve(hit)
      return !hit
    })
  })
  return recorder
}

const isOk = (m) => m.extension === 'postgres_changes' && m.status === 'ok' && m.message === SUBSCRIBED
const isError = (m) => m.extension === 'postgres_changes' && m.status === 'error'

/** Subscribes, waits for SUBSCRIBED and then for the `system` "Subscribed to PostgreSQL" message. */
async function subscribeLive(channel, system) {
  await subscribeOk(channel)
  const message = await system.waitFor((m) => isOk(m) || isError(m), SYSTEM_MS, 'the postgres_changes status')
  assert.equal(message.status, 'ok', `subscription failed: ${JSON.stringify(message)}`)
  assert.deepEqual(message, { extension: 'postgres_changes', status: 'ok', message: SUBSCRIBED, channel: channel.subTopic })
}

function summary(payload) {
  const row = payload.eventType === 'DELETE' ? payload.old : payload.new
  return `${payload.eventType} ${row?.id}`
}

/**
 * Checks what realtime-js hands the callback (PROTOCOL.md §5.5 "What the
 * clients make of it"): exactly {schema, table, commit_timestamp, eventType,
 * new, old, errors}, with the timestamp `YYYY-MM-DDTHH:MM:SS.mmmZ` inside the
 * commit's wall-clock window.
 */
function checkPayload(payload, { table, eventType, newRow = {}, oldRow = {}, window }, context = '') {
  const shown = `${context}\npayload: ${JSON.stringify(payload)}`
  assert.deepEqual(Object.keys(payload).sort(), ['commit_timestamp', 'errors', 'eventType', 'new', 'old', 'schema', 'table'], shown)
  assert.equal(payload.schema, 'public', shown)
  assert.equal(payload.table, table, shown)
  assert.equal(payload.eventType, eventType, shown)
  assert.equal(payload.errors, null, shown)
  assert.deepEqual(payload.new, newRow, `new: ${shown}`)
  assert.deepEqual(payload.old, oldRow, `old: ${shown}`)
  assert.match(payload.commit_timestamp, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/, shown)
  if (window) {
    const at = Date.parse(payload.commit_timestamp)
    assert.ok(at >= window[0] - 50 && at <= window[1] + 50, `commit_timestamp outside [${window}]: ${shown}`)
  }
}

const TODO_COLUMNS = '(id, title, done, owner_id, qty, status, amount, tags, meta, due, created_at)'

function todoValues(id, { title = `todo ${id}`, qty = 1, status = 'open', owner = userA.id } = {}) {
  return (
    `(${id}, '${title}', false, '${owner}', ${qty}, '${status}', 12.50, '{"a","b c"}', ` +
    `'{"k": [1, 2.5, null], "s": "\u00fc"}', '2026-08-21', '2026-08-21 10:15:30.123456+00')`
  )
}

// ---------------------------------------------------------------------------

test('INSERT, UPDATE and DELETE reach a * listener with eventType, new, old, typed values and commit_timestamp', async () => {
  const client = createClient({ label: 'iud' })
  const channel = client.channel(uniqueTopic('todos'))
  const changes = collectChanges(channel, { event: '*', schema: 'public', table: 'todos' })
  const system = recordSystem(channel)
  await subscribeLive(channel, system)

  const ins = await timedSql(`INSERT INTO public.todos ${TODO_COLUMNS} VALUES ${todoValues(101)}`)
  const inserted = await rowJson('todos', 101)
  assert.equal(inserted.created_at, '2026-08-21T10:15:30.123456+00:00')
  await changes.waitFor(1)
  checkPayload(changes.events[0], { table: 'todos', eventType: 'INSERT', newRow: inserted, window: ins.window }, dumpFrames(client))
  // Typed values, not strings.
  const row = changes.events[0].new
  assert.equal(typeof row.id, 'number')
  assert.equal(row.done, false)
  assert.equal(row.amount, 12.5)
  assert.deepEqual(row.tags, ['a', 'b c'])
  assert.deepEqual(row.meta, { k: [1, 2.5, null], s: '\u00fc' })

  const upd = await timedSql("UPDATE public.todos SET done = true, qty = 42, tags = '{}' WHERE id = 101")
  const updated = await rowJson('todos', 101)
  await changes.waitFor(2)
  checkPayload(changes.events[1], { table: 'todos', eventType: 'UPDATE', newRow: updated, oldRow: { id: 101 }, window: upd.window }, dumpFrames(client))

  const del = await timedSql('DELETE FROM public.todos WHERE id = 101')
  await changes.waitFor(3)
  checkPayload(changes.events[2], { table: 'todos', eventType: 'DELETE', oldRow: { id: 101 }, window: del.window }, dumpFrames(client))
  assert.equal(changes.events.length, 3)
})

test('an INSERT-only listener gets no UPDATE or DELETE', async () => {
  const client = createClient({ label: 'event-filter' })
  const channel = client.channel(uniqueTopic('inserts'))
  const inserts = collectChanges(channel, { event: 'INSERT', schema: 'public', table: 'todos' })
  const system = recordSystem(channel)
  await subscribeLive(channel, system)

  await sql(`INSERT INTO public.todos ${TODO_COLUMNS} VALUES ${todoValues(151)}`)
  await sql('UPDATE public.todos SET qty = 2 WHERE id = 151')
  await sql('DELETE FROM public.todos WHERE id = 151')
  await sql(`INSERT INTO public.todos ${TODO_COLUMNS} VALUES ${todoValues(152)}`)
  await inserts.waitFor(2)
  assert.deepEqual(inserts.events.map(summary), ['INSERT 151', 'INSERT 152'], dumpFrames(client))
})

test('filters eq, neq, lt, gt and in (with a quoted value) select the right rows', async () => {
  const client = createClient({ label: 'filters' })
  const filters = {
    eq: 'id=eq.201',
    neq: 'id=neq.201',
    lt: 'qty=lt.10',
    gt: 'qty=gt.10',
    in: 'status=in.("on hold",open)',
  }
  const collectors = {}
  const channels = []
  for (const [name, filter] of Object.entries(filters)) {
    const channel = client.channel(uniqueTopic(`filter-${name}`))
    collectors[name] = collectChanges(channel, { event: '*', schema: 'public', table: 'todos', filter }, filter)
    channels.push([channel, recordSystem(channel)])
  }
  // The sentinel listener, on the same socket.
  const sentinelChannel = client.channel(uniqueTopic('filter-all'))
  const all = collectChanges(sentinelChannel, { event: 'INSERT', schema: 'public', table: 'todos', filter: 'id=gte.200' })
  channels.push([sentinelChannel, recordSystem(sentinelChannel)])
  for (const [channel, system] of channels) await subscribeLive(channel, system)

  await sql(`INSERT INTO public.todos ${TODO_COLUMNS} VALUES ${todoValues(201, { qty: 5, status: 'open' })}`)
  await sql(`INSERT INTO public.todos ${TODO_COLUMNS} VALUES ${todoValues(202, { qty: 10, status: 'on hold' })}`)
  await sql(`INSERT INTO public.todos ${TODO_COLUMNS} VALUES ${todoValues(203, { qty: 20, status: 'closed' })}`)
  await sql('UPDATE public.todos SET qty = 15 WHERE id = 202')
  await sql(`INSERT INTO public.todos ${TODO_COLUMNS} VALUES ${todoValues(299, { qty: 10, status: 'end' })}`)
  await all.waitFor(4)
  assert.deepEqual(all.events.map(summary), ['INSERT 201', 'INSERT 202', 'INSERT 203', 'INSERT 299'])
  const seen = Object.fromEntries(Object.entries(collectors).map(([name, c]) => [name, c.events.map(summary)]))
  // neq also matches the sentinel; wait for it before comparing.
  await collectors.neq.waitFor(4)
  seen.neq = collectors.neq.events.map(summary)
  assert.deepEqual(
    seen,
    {
      eq: ['INSERT 201'],
      neq: ['INSERT 202', 'INSERT 203', 'UPDATE 202', 'INSERT 299'],
      lt: ['INSERT 201'],
      gt: ['INSERT 203', 'UPDATE 202'],
      in: ['INSERT 201', 'INSERT 202', 'UPDATE 202'],
    },
    dumpFrames(client, 60)
  )
})

test('three .on bindings on one channel each get their own events', async () => {
  const client = createClient({ label: 'three' })
  const channel = client.channel(uniqueTopic('three'))
  const inserts = collectChanges(channel, { event: 'INSERT', schema: 'public', table: 'todos' }, 'INSERT')
  const updatesOf302 = collectChanges(channel, { event: 'UPDATE', schema: 'public', table: 'todos', filter: 'id=eq.302' }, 'UPDATE id=eq.302')
  const big = collectChanges(channel, { event: '*', schema: 'public', table: 'todos', filter: 'qty=gt.10' }, '* qty=gt.10')
  const system = recordSystem(channel)
  await subscribeLive(channel, system)

  await sql(`INSERT INTO public.todos ${TODO_COLUMNS} VALUES ${todoValues(301, { qty: 5 })}`)
  await sql(`INSERT INTO public.todos ${TODO_COLUMNS} VALUES ${todoValues(302, { qty: 10 })}`)
  await sql(`INSERT INTO public.todos ${TODO_COLUMNS} VALUES ${todoValues(303, { qty: 20 })}`)
  await sql('UPDATE public.todos SET qty = 15 WHERE id = 302')
  await sql('UPDATE public.todos SET qty = 6 WHERE id = 301')
  await sql(`INSERT INTO public.todos ${TODO_COLUMNS} VALUES ${todoValues(304, { qty: 1 })}`)
  await inserts.waitFor(4)
  assert.deepEqual(inserts.events.map(summary), ['INSERT 301', 'INSERT 302', 'INSERT 303', 'INSERT 304'])
  assert.deepEqual(updatesOf302.events.map(summary), ['UPDATE 302'], dumpFrames(client))
  assert.deepEqual(big.events.map(summary), ['INSERT 303', 'UPDATE 302'], dumpFrames(client))
})

test('RLS: user A gets only own rows, user B only theirs, anon none under a TO authenticated policy; DELETE reaches all with the key only', async () => {
  const clients = {
    a: createClient({ label: 'user-a', apikey: userA.token }),
    b: createClient({ label: 'user-b', apikey: userB.token }),
    anon: createClient({ label: 'anon' }),
  }
  const seen = {}
  for (const [name, client] of Object.entries(clients)) {
    const channel = client.channel(uniqueTopic(`rls-${name}`))
    seen[name] = collectChanges(channel, { event: '*', schema: 'public', table: 'private_todos' }, name)
    await subscribeLive(channel, recordSystem(channel))
  }
  const insert = (id, owner) => sql(`INSERT INTO public.private_todos (id, title, owner_id) VALUES (${id}, 'todo ${id}', '${owner}')`)
  // One step at a time: the RLS check reads the row when the change is processed (§5.6).
  await insert(401, userA.id)
  const row401 = await rowJson('private_todos', 401)
  await seen.a.waitFor(1)
  await insert(402, userB.id)
  await seen.b.waitFor(1)
  await sql("UPDATE public.private_todos SET title = 'edited' WHERE id = 402")
  await seen.b.waitFor(2)
  await sql('DELETE FROM public.private_todos WHERE id = 401')
  await seen.a.waitFor(2)
  await seen.b.waitFor(3)
  await seen.anon.waitFor(1)
  await insert(403, userA.id)
  await seen.a.waitFor(3)
  await sql('DELETE FROM public.private_todos WHERE id = 403')
  await seen.a.waitFor(4)
  await seen.b.waitFor(4)
  await seen.anon.waitFor(2)

  const got = Object.fromEntries(Object.entries(seen).map(([name, c]) => [name, c.events.map(summary)]))
  assert.deepEqual(got, {
    a: ['INSERT 401', 'DELETE 401', 'INSERT 403', 'DELETE 403'],
    b: ['INSERT 402', 'UPDATE 402', 'DELETE 401', 'DELETE 403'],
    anon: ['DELETE 401', 'DELETE 403'],
  })
  assert.deepEqual(seen.a.events[0].new, row401)
  // DELETE under RLS: old is the primary key only, new is empty.
  for (const c of Object.values(seen)) {
    const del = c.events.find((e) => e.eventType === 'DELETE')
    assert.deepEqual([del.new, del.old], [{}, { id: 401 }])
  }
})

test('a table missing from the publication gets a system error naming the fix, then starts by itself once added', async () => {
  const client = createClient({ label: 'later' })
  const channel = client.channel(uniqueTopic('later'))
  const todos = collectChanges(channel, { event: 'INSERT', schema: 'public', table: 'todos' }, 'todos')
  const later = collectChanges(channel, { event: 'INSERT', schema: 'public', table: 'later' }, 'later')
  const system = recordSystem(channel)
  await subscribeOk(channel)
  const error = await system.waitFor(isError, SYSTEM_MS, 'the not-published error')
  assert.ok(
    error.message.startsWith(
      'Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given connect parameters: [event: INSERT, schema: public, table: later, filters: [], select: nil]'
    ),
    error.message
  )
  assert.ok(error.message.includes('ALTER PUBLICATION supabase_realtime ADD TABLE public.later'), error.message)
  await system.waitFor(isOk, SYSTEM_MS, 'the ok for the todos binding')

  await sql(`INSERT INTO public.todos ${TODO_COLUMNS} VALUES ${todoValues(501)}`)
  await todos.waitFor(1)
  await sql('ALTER PUBLICATION supabase_realtime ADD TABLE public.later')
  // The other binding keeps working meanwhile.
  await sql(`INSERT INTO public.todos ${TODO_COLUMNS} VALUES ${todoValues(502)}`)
  await todos.waitFor(2)
  await system.waitFor(isOk, 8000, 'a new Subscribed message after ALTER PUBLICATION')
  await sql("INSERT INTO public.later (id, note) VALUES (1, 'now published')")
  await later.waitFor(1)
  assert.deepEqual(later.events[0].new, { id: 1, note: 'now published' })
  assert.deepEqual(todos.events.map(summary), ['INSERT 501', 'INSERT 502'])
})

test('a change committed right after the system ok always arrives (no sleeps, no probes)', async () => {
  const client = createClient({ label: 'fast' })
  for (let i = 0; i < 10; i++) {
    const channel = client.channel(uniqueTopic(`fast-${i}`))
    const changes = collectChanges(channel, { event: 'INSERT', schema: 'public', table: 'fast', filter: `id=eq.${i}` })
    await subscribeLive(channel, recordSystem(channel))
    await sql(`INSERT INTO public.fast (id, n) VALUES (${i}, ${i})`)
    await changes.waitFor(1)
    assert.deepEqual(changes.events[0].new, { id: i, n: i }, `round ${i}`)
  }
})

// Last: it disturbs every subscription of the server.
test('the replication backend killed with pg_terminate_backend: system error, new ok, later changes arrive', async () => {
  const client = createClient({ label: 'killed' })
  const channel = client.channel(uniqueTopic('killed'))
  const changes = collectChanges(channel, { event: '*', schema: 'public', table: 'todos' })
  const system = recordSystem(channel)
  await subscribeLive(channel, system)
  await sql(`INSERT INTO public.todos ${TODO_COLUMNS} VALUES ${todoValues(601)}`)
  await changes.waitFor(1)

  const killed = await sql('SELECT pg_terminate_backend(pid) FROM pg_stat_replication')
  assert.equal(killed, 't')
  await system.waitFor(isError, SYSTEM_MS, 'the replication-lost error')
  await system.waitFor(isOk, 15000, 'the new Subscribed message')
  await sql(`INSERT INTO public.todos ${TODO_COLUMNS} VALUES ${todoValues(602)}`)
  await sql('DELETE FROM public.todos WHERE id = 601')
  await changes.waitFor(3)
  assert.deepEqual(changes.events.map(summary), ['INSERT 601', 'INSERT 602', 'DELETE 601'], dumpFrames(client))
})
