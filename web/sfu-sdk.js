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
// the server offering on the subscriber one, JSON signalling over one
// WebSocket.

/** Signalling protocol version this SDK speaks. */
export const PROTOCOL_VERSION = 1;

/** Keepalive interval; the server closes sockets silent for 45 s. */
const PING_INTERVAL_MS = 10_000;

/** With no pong for this long the socket is taken for dead and replaced. */
const PONG_TIMEOUT_MS = 25_000;

/**
 * How long to keep trying to resume a session after the socket dropped
 * (the server holds it for its reconnect grace, 15 s by default).
 */
const RECONNECT_WINDOW_MS = 15_000;

/** Waits between reconnect attempts; the last repeats. */
const RECONNECT_DELAYS_MS = [0, 250, 500, 1000, 2000];

/**
 * When a media path breaks, the signalling socket is checked with a ping:
 * no pong within this long means the network changed under it too.
 */
const PROBE_TIMEOUT_MS = 2500;

/** Messages kept while the socket is down, sent once it is back. */
const OUTBOX_LIMIT = 256;

/** Camera constraints used when `video` is `true` or not given. */
export const DEFAULT_VIDEO_CONSTRAINTS = { width: { ideal: 1280 }, height: { ideal: 720 } };

/**
 * Simulcast layers, lowest first. The rids are the ones the server ranks as
 * low, medium and high (see docs/protocol.md, "Media").
 */
export const SIMULCAST_LAYERS = [
  { rid: 'q', scaleResolutionDownBy: 4, maxBitrate: 150_000 },
  { rid: 'h', scaleResolutionDownBy: 2, maxBitrate: 500_000 },
  { rid: 'f', maxBitrate: 1_500_000 },
];

/**
 * @typedef {object} TrackInfo  A published track as the server describes it.
 * @property {string} sid  server track id (`TR_...`)
 * @property {string} [cid]  the publisher's MediaStreamTrack.id
 * @property {'audio'|'video'} kind
 * @property {boolean} muted
 * @property {string} [mimeType]
 * @property {boolean} [simulcast]
 * @property {MediaStreamTrack} [mediaStreamTrack]  set once the media arrives
 */

/**
 * @typedef {object} PublishOptions
 * @property {boolean} [simulcast]  send video as several layers (default true)
 * @property {RTCRtpEncodingParameters[]} [sendEncodings]  explicit encodings for video
 * @property {MediaStream} [stream]  the stream the track is announced in (default: a stream of its own)
 */

/** A participant in the room as this client knows it. */
export class RemoteParticipant {
  /** @param {{sid:string, identity:string, name?:string, tracks?:TrackInfo[]}} info */
  constructor(info) {
    /** @type {string} */
    this.sid = info.sid;
    /** @type {string} */
    this.identity = info.identity;
    /** @type {string} */
    this.name = info.name || '';
    /** @type {Map<string, TrackInfo>} track sid -> track */
    this.tracks = new Map();
    for (const t of info.tracks || []) this.tracks.set(t.sid, { ...t });
  }
}

/**
 * A connection to one room.
 *
 * Events (subscribe with `on`): `participantJoined` (participant),
 * `participantLeft` (participant), `trackSubscribed` ({participant, track,
 * mediaStreamTrack, stream}), `trackUnsubscribed` ({participant, trackSid}),
 * `trackMuted` ({participant, trackSid, muted}), `localTrackPublished`
 * (TrackInfo of an own track), `tokenRefreshed` (token), `reconnecting`
 * (the signalling socket dropped; media may still flow), `reconnected`
 * (the same session goes on), `disconnected` (reason), `error` (Error).
 *
 * Options: `iceServers` (use these instead of the ones the server names),
 * `iceTransportPolicy` ('all' or 'relay': only TURN relays, to
 * test or to force them), `turnTransport` ('udp', 'tcp' or 'tls': keep only
 * the TURN servers reached over that transport), `iceCandidatePoolSize`
 * (candidates gathered before they are needed) and `reconnectWindowMs` (how
 * long to try to resume the session after the socket drops; 0 turns
 * resuming off).
 */
