// Herald demo: the official phoenix client, served by Herald from its npm package.
import {Socket} from "/demo/phoenix.mjs"

const $ = (id) => document.getElementById(id)
let userSocket = null
let counter = 0

function log(list, text) {
  const item = document.createElement("li")
  item.textContent = text
  list.prepend(item)
}

function setStatus(text, ok) {
  $("status").textContent = text
  $("status").className = `status ${ok ? "ok" : "bad"}`
}

async function post(path, body) {
  const response = await fetch(path, {
    method: "POST",
    headers: {"content-type": "application/json"},
    body: JSON.stringify(body),
  })
  const json = await response.json()
  if (!response.ok) throw new Error(json.error ? json.error.message : response.statusText)
  return json
}

$("connect").addEventListener("click", async () => {
  const userId = $("user-id").value.trim()
  if (userSocket) userSocket.disconnect()
  try {
    const {token} = await post("/demo/token", {user_id: userId})
    userSocket = new Socket("/socket", {params: {token}})
    userSocket.onError(() => setStatus("connection error", false))
    userSocket.connect()
    const channel = userSocket.channel(`user:${userId}`)
    for (const event of ["push", "push_timed"]) {
      channel.on(event, ({seq, at, data}) => {
        log($("events"), `#${seq} ${event} ${JSON.stringify(data)} ${Date.now() - at} ms`)
      })
    }
    channel.join()
      .receive("ok", () => { setStatus(`joined user:${userId}`, true); $("send").disabled = false })
      .receive("error", ({reason}) => setStatus(`join refused: ${reason}`, false))
  } catch (error) {
    setStatus(error.message, false)
  }
})

$("send").addEventListener("click", async () => {
  counter += 1
  try {
    const {seq} = await post("/demo/events", {
      user_id: $("user-id").value.trim(),
      event: "push_timed",
      data: {n: counter, from: "demo page"},
    })
    $("send-result").textContent = `accepted as seq ${seq}`
  } catch (error) {
    $("send-result").textContent = error.message
  }
})

// Web Push: the browser's subscription, registered with the user's socket token.
async function userToken() {
  const {token} = await post("/demo/token", {user_id: $("user-id").value.trim()})
  return token
}

function setPushStatus(text, ok) {
  $("webpush-status").textContent = text
  $("webpush-status").className = `status ${ok ? "ok" : "bad"}`
}

/** `promise`, or an error saying what did not answer within `ms`. */
function within(ms, what, promise) {
  let timer
  const late = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not answer in ${ms / 1000} s`)), ms)
  })
  return Promise.race([promise, late]).finally(() => clearTimeout(timer))
}

/** Resolves once `registration` has an active worker. */
function activated(registration) {
  const worker = registration.installing || registration.waiting || registration.active
  if (worker.state === "activated") return Promise.resolve()
  return new Promise((resolve) => {
    worker.addEventListener("statechange", () => { if (worker.state === "activated") resolve() })
  })
}

function base64UrlBytes(text) {
  const base64 = text.replace(/-/g, "+").replace(/_/g, "/")
  return Uint8Array.from(atob(base64), (c) => c.charCodeAt(0))
}

async function listSubscriptions() {
  const response = await fetch("/api/v1/webpush/subscriptions", {
    headers: {authorization: `Bearer ${await userToken()}`},
  })
  const json = await response.json()
  if (!response.ok) throw new Error(json.error ? json.error.message : response.statusText)
  const list = $("webpush-subscriptions")
  list.replaceChildren()
  for (const {endpoint, created_at} of json.subscriptions) {
    log(list, `${new URL(endpoint).origin} since ${new Date(created_at).toLocaleTimeString()}`)
  }
  return json.subscriptions.length
}

$("webpush-subscribe").addEventListener("click", async () => {
  try {
    const keyResponse = await fetch("/api/v1/webpush/key")
    const key = await keyResponse.json()
    if (!keyResponse.ok) throw new Error(key.error.message)
    if (!("serviceWorker" in navigator) || !("PushManager" in window)) {
      throw new Error("this browser has no Web Push (service workers and PushManager)")
    }
    setPushStatus("registering the service worker…", true)
    // Its scope is /demo/, which this page (/demo) is not in: wait for it to activate rather
    // than for navigator.serviceWorker.ready (which waits for a worker controlling this page).
    const registration = await navigator.serviceWorker.register("/demo/sw.js")
    await within(10000, "the service worker", activated(registration))
    setPushStatus("subscribing at the browser's push service…", true)
    const subscription = await within(10000, "the browser's push service", registration.pushManager.subscribe({
      userVisibleOnly: true,
      applicationServerKey: base64UrlBytes(key.public_key),
    }))
    const response = await fetch("/api/v1/webpush/subscriptions", {
      method: "POST",
      headers: {"content-type": "application/json", authorization: `Bearer ${await userToken()}`},
      body: JSON.stringify(subscription),
    })
    const json = await response.json()
    if (!response.ok) throw new Error(json.error.message)
    setPushStatus(`subscribed (${new URL(json.endpoint).origin})`, true)
    await listSubscriptions()
  } catch (error) {
    setPushStatus(`cannot subscribe: ${error.message}`, false)
  }
})

$("webpush-list").addEventListener("click", async () => {
  try {
    const count = await listSubscriptions()
    setPushStatus(`${count} subscription${count === 1 ? "" : "s"} for user ${$("user-id").value.trim()}`, true)
  } catch (error) {
    setPushStatus(error.message, false)
  }
})

const statsSocket = new Socket("/stats_socket")
statsSocket.connect()
const stats = statsSocket.channel("valid")
stats.join()

for (const [id, event] of [["ping", "ping"], ["slow-ping", "slow_ping"], ["parallel-slow-ping", "parallel_slow_ping"]]) {
  $(id).addEventListener("click", () => {
    const sent = performance.now()
    stats.push(event, {}, 15000)
      .receive("ok", () => log($("stats-log"), `${event}: ${Math.round(performance.now() - sent)} ms`))
      .receive("error", ({reason}) => log($("stats-log"), `${event}: ${reason}`))
      .receive("timeout", () => log($("stats-log"), `${event}: timeout`))
  })
}
