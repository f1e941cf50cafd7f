// Herald's operator console: plain JavaScript served by the node itself (no build step, no CDN).
// Signs in with an admin API key kept in sessionStorage and sent as the admin API's bearer token;
// polls /api/v1/admin/stats every second for the live figures; lists events with the admin API's
// filters and cursor pagination; shows an event with its attempt log; replays with a dry-run count
// first, then follows the replay job until it is done. Every value from the server is written with
// textContent, never as HTML.
"use strict"

const KEY = "herald.adminKey"
const POLL_MS = 1000
const RATE_WINDOW_MS = 5000 // rates: the change over about the last 5 s
const LATENCY_WINDOW_MS = 30000 // p50/p99: pushes of about the last 30 s
const HISTORY = 60 // samples kept (a minute at one a second)

const $ = (id) => document.getElementById(id)
const state = {key: null, samples: [], timer: null, cursors: [null], next: null, detailId: null, job: null}

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: {authorization: `Bearer ${state.key}`, "content-type": "application/json", ...(options.headers ?? {})},
  })
  const body = await response.json().catch(() => ({}))
  if (response.status === 401) throw new Unauthorized(body.error?.message ?? "unauthorized")
  if (!response.ok) throw new Error(body.error?.message ?? `HTTP ${response.status}`)
  return body
}

// ---- sign in / out ----

async function signIn(key) {
  state.key = key
  const stats = await api("/api/v1/admin/stats")
  sessionStorage.setItem(KEY, key)
  $("sign-in").hidden = true
  $("console").hidden = false
  $("sign-out").hidden = false
  $("live").hidden = false
  record(stats)
  startPolling()
  loadEvents()
}

function signOut(message = "") {
  clearTimeout(state.timer)
  state.timer = null
  state.key = null
  state.samples = []
  sessionStorage.removeItem(KEY)
  $("console").hidden = true
  $("sign-out").hidden = true
  $("live").hidden = true
  $("node-info").textContent = ""
  $("sign-in").hidden = false
  $("sign-in-error").textContent = message
  $("api-key").value = ""
}

function handle(error, where) {
  if (error instanceof Unauthorized) signOut("That key is not an admin key (or it was revoked).")
  else if (where) where.textContent = error.message
}

// ---- live figures ----

function startPolling() {
  clearTimeout(state.timer)
  const tick = async () => {
    try {
      record(await api("/api/v1/admin/stats"))
      $("live").classList.remove("stale")
      $("live-text").textContent = "live"
    } catch (error) {
      if (error instanceof Unauthorized) return handle(error)
      $("live").classList.add("stale")
      $("live-text").textContent = "reconnecting"
    }
    if (state.key) state.timer = setTimeout(tick, POLL_MS)
  }
  state.timer = setTimeout(tick, POLL_MS)
}

/** The newest sample at least `ms` older than the latest, or the oldest there is. */
function sampleBefore(ms) {
  const latest = state.samples.at(-1)
  for (let i = state.samples.length - 2; i >= 0; i--) {
    if (latest.at_ms - state.samples[i].at_ms >= ms) return state.samples[i]
  }
  return state.samples[0]
}

function rate(key, from, to) {
  const seconds = (to.at_ms - from.at_ms) / 1000
  if (seconds <= 0) return null
  return Math.max(0, to.node[key] - from.node[key]) / seconds
}

/** histogram_quantile over the pushes between two readings of the cumulative buckets. */
function quantile(q, from, to) {
  const now = to.node.push_delivered.buckets
  const before = from === to ? [] : from.node.push_delivered.buckets
  const counts = now.map(([le, n], i) => [le, n - (before[i]?.[1] ?? 0)])
  const total = counts.at(-1)?.[1] ?? 0
  if (total <= 0) return null
  const rank = q * total
  let lower = 0
  let below = 0
  for (const [le, n] of counts) {
    if (n >= rank) {
      if (le === null) return lower // beyond the last bound: report the last bound
      const inBucket = n - below
      return inBucket > 0 ? lower + (le - lower) * ((rank - below) / inBucket) : le
    }
    if (le !== null) lower = le
    below = n
  }
  return lower
}

const number = new Intl.NumberFormat("en", {maximumFractionDigits: 1})
const integer = new Intl.NumberFormat("en")

