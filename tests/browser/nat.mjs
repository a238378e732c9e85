// The Chromium side of the NAT matrix (sfu-server/tests/nat_matrix.rs
// builds the networks and runs this): one headless Chromium per cell, each
// started inside that cell's network namespace, all four pages in one room.
// Every page must decode the three others; each reports the local side of
// its selected candidate pairs and the time to its first remote frame. In
// the tcp-only cell (only TCP to the signalling and TURN-over-TLS ports
// leaves) the path must be a relay over TLS.
//
// Then the page in the cone cell changes network: its address is replaced
// (as when a laptop moves to another network), which breaks its signalling
// socket and both media paths without a word to anyone. The SDK must notice,
// resume its session, restart ICE on both connections, and decode again;
// its video must come back at the others, none of which sees it leave.
//
// Env: SFU_URL (the server, inside the emulated public network) and
// NAT_CELLS ("cell=namespace,...").
import { execFileSync } from 'node:child_process';
import { chmodSync, writeFileSync } from 'node:fs';
import { chromium } from 'playwright-core';
import { Run, waitIn, CHROMIUM_ARGS } from './lib.mjs';

const run = new Run('nat', 300_000);
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

/** framesDecoded per inbound video stream on a page's subscriber connection. */
async function decoded(page) {
  return page.evaluate(async () => {
    const out = {};
    const stats = await window.sfuRoom.subscriberPc.getStats();
    stats.forEach((s) => {
      if (s.type === 'inbound-rtp' && s.kind === 'video') out[s.trackIdentifier] = s.framesDecoded || 0;
    });
    return out;
  });
}

async function networkChange(pages, cells) {
  const moving = pages.find((p) => p.cell === 'cone');
  if (!moving) return;
  const ns = cells.find(([cell]) => cell === 'cone')[1];
  const sid = await moving.page.evaluate(() => window.sfuRoom.localParticipant.sid);
  for (const { page } of pages) {
    await page.evaluate(() => {
      window.sfuLeftSeen = [];
      window.sfuRoom.on('participantLeft', (p) => window.sfuLeftSeen.push(p.sid));
    });
  }
  const ufrags = () => moving.page.evaluate(() => [window.sfuRoom.publisherPc, window.sfuRoom.subscriberPc]
    .map((pc) => /a=ice-ufrag:(\S+)/.exec(pc.localDescription.sdp)?.[1]));
  const ufragsBefore = await ufrags();
  const sh = (...args) => execFileSync('ip', ['-n', ns, ...args]);
  const changedAt = Date.now();
  sh('addr', 'flush', 'dev', 'eth0');
  sh('addr', 'add', '10.2.0.77/24', 'dev', 'eth0');
  sh('route', 'add', 'default', 'via', '10.2.0.1');
  const resumed = await waitIn(moving.page, () => window.sfuRoom.reconnects >= 1 && !window.sfuRoom.reconnecting, null, 40_000);
  const resumedAfter = Date.now() - changedAt;
  check('cone page resumes its session after a change of network', !!resumed, `after ${resumedAfter} ms`);
  // Decoding goes on at the moved page, for all three others.
  let before = await decoded(moving.page);
  const grows = await waitIn(moving.page, async (prev) => {
    const out = {};
    const stats = await window.sfuRoom.subscriberPc.getStats();
    stats.forEach((s) => {
      if (s.type === 'inbound-rtp' && s.kind === 'video') out[s.trackIdentifier] = s.framesDecoded || 0;
    });
    const grown = Object.keys(prev).filter((k) => (out[k] || 0) > prev[k] + 10);
    return grown.length >= 3 ? out : false;
  }, before, 30_000);
  const decodingAfter = Date.now() - changedAt;
  check('cone page decodes the three others again', !!grows, `${decodingAfter} ms after the change; ${JSON.stringify(await moving.page.evaluate(() => window.sfuRoom.timings))}`);
  // The others decode its video again and never saw it leave.
  for (const { cell, page } of pages) {
    if (page === moving.page) continue;
    const trackSid = await page.evaluate((pid) => [...document.querySelectorAll('video.remote-video')].find((v) => v.dataset.participantSid === pid)?.dataset.trackSid, sid);
    before = await decoded(page);
    const back = await waitIn(page, async ([t, prev]) => {
      const stats = await window.sfuRoom.subscriberPc.getStats();
      let now = 0;
      stats.forEach((s) => { if (s.type === 'inbound-rtp' && s.kind === 'video' && s.trackIdentifier === t) now = s.framesDecoded || 0; });
      return now > (prev[t] || 0) + 10;
    }, [trackSid, before], 60_000);
    const left = await page.evaluate(() => window.sfuLeftSeen);
    // What the page's receiver of that track saw, to tell a path that
    // carries nothing from a decoder that waits for a keyframe.
    const inbound = back ? '' : await page.evaluate(async (t) => {
      const stats = await window.sfuRoom.subscriberPc.getStats();
      let out = null;
      stats.forEach((s) => {
        if (s.type === 'inbound-rtp' && s.kind === 'video' && s.trackIdentifier === t) {
          const { packetsReceived, packetsLost, framesReceived, framesDecoded, keyFramesDecoded, frameWidth, pliCount, firCount, nackCount } = s;
          out = { packetsReceived, packetsLost, framesReceived, framesDecoded, keyFramesDecoded, frameWidth, pliCount, firCount, nackCount };
        }
      });
      const shown = [...document.querySelectorAll('video.remote-video')].map((v) => v.dataset.trackSid);
      return ` track ${t}: ${JSON.stringify(out)}; shown tracks ${JSON.stringify(shown)}; subscriber ${window.sfuRoom.subscriberPc.connectionState}`;
    }, trackSid);
    check(`${cell} page decodes the moved page again and never saw it leave`, !!back && left.length === 0, `${JSON.stringify(left)}${inbound}`);
  }
  const ufragsAfter = await ufrags();
  check('cone page restarted ICE on both connections', ufragsAfter[0] !== ufragsBefore[0] && ufragsAfter[1] !== ufragsBefore[1], `${ufragsBefore} -> ${ufragsAfter}`);
  const paths = await selectedLocal(moving.page);
  console.log(`network change: resumed after ${resumedAfter} ms, decoding the others after ${decodingAfter} ms; paths now ${JSON.stringify(paths)}`);
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
  await networkChange(pages, cells);
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
