// Test harness: runs the real `herald` binary on a free port with its own database and queue prefix,
// and cleans both up afterwards (`herald destroy --yes`). Tests talk to it with the official phoenix
// client, raw `ws` sockets, plain fetch, and a UDP listener standing in for StatsD.

import {spawn, execFile} from "node:child_process"
import {randomUUID} from "node:crypto"
import dgram from "node:dgram"
import net from "node:net"
import {fileURLToPath} from "node:url"
import {Socket} from "phoenix"
import WebSocket from "ws"

export const REPO = fileURLToPath(new URL("../../", import.meta.url))
const HERALD = process.env.TEST_HERALD_BIN ?? `${REPO}target/debug/herald`
// PostgreSQL (its server, without a database) and RabbitMQ: the variables and defaults tests/it uses.
const PG = process.env.HERALD_TEST_PG ?? "postgres://postgres@127.0.0.1:5432"
const AMQP = process.env.HERALD_TEST_AMQP ?? "amqp://guest:guest@127.0.0.1:5672/%2f"
export const PATIENCE_MS = 20_000

function run(args, env) {
  return new Promise((resolve, reject) => {
    execFile(HERALD, args, {env}, (error, stdout, stderr) => {
      if (error) reject(new Error(`herald ${args.join(" ")} failed: ${stderr || error.message}`))
      else resolve(stdout)
    })
  })
}

function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer()
    server.on("error", reject)
    server.listen(0, "127.0.0.1", () => {
      const {port} = server.address()
      server.close(() => resolve(port))
    })
  })
}

/** Polls `check` until it returns a truthy value; fails after `limit` ms. */
export async function waitFor(what, check, limit = PATIENCE_MS) {
  const deadline = Date.now() + limit
  for (;;) {
    const value = await check()
    if (value) return value
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 25))
  }
}

/** Resolves with what `register(resolve)` reports, or fails after PATIENCE_MS. */
export function within(what, register, limit = PATIENCE_MS) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), limit)
    register((value) => {
      clearTimeout(timer)
      resolve(value)
    }, (error) => {
      clearTimeout(timer)
      reject(error)
    })
  })
}

/** A new deployment's environment (its own database, queue prefix and port) with `settings` on
 * top: the node's whole environment, so the tester's shell has no say. */
async function freshDeployment(settings) {
  const id = randomUUID().replaceAll("-", "")
  const port = await freePort()
  const env = {
    HERALD_DATABASE_URL: `${PG}/herald_js_${id}`,
    HERALD_AMQP_URL: AMQP,
    HERALD_QUEUE__PREFIX: `js_${id}`,
    HERALD_HTTP_ADDR: `127.0.0.1:${port}`,
    HERALD_SECRET: "js-test-secret-js-test-secret-js-test",
    HERALD_STATSD_ADDR: "",
    // Prometheus' listener on a port of its own per node (the default, 9464, is one per box).
    HERALD_METRICS__PROMETHEUS_ADDR: "127.0.0.1:0",
    HERALD_PIPELINE__RELAY_GRACE_MS: "2000",
    HERALD_QUEUE__CONFIRM_TIMEOUT_MS: "1000",
    HERALD_QUEUE__PARTITIONS: "4",
    HERALD_PIPELINE__RELAY_INTERVAL_MS: "200",
    HERALD_LOG: "info",
    ...settings,
  }
  return {env, port}
}

export class Herald {
  constructor(env, port, key) {
    this.env = env
    this.port = port
    this.key = key
    this.child = null
    this.log = ""
  }

  /** A fresh node; `settings` are extra HERALD_* variables. They are its whole environment: the
   * tester's shell has no say. */
  static async start(settings = {}) {
    const {env, port} = await freshDeployment(settings)
    await run(["migrate"], env)
    const key = (await run(["producers", "add", "js"], env)).trim().split("\n").pop()
    const node = new Herald(env, port, key)
    await node.serve()
    return node
  }

