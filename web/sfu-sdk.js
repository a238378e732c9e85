// Browser SDK for the SFU: an ES module with no dependencies and no build step.
//
//   import { Room } from '/sdk/sfu-sdk.js';
//   const room = new Room();
//   room.on('trackSubscribed', ({ participant, mediaStreamTrack }) => ...);
//   await room.connect('ws://host:7880/v1/rtc', token);
//   await room.publishCamera();
//
// The protocol it speaks is documented in docs/protocol.md: two peer
// connections per participant, the client offering on the publisher one and
// the server offering on the subscriber one.

const PING_INTERVAL_MS = 10_000;

/** A participant in the room as this client knows it. */
export class RemoteParticipant {
  constructor(info) {
    this.sid = info.sid;
    this.identity = info.identity;
    this.name = info.name || '';
    /** @type {Map<string, {sid:string, kind:string, muted:boolean, mediaStreamTrack?:MediaStreamTrack}>} */
    this.tracks = new Map();
    for (const t of info.tracks || []) this.tracks.set(t.sid, { ...t });
  }
}

export class Room {
  constructor() {
    this.ws = null;
    this.localParticipant = null;
    /** @type {Map<string, RemoteParticipant>} */
    this.participants = new Map();
    this.publisherPc = null;
    this.subscriberPc = null;
    this.iceServers = [];
    this.localStream = null;
    /** server track sid by local MediaStreamTrack.id */
    this.localTrackSids = new Map();
    this._listeners = new Map();
    this._pendingCandidates = { publisher: [], subscriber: [] };
    this._negotiating = false;
    this._renegotiate = false;
    this._pingTimer = null;
    this._closed = false;
    this._inbox = Promise.resolve();
    /** performance.now() marks of the join sequence, for diagnostics. */
    this.timings = {};
  }

  _mark(name) {
    if (this.timings[name] === undefined) this.timings[name] = performance.now();
  }

  /** Subscribes `fn` to an event. */
  on(name, fn) {
    if (!this._listeners.has(name)) this._listeners.set(name, new Set());
    this._listeners.get(name).add(fn);
    return this;
  }

  off(name, fn) {
    this._listeners.get(name)?.delete(fn);
    return this;
  }

  _emit(name, arg) {
    for (const fn of this._listeners.get(name) || []) {
      try { fn(arg); } catch (e) { console.error(`listener for ${name} failed`, e); }
    }
  }