function formatRate(value) {
  return value === null ? "–" : number.format(value)
}

function formatMs(ms) {
  if (ms === null) return "–"
  if (ms >= 1000) return `${number.format(ms / 1000)} s`
  return `${number.format(ms)} ms`
}

function record(stats) {
  state.samples.push(stats)
  if (state.samples.length > HISTORY) state.samples.shift()
  const to = stats
  const from = sampleBefore(RATE_WINDOW_MS)
  const first = from === to
  $("node-info").textContent = `${stats.node_name} · ${stats.roles}`
  $("scope").textContent = `Rates, latency, connections and in-flight are node ${stats.node_name}'s own (open the console ` +
    "on another node, or scrape /metrics, for the others); queue depth and stored failed events are the whole deployment's."
  const rates = {
    accepted: "accepted", delivered: "delivered", failed: "failed", retries: "retries", dead: "dead_lettered",
    joins: "joins",
  }
  for (const [id, key] of Object.entries(rates)) {
    $(`fig-${id}`).textContent = first ? "–" : formatRate(rate(key, from, to))
    const total = $(`total-${id}`)
    if (total) total.textContent = integer.format(to.node[key])
  }
  const window = sampleBefore(LATENCY_WINDOW_MS)
  $("fig-p50").textContent = formatMs(quantile(0.5, window === to ? {node: {push_delivered: {buckets: []}}} : window, to))
  $("fig-p99").textContent = formatMs(quantile(0.99, window === to ? {node: {push_delivered: {buckets: []}}} : window, to))
  $("fig-connections").textContent = integer.format(to.node.connections)
  $("fig-channels").textContent = integer.format(to.node.channels)
  $("channels-word").textContent = to.node.channels === 1 ? "channel" : "channels"
  $("fig-in-flight").textContent = integer.format(to.node.in_flight)
  $("fig-failed-events").textContent = integer.format(stats.failed_events)
  for (const key of ["accepted", "delivered", "failed"]) spark(key)
  partitions(stats.partitions)
}

/** A sparkline of a rate over the samples kept. */
function spark(key) {
  const points = []
  for (let i = 1; i < state.samples.length; i++) points.push(rate(key, state.samples[i - 1], state.samples[i]) ?? 0)
  const svg = $(`spark-${key}`)
  svg.replaceChildren()
  if (points.length < 2) return
  const max = Math.max(1, ...points)
  const step = 60 / (HISTORY - 1)
  const offset = 60 - (points.length - 1) * step
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline")
  line.setAttribute("points", points.map((p, i) => `${(offset + i * step).toFixed(2)},${(19 - (p / max) * 18).toFixed(2)}`).join(" "))
  svg.append(line)
}

function partitions(list) {
  const box = $("partitions")
  box.replaceChildren()
  if (!list) {
    box.append(Object.assign(document.createElement("p"), {className: "muted", textContent: "RabbitMQ cannot be reached."}))
    return
  }
  const max = Math.max(1, ...list.map((p) => p.ready ?? 0))
  for (const {partition, ready} of list) {
    const row = document.createElement("div")
    row.className = "bar"
    row.dataset.partition = partition
    const name = Object.assign(document.createElement("span"), {className: "name", textContent: `p${partition}`})
    const track = Object.assign(document.createElement("span"), {className: "track"})
    const fill = Object.assign(document.createElement("span"), {className: "fill"})
    fill.style.width = `${((ready ?? 0) / max) * 100}%`
    track.append(fill)
    const count = Object.assign(document.createElement("span"), {className: "count", textContent: ready === null ? "missing" : integer.format(ready)})
    row.append(name, track, count)
    box.append(row)
  }
}

// ---- events ----

function filterParams() {
  const form = new FormData($("filters"))
  const params = {}
  for (const [key, value] of form) {
    if (key !== "limit" && String(value).trim() !== "") params[key] = String(value).trim()
  }
  return params
}

function when(text) {
  if (!text) return ""
  const date = new Date(text)
  return Number.isNaN(date.getTime()) ? text : date.toLocaleString()
}

function cell(text, className) {
  const td = document.createElement("td")
  td.textContent = text ?? ""
  if (className) td.className = className
  return td
}

function pill(status) {
  const span = document.createElement("span")
  span.className = `pill ${status}`
  span.textContent = status
  return span
}

