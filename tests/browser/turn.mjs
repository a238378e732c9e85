// TURN in Chromium: two pages that may use relays only (iceTransportPolicy
// "relay") reach the server through the embedded TURN server, once over
// each transport: UDP, TCP, and TLS. Each run checks that the selected
// candidate pair is a relay over that transport and reports the time from
// joining to the first decoded remote frame.
import { Run, waitIn } from './lib.mjs';

const run = new Run('turn', 150_000);
const check = (...args) => run.check(...args);

/** The local side of each connection's selected candidate pair. */
async function selectedLocal(page) {
  return page.evaluate(async () => {
    const out = {};
    const room = window.sfuRoom;
    for (const [name, pc] of [['publisher', room.publisherPc], ['subscriber', room.subscriberPc]]) {
      if (!pc) continue;
      const stats = await pc.getStats();
      let pair = null;
      stats.forEach((s) => {
        if (s.type === 'transport' && s.selectedCandidatePairId) pair = stats.get(s.selectedCandidatePairId);
      });
      const local = pair && stats.get(pair.localCandidateId);
      if (local) out[name] = { type: local.candidateType, relayProtocol: local.relayProtocol || null };
    }
    return out;
  });
}

function showsRemoteVideo() {
  return [...document.querySelectorAll('video.remote-video')].some((v) => v.videoWidth > 0);
}

async function main() {
  const base = await run.startServer(['--turn-listen', '127.0.0.1:0', '--turn-tls-listen', '127.0.0.1:0']);
  console.log(`server: ${base}`);
  // The TURN-over-TLS certificate is self-signed.
  const browser = await run.launch(['--ignore-certificate-errors']);
  for (const transport of (process.env.TURN_TRANSPORTS || 'udp,tcp,tls').split(',')) {
    const room = `turn-${transport}-${Date.now()}`;
    const pages = [];
    for (const name of ['a', 'b']) {
      const ctx = await browser.newContext();
      const page = await ctx.newPage();
      page.on('pageerror', (e) => console.error(`[${transport}/${name}] ${e.message}`));
      await page.goto(`${base}/?room=${room}&name=${name}-${transport}&autojoin=1&relay=${transport}`);
      pages.push({ ctx, page });
    }
    const shown = [];
    for (const { page } of pages) shown.push(await waitIn(page, showsRemoteVideo, null, 25_000));
    const times = [];
    for (const { page } of pages) {
      times.push(await page.evaluate(() => Math.round(window.sfuFirstRemoteFrameAt - window.sfuJoinStartedAt)));
    }
    check(`over ${transport}: both pages decode each other's video through the relay`, shown.every(Boolean), `join to first frame ${times.join(', ')} ms`);
    const want = transport;
    for (const [i, { page }] of pages.entries()) {
      const local = await selectedLocal(page);
      const ok = ['publisher', 'subscriber'].every((k) => local[k]?.type === 'relay' && local[k]?.relayProtocol === want);
      check(`over ${transport}: page ${i + 1} selected relay candidates over ${want}`, ok, JSON.stringify(local));
    }
    for (const { ctx, page } of pages) {
      await page.click('#leave').catch(() => {});
      await ctx.close();
    }
  }
  return run.finish(0);
}

main().catch((e) => {
  check('browser test ran', false, e.stack || String(e));
  run.finish(1);
});
