// Phoenix Channels conformance with the official phoenix client (1.8.16) over `ws`, against a real
// Herald node (../../shared/PHOENIX_PROTOCOL.md, section 10).

import assert from "node:assert/strict"
import {after, before, describe, it} from "node:test"
import {Socket} from "phoenix"
import WebSocket from "ws"
import {Herald, join, push, rawSocket, statsd, waitFor, within} from "./herald.mjs"

let herald
let metrics

before(async () => {
  metrics = await statsd()
  herald = await Herald.start({
    HERALD_STATSD_ADDR: metrics.addr,
    HERALD_SOCKET__MAX_FRAME_BYTES: "65536",
    HERALD_SOCKET__STATS_ENABLED: "true",
  })
})

after(async () => {
  await herald?.destroy()
  metrics?.close()
})

/** Connects `socket` and resolves once it is open. */
function connect(socket) {
  return within("socket open", (resolve) => {
    socket.onOpen(resolve)
    socket.connect()
  })
}

describe("connecting", () => {
  it("connects with a valid token and is refused (403, no upgrade) with a bad one", async () => {
    const good = await herald.userSocket("1")
    await connect(good)
    good.disconnect()

    const bad = new Socket(herald.socketUrl, {transport: WebSocket, params: {token: "forged.token"}})
    let opened = false
    bad.onOpen(() => { opened = true })
    const error = await within("connection error", (resolve) => {
      bad.onError((e) => resolve(e))
      bad.connect()
    })
    bad.disconnect()
    assert.match(String(error?.message ?? error), /403/)
    assert.equal(opened, false)
  })
})

