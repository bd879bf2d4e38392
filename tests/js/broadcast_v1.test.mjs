// The same broadcast checks with realtime-js forced to vsn 1.0.0 (JSON objects).
import { defineBroadcastTests } from './broadcast_suite.mjs'

defineBroadcastTests({ vsn: '1.0.0', name: 'v1' })
