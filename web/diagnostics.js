// The connection check at /diagnostics: which network paths between this
// browser and the media server work.
//
// Each check joins a throwaway room and publishes a small canvas track (no
// camera needed), limited to one kind of path, and waits for the media
// connection:
//   - signalling: the WebSocket to the server;
//   - direct: UDP straight to the media port (host or server-reflexive
//     candidates, no relay);
//   - public address: the server-reflexive candidate a STUN request learns
//     (what a NAT makes of this browser's address);
//   - relay over UDP, TCP and TLS: through the TURN server the server names.
//
// Query parameters: token and url (a join token and the signalling URL)
// for servers outside development mode.
//
// For tests: window.sfuDiagnostics = { rows: [{id, name, ok, detail}],
// summary, done }.
import { Room } from '/sdk/sfu-sdk.js';

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
const state = { rows: [], summary: '', done: false };
window.sfuDiagnostics = state;

const CONNECT_TIMEOUT_MS = 12_000;

function row(id, name) {
  const tr = document.createElement('tr');
  tr.id = `check-${id}`;
  tr.innerHTML = '<td></td><td>checking…</td><td></td>';
  tr.cells[0].textContent = name;
  $('checks').tBodies[0].append(tr);
  const entry = { id, name, ok: null, detail: '' };
  state.rows.push(entry);
  return (ok, detail, verdict) => {
    entry.ok = ok;
    entry.detail = detail;
    tr.dataset.ok = String(ok);
    tr.cells[1].textContent = verdict || (ok ? 'works' : 'does not work');
    tr.cells[2].textContent = detail;
  };
}

async function token(tag) {
  if (params.get('token')) {
    const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
    return { token: params.get('token'), url: params.get('url') || `${scheme}://${location.host}/v1/rtc` };
  }
  const identity = `diagnostics-${tag}-${Math.floor(Math.random() * 1e6)}`;
  const res = await fetch(`/dev/token?room=diagnostics-${Math.floor(Math.random() * 1e9)}&identity=${identity}`);
  if (!res.ok) throw new Error('no token: open this page with ?token=<join token> (the development token endpoint is off)');
  return res.json();
}

/** A small moving canvas as a video track. */
function canvasTrack() {
  const canvas = Object.assign(document.createElement('canvas'), { width: 160, height: 120 });
  const ctx = canvas.getContext('2d');
  let x = 0;
  const timer = setInterval(() => {
    ctx.fillStyle = '#123';
    ctx.fillRect(0, 0, 160, 120);
    ctx.fillStyle = '#4c8';
    ctx.fillRect((x += 7) % 160, 40, 30, 30);
  }, 50);
  const track = canvas.captureStream(20).getVideoTracks()[0];
  track.addEventListener('ended', () => clearInterval(timer));
  return track;
}

/** The local candidate of a connection's selected pair. */
async function selectedLocal(pc) {
  const stats = await pc.getStats();
  let local = null;
  stats.forEach((s) => {
    if (s.type === 'transport' && s.selectedCandidatePairId) {
      const pair = stats.get(s.selectedCandidatePairId);
      local = pair && stats.get(pair.localCandidateId);
    }
  });
  return local;
}

/**
 * Joins, publishes a canvas track with `options`, and waits for the media
 * connection. Resolves to { ok, local, ms, error }.
 */
async function tryPath(tag, options) {
  const started = performance.now();
  const room = new Room({ reconnectWindowMs: 0, ...options });
  let track = null;
  try {
    const { token: t, url } = await token(tag);
    await room.connect(url, t);
    track = canvasTrack();
    await room.publishTrack(track, { simulcast: false });
    const pc = room.publisherPc;
    const connected = await new Promise((resolve) => {
      const done = (v) => { clearTimeout(timer); resolve(v); };
      const timer = setTimeout(() => done(false), CONNECT_TIMEOUT_MS);
      const check = () => {
        if (pc.connectionState === 'connected') done(true);
        if (pc.connectionState === 'failed') done(false);
      };
      pc.addEventListener('connectionstatechange', check);
      check();
    });
    const ms = Math.round(performance.now() - started);
    const local = connected ? await selectedLocal(pc) : null;
    return { ok: connected, local, ms };
  } catch (e) {
    return { ok: false, error: e.message };
  } finally {
    track?.stop();
    await room.leave().catch(() => {});
  }
}

function describe(local) {
  if (!local) return '';
  const type = { host: 'host', srflx: 'server-reflexive', prflx: 'peer-reflexive', relay: 'relay' }[local.candidateType] || local.candidateType;
  const over = local.relayProtocol ? ` over ${local.relayProtocol.toUpperCase()}` : ` over ${String(local.protocol).toUpperCase()}`;
  return `${type} candidate${over}`;
}

