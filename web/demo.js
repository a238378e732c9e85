// The demo page: join a room, publish camera and microphone, show everyone.
//
// Query parameters:
//   room, name        prefill the form (defaults: "demo", a random guest name)
//   autojoin=0        show the form instead of joining at once (autojoin=1 or
//                     no parameter joins on open)
//   publish=0         receive only
//   simulcast=0       send one video encoding instead of three layers
//   video=WxH         capture at this size (default 1280x720)
//   relay=udp|tcp|tls only TURN relays, over that transport (or any)
//   token, url        a join token minted by your backend and the signalling
//                     URL, for servers outside development mode
//
// For tests: window.sfuRoom is the Room, window.sfuJoinStartedAt and
// window.sfuFirstRemoteFrameAt are performance.now() marks of the join and
// of the first remote video frame.
import { Room } from '/sdk/sfu-sdk.js';

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
const grid = $('grid');

$('room').value = params.get('room') || 'demo';
$('name').value = params.get('name') || `guest-${Math.floor(Math.random() * 10000)}`;

/** @type {Room|null} */
let room = null;
let cameraOn = true;
let micOn = true;

function setStatus(text, state) {
  const el = $('status');
  el.textContent = text;
  el.dataset.state = state || text;
}

/** The tile of one participant ('local' for ourselves), created on demand. */
function tile(id, label) {
  let el = document.getElementById(`tile-${id}`);
  if (!el) {
    el = document.createElement('div');
    el.className = 'tile';
    el.id = `tile-${id}`;
    el.dataset.participantSid = id;
    const caption = document.createElement('span');
    caption.className = 'label';
    caption.textContent = label;
    el.appendChild(caption);
    grid.appendChild(el);
  }
  return el;
}

function removeTile(id) {
  document.getElementById(`tile-${id}`)?.remove();
}

async function getToken(roomName, identity) {
  if (params.get('token')) {
    const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
    return { token: params.get('token'), url: params.get('url') || `${scheme}://${location.host}/v1/rtc` };
  }
  const q = `room=${encodeURIComponent(roomName)}&identity=${encodeURIComponent(identity)}`;
  const res = await fetch(`/dev/token?${q}`);
  if (!res.ok) throw new Error('no token: pass ?token=...&url=... (the dev token endpoint exists only in development mode)');
  return res.json();
}

function qualityMenu(video) {
  const menu = document.createElement('select');
  menu.className = 'quality';
  menu.title = 'Received quality';
  for (const q of ['high', 'medium', 'low', 'paused']) menu.add(new Option(q, q));
  menu.addEventListener('change', () => {
    const v = menu.value;
    room?.setSubscription(video.dataset.trackSid, v === 'paused' ? { paused: true } : { quality: v, paused: false });
  });
  return menu;
}

function onTrackSubscribed({ participant, track, mediaStreamTrack }) {
  const t = tile(participant.sid, participant.identity);
  if (mediaStreamTrack.kind === 'video') {
    let video = t.querySelector('video.remote-video');
    if (!video) {
      video = document.createElement('video');
      video.className = 'remote-video';
      video.autoplay = true;
      video.playsInline = true;
      video.muted = true; // video only: the sound plays through the tile's <audio>
      video.dataset.participantSid = participant.sid;
      video.addEventListener('resize', () => {
        if (video.videoWidth > 0 && window.sfuFirstRemoteFrameAt === undefined) {
          window.sfuFirstRemoteFrameAt = performance.now();
        }
      });
      t.prepend(video);
      t.appendChild(qualityMenu(video));
    }
    video.dataset.trackSid = track.sid;
    video.srcObject = new MediaStream([mediaStreamTrack]);
    t.classList.toggle('camera-off', !!track.muted);
  } else {
    const audio = document.createElement('audio');
    audio.className = 'remote-audio';
    audio.autoplay = true;
    audio.hidden = true;
    audio.dataset.participantSid = participant.sid;
    audio.dataset.trackSid = track.sid;
    audio.srcObject = new MediaStream([mediaStreamTrack]);
    t.appendChild(audio);
    t.classList.toggle('mic-off', !!track.muted);
  }
}

