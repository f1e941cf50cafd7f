// The operator console in headless Chromium (Debian's chromium driven by playwright-core), as an
// operator uses it: sign in with an admin key, watch the live figures move as events are delivered,
// find a failed event (failed by the fault injector the tests use), read its attempt log, replay
// it after a dry-run count, and see it delivered. Screenshots land in target/console-screenshots/
// for a reviewer.

import assert from "node:assert/strict"
import {existsSync, mkdirSync} from "node:fs"
import {after, before, it} from "node:test"
import {chromium} from "playwright-core"
import {Herald, REPO, join} from "./herald.mjs"

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium"
const SHOTS = `${REPO}target/console-screenshots`
const PATIENCE = 20_000
let herald
let browser
let socket

before(async () => {
  if (!existsSync(CHROMIUM)) {
    throw new Error(`${CHROMIUM} is missing: install Debian's chromium (scripts/test does: apt-get install chromium)`)
  }
  herald = await Herald.start({
    // `flaky` events fail their first two attempts on this node: with two attempts in all they
    // end failed and dead-lettered, and a replay (the third attempt) delivers them.
    HERALD_FAULTS__FAIL_EVENTS: "flaky:2",
    HERALD_RETRY__MAX_ATTEMPTS: "2",
    HERALD_RETRY__SCHEDULE_MS: "100",
  })
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
      "--disable-sync", "--no-first-run"],
  })
  mkdirSync(SHOTS, {recursive: true})
})

after(async () => {
  socket?.disconnect()
  await browser?.close()
  await herald?.destroy()
})

const number = (text) => Number(text.replaceAll(",", ""))

it("signs in, shows live figures, and replays a failed event until it is delivered", async () => {
  const page = await browser.newPage({viewport: {width: 1400, height: 1000}})
  try {
    await operate(page)
  } catch (error) {
    // What the page showed when it went wrong, for whoever reads the failure.
    await page.screenshot({path: `${SHOTS}/failure.png`, fullPage: true}).catch(() => {})
    throw error
  }
})

async function operate(page) {
  const errors = []
  page.on("pageerror", (error) => errors.push(error.message))
  await page.goto(`${herald.url}/console`)

  // A producer key is not an admin key: refused, and the console stays closed.
  await page.fill("#api-key", herald.key)
  await page.click("#sign-in-button")
  await page.waitForFunction(() => document.querySelector("#sign-in-error").textContent.includes("not an admin key"))
  assert.equal(await page.isVisible("#console"), false)
  await page.screenshot({path: `${SHOTS}/1-sign-in.png`})

  await page.fill("#api-key", await herald.adminKey())
  await page.click("#sign-in-button")
  await page.waitForSelector("#console", {state: "visible"})
  assert.ok(await page.evaluate(() => sessionStorage.getItem("herald.adminKey")), "the key is kept for the tab")
  await page.waitForFunction(() => document.querySelectorAll("#partitions .bar").length === 4, null, {timeout: PATIENCE})

  // Figures move: a connected user gets ten events; delivered and the latency percentiles follow.
  socket = await herald.userSocket("5")
  socket.connect()
  await join(socket.channel("user:5"))
  const deliveredBefore = number(await page.textContent("#total-delivered"))
  for (let n = 1; n <= 10; n++) await herald.send("5", {n})
  await page.waitForFunction((floor) => Number(document.querySelector("#total-delivered").textContent.replaceAll(",", "")) >= floor,
    deliveredBefore + 10, {timeout: PATIENCE})
  await page.waitForFunction(() => /ms|s$/.test(document.querySelector("#fig-p50").textContent), null, {timeout: PATIENCE})
  await page.waitForFunction(() => Number(document.querySelector("#fig-delivered").textContent) > 0, null, {timeout: PATIENCE})
  await page.waitForFunction(() => document.querySelector("#fig-connections").textContent === "1" &&
    document.querySelector("#fig-channels").textContent === "1", null, {timeout: PATIENCE})

  // A failed event: the list shows it; its detail shows both failed attempts.
  // Sent with the producer's W3C trace context: the detail shows its trace id.
  const trace = "4bf92f3577b34da6a3ce929d0e0e4736"
  const failed = await herald.send("6", {order: 42}, "flaky", {traceparent: `00-${trace}-00f067aa0ba902b7-01`})
  await page.waitForFunction(() => document.querySelector("#fig-failed-events").textContent === "1", null, {timeout: PATIENCE})
  await page.waitForFunction(() => Number(document.querySelector("#total-dead").textContent) >= 1, null, {timeout: PATIENCE})
  await page.click("#apply")
  const row = page.locator(`#events tr[data-id="${failed.id}"]`)
  await row.waitFor({timeout: PATIENCE})
  assert.match(await row.textContent(), /failed/)
  await page.screenshot({path: `${SHOTS}/2-live-figures-and-failed-events.png`, fullPage: true})
  await row.click()
  await page.waitForFunction((id) => document.querySelector("#detail-id").textContent === id, failed.id)
  assert.equal(await page.getAttribute("#detail-status", "data-status"), "failed")
  assert.equal(await page.locator("#detail-attempts tr").count(), 2)
  assert.match(await page.textContent("#detail-attempts"), /injected fault for flaky/)
  assert.match(await page.textContent("#detail-data"), /"order": 42/)
  assert.match(await page.textContent("#detail-fields"), new RegExp(`Trace${trace}`))

  // Replay: a dry-run count first, then the job's progress until done, then the event delivered.
  await page.click("#detail-replay")
  await page.waitForFunction(() => document.querySelector("#replay-summary").textContent.startsWith("1 event would be sent again"),
    null, {timeout: PATIENCE})
  await page.screenshot({path: `${SHOTS}/3-event-detail-and-dry-run.png`, fullPage: true})
  await page.click("#replay-confirm")
  await page.waitForFunction(() => document.querySelector("#replay-status").dataset.status === "done", null, {timeout: PATIENCE})
  assert.match(await page.textContent("#replay-status"), /done: 1 of 1 replayed/)
  await page.waitForFunction(() => document.querySelector("#detail-status")?.dataset.status === "delivered", null, {timeout: PATIENCE})
  assert.equal(await page.locator("#detail-attempts tr").count(), 3)
  await page.waitForFunction(() => document.querySelector("#fig-failed-events").textContent === "0", null, {timeout: PATIENCE})
  await page.screenshot({path: `${SHOTS}/4-replayed-and-delivered.png`, fullPage: true})

  // Signing out forgets the key.
  await page.click("#sign-out")
  assert.equal(await page.evaluate(() => sessionStorage.getItem("herald.adminKey")), null)
  assert.deepEqual(errors, [])
}