  _send(msg) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(msg));
  }

  /**
   * Connects to the signalling endpoint; resolves once the server has
   * answered with `joined`.
   * @param {string} url  e.g. ws://127.0.0.1:7880/v1/rtc
   * @param {string} token  a join token
   */
  connect(url, token) {
    this._mark('connect');
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(`${url}?access_token=${encodeURIComponent(token)}`);
      this.ws = ws;
      let joined = false;
      ws.onmessage = (ev) => {
        let msg;
        try { msg = JSON.parse(ev.data); } catch { return; }
        if (msg.type === 'joined') {
          this._mark('joined');
          joined = true;
          this._onJoined(msg);
          resolve(this);
          return;
        }
        if (!joined && msg.type === 'error') {
          reject(new Error(msg.message));
          return;
        }
        // Handle messages strictly in order: an offer's answer must be sent
        // before the next message touches the same connection.
        this._inbox = this._inbox
          .then(() => this._onMessage(msg))
          .catch((e) => this._emit('error', e));
      };
      ws.onclose = (ev) => {
        this._teardown();
        if (!joined) reject(new Error(`signalling closed before joining (code ${ev.code})`));
        this._emit('disconnected', ev.reason || 'closed');
      };
      ws.onerror = () => {
        if (!joined) reject(new Error('cannot reach the signalling server'));
      };
    });
  }

  _onJoined(msg) {
    this.localParticipant = { sid: msg.participant.sid, identity: msg.participant.identity };
    this.iceServers = msg.iceServers || [];
    for (const p of msg.participants) this.participants.set(p.sid, new RemoteParticipant(p));
    this.subscriberPc = new RTCPeerConnection({ iceServers: this.iceServers });
    this.subscriberPc.onicecandidate = (e) => {
      if (e.candidate) this._send({ type: 'candidate', target: 'subscriber', candidate: e.candidate.toJSON() });
    };
    this.subscriberPc.ontrack = (e) => this._onRemoteTrack(e);
    this.subscriberPc.onconnectionstatechange = () => {
      if (this.subscriberPc.connectionState === 'connected') this._mark('subscriberConnected');
    };
    this._pingTimer = setInterval(() => this._send({ type: 'ping', ts: Date.now() }), PING_INTERVAL_MS);
    for (const p of this.participants.values()) this._emit('participantJoined', p);
  }

  _onRemoteTrack(e) {
    const stream = e.streams[0];
    const participantSid = stream ? stream.id : '';
    const trackSid = e.track.id;
    const participant = this.participants.get(participantSid);
    if (!participant) return;
    let pub = participant.tracks.get(trackSid);
    if (!pub) {
      pub = { sid: trackSid, kind: e.track.kind, muted: false };
      participant.tracks.set(trackSid, pub);
    }
    pub.mediaStreamTrack = e.track;
    this._mark('firstRemoteTrack');
    this._emit('trackSubscribed', { participant, track: pub, mediaStreamTrack: e.track, stream });
  }

  async _onMessage(msg) {
    switch (msg.type) {
      case 'answer': {
        if (msg.target !== 'publisher' || !this.publisherPc) return;
        await this.publisherPc.setRemoteDescription({ type: 'answer', sdp: msg.sdp });
        await this._flushCandidates('publisher');
        this._negotiating = false;
        if (this._renegotiate) {
          this._renegotiate = false;
          await this._negotiate();
        }
        return;
      }
      case 'offer': {
        if (msg.target !== 'subscriber') return;
        this._mark('subscriberOffer');
        const pc = this.subscriberPc;
        await pc.setRemoteDescription({ type: 'offer', sdp: msg.sdp });
        await this._flushCandidates('subscriber');
        const answer = await pc.createAnswer();
        await pc.setLocalDescription(answer);
        this._send({ type: 'answer', target: 'subscriber', sdp: pc.localDescription.sdp });
        return;
      }
      case 'candidate': {
        const pc = msg.target === 'publisher' ? this.publisherPc : this.subscriberPc;
        if (!pc || !pc.remoteDescription) {
          this._pendingCandidates[msg.target]?.push(msg.candidate);
          return;
        }
        await pc.addIceCandidate(msg.candidate).catch(() => {});
        return;
      }
      case 'participantJoined': {
        const p = new RemoteParticipant(msg.participant);
        this.participants.set(p.sid, p);
        this._emit('participantJoined', p);
        return;
      }
      case 'participantLeft': {
        const p = this.participants.get(msg.sid);
        if (!p) return;
        for (const trackSid of p.tracks.keys()) this._emit('trackUnsubscribed', { participant: p, trackSid });
        this.participants.delete(msg.sid);
        this._emit('participantLeft', p);
        return;
      }
      case 'trackPublished': {
        if (msg.participantSid === this.localParticipant?.sid) {
          this.localTrackSids.set(msg.track.cid, msg.track.sid);
          this._emit('localTrackPublished', msg.track);
          return;
        }
        const p = this.participants.get(msg.participantSid);
        if (p && !p.tracks.has(msg.track.sid)) p.tracks.set(msg.track.sid, { ...msg.track });
        return;
      }
      case 'trackUnpublished': {
        const p = this.participants.get(msg.participantSid);
        if (!p) return;
        p.tracks.delete(msg.trackSid);
        this._emit('trackUnsubscribed', { participant: p, trackSid: msg.trackSid });
        return;
      }
      case 'trackMuted': {
        const p = this.participants.get(msg.participantSid);
        const t = p?.tracks.get(msg.trackSid);
        if (t) t.muted = msg.muted;
        if (p) this._emit('trackMuted', { participant: p, trackSid: msg.trackSid, muted: msg.muted });
        return;
      }
      case 'leave':
        this._emit('disconnected', msg.reason);
        return;
      case 'error':
        this._emit('error', new Error(`${msg.code}: ${msg.message}`));
        return;
      default:
        return;
    }
  }

  async _flushCandidates(target) {
    const pc = target === 'publisher' ? this.publisherPc : this.subscriberPc;
    const queued = this._pendingCandidates[target];
    this._pendingCandidates[target] = [];
    for (const c of queued) await pc.addIceCandidate(c).catch(() => {});
  }

  _ensurePublisher() {
    if (this.publisherPc) return this.publisherPc;
    const pc = new RTCPeerConnection({ iceServers: this.iceServers });
    pc.onicecandidate = (e) => {
      if (e.candidate) this._send({ type: 'candidate', target: 'publisher', candidate: e.candidate.toJSON() });
    };
    this.publisherPc = pc;
    return pc;
  }

  /** Sends a publisher offer; never two at once. */
  async _negotiate() {
    if (this._negotiating) {
      this._renegotiate = true;
      return;
    }
    this._negotiating = true;
    const pc = this._ensurePublisher();
    const offer = await pc.createOffer();
    await pc.setLocalDescription(offer);
    this._send({ type: 'offer', target: 'publisher', sdp: pc.localDescription.sdp });
  }

  /**
   * Captures camera and microphone and publishes them.
   * Video is sent as three simulcast layers (rids q, h, f at 1/4, 1/2 and
   * full resolution) unless `simulcast: false`; subscribers then each get
   * the layer that suits them.
   * @param {{video?: boolean|MediaTrackConstraints, audio?: boolean|MediaTrackConstraints, simulcast?: boolean}} opts
   * @returns {Promise<MediaStream>} the local stream
   */
  async publishCamera(opts = {}) {
    const video = opts.video ?? { width: { ideal: 1280 }, height: { ideal: 720 } };
    const audio = opts.audio ?? true;
    const stream = await navigator.mediaDevices.getUserMedia({ video, audio });
    const pc = this._ensurePublisher();
    for (const track of stream.getTracks()) {
      const init = { direction: 'sendonly', streams: [stream] };
      if (track.kind === 'video' && opts.simulcast !== false) {
        init.sendEncodings = [
          { rid: 'q', scaleResolutionDownBy: 4, maxBitrate: 150_000 },
          { rid: 'h', scaleResolutionDownBy: 2, maxBitrate: 500_000 },
          { rid: 'f', maxBitrate: 1_500_000 },
        ];
      }
      pc.addTransceiver(track, init);
    }
    this.localStream = stream;
    await this._negotiate();
    return stream;
  }

  /**
   * Says what this client wants of a track it receives.
   * @param {string} trackSid
   * @param {{quality?: 'low'|'medium'|'high', maxWidth?: number, maxHeight?: number, paused?: boolean}} wishes
   */
  setSubscription(trackSid, wishes) {
    const msg = { type: 'updateSubscription', trackSid };
    if (wishes.quality) msg.quality = wishes.quality;
    if (wishes.maxWidth && wishes.maxHeight) {
      msg.maxWidth = Math.round(wishes.maxWidth);
      msg.maxHeight = Math.round(wishes.maxHeight);
    }
    if (typeof wishes.paused === 'boolean') msg.paused = wishes.paused;
    this._send(msg);
  }

  async _setEnabled(kind, enabled) {
    if (!this.localStream) return;
    for (const track of this.localStream.getTracks()) {
      if (track.kind !== kind) continue;
      track.enabled = enabled;
      const sid = this.localTrackSids.get(track.id);
      if (sid) this._send({ type: 'mute', trackSid: sid, muted: !enabled });
    }
  }

  /** Turns the camera on or off (others see the track muted). */
  setCameraEnabled(enabled) { return this._setEnabled('video', enabled); }

  /** Turns the microphone on or off (others see the track muted). */
  setMicrophoneEnabled(enabled) { return this._setEnabled('audio', enabled); }

  /** Leaves the room and releases the camera and microphone. */
  async leave() {
    this._send({ type: 'leave' });
    this.ws?.close();
    this._teardown();
  }

  _teardown() {
    if (this._closed) return;
    this._closed = true;
    clearInterval(this._pingTimer);
    this.localStream?.getTracks().forEach((t) => t.stop());
    this.publisherPc?.close();
    this.subscriberPc?.close();
  }
}
