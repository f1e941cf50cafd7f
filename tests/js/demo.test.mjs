// The demo page in headless Chromium (Debian's chromium driven by playwright-core): a person connects
// as a user, sends a test event and sees it arrive; the stats buttons answer. A screenshot is kept
// under target/ for CI.

import assert from "node:assert/strict"
import {existsSync, mkdirSync} from "node:fs"
import {after, before, it} from "node:test"
import {chromium} from "playwright-core"
import {Herald, REPO} from "./herald.mjs"

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium"
let herald
let browser

before(async () => {
  if (!existsSync(CHROMIUM)) {
    throw new Error(`${CHROMIUM} is missing: install Debian's chromium (scripts/test does: apt-get install chromium)`)
  }
  herald = await Herald.start({
    HERALD_DEMO__ENABLED: "true",
    HERALD_DEMO__ASSETS_DIR: `${REPO}demo`,
    // The page's stats channel; `herald demo` turns it on itself.
    HERALD_SOCKET__STATS_ENABLED: "true",
    HERALD_SOCKET__STATS_SLOW_PING_MS: "300",
  })
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
