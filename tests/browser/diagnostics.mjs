// The connection check page (/diagnostics) in Chromium, against a server
// running the embedded TURN server: every path it tries works from here
// (signalling, direct UDP, TURN over UDP, TCP and TLS), and it says so in
// plain words.
import { Run, waitIn } from './lib.mjs';

const run = new Run('diagnostics', 120_000);
const check = (...args) => run.check(...args);

async function results(page) {
  const done = await waitIn(page, () => window.sfuDiagnostics?.done, null, 90_000);
  check('the check finishes', !!done);
  return page.evaluate(() => window.sfuDiagnostics);
}

async function main() {
  const base = await run.startServer(['--turn-listen', '127.0.0.1:0', '--turn-tls-listen', '127.0.0.1:0']);
  const browser = await run.launch(['--ignore-certificate-errors']);
  const page = await (await browser.newContext()).newPage();
  page.on('pageerror', (e) => console.error(`[page] ${e.message}`));
  await page.goto(`${base}/diagnostics`);
  const r = await results(page);
  for (const row of r.rows) console.log(`  ${row.name}: ${row.ok} — ${row.detail}`);
  const byId = Object.fromEntries(r.rows.map((row) => [row.id, row]));
  for (const id of ['signalling', 'direct', 'relay-udp', 'relay-tcp', 'relay-tls']) {
    check(`${id} works`, byId[id]?.ok === true, byId[id]?.detail);
  }
  check('relay rows name relay candidates over their transport',
    ['udp', 'tcp', 'tls'].every((t) => byId[`relay-${t}`]?.detail.includes(`relay candidate over ${t.toUpperCase()}`)),
    JSON.stringify(r.rows.map((row) => row.detail)));
  check('the summary says calls connect directly', r.summary.startsWith('Calls connect directly'), r.summary);
  const shown = await page.textContent('#summary');
  check('the summary is on the page', shown === r.summary);
  return run.finish(0);
}

main().catch((e) => {
  check('browser test ran', false, e.stack || String(e));
  run.finish(1);
});
