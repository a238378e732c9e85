// Browser end to end: three headless Chromium pages (fake camera) join one
// room through the demo page; each must show two remote videos that decode
// frames; a page whose signalling socket is cut resumes its session without
// the others seeing it leave; when one leaves, the others drop its video.
//
// SFU_URL=http://host:port uses a running server; otherwise SFU_BIN names
// the server binary, started here on free ports and stopped at the end.
import { mkdirSync } from 'node:fs';
import { Run, waitIn, median, pollUntil, startProxy } from './lib.mjs';

const run = new Run('e2e', 90_000);
const check = (...args) => run.check(...args);

function remoteVideoCount(min) {
  const vids = [...document.querySelectorAll('video.remote-video')].filter((v) => v.isConnected);
  return vids.filter((v) => v.videoWidth > 0).length >= min ? vids.length : 0;
}

/** framesDecoded of every inbound video stream on the subscriber connection, by track sid. */
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

/** Track sids of the remote videos the page shows. */
async function shownTrackSids(page) {
  return page.evaluate(() => [...document.querySelectorAll('video.remote-video')].map((v) => v.dataset.trackSid));
}

/**
 * Samples framesDecoded, then polls (up to `ms`) until it has grown for every
 * track in `sids`. Returns whether it did, with the two samples.
 */
async function decodingGrows(page, sids, ms = 5_000) {
  const before = await framesDecoded(page);
  let after = before;
  const ok = await pollUntil(async () => {
    after = await framesDecoded(page);
    return sids.length > 0 && sids.every((sid) => (after[sid] || 0) > (before[sid] || 0));
  }, ms);
  return { ok: !!ok, detail: JSON.stringify({ sids, before, after }) };
}

async function main() {
  const base = await run.startServer();
  console.log(`server: ${base}`);
  const browser = await run.launch();
  const roomName = `e2e-${Date.now()}`;
  const pages = [];
  // Page 2 reaches the server through a proxy that the test cuts.
  const proxy = await startProxy(base);
  for (let i = 1; i <= 3; i++) {
    const ctx = await browser.newContext();
    const page = await ctx.newPage();
    page.on('pageerror', (e) => console.error(`[p${i}] ${e.message}`));
    await page.goto(`${i === 2 ? proxy.base : base}/?room=${roomName}&name=p${i}&autojoin=1`);
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
    const sids = await shownTrackSids(page);
    const { ok, detail } = await decodingGrows(page, sids);
    check(`page ${i + 1}: framesDecoded grows for both remote videos`, sids.length === 2 && ok, detail);
  }
  {
    // Chromium's RTCP (sender reports on its publisher connection;
    // receiver reports, estimates and keyframe requests on its subscriber
    // one) is decrypted by the room itself.
    const metrics = await (await fetch(`${base}/metrics`)).text();
    const line = metrics.split('\n').find((l) => l.startsWith('sfu_rtcp_packets_received_by_room_total '));
    const count = Number(line?.split(' ')[1]);
    check('the room decrypts browsers\' RTCP itself', count > 0, line ?? 'no such counter');
  }
  try {
    mkdirSync(new URL('./out/', import.meta.url), { recursive: true });
    await pages[0].screenshot({ path: new URL('./out/page1.png', import.meta.url).pathname });
  } catch {}
  // Page 2's network drops its signalling socket (reset, no close): the SDK
  // resumes the same session; pages 1 and 3 never see it leave, and video
  // goes on both ways.
  const p2Sid = await pages[1].evaluate(() => window.sfuRoom.localParticipant.sid);
  await pages[0].evaluate(() => {
    window.sfuLeftSeen = [];
    window.sfuRoom.on('participantLeft', (p) => window.sfuLeftSeen.push(p.sid));
  });
  await pages[2].evaluate(() => {
    window.sfuLeftSeen = [];
    window.sfuRoom.on('participantLeft', (p) => window.sfuLeftSeen.push(p.sid));
  });
  const cutAt = Date.now();
  const cut = proxy.cut();
  const resumed = await waitIn(pages[1], () => window.sfuRoom.reconnects >= 1 && !window.sfuRoom.reconnecting, null, 15_000);
  check('page 2 resumes its session after its socket is cut', cut > 0 && !!resumed, `sockets cut: ${cut}`);
  console.log(`page 2 resumed ${Date.now() - cutAt} ms after the cut`);
  const stillP2 = await pages[1].evaluate(() => window.sfuRoom.localParticipant.sid);
  check('page 2 keeps its participant sid', stillP2 === p2Sid, `${p2Sid} -> ${stillP2}`);
  for (const i of [0, 2]) {
    const sids = await shownTrackSids(pages[i]);
    const p2Track = await pages[i].evaluate((sid) => [...document.querySelectorAll('video.remote-video')]
      .filter((v) => v.dataset.participantSid === sid).map((v) => v.dataset.trackSid), p2Sid);
    const { ok, detail } = await decodingGrows(pages[i], p2Track);
    const left = await pages[i].evaluate(() => window.sfuLeftSeen);
    check(`page ${i + 1} never sees page 2 leave and still decodes it`, left.length === 0 && sids.length === 2 && ok, `${JSON.stringify(left)} ${detail}`);
  }
  {
    const sids = await shownTrackSids(pages[1]);
    const { ok, detail } = await decodingGrows(pages[1], sids);
    const { connected } = await pages[1].evaluate(() => ({ connected: window.sfuRoom.ws.readyState === WebSocket.OPEN }));
    check('page 2 decodes both remote videos after resuming, on a live socket', sids.length === 2 && ok && connected, detail);
  }

  // Page 1 turns its camera off and on: the others see the track muted and
  // unmuted (the SDK learnt its own track sid from trackPublished).
  const p1Sid = await pages[0].evaluate(() => window.sfuRoom.localParticipant.sid);
  const tileState = (sid) => document.getElementById(`tile-${sid}`)?.classList.contains('camera-off');
  await pages[0].click('#toggle-camera');
  const muted = await waitIn(pages[1], tileState, p1Sid, 5_000);
  check('page 2 sees page 1 camera muted', !!muted);
  await pages[0].click('#toggle-camera');
  const unmuted = await waitIn(pages[1], (sid) => document.getElementById(`tile-${sid}`)?.classList.contains('camera-off') === false, p1Sid, 5_000);
  check('page 2 sees page 1 camera unmuted', !!unmuted);

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
    const sids = await shownTrackSids(page);
    const { ok, detail } = await decodingGrows(page, sids);
    check(`page ${i + 1} still decodes the other remaining publisher after renegotiations`, sids.length === 1 && ok, detail);
    const dirs = await page.evaluate(() => window.sfuRoom.subscriberPc.getTransceivers().map((t) => t.currentDirection));
    const inactive = dirs.filter((d) => d === 'inactive' || d === 'stopped').length;
    check(`page ${i + 1} subscriber connection retired departed tracks`, inactive >= 2, JSON.stringify(dirs));
  }
  proxy.close();
  console.log(`join_to_first_frame_ms=${Math.round(median(lateTimes))} (median of late joiners: ${lateTimes.map(Math.round).join(', ')})`);
  return run.finish(0);
}

main().catch((e) => {
  check('browser test ran', false, e.stack || String(e));
  run.finish(1);
});
