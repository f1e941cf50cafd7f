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