async function loadEvents() {
  const query = new URLSearchParams(filterParams())
  query.set("limit", new FormData($("filters")).get("limit"))
  const cursor = state.cursors.at(-1)
  if (cursor) query.set("before", cursor)
  $("events-error").textContent = ""
  try {
    const page = await api(`/api/v1/admin/events?${query}`)
    state.next = page.next
    const body = $("events")
    body.replaceChildren()
    if (page.events.length === 0) {
      const row = document.createElement("tr")
      const td = cell("No events match.", "muted")
      td.colSpan = 8
      row.append(td)
      body.append(row)
    }
    for (const event of page.events) {
      const row = document.createElement("tr")
      row.className = "event"
      row.dataset.id = event.id
      const status = document.createElement("td")
      status.append(pill(event.status))
      row.append(cell(event.id, "mono"), status, cell(event.user_id), cell(event.event), cell(event.producer),
        cell(String(event.attempts), "num"), cell(event.last_error, "error-text"), cell(when(event.enqueued_at)))
      row.addEventListener("click", () => showEvent(event.id))
      body.append(row)
    }
    $("older").disabled = !page.next
    $("newer").disabled = state.cursors.length <= 1
    $("page-info").textContent = `page ${state.cursors.length}`
  } catch (error) {
    handle(error, $("events-error"))
  }
}

async function showEvent(id) {
  state.detailId = id
  try {
    const event = await api(`/api/v1/admin/events/${encodeURIComponent(id)}`)
    if (state.detailId !== id) return
    $("detail").hidden = false
    $("detail-id").textContent = event.id
    const fields = $("detail-fields")
    fields.replaceChildren()
    const shown = [
      ["Status", event.status], ["User", event.user_id], ["Seq", event.seq], ["Event", event.event],
      ["Producer", event.producer], ["Attempts", event.attempts], ["Replays", event.replays],
      ["Last error", event.last_error], ["Enqueued", when(event.enqueued_at)], ["First attempt", when(event.published_at)],
      ["Delivered", when(event.delivered_at)], ["Failed", when(event.failed_at)], ["Next attempt", when(event.next_attempt_at)],
      ["Sockets reached", event.push_count], ["Trace", event.trace_id],
    ]
    for (const [label, value] of shown) {
      if (value === null || value === undefined || value === "") continue
      const dt = Object.assign(document.createElement("dt"), {textContent: label})
      const dd = document.createElement("dd")
      if (label === "Status") {
        dd.append(pill(value))
        dd.id = "detail-status"
        dd.dataset.status = value
      } else dd.textContent = String(value)
      const group = document.createElement("div")
      group.append(dt, dd)
      fields.append(group)
    }
    $("detail-data").textContent = JSON.stringify(event.data, null, 2)
    const attempts = $("detail-attempts")
    attempts.replaceChildren()
    for (const attempt of event.attempt_log) {
      const row = document.createElement("tr")
      const outcome = document.createElement("td")
      outcome.append(pill(attempt.outcome))
      const took = new Date(attempt.finished_at) - new Date(attempt.started_at)
      row.append(cell(String(attempt.attempt), "num"), outcome, cell(attempt.sockets ?? "", "num"),
        cell(when(attempt.started_at)), cell(Number.isNaN(took) ? "" : formatMs(took), "num"), cell(attempt.error, "error-text"))
      attempts.append(row)
    }
    // Its Web Push sends, if its name falls back: the push service's origin and answer.
    for (const push of event.webpush_log ?? []) {
      const row = document.createElement("tr")
      row.dataset.channel = "webpush"
      const outcome = document.createElement("td")
      outcome.append(pill(push.outcome))
      const said = [push.origin, push.status, push.error].filter((x) => x !== null && x !== undefined).join(" ")
      row.append(cell("web push", "num"), outcome, cell("", "num"), cell(when(new Date(push.at).toISOString())),
        cell("", "num"), cell(said, "error-text"))
      attempts.append(row)
    }
    $("detail").scrollIntoView({block: "nearest"})
  } catch (error) {
    handle(error, $("events-error"))
  }
}

// ---- replay: a dry-run count first, then the job's progress until it ends ----

