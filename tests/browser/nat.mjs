// The Chromium side of the NAT matrix (sfu-server/tests/nat_matrix.rs
// builds the networks and runs this): one headless Chromium per cell, each
// started inside that cell's network namespace, all four pages in one room.
// Every page must decode the three others; each reports the local side of
// its selected candidate pairs and the time to its first remote frame. In
// the tcp-only cell (only TCP to the signalling and TURN-over-TLS ports
// leaves) the path must be a relay over TLS.
//
// Env: SFU_URL (the server, inside the emulated public network) and
// NAT_CELLS ("cell=namespace,...").
import { chmodSync, writeFileSync } from 'node:fs';
import { chromium } from 'playwright-core';
import { Run, waitIn, CHROMIUM_ARGS } from './lib.mjs';

const run = new Run('nat', 150_000);
const check = (...args) => run.check(...args);

async function selectedLocal(page) {
  return page.evaluate(async () => {
    const out = {};
    for (const [name, pc] of [['publisher', window.sfuRoom.publisherPc], ['subscriber', window.sfuRoom.subscriberPc]]) {
      if (!pc) continue;
      const stats = await pc.getStats();
      stats.forEach((s) => {
        if (s.type === 'transport' && s.selectedCandidatePairId) {
          const pair = stats.get(s.selectedCandidatePairId);
          const local = pair && stats.get(pair.localCandidateId);
          if (local) out[name] = `${local.candidateType}/${local.relayProtocol || local.protocol}`;
        }
      });
    }
    return out;
  });
}

async function main() {
  const base = process.env.SFU_URL;
  const cells = (process.env.NAT_CELLS || '').split(',').filter(Boolean).map((c) => c.split('='));
  if (!base || cells.length === 0) throw new Error('set SFU_URL and NAT_CELLS');
  const room = `nat-browser-${Date.now()}`;
  const pages = [];
  for (const [cell, ns] of cells) {
    // Chromium inside the cell's namespace.
    const wrapper = `/tmp/chromium-${ns}.sh`;
    writeFileSync(wrapper, `#!/bin/sh\nexec ip netns exec ${ns} ${process.env.CHROMIUM_PATH || '/usr/bin/chromium'} "$@"\n`);
    chmodSync(wrapper, 0o755);
    const browser = await chromium.launch({
      executablePath: wrapper,
      headless: true,
      // The server is not on localhost: let this origin use the camera.
      args: [...CHROMIUM_ARGS, `--unsafely-treat-insecure-origin-as-secure=${base}`, '--ignore-certificate-errors'],
    });
    run.browsers = [...(run.browsers || []), browser];
    const page = await browser.newPage();
    page.on('pageerror', (e) => console.error(`[${cell}] ${e.message}`));
    // Four browsers share two cores: small single-layer video.
    await page.goto(`${base}/?room=${room}&name=${cell}&autojoin=1&simulcast=0&video=320x180`);
    pages.push({ cell, page });
  }
  const others = pages.length - 1;
  const decoding = (n) => [...document.querySelectorAll('video.remote-video')].filter((v) => v.videoWidth > 0).length >= n;
  // All pages at once, within one deadline.
  const shown = await Promise.all(pages.map(({ page }) => waitIn(page, decoding, others, 60_000)));
  const rows = [];
  for (const [i, { cell, page }] of pages.entries()) {
    const firstFrame = await page.evaluate(() => Math.round(window.sfuFirstRemoteFrameAt - window.sfuJoinStartedAt));
    const count = await page.evaluate(() => [...document.querySelectorAll('video.remote-video')].filter((v) => v.videoWidth > 0).length);
    const paths = await selectedLocal(page);
    rows.push({ cell, shown: !!shown[i], firstFrame, paths });
    check(`${cell}: decodes the ${others} other pages`, !!shown[i], `${count} decoding; first remote frame after ${firstFrame} ms; ${JSON.stringify(paths)}`);
    if (cell === 'tcp-only') {
      check('tcp-only: both connections relay over TLS', paths.publisher === 'relay/tls' && paths.subscriber === 'relay/tls', JSON.stringify(paths));
    }
  }
  console.log('| cell | connected | first remote frame | publisher path | subscriber path |');
  console.log('|---|---|---|---|---|');
  for (const r of rows) console.log(`| ${r.cell} | ${r.shown ? 'yes' : 'no'} | ${r.firstFrame} ms | ${r.paths.publisher || '-'} | ${r.paths.subscriber || '-'} |`);
  for (const b of run.browsers || []) await b.close().catch(() => {});
  return run.finish(0);
}

main().catch(async (e) => {
  check('browser NAT test ran', false, e.stack || String(e));
  for (const b of run.browsers || []) await b.close().catch(() => {});
  run.finish(1);
});