describe("channels", () => {
  it("joins its own user topic and is refused others, with the reasons", async () => {
    const socket = await herald.userSocket("2")
    await connect(socket)
    assert.deepEqual(await join(socket.channel("user:2")), {last_seq: 0, missed: false})
    const other = socket.channel("user:3")
    await assert.rejects(join(other), (e) => e.response?.reason === "unauthorized")
    other.leave()
    const unrouted = socket.channel("room:lobby")
    await assert.rejects(join(unrouted), (e) => e.response?.reason === "unmatched topic")
    unrouted.leave()
    socket.disconnect()
  })

  it("answers heartbeats and stays open across them", async () => {
    const socket = await herald.userSocket("4", {heartbeatIntervalMs: 100})
    let heartbeats = 0
    let closed = false
    socket.onMessage(({topic, event, payload}) => {
      if (topic === "phoenix" && event === "phx_reply" && payload.status === "ok") heartbeats += 1
    })
    socket.onClose(() => { closed = true })
    await connect(socket)
    await waitFor("five heartbeat replies", () => heartbeats >= 5)
    const rtt = await within("ping", (resolve) => socket.ping(resolve))
    assert.ok(rtt >= 0)
    assert.equal(closed, false, "a heartbeat timeout would have closed the socket")
    socket.disconnect()
  })

  it("receives pushes in enqueue order, with id, seq and at", async () => {
    const socket = await herald.userSocket("5")
    await connect(socket)
    const channel = socket.channel("user:5")
    const got = []
    channel.on("push_timed", (payload) => got.push(payload))
    await join(channel)
    for (let n = 1; n <= 20; n++) await herald.send("5", {n}, "push_timed")
    await waitFor("20 pushes", () => got.length === 20)
    assert.deepEqual(got.map((p) => p.data.n), [...Array(20).keys()].map((i) => i + 1))
    assert.deepEqual(got.map((p) => p.seq), [...Array(20).keys()].map((i) => i + 1))
    assert.ok(got.every((p) => typeof p.id === "string" && Number.isInteger(p.at)))
    socket.disconnect()
  })

  it("leaves: the reply is ok and the channel gets nothing more", async () => {
    const socket = await herald.userSocket("6")
    await connect(socket)
    const channel = socket.channel("user:6")
    let pushes = 0
    channel.on("push", () => { pushes += 1 })
    await join(channel)
    await herald.send("6", {before: true})
    await waitFor("the push before leaving", () => pushes === 1)
    const reply = await within("leave reply", (resolve) => channel.leave().receive("ok", resolve))
    assert.deepEqual(reply, {})
    // A second channel on the same socket proves delivery goes on, while the left one stays silent.
    const witness = socket.channel("user:6")
    let witnessed = 0
    witness.on("push", () => { witnessed += 1 })
    await join(witness)
    await herald.send("6", {after: true})
    await waitFor("the push after leaving, on the new channel", () => witnessed === 1)
    assert.equal(pushes, 1)
    socket.disconnect()
  })

  it("joining the same topic twice keeps only the newest channel", async () => {
    const socket = await herald.userSocket("7")
    await connect(socket)
    const first = socket.channel("user:7")
    const second = socket.channel("user:7")
    const seen = {first: 0, second: 0}
    first.on("push", () => { seen.first += 1 })
    second.on("push", () => { seen.second += 1 })
    await join(first)
    await join(second)
    await herald.send("7", {n: 1})
    await waitFor("the push on the newest channel", () => seen.second === 1)
    assert.equal(seen.first, 0)
    assert.equal(first.state, "closed")
    socket.disconnect()
  })

  it("answers a push to a topic it has not joined with unmatched topic", async () => {
    const socket = await herald.userSocket("8")
    await connect(socket)
    const ref = socket.makeRef()
    const reply = within("the reply", (resolve) => {
      socket.onMessage((message) => { if (message.ref === ref) resolve(message) })
    })
    socket.push({topic: "user:8", event: "hello", payload: {}, ref, join_ref: null})
    const message = await reply
    assert.equal(message.event, "phx_reply")
    assert.equal(message.join_ref, null)
    assert.deepEqual(message.payload, {status: "error", response: {reason: "unmatched topic"}})
    socket.disconnect()
  })

  it("matches replies to pushes by ref, and answers an unknown event with an error", async () => {
    const socket = new Socket(herald.statsSocketUrl, {transport: WebSocket})
    await connect(socket)
    const channel = socket.channel("valid")
    await join(channel)
    const replies = await Promise.all([1, 2, 3, 4, 5].map(() => push(channel, "ping")))
    assert.ok(replies.every((r) => r.status === "ok" && r.response.ping === "pong"))
    const userSocket = await herald.userSocket("9")
    await connect(userSocket)
    const user = userSocket.channel("user:9")
    await join(user)
    const unknown = await push(user, "shout")
    assert.deepEqual(unknown, {...unknown, status: "error", response: {reason: "unknown event"}})
    socket.disconnect()
    userSocket.disconnect()
  })

  it("sees a channel closed by the server (phx_close)", async () => {
    const socket = new Socket(herald.statsSocketUrl, {transport: WebSocket})
    await connect(socket)
    const channel = socket.channel("valid")
    await join(channel)
    const closed = within("channel closed", (resolve) => channel.onClose(resolve))
    await push(channel, "close")
    await closed
    assert.equal(channel.state, "closed")
    socket.disconnect()
  })
})

describe("server-side disconnect", () => {
  it("a disconnect of the user closes its sockets with 1001, and the client comes back", async () => {
    const socket = await herald.userSocket("14")
    let opens = 0
    const closes = []
    socket.onOpen(() => { opens += 1 })
    socket.onClose((event) => closes.push(event.code))
    await connect(socket)
    const response = await herald.api("/api/v1/users/14/disconnect", {})
    assert.equal(response.connections, 1)
    await waitFor("closed with 1001 and reconnected", () => closes[0] === 1001 && opens === 2)
    socket.disconnect()
  })
})