function openReplay(filter, title) {
  state.job = {filter, id: null}
  $("replay").hidden = false
  $("replay-title").textContent = title
  $("replay-summary").textContent = "Counting…"
  $("replay-actions").hidden = true
  $("replay-progress").hidden = true
  $("replay-status").textContent = ""
  api("/api/v1/admin/replays", {method: "POST", body: JSON.stringify({...filter, dry_run: true})})
    .then(({matched}) => {
      if (state.job?.filter !== filter) return
      state.job.matched = matched
      $("replay-summary").textContent = matched === 0
        ? "No event matches: nothing to replay."
        : `${integer.format(matched)} event${matched === 1 ? "" : "s"} would be sent again (dry run).`
      $("replay-confirm").textContent = `Replay ${integer.format(matched)}`
      $("replay-actions").hidden = matched === 0
    })
    .catch((error) => handle(error, $("replay-summary")))
}

async function confirmReplay() {
  const job = state.job
  $("replay-actions").hidden = true
  try {
    const started = await api("/api/v1/admin/replays", {method: "POST", body: JSON.stringify(job.filter)})
    job.id = started.id
    $("replay-progress").hidden = false
    followReplay(job)
  } catch (error) {
    handle(error, $("replay-status"))
  }
}

async function followReplay(job) {
  if (state.job !== job) return
  try {
    const progress = await api(`/api/v1/admin/replays/${job.id}`)
    const share = progress.matched > 0 ? Math.min(1, (progress.replayed + progress.deferred) / progress.matched) : 1
    $("replay-fill").style.width = `${share * 100}%`
    $("replay-status").dataset.status = progress.status
    $("replay-status").textContent = `${progress.status}: ${integer.format(progress.replayed)} of ` +
      `${integer.format(progress.matched)} replayed` +
      (progress.deferred ? `, ${integer.format(progress.deferred)} left to the outbox relay` : "") +
      (progress.error ? ` (${progress.error})` : "")
    if (progress.status === "running") {
      setTimeout(() => followReplay(job), 500)
    } else {
      loadEvents()
      if (state.detailId) refreshDetailUntilSettled(state.detailId, 40)
    }
  } catch (error) {
    handle(error, $("replay-status"))
  }
}

/** After a replay, the event's new attempt takes a moment: show it until it is settled. */
async function refreshDetailUntilSettled(id, tries) {
  await showEvent(id)
  const status = $("detail-status")?.dataset.status
  if (tries > 0 && state.detailId === id && (status === "accepted" || status === "published")) {
    setTimeout(() => refreshDetailUntilSettled(id, tries - 1), 500)
  }
}

// ---- wiring ----

document.addEventListener("DOMContentLoaded", () => {
  $("sign-in-form").addEventListener("submit", async (e) => {
    e.preventDefault()
    $("sign-in-error").textContent = ""
    try {
      await signIn($("api-key").value.trim())
    } catch (error) {
      const message = error instanceof Unauthorized ? "That key is not an admin key." : error.message
      signOut(message)
    }
  })
  $("sign-out").addEventListener("click", () => signOut())
  $("filters").addEventListener("submit", (e) => {
    e.preventDefault()
    state.cursors = [null]
    loadEvents()
  })
  $("older").addEventListener("click", () => {
    if (!state.next) return
    state.cursors.push(state.next)
    loadEvents()
  })
  $("newer").addEventListener("click", () => {
    if (state.cursors.length > 1) state.cursors.pop()
    loadEvents()
  })
  $("replay-matching").addEventListener("click", () => {
    const filter = filterParams()
    // Delivered events are replayed only when asked for by name: the filter asks for them here.
    if (filter.status === "delivered") filter.include_delivered = true
    openReplay(filter, "Replay the events matching the filter")
  })
  $("replay-confirm").addEventListener("click", confirmReplay)
  $("replay-cancel").addEventListener("click", () => { state.job = null; $("replay").hidden = true })
  $("replay-close").addEventListener("click", () => { state.job = null; $("replay").hidden = true })
  $("detail-close").addEventListener("click", () => { state.detailId = null; $("detail").hidden = true })
  $("detail-replay").addEventListener("click", () => {
    if (state.detailId) openReplay({ids: [state.detailId]}, "Replay this event")
  })
  const saved = sessionStorage.getItem(KEY)
  if (saved) signIn(saved).catch((error) => signOut(error instanceof Unauthorized ? "" : error.message))
})
