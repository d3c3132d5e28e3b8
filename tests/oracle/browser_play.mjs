// Plays the seed's browser example in a real Chromium, from a page on another origin than
// the gateway's and the store's: a click (a real user gesture, as an app's Play button
// gives) runs the Quick Start JavaScript, which fetches a track and calls
// `new Audio(url).play()`. Prints what the page saw as one JSON line.
//
// usage: node browser_play.mjs CHROMIUM EXAMPLE_JS
import http from 'node:http'
import { createRequire } from 'node:module'

const [chromiumPath, example] = process.argv.slice(2)
const require = createRequire(process.env.AUDIOLIB_NODE_MODULES + '/')
const { chromium } = require('playwright-core')

// Records each Audio the example makes and the status of its API call, then runs the
// example unchanged inside the click handler.
const page = `<!doctype html><meta charset="utf-8"><title>player</title>
<button id="play">Play</button>
<script>
  window.seen = { status: null, audios: [], error: null }
  const realFetch = window.fetch
  window.fetch = async (...args) => {
    const res = await realFetch(...args)
    window.seen.status = res.status
    return res
  }
  const RealAudio = window.Audio
  window.Audio = function (url) {
    const audio = new RealAudio(url)
    window.seen.audios.push(audio)
    return audio
  }
  document.getElementById('play').addEventListener('click', async () => {
    try {
${example}
    } catch (e) { window.seen.error = String(e) }
  })
</script>`

const server = http.createServer((req, res) => {
  res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' })
  res.end(page)
})
await new Promise((ok) => server.listen(0, '127.0.0.1', ok))
// `localhost`: another origin than the gateway's and the store's 127.0.0.1.
const origin = `http://localhost:${server.address().port}`

const browser = await chromium.launch({
  executablePath: chromiumPath,
  args: ['--no-sandbox', '--use-fake-device-for-media-stream'],
})
let result
try {
  const tab = await browser.newPage()
  const rejections = []
  tab.on('pageerror', (e) => rejections.push(String(e)))
  await tab.goto(origin + '/')
  await tab.click('#play')
  await tab.waitForFunction(
    () => window.seen.error || window.seen.audios.some((a) => a.ended || a.error),
    null,
    { timeout: 30000 },
  )
  result = await tab.evaluate(() => {
    const a = window.seen.audios[0]
    return {
      status: window.seen.status,
      error: window.seen.error,
      audios: window.seen.audios.length,
      ended: a ? a.ended : null,
      mediaError: a && a.error ? a.error.code : null,
      duration: a ? a.duration : null,
      currentTime: a ? a.currentTime : null,
      src: a ? a.currentSrc : null,
    }
  })
  result.origin = origin
  result.pageErrors = rejections
} finally {
  await browser.close()
  server.close()
}
console.log(JSON.stringify(result))
