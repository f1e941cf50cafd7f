// Catch-up with the official client: join params given as a function are re-evaluated at every
// rejoin, so a client passes the last seq it saw and gets what it missed while its node was down.

import assert from "node:assert/strict"
import {after, before, it} from "node:test"
import {Socket} from "phoenix"
import WebSocket from "ws"
import {Herald, join, waitFor, within} from "./herald.mjs"

let api
let socketNode

before(async () => {
  api = await Herald.start({HERALD_PUBSUB__MODE: "cluster", HERALD_NODE__ROLES: "api,worker"})
  socketNode = await api.node({HERALD_NODE__ROLES: "socket"})
})

after(async () => {
  await socketNode?.stop()
  await api?.destroy()
})

it("a client whose node restarts rejoins with its last seq and misses nothing", async () => {
  // The socket node serves no producer API: the backend gets the token from an api node.
  const token = await api.token("50")
  const socket = new Socket(socketNode.socketUrl, {transport: WebSocket, params: {token}})
  const opened = within("socket open", (resolve) => { socket.onOpen(resolve); socket.connect() })
  await opened
  let lastSeq = 0
  const got = []
  const channel = socket.channel("user:50", () => ({last_seq: lastSeq}))
  channel.on("push", ({seq, data}) => { lastSeq = seq; got.push(data.n) })
  await join(channel)
  for (let n = 1; n <= 5; n++) await api.send("50", {n})
  await waitFor("the first five", () => got.length === 5)

  await socketNode.stop()
  for (let n = 6; n <= 50; n++) await api.send("50", {n})
  await socketNode.serve()

  await waitFor("the missed events after the rejoin", () => got.length === 50, 30_000)
  assert.deepEqual(got, [...Array(50).keys()].map((i) => i + 1))
  await api.send("50", {n: 51})
  await waitFor("a live event after catching up", () => got.length === 51)
  assert.equal(lastSeq, 51)
  socket.disconnect()
})