function onTrackUnsubscribed({ participant, trackSid }) {
  const t = document.getElementById(`tile-${participant.sid}`);
  if (!t) return;
  for (const el of t.querySelectorAll(`[data-track-sid="${CSS.escape(trackSid)}"]`)) {
    if (el.tagName === 'VIDEO') t.querySelector('.quality')?.remove();
    el.remove();
  }
  if (!t.querySelector('video, audio')) removeTile(participant.sid);
}

function onTrackMuted({ participant, trackSid, muted }) {
  const track = participant.tracks.get(trackSid);
  const t = document.getElementById(`tile-${participant.sid}`);
  if (!t || !track) return;
  t.classList.toggle(track.kind === 'video' ? 'camera-off' : 'mic-off', muted);
}

function showJoined(joined) {
  $('join').hidden = joined;
  $('controls').hidden = !joined;
  if (!joined) grid.replaceChildren();
}

function showLocal(identity, stream) {
  const t = tile('local', `${identity} (you)`);
  t.classList.add('local');
  const video = document.createElement('video');
  video.className = 'local-video';
  video.autoplay = true;
  video.playsInline = true;
  video.muted = true;
  video.srcObject = stream;
  t.prepend(video);
}

async function join() {
  const roomName = $('room').value.trim();
  const identity = $('name').value.trim();
  window.sfuJoinStartedAt = performance.now();
  window.sfuFirstRemoteFrameAt = undefined;
  setStatus('connecting…', 'connecting');
  $('join-button').disabled = true;
  cameraOn = true;
  micOn = true;
  $('toggle-camera').textContent = 'Camera off';
  $('toggle-mic').textContent = 'Mic off';

  // ?relay=udp|tcp|tls (or any): only TURN relays, over that transport, to
  // try a path a restrictive network would leave.
  const relay = params.get('relay');
  room = new Room(relay ? { iceTransportPolicy: 'relay', turnTransport: relay === 'any' ? undefined : relay } : {});
  window.sfuRoom = room;
  room.on('trackSubscribed', onTrackSubscribed);
  room.on('trackUnsubscribed', onTrackUnsubscribed);
  room.on('participantLeft', (p) => removeTile(p.sid));
  room.on('trackMuted', onTrackMuted);
  room.on('error', (e) => console.warn(e));
  room.on('reconnecting', () => setStatus('reconnecting…', 'connecting'));
  room.on('reconnected', () => setStatus('connected'));
  const thisRoom = room;
  room.on('disconnected', (reason) => {
    if (room !== thisRoom) return;
    setStatus(reason === 'left' ? 'left' : `disconnected (${reason})`, 'disconnected');
    showJoined(false);
  });
  try {
    const { token, url } = await getToken(roomName, identity);
    await room.connect(url, token);
    setStatus('connected');
    showJoined(true);
    if (params.get('publish') === '0' || !room.canPublish) {
      setStatus('connected, receiving only', 'connected');
      return;
    }
    try {
      const size = /^(\d+)x(\d+)$/.exec(params.get('video') || '');
      const video = size ? { width: { ideal: Number(size[1]) }, height: { ideal: Number(size[2]) } } : true;
      const stream = await room.publishCamera({ video, simulcast: params.get('simulcast') !== '0' });
      showLocal(identity, stream);
    } catch (e) {
      // No camera (or permission refused): still receive everyone else.
      setStatus(`connected, receiving only (${e.name || e.message})`, 'connected');
    }
  } catch (e) {
    setStatus(`error: ${e.message}`, 'error');
    showJoined(false);
  } finally {
    $('join-button').disabled = false;
  }
}

$('join').addEventListener('submit', (e) => { e.preventDefault(); join(); });
$('toggle-camera').addEventListener('click', async () => {
  cameraOn = !cameraOn;
  await room?.setCameraEnabled(cameraOn);
  $('toggle-camera').textContent = cameraOn ? 'Camera off' : 'Camera on';
  document.getElementById('tile-local')?.classList.toggle('camera-off', !cameraOn);
});
$('toggle-mic').addEventListener('click', async () => {
  micOn = !micOn;
  await room?.setMicrophoneEnabled(micOn);
  $('toggle-mic').textContent = micOn ? 'Mic off' : 'Mic on';
  document.getElementById('tile-local')?.classList.toggle('mic-off', !micOn);
});
$('leave').addEventListener('click', () => room?.leave());

// Opening the page is joining: a newcomer opens it in two tabs and is in a
// call. ?autojoin=0 shows the form first.
if (params.get('autojoin') !== '0') join();
