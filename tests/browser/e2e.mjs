// Browser end to end: three headless Chromium pages (fake camera) join one
// room through the demo page; each must show two remote videos that decode
// frames; when one leaves, the others drop its video.
//
// SFU_URL=http://host:port uses a running server; otherwise SFU_BIN names
// the server binary, started here on free ports and stopped at the end.
import { mkdirSync } from 'node:fs';
import { Run, waitIn, median, sleep } from './lib.mjs';

const run = new Run('e2e', 120_000);
const check = (...args) => run.check(...args);

function remoteVideoCount(min) {
  const vids = [...document.querySelectorAll('video.remote-video')].filter((v) => v.isConnected);
  return vids.filter((v) => v.videoWidth > 0).length >= min ? vids.length : 0;
}

async function framesDecoded(page) {
  return page.evaluate(async () => {
    const stats = await window.sfuRoom.subscriberPc.getStats();
    const out = {};
    stats.forEach((s) => {
      if (s.type === 'inbound-rtp' && s.kind === 'video') out[s.trackIdentifier || s.id] = s.framesDecoded || 0;
    });
    return out;
  });
}

async function main() {
  const base = await run.startServer();
  console.log(`server: ${base}`);
  const browser = await run.launch();
  const roomName = `e2e-${Date.now()}`;
  const pages = [];
  for (let i = 1; i <= 3; i++) {
    const ctx = await browser.newContext();
    const page = await ctx.newPage();
    page.on('pageerror', (e) => console.error(`[p${i}] ${e.message}`));
    await page.goto(`${base}/?room=${roomName}&name=p${i}&autojoin=1`);
    pages.push(page);
  }
  const joinTimes = [];
  for (const [i, page] of pages.entries()) {
    const n = await waitIn(page, remoteVideoCount, 2, 20_000);
    check(`page ${i + 1} shows two remote videos with videoWidth > 0`, n === 2, `count=${n}`);
    const t = await page.evaluate(() => window.sfuFirstRemoteFrameAt - window.sfuJoinStartedAt);
    if (Number.isFinite(t)) joinTimes.push(t);
  }
  for (const [i, page] of pages.entries()) {
    const a = await framesDecoded(page);
    await sleep(1000);
    const b = await framesDecoded(page);
    const keys = Object.keys(b);
    const growing = keys.filter((k) => b[k] > (a[k] || 0));
    check(`page ${i + 1}: framesDecoded grows for both remote videos`, keys.length >= 2 && growing.length >= 2,
      JSON.stringify({ before: a, after: b }));
  }
  try {
    mkdirSync(new URL('./out/', import.meta.url), { recursive: true });
    await pages[0].screenshot({ path: new URL('./out/page1.png', import.meta.url).pathname });
  } catch {}
  // Page 3 leaves; the others drop its video.
  const leaverSid = await pages[2].evaluate(() => window.sfuRoom.localParticipant.sid);
  await pages[2].click('#leave');
  for (const [i, page] of pages.slice(0, 2).entries()) {
    const gone = await waitIn(page, (sid) => {
      const vids = [...document.querySelectorAll('video.remote-video')];
      return vids.length === 1 && !vids.some((v) => v.dataset.participantSid === sid);
    }, leaverSid, 10_000);
    check(`page ${i + 1} removes the leaver's video`, !!gone);
  }
  console.log(`first three pages, join to first remote frame (includes waiting for the others to publish): ${joinTimes.map(Math.round).join(', ')} ms`);

  // Late joiners into a running call: join to first decoded remote frame.
  const lateTimes = [];
  for (let i = 4; i <= 6; i++) {
    const ctx = await browser.newContext();
    const page = await ctx.newPage();
    await page.goto(`${base}/?room=${roomName}&name=p${i}&autojoin=1`);
    const n = await waitIn(page, remoteVideoCount, 2, 20_000);
    check(`late joiner p${i} shows both remote videos`, n === 2, `count=${n}`);
    const t = await page.evaluate(() => ({
      firstFrame: window.sfuFirstRemoteFrameAt - window.sfuJoinStartedAt,
      marks: Object.fromEntries(Object.entries(window.sfuRoom.timings).map(([k, v]) => [k, Math.round(v - window.sfuJoinStartedAt)])),
    }));
    console.log(`p${i}: first frame ${Math.round(t.firstFrame)} ms; marks ${JSON.stringify(t.marks)}`);
    if (Number.isFinite(t.firstFrame)) lateTimes.push(t.firstFrame);
    await page.click('#leave');
    await ctx.close();
  }
  // After all that renegotiation, the two who stayed still decode each other,
  // and the subscriber connection retired the leavers' transceivers.
  for (const [i, page] of pages.slice(0, 2).entries()) {
    const a = await framesDecoded(page);
    await sleep(1000);
    const b = await framesDecoded(page);
    const growing = Object.keys(b).filter((k) => b[k] > (a[k] || 0));
    check(`page ${i + 1} still decodes the other remaining publisher after renegotiations`, growing.length >= 1, JSON.stringify(b));
    const dirs = await page.evaluate(() => window.sfuRoom.subscriberPc.getTransceivers().map((t) => t.currentDirection));
    const inactive = dirs.filter((d) => d === 'inactive' || d === 'stopped').length;
    check(`page ${i + 1} subscriber connection retired departed tracks`, inactive >= 2, JSON.stringify(dirs));
  }
  console.log(`join_to_first_frame_ms=${Math.round(median(lateTimes))} (median of late joiners: ${lateTimes.map(Math.round).join(', ')})`);
  return run.finish(0);
}

main().catch((e) => {
  check('browser test ran', false, e.stack || String(e));
  run.finish(1);
});
