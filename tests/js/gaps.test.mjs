// A gap the socket node cannot fill (its PostgreSQL unreachable) closes the channel with phx_error
// instead of pushing past the hole; the official client rejoins by itself, re-sending its join
// params, so its last seq brings the missing events from PostgreSQL once the node can read again.

import assert from "node:assert/strict"
import {after, before, it} from "node:test"
import {Socket} from "phoenix"
import WebSocket from "ws"
import {Herald, join, tcpProxy, waitFor, within} from "./herald.mjs"

let api
let socketNode
let pg

before(async () => {
  // Events named "poison" fail every attempt on the worker: committed, never broadcast.
  api = await Herald.start({
    HERALD_PUBSUB__MODE: "cluster",
    HERALD_NODE__ROLES: "api,worker",
    HERALD_FAULTS__FAIL_EVENTS: "poison",
    HERALD_RETRY__SCHEDULE_MS: "100",
    HERALD_RETRY__MAX_ATTEMPTS: "2",
  })
  const proxied = new URL(api.env.HERALD_DATABASE_URL)
  pg = await tcpProxy(proxied.hostname, Number(proxied.port || 5432))
  proxied.host = `127.0.0.1:${pg.port}`
  socketNode = await api.node({
    HERALD_NODE__ROLES: "socket",
    HERALD_DATABASE_URL: proxied.href,
    HERALD_STORE__ACQUIRE_TIMEOUT_MS: "1000",
  })
})

after(async () => {
  await socketNode?.stop()
  await api?.destroy()
  await pg?.close()
})

it("a channel that cannot fill a gap errors, and the client's own rejoin fills it", async () => {
  const token = await api.token("60")
  const socket = new Socket(socketNode.socketUrl, {transport: WebSocket, params: {token}})
  await within("socket open", (resolve) => { socket.onOpen(resolve); socket.connect() })
  let lastSeq = 0
  const got = []
  const errors = []
  const channel = socket.channel("user:60", () => ({last_seq: lastSeq}))
  const record = ({seq}) => { lastSeq = seq; got.push(seq) }
  channel.on("push", record)
  channel.on("poison", record)
  channel.onError((reason) => errors.push(reason))
  await join(channel)
  await api.send("60", {n: 1})
  await waitFor("seq 1", () => got.length === 1)

  // Seq 2 is never broadcast; seq 3 then reveals the gap while the node cannot read PostgreSQL.
  await api.send("60", {n: 2}, "poison")
  pg.cut()
  await api.send("60", {n: 3})
  await waitFor("the channel's error", () => errors.length > 0)
  assert.equal(errors[0].cause, "store_unavailable")
  assert.deepEqual(got, [1], "nothing pushed past the hole")

  pg.restore()
  await waitFor("the rejoin's catch-up", () => got.length >= 3)
  assert.deepEqual(got, [1, 2, 3])
  await api.send("60", {n: 4})
  await waitFor("a live event after the rejoin", () => got.length >= 4)
  assert.deepEqual(got, [1, 2, 3, 4], "every event, in order, once")
  socket.disconnect()
})