  /** `herald demo` on a fresh deployment, as a newcomer runs it (it migrates and makes its own
   * producers): resolves with the node (its `key` the demo producer's) and the lines it printed. */
  static async demo(settings = {}) {
    const {env, port} = await freshDeployment({HERALD_DEMO__ASSETS_DIR: `${REPO}demo`, ...settings})
    const node = new Herald(env, port, null)
    node.child = spawn(HERALD, ["demo"], {env, stdio: ["ignore", "pipe", "pipe"]})
    node.child.stderr.on("data", (chunk) => { node.log += chunk })
    node.exited = new Promise((resolve) => node.child.once("exit", resolve))
    let printed = ""
    node.child.stdout.on("data", (chunk) => { printed += chunk })
    await waitFor("the demo's instructions", () => {
      if (node.child.exitCode !== null) throw new Error(`herald demo exited:\n${node.log}`)
      return printed.includes("Send user 42 an event")
    })
    const lines = printed.split("\n")
    node.key = lines[lines.findIndex((l) => l.startsWith("API key")) + 1].trim()
    return {node, lines}
  }

  /** Another node of the same deployment (same database and queues) with `settings` on top, e.g.
   * {HERALD_NODE__ROLES: "socket"}. Stop it yourself; destroy() of the first node cleans up. */
  async node(settings = {}) {
    const port = await freePort()
    const node = new Herald({...this.env, HERALD_HTTP_ADDR: `127.0.0.1:${port}`, ...settings}, port, this.key)
    await node.serve()
    return node
  }

  get url() {
    return `http://127.0.0.1:${this.port}`
  }

  /** The endpoint the phoenix client is given (it appends /websocket). */
  get socketUrl() {
    return `ws://127.0.0.1:${this.port}/socket`
  }

  get statsSocketUrl() {
    return `ws://127.0.0.1:${this.port}/stats_socket`
  }

  async serve() {
    this.child = spawn(HERALD, ["serve"], {env: this.env, stdio: ["ignore", "ignore", "pipe"]})
    this.child.stderr.on("data", (chunk) => { this.log += chunk })
    const exited = new Promise((resolve) => this.child.once("exit", resolve))
    this.exited = exited
    await waitFor("herald ready", async () => {
      if (this.child.exitCode !== null) throw new Error(`herald exited:\n${this.log}`)
      try {
        return (await fetch(`${this.url}/readyz`)).ok
      } catch {
        return false
      }
    })
  }

  /** SIGTERM, and wait for the drain to finish. */
  async stop() {
    if (!this.child || this.child.exitCode !== null) return
    this.child.kill("SIGTERM")
    await this.exited
  }

  async restart() {
    await this.stop()
    await this.serve()
  }

  /** Stops the node and deletes its queues and database. */
  async destroy() {
    await this.stop()
    await run(["destroy", "--yes"], this.env)
  }

  async api(path, body, headers = {}) {
    const response = await fetch(`${this.url}${path}`, {
      method: "POST",
      headers: {authorization: `Bearer ${this.key}`, "content-type": "application/json", ...headers},
      body: JSON.stringify(body),
    })
    const json = await response.json()
    if (!response.ok) throw new Error(`${path}: ${response.status} ${JSON.stringify(json)}`)
    return json
  }

  /** A new producer named `name` with the admin role; resolves with its API key. */
  async adminKey(name = "ops") {
    return (await run(["producers", "add", name, "--admin"], this.env)).trim().split("\n").pop()
  }

  async token(userId) {
    return (await this.api("/api/v1/tokens", {user_id: userId})).token
  }

  async send(userId, data, event = "push", headers = {}) {
    return this.api("/api/v1/events", {user_id: userId, event, data}, headers)
  }

  /** An official phoenix client Socket for `userId`, not yet connected. */
  async userSocket(userId, options = {}) {
    const token = await this.token(userId)
    return new Socket(this.socketUrl, {transport: WebSocket, params: {token}, ...options})
  }
}

/** Joins `channel`; resolves with the reply, rejects with the error response. */
export function join(channel) {
  return within(`join of ${channel.topic}`, (resolve, reject) => {
    channel.join()
      .receive("ok", resolve)
      .receive("error", (response) => reject(Object.assign(new Error("join refused"), {response})))
      .receive("timeout", () => reject(new Error("join timed out")))
  })
}