/** Gathers candidates against a STUN URL; resolves to the server-reflexive ones. */
async function reflexive(urls) {
  const pc = new RTCPeerConnection({ iceServers: [{ urls }] });
  pc.createDataChannel('probe');
  const found = [];
  await new Promise((resolve) => {
    const timer = setTimeout(resolve, 5000);
    pc.onicecandidate = (e) => {
      if (!e.candidate) { clearTimeout(timer); resolve(); return; }
      if (e.candidate.type === 'srflx') found.push(`${e.candidate.address}:${e.candidate.port}`);
    };
    pc.createOffer().then((o) => pc.setLocalDescription(o));
  });
  pc.close();
  return found;
}

async function main() {
  const signalling = row('signalling', 'Signalling (WebSocket to the server)');
  let servers = [];
  try {
    const probe = new Room({ reconnectWindowMs: 0 });
    const { token: t, url } = await token('signalling');
    const start = performance.now();
    await probe.connect(url, t);
    servers = probe.iceServers;
    signalling(true, `connected in ${Math.round(performance.now() - start)} ms`);
    await probe.leave();
  } catch (e) {
    signalling(false, e.message);
    finish();
    return;
  }
  const turnUrls = servers.filter((s) => s.username).flatMap((s) => [].concat(s.urls));
  const stunUrls = servers.filter((s) => !s.username).flatMap((s) => [].concat(s.urls));

  const direct = row('direct', 'Direct UDP to the media server');
  const d = await tryPath('direct', { iceServers: [] });
  direct(d.ok, d.ok ? `${describe(d.local)}, connected in ${d.ms} ms` : (d.error || 'no connection within 12 s: UDP to the media server is blocked'));

  const srflx = row('srflx', 'Your public address (server-reflexive, via STUN)');
  if (stunUrls.length === 0 && turnUrls.length === 0) {
    srflx(null, 'the server names no STUN or TURN server', 'not checked');
  } else {
    // A TURN server answers STUN too.
    const probeUrls = stunUrls.length ? stunUrls : turnUrls.filter((u) => u.startsWith('turn:') && !u.includes('transport=tcp')).map((u) => u.replace(/^turn:/, 'stun:').replace(/\?.*$/, ''));
    const found = await reflexive(probeUrls);
    if (found.length) srflx(true, `seen as ${found.join(', ')}: a NAT or firewall stands between you and the server`, 'learned');
    else srflx(true, 'no address other than your local one: no NAT on the way, or STUN is blocked', 'none');
  }

  const relays = [['udp', 'TURN relay over UDP'], ['tcp', 'TURN relay over TCP'], ['tls', 'TURN relay over TLS']];
  for (const [transport, name] of relays) {
    const set = row(`relay-${transport}`, name);
    const wanted = turnUrls.filter((u) => (transport === 'tls' ? u.startsWith('turns:') : u.startsWith('turn:') && (u.includes(`transport=${transport}`) || (transport === 'udp' && !u.includes('transport=')))));
    if (wanted.length === 0) {
      set(null, 'the server names no TURN server for this transport', 'not offered');
      continue;
    }
    const r = await tryPath(transport, { iceTransportPolicy: 'relay', turnTransport: transport });
    set(r.ok, r.ok ? `${describe(r.local)} via ${wanted[0]}, connected in ${r.ms} ms` : (r.error || `no connection within 12 s through ${wanted[0]}`));
  }
  finish();
}

function finish() {
  const ok = (id) => state.rows.find((r) => r.id === id)?.ok === true;
  let summary;
  if (!ok('signalling')) {
    summary = 'The server cannot be reached at all from here: check the address, and whether a firewall or proxy blocks WebSocket connections.';
  } else if (ok('direct')) {
    summary = 'Calls connect directly: this network lets UDP through to the media server, the best path.';
  } else if (ok('relay-udp')) {
    summary = 'Direct UDP is blocked, but the TURN relay over UDP works: calls connect through the relay.';
  } else if (ok('relay-tcp') || ok('relay-tls')) {
    const which = ok('relay-tls') ? (ok('relay-tcp') ? 'TCP and TLS' : 'TLS') : 'TCP';
    summary = `Only TCP gets out of this network: calls connect through the TURN relay over ${which}, with more delay and less resilience to loss than UDP.`;
  } else {
    summary = 'No path to the media server works from this network: calls will not connect. Ask the network administrator to allow UDP to the media port, or TCP to the TURN server.';
  }
  state.summary = summary;
  state.done = true;
  $('summary').textContent = summary;
  const status = $('status');
  status.textContent = ok('direct') || ok('relay-udp') || ok('relay-tcp') || ok('relay-tls') ? 'calls can connect' : 'calls cannot connect';
  status.dataset.state = ok('direct') || ok('relay-udp') || ok('relay-tcp') || ok('relay-tls') ? 'connected' : 'error';
}

main();
