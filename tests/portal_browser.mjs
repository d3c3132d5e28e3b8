// The developer portal's whole flow in a real Chromium, by the accessible names of SPEC §10:
// invite -> set password -> sign in -> create key -> Copy -> call /v1/audio with it (200) ->
// usage rises -> rotate -> the old key works during the grace -> revoke (confirmed) -> the
// key is refused on the other node within a second -> sign out. Saves screenshots of the
// keys and usage pages in $SHOTS. Prints one JSON line; exits non-zero on any failure.
//
// env: AUDIOLIB_NODE_MODULES CHROMIUM INVITE_URL EMAIL API_ONE API_TWO SHOTS
import { createRequire } from 'node:module'

const env = process.env
const require = createRequire(env.AUDIOLIB_NODE_MODULES + '/')
const { chromium } = require('playwright-core')

const origin = new URL(env.INVITE_URL).origin
const password = 'a browser password'
const body = JSON.stringify({ library: 'audio.focus' })
const call = async (api, key) =>
  (await fetch(api, {
    method: 'POST',
    headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'application/json' },
    body,
  })).status
const check = (what, ok, detail) => {
  if (!ok) throw new Error(`${what}: ${detail ?? ''}`)
}

const browser = await chromium.launch({
  executablePath: env.CHROMIUM,
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
})
const seen = {}
try {
  const context = await browser.newContext({ viewport: { width: 960, height: 900 } })
  await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin })
  const page = await context.newPage()
  page.setDefaultTimeout(10000)
  const errors = []
  page.on('pageerror', (e) => errors.push(String(e)))

  // Invite -> set password -> sign in.
  await page.goto(env.INVITE_URL)
  await page.getByLabel('Password').fill(password)
  await page.getByRole('button', { name: 'Set password' }).click()
  await page.waitForURL('**/signin?password=set')
  await page.getByLabel('Email').fill(env.EMAIL)
  await page.getByLabel('Password').fill(password)
  await page.getByRole('button', { name: 'Sign in' }).click()
  await page.getByRole('heading', { name: 'API keys', level: 1 }).waitFor()

  // Usage before any call.
  await page.getByRole('link', { name: 'Usage' }).click()
  await page.getByRole('heading', { name: 'Usage', level: 1 }).waitFor()
  seen.usageBefore = await page.locator('#usage-line').innerText()
  check('usage starts at 0', seen.usageBefore === '0 of 1000 calls this month', seen.usageBefore)

  // Create a key, copy it with the Copy button.
  await page.getByRole('link', { name: 'API keys' }).click()
  await page.getByLabel('Key name').fill('browser key')
  await page.getByRole('button', { name: 'Create key' }).click()
  await page.getByText('it will not be shown again').waitFor()
  await page.getByRole('button', { name: 'Copy' }).click()
  await page.getByText('Copied.').waitFor()
  const key = await page.evaluate(() => navigator.clipboard.readText())
  check('copied a key', /^alp_[A-Za-z0-9]{32}$/.test(key), key)
  check('copied the key shown', key === (await page.locator('#new-key').innerText()))

  seen.firstCall = await call(env.API_ONE, key)
  check('the new key calls /v1/audio', seen.firstCall === 200, seen.firstCall)

  // Usage rises (nodes report within a second or so).
  await page.getByRole('link', { name: 'Usage' }).click()
  const deadline = Date.now() + 10000
  for (;;) {
    seen.usageAfter = await page.locator('#usage-line').innerText()
    if (seen.usageAfter === '1 of 1000 calls this month') break
    check('usage rose', Date.now() < deadline, seen.usageAfter)
    await page.waitForTimeout(200)
    await page.reload()
  }
  check('a chart', (await page.locator('svg[role=img]').count()) === 1)
  check('a bar for today', (await page.locator('svg rect:not([height="0"])').count()) === 1)
  check('the quick-start', (await page.getByText('curl -X POST').count()) === 1)
  await page.screenshot({ path: `${env.SHOTS}/usage.png`, fullPage: true })

  // The list, then rotate with a grace of 1 hour.
  await page.getByRole('link', { name: 'API keys' }).click()
  const row = page.locator('tr', { hasText: 'browser key' })
  check('the key is listed', (await row.count()) === 1)
  check('no secret in the list', !(await page.content()).includes(key))
  await page.screenshot({ path: `${env.SHOTS}/keys.png`, fullPage: true })
  // Readable on a phone: nothing wider than the screen (the table scrolls in its box).
  await page.setViewportSize({ width: 390, height: 844 })
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth)
  check('fits a phone', overflow <= 390, overflow)
  await page.screenshot({ path: `${env.SHOTS}/keys-phone.png`, fullPage: true })
  await page.setViewportSize({ width: 960, height: 900 })
  await row.getByRole('combobox').selectOption({ label: '1 hour' })
  await row.getByRole('button', { name: 'Rotate' }).click()
  await page.getByText('it will not be shown again').waitFor()
  const rotated = await page.locator('#new-key').innerText()
  check('a new secret', rotated !== key && rotated.startsWith('alp_'), rotated)
  seen.oldDuringGrace = await call(env.API_TWO, key)
  seen.newAfterRotate = await call(env.API_TWO, rotated)
  check('the old key works during the grace', seen.oldDuringGrace === 200, seen.oldDuringGrace)
  check('the new key works', seen.newAfterRotate === 200, seen.newAfterRotate)

  // Revoke, which asks first; refused on the other node within a second.
  await page.locator('tr', { hasText: 'browser key' }).getByRole('button', { name: 'Revoke' }).click()
  await page.getByRole('heading', { name: /Revoke/ }).waitFor()
  await page.getByRole('button', { name: 'Revoke' }).click()
  await page.getByRole('heading', { name: 'API keys', level: 1 }).waitFor()
  const revokedAt = Date.now()
  for (;;) {
    const [a, b] = [await call(env.API_TWO, rotated), await call(env.API_TWO, key)]
    if (a === 401 && b === 401) break
    check('revoked within a second', Date.now() - revokedAt < 1000, `${a} ${b}`)
    await new Promise((ok) => setTimeout(ok, 20))
  }
  seen.revokedAfterMs = Date.now() - revokedAt
  check('listed as revoked', (await page.locator('tr', { hasText: 'browser key' }).innerText()).includes('revoked'))

  // Sign out: the session is gone.
  await page.getByRole('button', { name: 'Sign out' }).click()
  await page.getByRole('button', { name: 'Sign in' }).waitFor()
  await page.goto(origin + '/keys')
  check('signed out', page.url().endsWith('/signin'), page.url())
  check('no page errors', errors.length === 0, errors.join('; '))
  seen.ok = true
} catch (e) {
  seen.ok = false
  seen.error = String(e)
} finally {
  await browser.close()
}
console.log(JSON.stringify(seen))
process.exit(seen.ok ? 0 : 1)
