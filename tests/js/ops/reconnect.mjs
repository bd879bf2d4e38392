// Driven by tests/drain.rs: the official client rides through a server restart on the same
// address. Prints SUBSCRIBED once joined; the test then sends SIGTERM to the server and starts
// a new one. Expects the `system` "Server requested disconnect" notice and close 1012, then
// rejoins by itself, broadcasts to itself with an ack and prints DONE. Prints FAIL ... on error.
import { RealtimeClient } from '@supabase/realtime-js'
import WebSocket from 'ws'

const endpoint = process.env.POWA_ENDPOINT
const apikey = process.env.POWA_ANON_KEY
if (!endpoint || !apikey) {
  console.log('FAIL POWA_ENDPOINT and POWA_ANON_KEY are required')
  process.exit(1)
}

const fail = (why) => {
  console.log(`FAIL ${why}`)
  process.exit(1)
}
setTimeout(() => fail('timed out'), 45000).unref()

const client = new RealtimeClient(endpoint, { params: { apikey }, transport: WebSocket })
const closes = []
client.socketAdapter.onClose((event) => closes.push(event?.code))

const channel = client.channel('restart-room', { config: { broadcast: { self: true, ack: true } } })
let notice = null
let subscribedTimes = 0
let received = null
channel.on('system', {}, (payload) => {
  if (payload?.message === 'Server requested disconnect') notice = payload
})
channel.on('broadcast', { event: 'after' }, (message) => {
  received = message.payload
})

channel.subscribe(async (status, error) => {
  if (status !== 'SUBSCRIBED') return
  subscribedTimes += 1
  if (subscribedTimes === 1) {
    console.log('SUBSCRIBED')
    return
  }
  // Rejoined after the restart.
  if (!notice) fail('rejoined without the "Server requested disconnect" notice')
  if (notice.status !== 'ok') fail(`notice status ${notice.status}`)
  if (!closes.includes(1012)) fail(`socket closes seen: ${JSON.stringify(closes)}`)
  const ack = await channel.send({ type: 'broadcast', event: 'after', payload: { hello: 'again' } })
  if (ack !== 'ok') fail(`broadcast after reconnect: ${ack}`)
  const deadline = Date.now() + 5000
  while (!received && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20))
  if (received?.hello !== 'again') fail('own broadcast not received after reconnect')
  console.log('DONE')
  client.disconnect()
  process.exit(0)
})