/** Pushes `event` on `channel`; resolves with {status, response, ms}. */
export function push(channel, event, payload = {}, timeout = PATIENCE_MS) {
  const sent = performance.now()
  return within(`reply to ${event}`, (resolve) => {
    channel.push(event, payload, timeout)
      .receive("ok", (response) => resolve({status: "ok", response, ms: performance.now() - sent}))
      .receive("error", (response) => resolve({status: "error", response, ms: performance.now() - sent}))
      .receive("timeout", () => resolve({status: "timeout"}))
  }, timeout + 1000)
}

/** A raw WebSocket to `url`, with a queue of received text frames. */
export async function rawSocket(url) {
  const ws = new WebSocket(url)
  const frames = []
  const waiters = []
  ws.on("message", (data) => {
    frames.push(JSON.parse(data.toString()))
    while (waiters.length) waiters.shift()()
  })
  const closed = new Promise((resolve) => ws.on("close", (code) => resolve(code)))
  await within("raw socket open", (resolve, reject) => {
    ws.once("open", resolve)
    ws.once("error", reject)
  })
  return {
    ws,
    closed,
    send: (frame) => ws.send(typeof frame === "string" ? frame : JSON.stringify(frame)),
    next: () => within("a frame", (resolve) => {
      const take = () => (frames.length ? resolve(frames.shift()) : waiters.push(take))
      take()
    }),
  }
}

/** A TCP proxy in front of a dependency on `host`:`port`: `cut()` drops every connection
 * and refuses new ones until `restore()`, making it unreachable for one node without touching the
 * shared service. */
export async function tcpProxy(host, port) {
  const open = new Set()
  let up = true
  const server = net.createServer((inbound) => {
    if (!up) {
      inbound.destroy()
      return
    }
    const outbound = net.connect(port, host)
    const pair = [inbound, outbound]
    for (const end of pair) {
      open.add(end)
      end.on("error", () => {})
      end.on("close", () => {
        open.delete(end)
        for (const other of pair) other.destroy()
      })
    }
    inbound.pipe(outbound)
    outbound.pipe(inbound)
  })
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve))
  return {
    port: server.address().port,
    cut() {
      up = false
      for (const end of open) end.destroy()
    },
    restore() {
      up = true
    },
    close() {
      this.cut()
      return new Promise((resolve) => server.close(resolve))
    },
  }
}

/** The tags of a DogStatsD line (`name:1|c|#k:v,k2:v2`), as an object. */
export function statsdTags(line) {
  const tags = line.split("|#")[1] ?? ""
  return Object.fromEntries(tags.split(",").filter(Boolean).map((t) => {
    const at = t.indexOf(":")
    return at < 0 ? [t, ""] : [t.slice(0, at), t.slice(at + 1)]
  }))
}

/** A UDP listener standing in for StatsD; `line(prefix)` waits for a metric line, `metric(head,
 * tags)` for a line starting with `head` (e.g. `channel_join:1|c`) that carries every tag given. */
export async function statsd() {
  const socket = dgram.createSocket("udp4")
  const lines = []
  const waiters = []
  socket.on("message", (packet) => {
    lines.push(...packet.toString().split("\n").filter(Boolean))
    // Each waiter looks once per packet; one that does not find its line waits again. (Calling
    // waiters until none is left spun forever: a waiter that looks in vain re-registers itself.)
    for (const look of waiters.splice(0)) look()
  })
  await new Promise((resolve) => socket.bind(0, "127.0.0.1", resolve))
  return {
    addr: `127.0.0.1:${socket.address().port}`,
    lines,
    line: (prefix) => within(`StatsD line ${prefix}`, (resolve) => {
      const look = () => {
        const found = lines.find((l) => l.startsWith(prefix))
        found ? resolve(found) : waiters.push(look)
      }
      look()
    }),
    metric: (head, tags = {}) => within(`StatsD line ${head} ${JSON.stringify(tags)}`, (resolve) => {
      const fits = (l) => {
        if (!l.startsWith(head)) return false
        const carried = statsdTags(l)
        return Object.entries(tags).every(([k, v]) => carried[k] === v)
      }
      const look = () => {
        const found = lines.find(fits)
        found ? resolve(found) : waiters.push(look)
      }
      look()
    }),
    close: () => socket.close(),
  }
}
