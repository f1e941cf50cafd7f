// The stats socket (the seed's StatsSocket and StatsChannel) with the official phoenix client, and the
// StatsD packets it emits.

import assert from "node:assert/strict"
import {after, before, describe, it} from "node:test"
import {Socket} from "phoenix"
import WebSocket from "ws"
import {Herald, join, push, statsd, statsdTags, within} from "./herald.mjs"

const SLOW_MS = 1500
let herald
let metrics

before(async () => {
  metrics = await statsd()
  herald = await Herald.start({
    HERALD_STATSD_ADDR: metrics.addr,
    HERALD_SOCKET__STATS_ENABLED: "true",
    HERALD_SOCKET__STATS_SLOW_PING_MS: String(SLOW_MS),
    HERALD_SOCKET__STATS_MAX_PARALLEL: "2",
  })
})

after(async () => {
  await herald?.destroy()
  metrics?.close()
})

async function statsSocket() {
  const socket = new Socket(herald.statsSocketUrl, {transport: WebSocket})
  await within("stats socket open", (resolve) => {
    socket.onOpen(resolve)
    socket.connect()
  })
  return socket
}

describe("stats socket", () => {
  it("connects without a token and counts the connect", async () => {
    const socket = await statsSocket()
    const line = await metrics.metric("socket_connect:1|c", {status: "success", socket: "StatsSocket"})
    // The node's identity, once each (cadence's default tags).
    assert.equal(line.match(/node:/g).length, 1, line)
    assert.equal(statsdTags(line).roles, "api+worker+socket", line)
    socket.disconnect()
  })

  it("joins 'valid', refuses 'invalid' with 'always fails', and counts both", async () => {
    const socket = await statsSocket()
    await join(socket.channel("valid"))
    await metrics.metric("channel_join:1|c", {status: "success", channel: "StatsChannel"})
    const invalid = socket.channel("invalid")
    await assert.rejects(join(invalid), (e) => e.response?.reason === "always fails")
    invalid.leave()
    await metrics.metric("channel_join:1|c", {status: "fail", channel: "StatsChannel"})
    socket.disconnect()
  })

  it("answers ping with pong and times it", async () => {
    const socket = await statsSocket()
    const channel = socket.channel("valid")
    await join(channel)
    const reply = await push(channel, "ping")
    assert.deepEqual(reply.response, {ping: "pong"})
    const line = await metrics.line("stats_channel.ping:")
    assert.match(line, /\|ms(\|#|$)/)
    socket.disconnect()
  })

  it("slow_ping holds its channel: a later ping waits, but heartbeats and other channels do not", async () => {
    const socket = await statsSocket()
    const channel = socket.channel("valid")
    const other = socket.channel("other")
    await join(channel)
    await join(other)
    const order = []
    const slow = push(channel, "slow_ping").then((r) => { order.push("slow_ping"); return r })
    const ping = push(channel, "ping").then((r) => { order.push("ping"); return r })
    const otherPing = push(other, "ping").then((r) => { order.push("other ping"); return r })
    const heartbeat = within("heartbeat", (resolve) => socket.ping(resolve)).then((ms) => { order.push("heartbeat"); return ms })
    await Promise.all([slow, ping, otherPing, heartbeat])
    // The channel's own ping queued behind slow_ping; the heartbeat and the other channel did not.
    assert.ok(order.indexOf("ping") > order.indexOf("slow_ping"), order.join(", "))
    assert.ok(order.indexOf("heartbeat") < order.indexOf("slow_ping"), order.join(", "))
    assert.ok(order.indexOf("other ping") < order.indexOf("slow_ping"), order.join(", "))
    socket.disconnect()
  })

  it("parallel_slow_ping runs in its own task: a later ping overtakes it", async () => {
    const socket = await statsSocket()
    const channel = socket.channel("valid")
    await join(channel)
    const order = []
    const slow = push(channel, "parallel_slow_ping").then((r) => { order.push("parallel_slow_ping"); return r })
    const ping = push(channel, "ping").then((r) => { order.push("ping"); return r })
    const [slowReply] = await Promise.all([slow, ping])
    assert.deepEqual(order, ["ping", "parallel_slow_ping"])
    assert.deepEqual(slowReply.response, {ping: "pong"})
    socket.disconnect()
  })

  it("caps parallel work per channel: over the cap the push gets 'too many requests' at once", async () => {
    const socket = await statsSocket()
    const channel = socket.channel("valid")
    await join(channel)
    const running = [push(channel, "parallel_slow_ping"), push(channel, "parallel_slow_ping")]
    const refused = await push(channel, "parallel_slow_ping")
    assert.deepEqual(refused.response, {reason: "too many requests"})
    assert.equal(refused.status, "error")
    const finished = await Promise.all(running)
    assert.ok(finished.every((r) => r.status === "ok"))
    assert.ok(refused.ms < Math.min(...finished.map((r) => r.ms)), "the refusal came before the slow replies")
    socket.disconnect()
  })
})