describe("restarts", () => {
  it("reconnects and rejoins by itself after the server restarts, then receives new events", async () => {
    const socket = await herald.userSocket("10")
    let opens = 0
    socket.onOpen(() => { opens += 1 })
    const closes = []
    socket.onClose((event) => closes.push(event.code))
    await connect(socket)
    const channel = socket.channel("user:10")
    const got = []
    channel.on("push", (payload) => got.push(payload.data.n))
    await join(channel)
    await herald.send("10", {n: 1})
    await waitFor("the first push", () => got.length === 1)

    await herald.restart()
    await waitFor("reconnected and rejoined", () => opens >= 2 && channel.state === "joined", 30_000)
    assert.equal(closes[0], 1012, "a draining node closes with 1012 (service restart)")
    await herald.send("10", {n: 2})
    await waitFor("the push after the restart", () => got.length === 2)
    assert.deepEqual(got, [1, 2])
    socket.disconnect()
  })
})

describe("serializers and bad input", () => {
  it("serves the v1 JSON serializer (vsn 1.0.0) with object frames", async () => {
    const token = await herald.token("11")
    const raw = await rawSocket(`${herald.socketUrl}/websocket?token=${token}&vsn=1.0.0`)
    raw.send({topic: "phoenix", event: "heartbeat", payload: {}, ref: "1"})
    assert.deepEqual(await raw.next(), {topic: "phoenix", event: "phx_reply", payload: {status: "ok", response: {}}, ref: "1"})
    raw.send({topic: "user:11", event: "phx_join", payload: {}, ref: "2", join_ref: "2"})
    assert.deepEqual(await raw.next(), {topic: "user:11", event: "phx_reply", payload: {status: "ok", response: {last_seq: 0, missed: false}}, ref: "2"})
    await herald.send("11", {v: 1})
    const event = await raw.next()
    assert.equal(event.event, "push")
    assert.equal(event.ref, null)
    assert.deepEqual(event.payload.data, {v: 1})
    raw.ws.close()
  })

  it("refuses unsupported vsn at the upgrade", async () => {
    const token = await herald.token("12")
    const status = (vsn) => within(`upgrade with vsn=${vsn}`, (resolve) => {
      const ws = new WebSocket(`${herald.socketUrl}/websocket?token=${token}&vsn=${vsn}`)
      ws.on("error", () => {}) // a refused upgrade also emits an error; the status is what counts
      ws.on("unexpected-response", (request, response) => { resolve(response.statusCode); request.destroy() })
      ws.on("open", () => { resolve(101); ws.close() })
    })
    assert.equal(await status("3.0.0"), 403)
    assert.equal(await status("x"), 403)
    assert.equal(await status("2.0.0"), 101)
  })

  it("closes only the offending connection on malformed or oversized frames, and counts them", async () => {
    const token = await herald.token("13")
    const url = `${herald.socketUrl}/websocket?token=${token}&vsn=2.0.0`
    const cases = [
      ["not json", "not json", 1007, "not_json"],
      ["wrong arity", JSON.stringify([null, "1", "phoenix"]), 1007, "shape"],
      ["wrong types", JSON.stringify([null, "1", 5, "heartbeat", {}]), 1007, "field_type"],
      ["oversized", JSON.stringify([null, "1", "phoenix", "heartbeat", {pad: "x".repeat(70_000)}]), 1009, "oversized"],
    ]
    for (const [name, frame, code, reason] of cases) {
      const raw = await rawSocket(url)
      raw.send(frame)
      assert.equal(await within(`close after ${name}`, (resolve) => raw.closed.then(resolve)), code, name)
      await metrics.metric("socket.frame.malformed:1|c", {reason})
    }
    // The node is unharmed: a new connection works.
    const fine = await rawSocket(url)
    fine.send([null, "hb", "phoenix", "heartbeat", {}])
    assert.deepEqual(await fine.next(), [null, "hb", "phoenix", "phx_reply", {status: "ok", response: {}}])
    fine.ws.close()
  })
})