export class Room {
  /** @param {{iceTransportPolicy?: RTCIceTransportPolicy, iceCandidatePoolSize?: number}} [options] */
  constructor(options = {}) {
    this.options = options;
    /** @type {WebSocket|null} */
    this.ws = null;
    /** @type {{sid:string, identity:string, name:string}|null} */
    this.localParticipant = null;
    /** @type {{name:string, sid:string}|null} */
    this.roomInfo = null;
    /** @type {Map<string, RemoteParticipant>} participant sid -> participant */
    this.participants = new Map();
    /** @type {RTCPeerConnection|null} the connection this client sends on (client offers) */
    this.publisherPc = null;
    /** @type {RTCPeerConnection|null} the connection this client receives on (server offers) */
    this.subscriberPc = null;
    /** @type {RTCIceServer[]} */
    this.iceServers = [];
    this.canPublish = false;
    this.canSubscribe = false;
    /** Protocol version the server announced. */
    this.protocol = 0;
    /** @type {MediaStream|null} the stream from publishCamera */
    this.localStream = null;
    /** @type {Map<string, string>} server track sid by local MediaStreamTrack.id */
    this.localTrackSids = new Map();
    /** Signalling round trip of the last ping, in ms. */
    this.rtt = NaN;
    /** performance.now() marks of the join sequence, for diagnostics. */
    this.timings = {};

    this._listeners = new Map();
    /** Remote candidates that arrived before their connection's remote description. */
    this._pendingCandidates = { publisher: [], subscriber: [] };
    /** Local publisher candidates gathered before the first offer went out. */
    this._localPublisherCandidates = [];
    this._publisherOfferSent = false;
    this._negotiating = false; // a publisher offer awaits its answer
    this._renegotiate = false; // another offer is wanted after that
    this._pingTimer = null;
    this._lastPong = 0;
    this._closed = false;
    this._leaving = false;
    this._leaveReason = null;
    this._inbox = Promise.resolve();
    /** Signalling URL, for reconnecting. */
    this._url = null;
    /** Set while the socket is down and the session is being resumed. */
    this.reconnecting = false;
    /** Times the session was resumed after the socket dropped. */
    this.reconnects = 0;
    /** Messages sent while reconnecting, for the new socket. */
    this._outbox = [];
    /** A publisher ICE restart is wanted with the next offer. */
    this._iceRestart = false;
  }

  // ---- events ------------------------------------------------------------

  /** Subscribes `fn` to the event `name`. */
  on(name, fn) {
    if (!this._listeners.has(name)) this._listeners.set(name, new Set());
    this._listeners.get(name).add(fn);
    return this;
  }

  /** Unsubscribes `fn` from the event `name`. */
  off(name, fn) {
    this._listeners.get(name)?.delete(fn);
    return this;
  }

  _emit(name, arg) {
    for (const fn of this._listeners.get(name) || []) {
      try { fn(arg); } catch (e) { console.error(`listener for ${name} failed`, e); }
    }
  }

  _mark(name) {
    if (this.timings[name] === undefined) this.timings[name] = performance.now();
  }

