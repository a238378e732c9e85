// The demo page: join a room, publish camera and microphone, show everyone.
//
// Query parameters: room, name, autojoin=0 (show the form instead of joining
// at once), publish=0 (receive only), simulcast=0 (send one layer), and for
// servers outside
// development mode token + url (a join token minted by your backend).
import { Room } from '/sdk/sfu-sdk.js';

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
const grid = $('grid');
const status = (text) => { $('status').textContent = text; };

$('room').value = params.get('room') || 'demo';
$('name').value = params.get('name') || `guest-${Math.floor(Math.random() * 10000)}`;

let room = null;
let cameraOn = true;
let micOn = true;

function tile(id, label) {
  let el = document.getElementById(`tile-${id}`);
  if (!el) {
    el = document.createElement('div');
    el.className = 'tile';
    el.id = `tile-${id}`;
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
    return { token: params.get('token'), url: params.get('url') || `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/v1/rtc` };
  }
  const res = await fetch(`/dev/token?room=${encodeURIComponent(roomName)}&identity=${encodeURIComponent(identity)}`);
  if (!res.ok) throw new Error('no token: pass ?token=...&url=... (the dev token endpoint exists only in development mode)');
  return res.json();
}

async function join() {
  const roomName = $('room').value.trim();
  const identity = $('name').value.trim();
  window.sfuJoinStartedAt = performance.now();
  status('connecting…');
  room = new Room();
  window.sfuRoom = room;
  room.on('trackSubscribed', ({ participant, mediaStreamTrack, stream }) => {
    const t = tile(participant.sid, participant.identity);
    if (mediaStreamTrack.kind === 'video') {
      let video = t.querySelector('video');
      if (!video) {
        video = document.createElement('video');
        video.className = 'remote-video';
        video.autoplay = true;
        video.playsInline = true;
        video.muted = true; // sound plays through the audio element
        video.dataset.participantSid = participant.sid;
        video.dataset.trackSid = mediaStreamTrack.id;
        const quality = document.createElement('select');
        quality.className = 'quality';
        quality.title = 'Received quality';
        for (const q of ['high', 'medium', 'low', 'paused']) quality.add(new Option(q, q));
        quality.addEventListener('change', () => {
          const v = quality.value;
          room.setSubscription(video.dataset.trackSid, v === 'paused' ? { paused: true } : { quality: v, paused: false });
        });
        t.appendChild(quality);
        video.addEventListener('resize', () => {
          if (video.videoWidth > 0 && window.sfuFirstRemoteFrameAt === undefined) {
            window.sfuFirstRemoteFrameAt = performance.now();
          }
        });
        t.prepend(video);
      }
      video.dataset.trackSid = mediaStreamTrack.id;
      video.srcObject = new MediaStream([mediaStreamTrack]);
    } else {
      let audio = t.querySelector('audio');
      if (!audio) {
        audio = document.createElement('audio');
        audio.autoplay = true;
        t.appendChild(audio);
      }
      audio.srcObject = new MediaStream([mediaStreamTrack]);
    }
    void stream;
  });
  room.on('trackUnsubscribed', ({ participant }) => {
    if (!participant.tracks.size) removeTile(participant.sid);
  });
  room.on('participantLeft', (p) => removeTile(p.sid));
  room.on('trackMuted', ({ participant, muted }) => {
    tile(participant.sid, participant.identity).classList.toggle('muted', muted);
  });
  room.on('disconnected', (reason) => { status(`disconnected (${reason})`); });
  room.on('error', (e) => console.warn(e));
  try {
    const { token, url } = await getToken(roomName, identity);
    await room.connect(url, token);
    status('connected');
    $('join').hidden = true;
    $('controls').hidden = false;
    if (params.get('publish') === '0') {
      status('connected, receiving only');
      return;
    }
    let stream;
    try {
      stream = await room.publishCamera({ simulcast: params.get('simulcast') !== '0' });
    } catch (e) {
      // No camera (or permission refused): still receive everyone else.
      status(`connected, receiving only (${e.name || e.message})`);
      return;
    }
    const t = tile('local', `${identity} (you)`);
    const video = document.createElement('video');
    video.className = 'local-video';
    video.autoplay = true;
    video.playsInline = true;
    video.muted = true;
    video.srcObject = stream;
    t.prepend(video);
  } catch (e) {
    status(`error: ${e.message}`);
  }
}

$('join').addEventListener('submit', (e) => { e.preventDefault(); join(); });
$('toggle-camera').addEventListener('click', async () => {
  cameraOn = !cameraOn;
  await room?.setCameraEnabled(cameraOn);
  $('toggle-camera').textContent = cameraOn ? 'Camera off' : 'Camera on';
});
$('toggle-mic').addEventListener('click', async () => {
  micOn = !micOn;
  await room?.setMicrophoneEnabled(micOn);
  $('toggle-mic').textContent = micOn ? 'Mic off' : 'Mic on';
});
$('leave').addEventListener('click', async () => {
  await room?.leave();
  grid.replaceChildren();
  $('controls').hidden = true;
  $('join').hidden = false;
  status('left');
});

// Opening the page is joining: a newcomer opens it in two tabs and is in a call.
// ?autojoin=0 shows the form first.
if (params.get('autojoin') !== '0') join();
