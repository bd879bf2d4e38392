// Broadcast checks with realtime-js's default serializer (vsn 2.0.0: broadcasts
// travel as binary frames).
import { defineBroadcastTests } from './broadcast_suite.mjs'

defineBroadcastTests({ vsn: undefined, name: 'v2 default' })