  _send(msg) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN && !this.reconnecting) {
      this.ws.send(JSON.stringify(msg));
    } else if (this.reconnecting && this._outbox.length < OUTBOX_LIMIT) {
      this._outbox.push(msg);
    }
  }

  // ---- connecting --------------------------------------------------------

  /**
   * Connects to the signalling endpoint; resolves once the server has sent
   * `joined`, rejects if the server refuses (bad token, room full).
   * @param {string} url  e.g. ws://127.0.0.1:7880/v1/rtc
   * @param {string} token  a join token
   * @returns {Promise<Room>}
   */
  connect(url, token) {
    if (this.ws) return Promise.reject(new Error('this Room is already connected; make a new one'));
    this._mark('connect');
    this.token = token;
    this._url = url;
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(this._signalUrl());
      this.ws = ws;
      let joined = false;
      let refusal = null;
      ws.onmessage = (ev) => {
        let msg;
        try { msg = JSON.parse(ev.data); } catch { return; }
        if (msg.type === 'joined') {
          joined = true;
          this._mark('joined');
          try {
            this._onJoined(msg);
          } catch (e) {
            reject(e);
            this.leave();
            return;
          }
          this._attach(ws);
          resolve(this);
        } else if (msg.type === 'error') {
          refusal = new Error(`${msg.code}: ${msg.message}`);
        }
      };
      ws.onclose = (ev) => {
        if (joined) return; // _attach has taken over
        this._closed = true;
        reject(refusal || new Error(`cannot join: signalling closed (code ${ev.code}); bad or expired token?`));
      };
      ws.onerror = () => {
        if (!joined && !refusal) refusal = new Error('cannot reach the signalling server, or it refused the token');
      };
    });
  }

  /** The signalling URL with the current token, resuming `sid` if given. */
  _signalUrl(sid) {
    const sep = this._url.includes('?') ? '&' : '?';
    let url = `${this._url}${sep}access_token=${encodeURIComponent(this.token)}`;
    if (sid) url += `&reconnect=1&sid=${encodeURIComponent(sid)}`;
    return url;
  }

  /** Makes `ws` the session's socket: messages in order, loss noticed. */
  _attach(ws) {
    this.ws = ws;
    this._lastPong = Date.now();
    ws.onmessage = (ev) => {
      let msg;
      try { msg = JSON.parse(ev.data); } catch { return; }
      if (msg.type === 'pong') this._lastPong = Date.now();
      // Strictly in order: an offer's answer must go out before the next
      // message touches the same connection.
      this._inbox = this._inbox
        .then(() => this._onMessage(msg))
        .catch((e) => this._emit('error', e));
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return; // a socket already given up on
      if (this._closed || this._leaving || this._leaveReason) {
        this._teardown(this._leaveReason || ev.reason || 'closed');
        return;
      }
      this._socketLost(`signalling closed (code ${ev.code})`);
    };
    ws.onerror = () => {};
    clearInterval(this._pingTimer);
    this._pingTimer = setInterval(() => {
      if (this.reconnecting) return;
      if (Date.now() - this._lastPong > PONG_TIMEOUT_MS) {
        this._socketLost('no pong from the server');
        return;
      }
      this._send({ type: 'ping', ts: Date.now() });
    }, PING_INTERVAL_MS);
  }

  /**
   * The socket dropped (or went silent) without a leave: resume the same
   * session on a new one, retrying within the reconnect window. Media keeps
   * flowing meanwhile if the network still carries it.
   */
  async _socketLost(why) {
    if (this.reconnecting || this._closed) return;
    const window = this.options.reconnectWindowMs ?? RECONNECT_WINDOW_MS;
    const old = this.ws;
    if (old) {
      old.onclose = null;
      old.onmessage = null;
      // 4000: not a leave; the server keeps the session for the grace.
      try { old.close(4000, 'reconnecting'); } catch { /* already closed */ }
    }
    if (window <= 0) {
      this._teardown(why);
      return;
    }
    this.reconnecting = true;
    this._emit('reconnecting', why);
    const deadline = Date.now() + window;
    for (let attempt = 0; !this._closed; attempt++) {
      const wait = RECONNECT_DELAYS_MS[Math.min(attempt, RECONNECT_DELAYS_MS.length - 1)];
      if (Date.now() + wait > deadline) break;
      await new Promise((r) => setTimeout(r, wait));
      const outcome = await this._tryResume();
      if (outcome === 'resumed') return;
      if (outcome === 'gone') break;
    }
    this.reconnecting = false;
    this._teardown('connection_lost');
  }

  /** One attempt: 'resumed', 'gone' (the server no longer has the session) or 'failed'. */
  _tryResume() {
    return new Promise((resolve) => {
      let ws;
      try {
        ws = new WebSocket(this._signalUrl(this.localParticipant.sid));
      } catch {
        resolve('failed');
        return;
      }
      let settled = false;
      const settle = (outcome) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        resolve(outcome);
      };
      const timer = setTimeout(() => {
        ws.onclose = null;
        try { ws.close(4000); } catch { /* ignore */ }
        settle('failed');
      }, 5000);
      ws.onmessage = (ev) => {
        let msg;
        try { msg = JSON.parse(ev.data); } catch { return; }
        if (msg.type === 'reconnected') {
          this._onReconnected(ws, msg);
          settle('resumed');
        } else if (msg.type === 'error') {
          settle(msg.code === 'session_not_found' ? 'gone' : 'failed');
        }
      };
      ws.onclose = () => settle('failed');
      ws.onerror = () => {};
    });
  }

  _onReconnected(ws, msg) {
    this.reconnecting = false;
    this.reconnects += 1;
    this._attach(ws);
    if (Array.isArray(msg.iceServers) && msg.iceServers.length) {
      this.iceServers = msg.iceServers;
      for (const pc of [this.publisherPc, this.subscriberPc]) {
        try { pc?.setConfiguration({ ...pc.getConfiguration(), iceServers: this._usableIceServers() }); } catch { /* keep the old */ }
      }
    }
    for (const queued of this._outbox.splice(0)) this._send(queued);
    this._emit('reconnected');
    // A network change breaks the media paths too: restart ICE on each
    // connection that lost its path.
    const broken = (pc) => pc && ['disconnected', 'failed'].includes(pc.iceConnectionState);
    if (broken(this.publisherPc)) this.restartIce();
    if (broken(this.subscriberPc)) this._send({ type: 'restartIce' });
  }

  /**
   * Calls `restart` when `pc`'s ICE fails. When it only goes
   * disconnected, the signalling socket is checked: a dead one means the
   * network changed, and resuming the session restarts ICE on every
   * connection that lost its path; with a live one the path may come back
   * by itself (a busy machine, a burst of loss), and a restart would only
   * interrupt it.
   */
  _watchIce(pc, restart) {
    pc.addEventListener('iceconnectionstatechange', () => {
      if (this.reconnecting || this._closed) return;
      const state = pc.iceConnectionState;
      if (state === 'disconnected') this._probeSignalling();
      if (state === 'failed') restart();
    });
  }

  /**
   * Checks the signalling socket with a ping; no pong in time means it is
   * dead (the network changed under it), and the session is resumed on a
   * new one rather than after the keepalive gives up.
   */
  _probeSignalling() {
    if (this.reconnecting || this._closed || this._probing) return;
    this._probing = true;
    const sentAt = Date.now();
    this._send({ type: 'ping', ts: sentAt });
    setTimeout(() => {
      this._probing = false;
      if (this._lastPong < sentAt && !this.reconnecting && !this._closed) {
        this._socketLost('no pong after the media path broke');
      }
    }, PROBE_TIMEOUT_MS);
  }

  /**
   * Restarts ICE on the publishing connection (new credentials, new
   * candidates), as after a change of network. Done by itself when the
   * connection fails (or, after a change of network, on resuming), as is
   * the subscribing one's.
   */
  restartIce() {
    if (!this.publisherPc || this._closed) return Promise.resolve();
    this._iceRestart = true;
    return this._negotiate().catch((e) => this._emit('error', e));
  }

  _onJoined(msg) {
    this.protocol = msg.protocol;
    if (msg.protocol !== PROTOCOL_VERSION) {
      console.warn(`server speaks protocol ${msg.protocol}, this SDK ${PROTOCOL_VERSION}`);
    }
    this.roomInfo = msg.room;
    this.localParticipant = {
      sid: msg.participant.sid,
      identity: msg.participant.identity,
      name: msg.participant.name || '',
    };
    this.iceServers = msg.iceServers || [];
    this.canPublish = msg.canPublish !== false;
    this.canSubscribe = msg.canSubscribe !== false;
    for (const p of msg.participants || []) this.participants.set(p.sid, new RemoteParticipant(p));

    const pc = new RTCPeerConnection(this._rtcConfig());
    pc.onicecandidate = (e) => {
      if (e.candidate && e.candidate.candidate) {
        this._send({ type: 'candidate', target: 'subscriber', candidate: e.candidate.toJSON() });
      }
    };
    pc.ontrack = (e) => this._onRemoteTrack(e);
    pc.onconnectionstatechange = () => {
      if (pc.connectionState === 'connected') this._mark('subscriberConnected');
    };
    // The server offers on this connection: a restart is asked of it.
    this._watchIce(pc, () => this._send({ type: 'restartIce' }));
    this.subscriberPc = pc;

    for (const p of this.participants.values()) this._emit('participantJoined', p);
  }

  // ---- incoming signalling -----------------------------------------------

  async _onMessage(msg) {
    switch (msg.type) {
      case 'answer':
        if (msg.target === 'publisher') await this._onPublisherAnswer(msg.sdp);
        return;
      case 'offer':
        if (msg.target === 'subscriber') await this._onSubscriberOffer(msg.sdp);
        return;
      case 'candidate':
        await this._onRemoteCandidate(msg.target, msg.candidate);
        return;
      case 'participantJoined': {
        const p = new RemoteParticipant(msg.participant);
        this.participants.set(p.sid, p);
        this._emit('participantJoined', p);
        return;
      }
      case 'participantLeft': {
        const p = this.participants.get(msg.sid);
        if (!p) return;
        // The server sends trackUnpublished first; this covers anything left.
        for (const trackSid of [...p.tracks.keys()]) {
          p.tracks.delete(trackSid);
          this._emit('trackUnsubscribed', { participant: p, trackSid });
        }
        this.participants.delete(msg.sid);
        this._emit('participantLeft', p);
        return;
      }
      case 'trackPublished':
        this._onTrackPublished(msg.participantSid, msg.track);
        return;
      case 'trackUnpublished': {
        if (msg.participantSid === this.localParticipant?.sid) {
          for (const [cid, sid] of this.localTrackSids) if (sid === msg.trackSid) this.localTrackSids.delete(cid);
          return;
        }
        const p = this.participants.get(msg.participantSid);
        if (!p || !p.tracks.delete(msg.trackSid)) return;
        this._emit('trackUnsubscribed', { participant: p, trackSid: msg.trackSid });
        return;
      }
      case 'trackMuted': {
        const p = this.participants.get(msg.participantSid);
        if (!p) return; // our own mute, echoed
        const t = p.tracks.get(msg.trackSid);
        if (t) t.muted = msg.muted;
        this._emit('trackMuted', { participant: p, trackSid: msg.trackSid, muted: msg.muted });
        return;
      }
      case 'publishedLayers':
        await this._setActiveLayers(msg.trackSid, msg.layers);
        return;
      case 'pong':
        if (typeof msg.ts === 'number') this.rtt = Date.now() - msg.ts;
        return;
      case 'reconnected':
        return; // handled when the socket was attached
      case 'tokenRefresh':
        // The newest token: join again with it once the first has expired.
        this.token = msg.token;
        this._emit('tokenRefreshed', msg.token);
        return;
      case 'leave':
        // The server closes the socket next; report the reason it gave.
        this._leaveReason = msg.reason;
        this._teardown(msg.reason);
        this.ws?.close();
        return;
      case 'error':
        this._emit('error', Object.assign(new Error(`${msg.code}: ${msg.message}`), { code: msg.code }));
        return;
      default:
        return; // newer servers may add messages; ignore them
    }
  }

  async _onSubscriberOffer(sdp) {
    this._mark('subscriberOffer');
    const pc = this.subscriberPc;
    await pc.setRemoteDescription({ type: 'offer', sdp });
    await this._flushCandidates('subscriber');
    await pc.setLocalDescription(await pc.createAnswer());
    this._send({ type: 'answer', target: 'subscriber', sdp: pc.localDescription.sdp });
  }

  async _onPublisherAnswer(sdp) {
    const pc = this.publisherPc;
    if (!pc || !this._negotiating) return;
    try {
      await pc.setRemoteDescription({ type: 'answer', sdp });
      await this._flushCandidates('publisher');
    } finally {
      this._negotiating = false;
    }
    if (this._renegotiate) {
      this._renegotiate = false;
      await this._negotiate();
    }
  }

  async _onRemoteCandidate(target, candidate) {
    if (!candidate || !candidate.candidate) return; // end of candidates
    const pc = target === 'publisher' ? this.publisherPc : this.subscriberPc;
    if (!pc || !pc.remoteDescription) {
      this._pendingCandidates[target]?.push(candidate);
      return;
    }
    await pc.addIceCandidate(candidate).catch((e) => console.warn('remote candidate refused', e));
  }

  async _flushCandidates(target) {
    const pc = target === 'publisher' ? this.publisherPc : this.subscriberPc;
    const queued = this._pendingCandidates[target];
    this._pendingCandidates[target] = [];
    for (const c of queued) await pc.addIceCandidate(c).catch((e) => console.warn('remote candidate refused', e));
  }

  _onTrackPublished(participantSid, track) {
    if (participantSid === this.localParticipant?.sid) {
      this.localTrackSids.set(track.cid, track.sid);
      // Muted before the server knew the track: tell it now.
      const local = this._localTracks().find((t) => t.id === track.cid);
      if (local && !local.enabled) this._send({ type: 'mute', trackSid: track.sid, muted: true });
      this._emit('localTrackPublished', track);
      return;
    }
    const p = this.participants.get(participantSid);
    if (!p) return;
    const known = p.tracks.get(track.sid);
    if (known) Object.assign(known, track);
    else p.tracks.set(track.sid, { ...track });
  }

  /** ontrack on the subscriber connection: msid is "<participant sid> <track sid>". */
  _onRemoteTrack(e) {
    const stream = e.streams[0];
    const participant = stream && this.participants.get(stream.id);
    if (!participant) {
      console.warn('media for an unknown participant', stream?.id, e.track.id);
      return;
    }
    const trackSid = e.track.id;
    let track = participant.tracks.get(trackSid);
    if (!track) {
      track = { sid: trackSid, kind: e.track.kind, muted: false };
      participant.tracks.set(trackSid, track);
    }
    track.mediaStreamTrack = e.track;
    this._mark('firstRemoteTrack');
    this._emit('trackSubscribed', { participant, track, mediaStreamTrack: e.track, stream });
  }

  // ---- publishing --------------------------------------------------------

  /** The RTCPeerConnection configuration: ICE servers from the server, policy and pool from the options. */
  _rtcConfig() {
    const config = { iceServers: this._usableIceServers() };
    if (this.options.iceTransportPolicy) config.iceTransportPolicy = this.options.iceTransportPolicy;
    if (Number.isInteger(this.options.iceCandidatePoolSize)) config.iceCandidatePoolSize = this.options.iceCandidatePoolSize;
    return config;
  }

  /** The server's ICE servers, narrowed to `turnTransport` if set. */
  _usableIceServers() {
    if (Array.isArray(this.options.iceServers)) return this.options.iceServers;
    const want = this.options.turnTransport;
    if (!want) return this.iceServers;
    const keep = (url) => {
      if (want === 'tls') return url.startsWith('turns:');
      return url.startsWith('turn:') && (url.includes(`transport=${want}`) || (want === 'udp' && !url.includes('transport=')));
    };
    return this.iceServers
      .map((s) => ({ ...s, urls: [].concat(s.urls).filter(keep) }))
      .filter((s) => s.urls.length > 0);
  }

  _ensurePublisher() {
    if (this.publisherPc) return this.publisherPc;
    const pc = new RTCPeerConnection(this._rtcConfig());
    pc.onicecandidate = (e) => {
      if (!e.candidate || !e.candidate.candidate) return;
      const msg = { type: 'candidate', target: 'publisher', candidate: e.candidate.toJSON() };
      // The server only knows the connection once it has our first offer.
      if (this._publisherOfferSent) this._send(msg);
      else this._localPublisherCandidates.push(msg);
    };
    this._watchIce(pc, () => this.restartIce());
    this.publisherPc = pc;
    return pc;
  }

  /**
   * Sends a publisher offer. Never two at once: while one awaits its answer,
   * further requests collapse into one more offer sent after that answer.
   */
  async _negotiate() {
    if (this._closed) return;
    if (this._negotiating) {
      this._renegotiate = true;
      return;
    }
    this._negotiating = true;
    try {
      const pc = this._ensurePublisher();
      const iceRestart = this._iceRestart;
      this._iceRestart = false;
      await pc.setLocalDescription(await pc.createOffer(iceRestart ? { iceRestart: true } : undefined));
      this._send({ type: 'offer', target: 'publisher', sdp: pc.localDescription.sdp });
    } catch (e) {
      this._negotiating = false;
      throw e;
    }
    if (!this._publisherOfferSent) {
      this._publisherOfferSent = true;
      for (const msg of this._localPublisherCandidates.splice(0)) this._send(msg);
    }
  }

  /** Encodings for a new video sender: one, or the simulcast layers. */
  _sendEncodings(track, opts) {
    if (track.kind !== 'video') return undefined;
    if (opts.sendEncodings) return opts.sendEncodings;
    if (opts.simulcast === false) return undefined; // a single encoding
    return SIMULCAST_LAYERS.map((l) => ({ ...l }));
  }

  _addSender(track, opts) {
    if (!this.canPublish) throw new Error('this token does not allow publishing');
    const stream = opts.stream || new MediaStream([track]);
    const init = { direction: 'sendonly', streams: [stream] };
    const sendEncodings = this._sendEncodings(track, opts);
    if (sendEncodings) init.sendEncodings = sendEncodings;
    return this._ensurePublisher().addTransceiver(track, init);
  }

  /**
   * Captures camera and microphone and publishes them (one offer for both).
   * Video is sent as three simulcast layers (rids q, h, f at 1/4, 1/2 and
   * full resolution) unless `simulcast: false`, which sends one encoding.
   * @param {{video?: boolean|MediaTrackConstraints, audio?: boolean|MediaTrackConstraints} & PublishOptions} [opts]
   * @returns {Promise<MediaStream>} the local stream
   */
  async publishCamera(opts = {}) {
    if (!this.ws) throw new Error('connect first');
    if (!this.canPublish) throw new Error('this token does not allow publishing');
    const video = opts.video === undefined || opts.video === true ? DEFAULT_VIDEO_CONSTRAINTS : opts.video;
    const audio = opts.audio ?? true;
    if (!video && !audio) throw new Error('nothing to publish: video and audio are both off');
    const stream = await navigator.mediaDevices.getUserMedia({ video, audio });
    this.localStream = stream;
    for (const track of stream.getTracks()) this._addSender(track, { ...opts, stream });
    await this._negotiate();
    return stream;
  }

  /**
   * Publishes one more track (a screen share, a second camera).
   * @param {MediaStreamTrack} track
   * @param {PublishOptions} [opts]
   * @returns {Promise<RTCRtpTransceiver>}
   */
  async publishTrack(track, opts = {}) {
    const transceiver = this._addSender(track, opts);
    await this._negotiate();
    return transceiver;
  }

  /**
   * Stops publishing a track; the server announces trackUnpublished.
   * @param {MediaStreamTrack} track
   */
  async unpublishTrack(track) {
    const sender = this.publisherPc?.getSenders().find((s) => s.track === track);
    if (!sender) return;
    this.publisherPc.removeTrack(sender);
    await this._negotiate();
  }

  _localTracks() {
    const tracks = new Set(this.localStream?.getTracks() || []);
    for (const s of this.publisherPc?.getSenders() || []) if (s.track) tracks.add(s.track);
    return [...tracks];
  }

  /**
   * Dynacast: the server says which simulcast layers of one of our tracks
   * anyone receives; encoding the others would only waste CPU and uplink.
   * @param {string} trackSid
   * @param {{rid: string, active: boolean}[]} layers
   */
  async _setActiveLayers(trackSid, layers) {
    let cid = null;
    for (const [c, sid] of this.localTrackSids) if (sid === trackSid) cid = c;
    const sender = this.publisherPc?.getSenders().find((s) => s.track && s.track.id === cid);
    if (!sender) return;
    const params = sender.getParameters();
    let changed = false;
    for (const enc of params.encodings || []) {
      const want = layers.find((l) => l.rid === enc.rid);
      if (want && enc.active !== want.active) {
        enc.active = want.active;
        changed = true;
      }
    }
    if (changed) await sender.setParameters(params);
    this._emit('publishedLayers', { trackSid, layers });
  }

  async _setEnabled(kind, enabled) {
    for (const track of this._localTracks()) {
      if (track.kind !== kind) continue;
      track.enabled = enabled;
      // Unknown sid yet: sent when trackPublished tells us the sid.
      const sid = this.localTrackSids.get(track.id);
      if (sid) this._send({ type: 'mute', trackSid: sid, muted: !enabled });
    }
  }

  /** Turns the camera on or off; others see the track muted. */
  setCameraEnabled(enabled) { return this._setEnabled('video', enabled); }

  /** Turns the microphone on or off; others see the track muted. */
  setMicrophoneEnabled(enabled) { return this._setEnabled('audio', enabled); }

  // ---- receiving ---------------------------------------------------------

  /**
   * Says what this client wants of a track it receives (simulcast layer,
   * largest useful size, paused).
   * @param {string} trackSid
   * @param {{quality?: 'low'|'medium'|'high', maxWidth?: number, maxHeight?: number, maxFps?: number, paused?: boolean}} wishes
   */
  setSubscription(trackSid, wishes) {
    const msg = { type: 'updateSubscription', trackSid };
    if (wishes.quality) msg.quality = wishes.quality;
    if (wishes.maxWidth && wishes.maxHeight) {
      msg.maxWidth = Math.round(wishes.maxWidth);
      msg.maxHeight = Math.round(wishes.maxHeight);
    }
    if (wishes.maxFps) msg.maxFps = Math.round(wishes.maxFps);
    if (typeof wishes.paused === 'boolean') msg.paused = wishes.paused;
    this._send(msg);
  }

  // ---- leaving -----------------------------------------------------------

  /** Leaves the room and releases the camera and microphone. */
  async leave() {
    this._leaving = true;
    this._send({ type: 'leave' });
    this.ws?.close(1000);
    this._teardown('left');
  }

  /** Stops everything once; emits `disconnected` once. */
  _teardown(reason) {
    if (this._closed) return;
    this._closed = true;
    this.reconnecting = false;
    clearInterval(this._pingTimer);
    this.localStream?.getTracks().forEach((t) => t.stop());
    this.publisherPc?.close();
    this.subscriberPc?.close();
    this._emit('disconnected', reason);
  }
}
