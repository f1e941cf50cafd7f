// `herald demo` and its page in headless Chromium (Debian's chromium driven by playwright-core): a
// person connects as a user, sends a test event and sees it arrive; the stats buttons answer; the
// console the demo prints (and the page links to) opens with the admin key it prints. A screenshot
// is kept under target/ for CI.

import assert from "node:assert/strict"
import {createECDH, randomBytes} from "node:crypto"
import {existsSync, mkdirSync} from "node:fs"
import {after, before, it} from "node:test"
import {chromium} from "playwright-core"
import {Herald, REPO} from "./herald.mjs"

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium"
let herald
let printed
let browser

before(async () => {
  if (!existsSync(CHROMIUM)) {
    throw new Error(`${CHROMIUM} is missing: install Debian's chromium (scripts/test does: apt-get install chromium)`)
  }
  // `herald demo` itself, as README's first command runs it.
  ;({node: herald, lines: printed} = await Herald.demo({HERALD_SOCKET__STATS_SLOW_PING_MS: "300"}))
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
      "--disable-sync", "--no-first-run"],
  })
})

after(async () => {
  await browser?.close()
  await herald?.destroy()
})

it("shows a sent event arriving live, and the stats channel answering", async () => {
  const page = await browser.newPage()
  const errors = []
  page.on("pageerror", (error) => errors.push(error.message))
  await page.goto(`${herald.url}/demo`)
  await page.fill("#user-id", "77")
  await page.click("#connect")
  await page.waitForFunction(() => document.querySelector("#status").textContent === "joined user:77")
  await page.click("#send")
  const item = page.locator("#events li").first()
  await item.waitFor()
  assert.match(await item.textContent(), /^#1 push_timed \{"n":1,"from":"demo page"\} \d+ ms$/)
  await page.click("#ping")
  await page.click("#slow-ping")
  await page.waitForFunction(() => document.querySelectorAll("#stats-log li").length === 2)
  const log = await page.locator("#stats-log li").allTextContents()
  assert.ok(log.some((l) => /^ping: \d+ ms$/.test(l)), log.join(" | "))
  assert.ok(log.some((l) => /^slow_ping: \d+ ms$/.test(l)), log.join(" | "))
  mkdirSync(`${REPO}target`, {recursive: true})
  await page.screenshot({path: `${REPO}target/demo.png`, fullPage: true})
  assert.deepEqual(errors, [])
})

it("prints the console's address and an admin key, and the page's link leads there", async () => {
  const consoleLine = printed.find((l) => l.startsWith("Console:"))
  assert.ok(consoleLine, printed.join("\n"))
  assert.equal(consoleLine.split(/\s+/)[1], `${herald.url}/console`)
  const adminKey = printed[printed.findIndex((l) => l.startsWith("Admin key")) + 1]?.trim()
  assert.ok(adminKey && adminKey !== herald.key, printed.join("\n"))
  const page = await browser.newPage()
  await page.goto(`${herald.url}/demo`)
  await page.click("#console-link")
  await page.waitForURL(`${herald.url}/console`)
  await page.fill("#api-key", adminKey)
  await page.click("#sign-in-button")
  await page.waitForSelector("#console", {state: "visible"})
  // The demo producer's key is not an admin key.
  const refused = await fetch(`${herald.url}/api/v1/admin/events`, {headers: {authorization: `Bearer ${herald.key}`}})
  assert.ok([401, 403].includes(refused.status), `${refused.status}`)
})

it("offers Web Push: the page subscribes or says why it cannot, and lists the user's subscriptions", async (t) => {
  const context = await browser.newContext()
  await context.grantPermissions(["notifications"], {origin: herald.url})
  const page = await context.newPage()
  const errors = []
  page.on("pageerror", (error) => errors.push(error.message))
  await page.goto(`${herald.url}/demo`)
  const key = await (await fetch(`${herald.url}/api/v1/webpush/key`)).json()
  assert.match(key.public_key, /^[A-Za-z0-9_-]{87}$/, "the demo serves a VAPID public key")
  // Subscribing needs the browser's push service (on the internet): here it either works or the
  // page shows the browser's reason.
  await page.click("#webpush-subscribe")
  await page.waitForFunction(() => /^(subscribed|cannot)/.test(document.querySelector("#webpush-status").textContent))
  const status = await page.locator("#webpush-status").textContent()
  assert.match(status, /^(subscribed \(https:\/\/|cannot subscribe: )/, status)
  t.diagnostic(`the page: ${status}`)
  // A subscription registered for user 42 (as a browser with a push service would) is listed.
  const {token} = await (await fetch(`${herald.url}/demo/token`, {
    method: "POST", headers: {"content-type": "application/json"}, body: JSON.stringify({user_id: "42"}),
  })).json()
  const ecdh = createECDH("prime256v1")
  ecdh.generateKeys()
  const registered = await fetch(`${herald.url}/api/v1/webpush/subscriptions`, {
    method: "POST",
    headers: {"content-type": "application/json", authorization: `Bearer ${token}`},
    body: JSON.stringify({
      endpoint: "https://fcm.googleapis.com/fcm/send/demo-test",
      expirationTime: null,
      keys: {p256dh: ecdh.getPublicKey("base64url"), auth: randomBytes(16).toString("base64url")},
    }),
  })
  assert.equal(registered.status, 201, await registered.text())
  await page.click("#webpush-list")
  await page.waitForFunction(() => /subscriptions? for user 42$/.test(document.querySelector("#webpush-status").textContent))
  const listed = await page.locator("#webpush-subscriptions li").allTextContents()
  assert.ok(listed.some((l) => l.startsWith("https://fcm.googleapis.com since ")), listed.join(" | "))
  assert.deepEqual(errors, [])
  await context.close()
})
