//! Encrypting forwarded RTP without the engine's generic send path, and
//! decrypting published RTP without its read path.
//!
//! Every forwarded packet used to go through the engine's `write_rtp`:
//! codec and extension checks that rebuild the sender's parameters, the
//! interceptor chain, and queues that copy the packet several times before
//! SRTP. A subscriber connection runs no per-packet interceptors, so all of
//! that is overhead. The room instead encrypts forwarded packets itself
//! with the connection's outbound SRTP keys (RFC 3711, RFC 7714) and sends
//! them to the connection's selected path. Likewise, inbound RTP of the
//! streams a publisher connection has announced is decrypted by the room
//! ([`SrtpReceiver`]) and handed to that connection's interceptors
//! directly, skipping the engine's demultiplexing, handlers and queues.
//!
//! The engine does not expose its SRTP keys. It does take the crypto
//! provider each connection uses, and derives its SRTP session keys through
//! that provider: [`KeyCapture`] wraps the real provider, passes every call
//! through, and notes each SRTP master key and salt as the engine derives
//! from them. The engine builds its outbound context first and its inbound
//! one second, so the first of each pair is ours to send with and the
//! second is the publisher's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use rtc::crypto::{ActiveKeyExchange, CbcAlgorithm, CbcCipher};
use rtc::crypto::{
    AeadAlgorithm, AeadCipher, BlockCipherAlgorithm, CryptoAlgorithm, CryptoError, HashAlgorithm,
    HmacAlgorithm, KeyExchangeAlgorithm, Mac, PublicKey, RTCCrypto, RTCCryptoProvider, RTCRandom,
    SignatureScheme, SigningKey, StreamCipher, StreamCipherAlgorithm,
};

use crate::rtp::RtpView;
use crate::seq::SeqExtender;

/// The SRTP protection profiles the server negotiates, in its order of
/// preference. [`KeyCapture`] tells them apart by the ciphers the engine
/// builds (an AEAD for GCM, a stream cipher for AES-CM).
pub const PROFILES: [rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile; 2] = [
    rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm,
    rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80,
];

/// An SRTP protection profile this module implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// AEAD_AES_128_GCM (RFC 7714): 16-byte tag.
    AeadAes128Gcm,
    /// AES_CM_128_HMAC_SHA1_80 (RFC 3711): 10-byte tag.
    Aes128CmHmacSha1_80,
}

impl Profile {
    fn salt_len(self) -> usize {
        match self {
            Profile::AeadAes128Gcm => 12,
            Profile::Aes128CmHmacSha1_80 => 14,
        }
    }

    /// Bytes SRTP adds to an RTP packet.
    pub fn overhead(self) -> usize {
        match self {
            Profile::AeadAes128Gcm => 16,
            Profile::Aes128CmHmacSha1_80 => 10,
        }
    }
}

/// One SRTP master key and salt with its profile.
#[derive(Clone, PartialEq, Eq)]
pub struct MasterKeys {
    pub profile: Profile,
    pub key: Vec<u8>,
    pub salt: Vec<u8>,
}

impl std::fmt::Debug for MasterKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("MasterKeys")
            .field("profile", &self.profile)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Seen {
    /// Master keys in the order the engine derived from them.
    keys: Vec<MasterKeys>,
    /// The master key of the derivation in progress, with the first block
    /// it encrypted (the master salt, padded, for the encryption key).
    current: Option<(Vec<u8>, [u8; 16])>,
    /// Whether `current` has become an entry of `keys` yet.
    recorded: bool,
}

/// A crypto provider for one peer connection that notes the SRTP master
/// keys derived through it. See the module documentation.
pub struct KeyCapture {
    inner: Arc<dyn RTCCryptoProvider>,
    seen: Mutex<Seen>,
}

impl KeyCapture {
    pub fn new(inner: Arc<dyn RTCCryptoProvider>) -> KeyCapture {
        KeyCapture {
            inner,
            seen: Mutex::new(Seen::default()),
        }
    }

    /// With the built-in default provider.
    pub fn with_default_provider() -> Result<KeyCapture, CryptoError> {
        Ok(KeyCapture::new(rtc::crypto::default_provider()?))
    }

    /// The wrapped provider's operations, for work of our own that should
    /// not be noted.
    pub fn inner_crypto(&self) -> &dyn RTCCrypto {
        self.inner.crypto()
    }

    /// The outbound master keys of the last DTLS handshake: the first of
    /// the last pair of contexts the engine built.
    pub fn outbound(&self) -> Option<MasterKeys> {
        self.of_last_pair(0)
    }

    /// The inbound master keys of the last DTLS handshake: the second of
    /// the last pair.
    pub fn inbound(&self) -> Option<MasterKeys> {
        self.of_last_pair(1)
    }

    fn of_last_pair(&self, which: usize) -> Option<MasterKeys> {
        let seen = self.seen.lock().ok()?;
        let n = seen.keys.len();
        if n < 2 || n % 2 != 0 {
            return None;
        }
        Some(seen.keys[n - 2 + which].clone())
    }

    fn note_block(&self, algorithm: BlockCipherAlgorithm, key: &[u8], block: &[u8]) {
        if algorithm != BlockCipherAlgorithm::Aes128 || key.len() != 16 || block.len() != 16 {
            return;
        }
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        if seen.current.as_ref().is_some_and(|(k, _)| k == key) {
            return;
        }
        // A new master key: its first derivation is that of the SRTP
        // encryption key (label 0, counter 0), whose input block is the
        // master salt padded with zeros.
        let mut first = [0u8; 16];
        first.copy_from_slice(block);
        seen.current = Some((key.to_vec(), first));
        seen.recorded = false;
    }

    fn note_cipher(&self, profile: Profile) {
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        if seen.recorded {
            return;
        }
        let Some((key, block)) = seen.current.clone() else {
            return;
        };
        seen.recorded = true;
        seen.keys.push(MasterKeys {
            profile,
            key,
            salt: block[..profile.salt_len()].to_vec(),
        });
    }
}

impl RTCCryptoProvider for KeyCapture {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn crypto(&self) -> &dyn RTCCrypto {
        self
    }

    fn random(&self) -> &dyn RTCRandom {
        self.inner.random()
    }
}

impl RTCCrypto for KeyCapture {
    fn supports(&self, algorithm: CryptoAlgorithm) -> bool {
        self.inner.crypto().supports(algorithm)
    }

    fn hash(&self, algorithm: HashAlgorithm, data: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.inner.crypto().hash(algorithm, data)
    }

    fn block_encrypt(
        &self,
        algorithm: BlockCipherAlgorithm,
        key: &[u8],
        block: &mut [u8],
    ) -> Result<(), CryptoError> {
        self.note_block(algorithm, key, block);
        self.inner.crypto().block_encrypt(algorithm, key, block)
    }

    fn new_hmac(&self, algorithm: HmacAlgorithm, key: &[u8]) -> Result<Box<dyn Mac>, CryptoError> {
        self.inner.crypto().new_hmac(algorithm, key)
    }

    fn new_stream_cipher(
        &self,
        algorithm: StreamCipherAlgorithm,
        key: &[u8],
    ) -> Result<Box<dyn StreamCipher>, CryptoError> {
        if algorithm == StreamCipherAlgorithm::Aes128Ctr {
            self.note_cipher(Profile::Aes128CmHmacSha1_80);
        }
        self.inner.crypto().new_stream_cipher(algorithm, key)
    }

    fn new_aead(
        &self,
        algorithm: AeadAlgorithm,
        key: &[u8],
    ) -> Result<Box<dyn AeadCipher>, CryptoError> {
        if algorithm == AeadAlgorithm::Aes128Gcm {
            self.note_cipher(Profile::AeadAes128Gcm);
        }
        self.inner.crypto().new_aead(algorithm, key)
    }

    fn new_cbc(
        &self,
        algorithm: CbcAlgorithm,
        key: &[u8],
    ) -> Result<Box<dyn CbcCipher>, CryptoError> {
        self.inner.crypto().new_cbc(algorithm, key)
    }

    fn start_key_exchange(
        &self,
        algorithm: KeyExchangeAlgorithm,
    ) -> Result<Box<dyn ActiveKeyExchange>, CryptoError> {
        self.inner.crypto().start_key_exchange(algorithm)
    }

    fn generate_signing_key(
        &self,
        scheme: SignatureScheme,
    ) -> Result<Arc<dyn SigningKey>, CryptoError> {
        self.inner.crypto().generate_signing_key(scheme)
    }

    fn import_signing_key(
        &self,
        scheme: SignatureScheme,
        pkcs8_der: &[u8],
    ) -> Result<Arc<dyn SigningKey>, CryptoError> {
        self.inner.crypto().import_signing_key(scheme, pkcs8_der)
    }

    fn verify_signature(
        &self,
        scheme: SignatureScheme,
        public_key: PublicKey<'_>,
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), CryptoError> {
        self.inner
            .crypto()
            .verify_signature(scheme, public_key, message, signature)
    }
}

/// The packet index (RFC 3711 3.3.1: rollover counter and sequence number)
/// of `seq` on a stream whose sequence numbers `seen` has extended so far:
/// the index closest to the highest, as RFC 3711 estimates it. The
/// extender puts a stream's first packet in its cycle 1, SRTP in rollover
/// period 0. None for a packet from before the stream's first period,
/// which no index can have.
fn packet_index(seen: &SeqExtender, seq: u16) -> (u64, Option<u64>) {
    let extended = seen.value_of(seq as u64);
    (extended, extended.checked_sub(1 << 16))
}

/// Why a packet could not be protected.
#[derive(Debug, thiserror::Error)]
pub enum ProtectError {
    #[error("not an RTP packet")]
    NotRtp,
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

enum Cipher {
    Gcm(Box<dyn AeadCipher>),
    CmHmac {
        stream: Box<dyn StreamCipher>,
        auth: Box<dyn Mac>,
    },
}

/// The longest session salt of the profiles (AES-CM's).
const MAX_SALT: usize = 14;

/// Encrypts RTP for one connection's outbound direction. What each stream
/// has sent (for its rollover counter) is kept by the stream's owner, in
/// an [`SrtpStream`]: the down track, whose other state the forwarded
/// packet touches anyway.
pub struct SrtpSender {
    profile: Profile,
    cipher: Cipher,
    /// Only the first bytes, the profile's salt length, are used.
    session_salt: [u8; MAX_SALT],
    /// Tells this sender's streams from those of earlier keys.
    session: u64,
}

/// Distinct for every [`SrtpSender`] made.
static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// The sending state of one outbound SRTP stream (one SSRC): the sequence
/// numbers sent, for the RFC 3711 rollover counter. It starts over when
/// the connection's keys change, as the receiver's context then does.
#[derive(Debug, Clone, Default)]
pub struct SrtpStream {
    /// The [`SrtpSender`] whose stream this is; 0 for none yet.
    session: u64,
    sent: SeqExtender,
}

/// The SRTP key derivation function (RFC 3711 4.3.3, key derivation rate
/// zero): AES in counter mode keyed by the master key over the master salt
/// with the label folded in.
fn derive(
    crypto: &dyn RTCCrypto,
    master_key: &[u8],
    master_salt: &[u8],
    label: u8,
    len: usize,
) -> Result<Vec<u8>, CryptoError> {
    let mut out = Vec::with_capacity(len.div_ceil(16) * 16);
    let mut counter: u16 = 0;
    while out.len() < len {
        let mut block = [0u8; 16];
        block[..master_salt.len()].copy_from_slice(master_salt);
        block[7] ^= label;
        block[14..16].copy_from_slice(&counter.to_be_bytes());
        crypto.block_encrypt(BlockCipherAlgorithm::Aes128, master_key, &mut block)?;
        out.extend_from_slice(&block);
        counter += 1;
    }
    out.truncate(len);
    Ok(out)
}

const LABEL_SRTP_ENCRYPTION: u8 = 0x00;
const LABEL_SRTP_AUTHENTICATION: u8 = 0x01;
const LABEL_SRTP_SALT: u8 = 0x02;

/// The key derivation labels of one direction's session keys.
struct Labels {
    encryption: u8,
    authentication: u8,
    salt: u8,
}

const SRTP_LABELS: Labels = Labels {
    encryption: LABEL_SRTP_ENCRYPTION,
    authentication: LABEL_SRTP_AUTHENTICATION,
    salt: LABEL_SRTP_SALT,
};

/// RFC 3711 4.3.2: SRTCP's session keys come from the same master key.
const SRTCP_LABELS: Labels = Labels {
    encryption: 0x03,
    authentication: 0x04,
    salt: 0x05,
};

/// The cipher and session salt `keys` give under `labels`.
fn session(
    keys: &MasterKeys,
    crypto: &dyn RTCCrypto,
    labels: &Labels,
) -> Result<(Cipher, [u8; MAX_SALT]), CryptoError> {
    let salt_len = keys.profile.salt_len();
    if keys.key.len() != 16 {
        return Err(CryptoError::InvalidKeyLength {
            expected: 16,
            actual: keys.key.len(),
        });
    }
    if keys.salt.len() != salt_len {
        return Err(CryptoError::InvalidKeyLength {
            expected: salt_len,
            actual: keys.salt.len(),
        });
    }
    let session_key = derive(crypto, &keys.key, &keys.salt, labels.encryption, 16)?;
    let mut session_salt = [0u8; MAX_SALT];
    session_salt[..salt_len].copy_from_slice(&derive(
        crypto,
        &keys.key,
        &keys.salt,
        labels.salt,
        salt_len,
    )?);
    let cipher = match keys.profile {
        Profile::AeadAes128Gcm => {
            Cipher::Gcm(crypto.new_aead(AeadAlgorithm::Aes128Gcm, &session_key)?)
        }
        Profile::Aes128CmHmacSha1_80 => {
            let auth_key = derive(crypto, &keys.key, &keys.salt, labels.authentication, 20)?;
            Cipher::CmHmac {
                stream: crypto.new_stream_cipher(StreamCipherAlgorithm::Aes128Ctr, &session_key)?,
                auth: crypto.new_hmac(HmacAlgorithm::Sha1, &auth_key)?,
            }
        }
    };
    Ok((cipher, session_salt))
}

impl SrtpSender {
    pub fn new(keys: &MasterKeys, crypto: &dyn RTCCrypto) -> Result<SrtpSender, CryptoError> {
        let (cipher, session_salt) = session(keys, crypto, &SRTP_LABELS)?;
        Ok(SrtpSender {
            profile: keys.profile,
            cipher,
            session_salt,
            session: NEXT_SESSION.fetch_add(1, Ordering::Relaxed),
        })
    }

    pub fn profile(&self) -> Profile {
        self.profile
    }

    /// Encrypts the RTP packet in `packet` (header of `header_len` bytes,
    /// then payload) in place and appends the tag. `stream` is the state of
    /// the packet's SSRC, the same one for every packet of it. `packet`
    /// should have [`Profile::overhead`] bytes of spare capacity.
    pub fn protect(
        &mut self,
        stream: &mut SrtpStream,
        packet: &mut BytesMut,
        header_len: usize,
    ) -> Result<(), ProtectError> {
        if packet.len() < 12 || header_len < 12 || header_len > packet.len() {
            return Err(ProtectError::NotRtp);
        }
        let seq = u16::from_be_bytes([packet[2], packet[3]]);
        let ssrc = u32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]);
        if stream.session != self.session {
            *stream = SrtpStream {
                session: self.session,
                sent: SeqExtender::default(),
            };
        }
        // A retransmission may be from before a wrap; one from before the
        // first period keeps rollover counter 0.
        let (extended, index) = packet_index(&stream.sent, seq);
        stream.sent.accept(extended);
        let roc = (index.unwrap_or(0) >> 16) as u32;
        match &mut self.cipher {
            Cipher::Gcm(aead) => {
                let nonce = gcm_nonce(&self.session_salt, ssrc, roc, seq);
                let mut tag = [0u8; 16];
                let (aad, payload) = packet.split_at_mut(header_len);
                aead.seal_in_place(&nonce, aad, payload, &mut tag)?;
                packet.extend_from_slice(&tag);
            }
            Cipher::CmHmac { stream, auth } => {
                let iv = cm_iv(&self.session_salt, ssrc, roc, seq);
                stream.apply_keystream(&iv, &mut packet[header_len..])?;
                let mut tag = [0u8; 20];
                auth.sign(&[&packet[..], &roc.to_be_bytes()], &mut tag)?;
                packet.extend_from_slice(&tag[..10]);
            }
        }
        Ok(())
    }
}

/// Decrypts inbound RTP of one connection with its inbound keys (RFC 3711,
/// RFC 7714): the rollover counter estimated per stream as RFC 3711 3.3.1
/// says, and a replay window of 64 packets, as the engine keeps. The
/// plaintext is written into a buffer of the caller's, so decrypting
/// allocates nothing per packet.
pub struct SrtpReceiver {
    profile: Profile,
    cipher: Cipher,
    session_salt: [u8; MAX_SALT],
    /// A publisher connection carries a handful of streams.
    streams: StreamWindows,
}

/// Why an inbound packet could not be decrypted.
#[derive(Debug, thiserror::Error)]
pub enum UnprotectError {
    #[error("replayed packet, or older than the replay window")]
    Replay,
    #[error("packet too short for its header and tag")]
    TooShort,
    #[error("authentication failed")]
    Auth,
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

/// Inbound replay window, as the engine's (packets).
const REPLAY_WINDOW: u64 = 64;

/// The sequence numbers authenticated on one stream: the highest, and
/// which of the 64 before it were received.
#[derive(Debug, Clone, Default)]
struct ReplayWindow {
    seq: SeqExtender,
    /// Bit `k`: the packet `k` behind the highest was received.
    seen: u64,
}

impl ReplayWindow {
    /// Whether the packet of extended sequence number `value` is new:
    /// ahead of the highest, or within the window and not yet received.
    fn is_new(&self, value: u64) -> bool {
        match self.seq.highest() {
            Some(highest) if value <= highest => {
                let behind = highest - value;
                behind < REPLAY_WINDOW && self.seen & (1 << behind) == 0
            }
            _ => true,
        }
    }

    /// Notes an authenticated packet.
    fn accept(&mut self, value: u64) {
        match self.seq.highest() {
            Some(highest) if value <= highest => self.seen |= 1 << (highest - value),
            Some(highest) => {
                let ahead = value - highest;
                self.seen = if ahead >= REPLAY_WINDOW {
                    1
                } else {
                    self.seen << ahead | 1
                };
            }
            None => self.seen = 1,
        }
        self.seq.accept(value);
    }
}

/// Streams whose replay windows one receiver keeps; past this, the first
/// one heard makes way.
const MAX_STREAMS: usize = 32;

/// The replay windows of one direction's streams, by SSRC.
#[derive(Default)]
struct StreamWindows(Vec<(u32, ReplayWindow)>);

impl StreamWindows {
    fn find(&self, ssrc: u32) -> Option<usize> {
        self.0.iter().position(|(s, _)| *s == ssrc)
    }

    fn get(&self, at: Option<usize>) -> Option<&ReplayWindow> {
        at.map(|at| &self.0[at].1)
    }

    /// Notes an authenticated `value` on the window at `at` (from
    /// [`find`](Self::find)), or on a new one for `ssrc`.
    fn accept(&mut self, at: Option<usize>, ssrc: u32, value: u64) {
        match at {
            Some(at) => self.0[at].1.accept(value),
            None => {
                if self.0.len() >= MAX_STREAMS {
                    self.0.remove(0);
                }
                let mut window = ReplayWindow::default();
                window.accept(value);
                self.0.push((ssrc, window));
            }
        }
    }
}

/// Room for this many full-size packets per allocation of the buffer
/// plaintext is written into.
pub const PLAINTEXT_BUFFER_PACKETS: usize = 32;

impl SrtpReceiver {
    pub fn new(keys: &MasterKeys, crypto: &dyn RTCCrypto) -> Result<SrtpReceiver, CryptoError> {
        let (cipher, session_salt) = session(keys, crypto, &SRTP_LABELS)?;
        Ok(SrtpReceiver {
            profile: keys.profile,
            cipher,
            session_salt,
            streams: StreamWindows::default(),
        })
    }

    /// Authenticates and decrypts the SRTP packet `encrypted`, whose header
    /// is `header`, into the end of `buffer` (empty, and grown by
    /// [`PLAINTEXT_BUFFER_PACKETS`] packets when short): returns the
    /// plaintext packet, header and payload without the tag, split off
    /// `buffer`.
    pub fn unprotect(
        &mut self,
        encrypted: &[u8],
        header: &RtpView,
        buffer: &mut BytesMut,
    ) -> Result<BytesMut, UnprotectError> {
        let tag_len = self.profile.overhead();
        if encrypted.len() < header.header_len + tag_len {
            return Err(UnprotectError::TooShort);
        }
        let (ssrc, seq) = (header.ssrc, header.sequence_number);
        let at = self.streams.find(ssrc);
        let fresh = ReplayWindow::default();
        let window = self.streams.get(at).unwrap_or(&fresh);
        let (extended, index) = packet_index(&window.seq, seq);
        let index = index.ok_or(UnprotectError::Replay)?;
        if !window.is_new(extended) {
            return Err(UnprotectError::Replay);
        }
        let roc = (index >> 16) as u32;
        let body_end = encrypted.len() - tag_len;
        let (body, tag) = encrypted.split_at(body_end);
        debug_assert!(buffer.is_empty());
        if buffer.capacity() < body_end {
            *buffer = BytesMut::with_capacity(body_end.max(PLAINTEXT_BUFFER_PACKETS * 1500));
        }
        match &mut self.cipher {
            Cipher::Gcm(aead) => {
                buffer.extend_from_slice(body);
                let nonce = gcm_nonce(&self.session_salt, ssrc, roc, seq);
                let (aad, payload) = buffer.split_at_mut(header.header_len);
                if aead.open_in_place(&nonce, aad, payload, tag).is_err() {
                    buffer.clear();
                    return Err(UnprotectError::Auth);
                }
            }
            Cipher::CmHmac { stream, auth } => {
                // RFC 3711 4.2: the tag covers the packet and the ROC;
                // checked before anything is decrypted.
                let mut expected = [0u8; 20];
                auth.sign(&[body, &roc.to_be_bytes()], &mut expected)?;
                if !constant_time_eq(&expected[..tag_len], tag) {
                    return Err(UnprotectError::Auth);
                }
                buffer.extend_from_slice(body);
                let iv = cm_iv(&self.session_salt, ssrc, roc, seq);
                if let Err(e) = stream.apply_keystream(&iv, &mut buffer[header.header_len..]) {
                    buffer.clear();
                    return Err(e.into());
                }
            }
        }
        self.streams.accept(at, ssrc, extended);
        Ok(buffer.split())
    }
}

/// Decrypts the SRTCP a client sends on one connection (RFC 3711 3.4,
/// RFC 7714 9), with a replay window per sending SSRC over the SRTCP
/// index, so that its feedback (NACKs, keyframe requests, estimates)
/// reaches the room without the engine's read path.
pub struct SrtcpReceiver {
    profile: Profile,
    cipher: Cipher,
    session_salt: [u8; MAX_SALT],
    /// A client's RTCP comes from a handful of SSRCs.
    streams: StreamWindows,
}

/// The E flag and 31-bit SRTCP index after an SRTCP packet's payload.
const SRTCP_INDEX_LEN: usize = 4;
/// The RTCP header and sender SSRC: never encrypted.
const RTCP_FIXED_LEN: usize = 8;

impl SrtcpReceiver {
    pub fn new(keys: &MasterKeys, crypto: &dyn RTCCrypto) -> Result<SrtcpReceiver, CryptoError> {
        let (cipher, session_salt) = session(keys, crypto, &SRTCP_LABELS)?;
        Ok(SrtcpReceiver {
            profile: keys.profile,
            cipher,
            session_salt,
            streams: StreamWindows::default(),
        })
    }

    /// Authenticates and decrypts the SRTCP packet `encrypted` into
    /// `buffer` (emptied first): returns the compound RTCP packet, without
    /// the index and tag.
    pub fn unprotect(
        &mut self,
        encrypted: &[u8],
        buffer: &mut BytesMut,
    ) -> Result<BytesMut, UnprotectError> {
        let tag_len = self.profile.overhead();
        let n = encrypted.len();
        if n < RTCP_FIXED_LEN + SRTCP_INDEX_LEN + tag_len {
            return Err(UnprotectError::TooShort);
        }
        // GCM: ... || tag || E+index. AES-CM: ... || E+index || tag.
        let (body_end, index_at, tag_at) = match self.profile {
            Profile::AeadAes128Gcm => {
                let body_end = n - SRTCP_INDEX_LEN - tag_len;
                (body_end, n - SRTCP_INDEX_LEN, body_end)
            }
            Profile::Aes128CmHmacSha1_80 => {
                let body_end = n - tag_len - SRTCP_INDEX_LEN;
                (body_end, body_end, n - tag_len)
            }
        };
        let trailer: [u8; 4] = encrypted[index_at..index_at + SRTCP_INDEX_LEN]
            .try_into()
            .map_err(|_| UnprotectError::TooShort)?;
        let e_and_index = u32::from_be_bytes(trailer);
        let encrypted_flag = e_and_index >> 31 == 1;
        let index = e_and_index & 0x7FFF_FFFF;
        let ssrc = u32::from_be_bytes([encrypted[4], encrypted[5], encrypted[6], encrypted[7]]);
        let at = self.streams.find(ssrc);
        if self
            .streams
            .get(at)
            .is_some_and(|w| !w.is_new(index as u64))
        {
            return Err(UnprotectError::Replay);
        }
        let body = &encrypted[..body_end];
        let tag = &encrypted[tag_at..tag_at + tag_len];
        buffer.clear();
        buffer.extend_from_slice(body);
        match &mut self.cipher {
            Cipher::Gcm(aead) => {
                let mut nonce = [0u8; 12];
                nonce[2..6].copy_from_slice(&ssrc.to_be_bytes());
                nonce[8..12].copy_from_slice(&index.to_be_bytes());
                for (n, s) in nonce.iter_mut().zip(&self.session_salt) {
                    *n ^= s;
                }
                let opened = if encrypted_flag {
                    // RFC 7714 9.1: the fixed header and the index are
                    // authenticated, the rest encrypted.
                    let mut aad = [0u8; RTCP_FIXED_LEN + SRTCP_INDEX_LEN];
                    aad[..RTCP_FIXED_LEN].copy_from_slice(&body[..RTCP_FIXED_LEN]);
                    aad[RTCP_FIXED_LEN..].copy_from_slice(&trailer);
                    aead.open_in_place(&nonce, &aad, &mut buffer[RTCP_FIXED_LEN..], tag)
                } else {
                    // Unencrypted: all of it authenticated only.
                    let mut aad = Vec::with_capacity(body.len() + SRTCP_INDEX_LEN);
                    aad.extend_from_slice(body);
                    aad.extend_from_slice(&trailer);
                    aead.open_in_place(&nonce, &aad, &mut [], tag)
                };
                if opened.is_err() {
                    buffer.clear();
                    return Err(UnprotectError::Auth);
                }
            }
            Cipher::CmHmac { stream, auth } => {
                let mut expected = [0u8; 20];
                auth.sign(&[&encrypted[..tag_at]], &mut expected)?;
                if !constant_time_eq(&expected[..tag_len], tag) {
                    buffer.clear();
                    return Err(UnprotectError::Auth);
                }
                if encrypted_flag {
                    let iv = cm_iv(&self.session_salt, ssrc, index >> 16, index as u16);
                    if let Err(e) = stream.apply_keystream(&iv, &mut buffer[RTCP_FIXED_LEN..]) {
                        buffer.clear();
                        return Err(e.into());
                    }
                }
            }
        }
        self.streams.accept(at, ssrc, index as u64);
        Ok(buffer.split())
    }
}

/// RFC 7714 8.1: 00 00 || SSRC || ROC || SEQ, XOR the salt.
fn gcm_nonce(salt: &[u8; MAX_SALT], ssrc: u32, roc: u32, seq: u16) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    nonce[2..6].copy_from_slice(&ssrc.to_be_bytes());
    nonce[6..10].copy_from_slice(&roc.to_be_bytes());
    nonce[10..12].copy_from_slice(&seq.to_be_bytes());
    for (n, s) in nonce.iter_mut().zip(salt) {
        *n ^= s;
    }
    nonce
}

/// RFC 3711 4.1.1: salt * 2^16 XOR SSRC * 2^64 XOR index * 2^16.
fn cm_iv(salt: &[u8; MAX_SALT], ssrc: u32, roc: u32, seq: u16) -> [u8; 16] {
    let mut iv = [0u8; 16];
    iv[..MAX_SALT].copy_from_slice(salt);
    for (i, b) in ssrc.to_be_bytes().into_iter().enumerate() {
        iv[4 + i] ^= b;
    }
    for (i, b) in roc.to_be_bytes().into_iter().enumerate() {
        iv[8 + i] ^= b;
    }
    for (i, b) in seq.to_be_bytes().into_iter().enumerate() {
        iv[12 + i] ^= b;
    }
    iv
}

/// Compares authentication tags in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::rtp::{Header, Packet};
    use rtc::shared::marshal::{Marshal, MarshalSize};
    use rtc::srtp::context::Context;
    use rtc::srtp::protection_profile::ProtectionProfile;

    fn packet(ssrc: u32, seq: u16, payload: &[u8]) -> (BytesMut, usize) {
        let p = Packet {
            header: Header {
                version: 2,
                payload_type: 96,
                sequence_number: seq,
                timestamp: 1000 + seq as u32,
                ssrc,
                ..Default::default()
            },
            payload: bytes::Bytes::copy_from_slice(payload),
        };
        let header_len = p.header.marshal_size();
        let mut buf = BytesMut::from(&p.marshal().unwrap()[..]);
        buf.reserve(16);
        (buf, header_len)
    }

    fn keys(profile: Profile) -> MasterKeys {
        MasterKeys {
            profile,
            key: (1..=16).collect(),
            salt: (100..100 + profile.salt_len() as u8).collect(),
        }
    }

    /// Both profiles, as ours and as the engine's.
    const BOTH: [(Profile, ProtectionProfile); 2] = [
        (Profile::AeadAes128Gcm, ProtectionProfile::AeadAes128Gcm),
        (
            Profile::Aes128CmHmacSha1_80,
            ProtectionProfile::Aes128CmHmacSha1_80,
        ),
    ];

    /// The engine's SRTP context for `keys`, without replay protection.
    fn engine_context(
        keys: &MasterKeys,
        profile: ProtectionProfile,
        crypto: &dyn RTCCrypto,
    ) -> Context {
        Context::new(&keys.key, &keys.salt, profile, None, None, crypto).unwrap()
    }

    /// Our encryption, decrypted by the engine's own SRTP implementation,
    /// across a sequence-number wrap and with a retransmission from before
    /// it.
    fn round_trip(profile: Profile, rtc_profile: ProtectionProfile) {
        let provider = rtc::crypto::default_provider().unwrap();
        let keys = keys(profile);
        let mut sender = SrtpSender::new(&keys, provider.crypto()).unwrap();
        let mut receiver = engine_context(&keys, rtc_profile, provider.crypto());
        let mut stream = SrtpStream::default();
        let seqs: Vec<u16> = (65_530..=65_535).chain(0..6).chain([65_534, 7]).collect();
        for (i, seq) in seqs.into_iter().enumerate() {
            let payload = vec![i as u8; 200 + i];
            let (mut buf, header_len) = packet(0x1234_5678, seq, &payload);
            sender.protect(&mut stream, &mut buf, header_len).unwrap();
            assert_eq!(buf.len(), header_len + payload.len() + profile.overhead());
            assert_ne!(&buf[header_len..header_len + payload.len()], &payload[..]);
            let plain = receiver.decrypt_rtp(&buf).unwrap();
            assert_eq!(&plain[header_len..], &payload[..], "seq {seq}");
        }
    }

    /// A stream carried over to new keys (a DTLS renegotiation) starts its
    /// rollover counter over, as the receiver's new context expects.
    #[test]
    fn a_stream_starts_over_under_new_keys() {
        let provider = rtc::crypto::default_provider().unwrap();
        for (profile, rtc_profile) in BOTH {
            let keys = keys(profile);
            let mut stream = SrtpStream::default();
            let mut first = SrtpSender::new(&keys, provider.crypto()).unwrap();
            let mut old = engine_context(&keys, rtc_profile, provider.crypto());
            // Past a wrap: rollover counter 1.
            for seq in [65_534u16, 65_535, 0, 1] {
                let (mut buf, header_len) = packet(7, seq, &[seq as u8; 50]);
                first.protect(&mut stream, &mut buf, header_len).unwrap();
                assert!(old.decrypt_rtp(&buf).is_ok(), "{profile:?} seq {seq}");
            }
            let mut second = SrtpSender::new(&keys, provider.crypto()).unwrap();
            let mut new = engine_context(&keys, rtc_profile, provider.crypto());
            for seq in [2u16, 3] {
                let payload = [seq as u8; 50];
                let (mut buf, header_len) = packet(7, seq, &payload);
                second.protect(&mut stream, &mut buf, header_len).unwrap();
                let plain = new.decrypt_rtp(&buf).unwrap();
                assert_eq!(&plain[header_len..], &payload[..], "{profile:?} seq {seq}");
            }
        }
    }

    #[test]
    fn gcm_packets_decrypt_with_the_engine_srtp() {
        round_trip(Profile::AeadAes128Gcm, ProtectionProfile::AeadAes128Gcm);
    }

    #[test]
    fn aes_cm_packets_decrypt_with_the_engine_srtp() {
        round_trip(
            Profile::Aes128CmHmacSha1_80,
            ProtectionProfile::Aes128CmHmacSha1_80,
        );
    }

    #[test]
    fn the_capture_sees_the_keys_the_engine_derives_from() {
        for (profile, rtc_profile) in BOTH {
            let capture = KeyCapture::with_default_provider().unwrap();
            let local = keys(profile);
            let mut remote = keys(profile);
            remote.key.reverse();
            assert_eq!(capture.outbound(), None);
            for k in [&local, &remote] {
                engine_context(k, rtc_profile, &capture);
            }
            assert_eq!(capture.outbound(), Some(local));
            assert_eq!(capture.inbound(), Some(remote));
        }
    }

    /// What our sender protects, our receiver takes back once: a replay
    /// and a damaged packet are refused.
    #[test]
    fn the_receiver_decrypts_once_and_refuses_damage() {
        let provider = rtc::crypto::default_provider().unwrap();
        for profile in [Profile::AeadAes128Gcm, Profile::Aes128CmHmacSha1_80] {
            let keys = keys(profile);
            let mut sender = SrtpSender::new(&keys, provider.crypto()).unwrap();
            let mut receiver = SrtpReceiver::new(&keys, provider.crypto()).unwrap();
            let mut buffer = BytesMut::new();
            let mut stream = SrtpStream::default();
            for seq in [65_534u16, 65_535, 0, 1] {
                let payload = vec![seq as u8; 300];
                let (mut buf, header_len) = packet(0x0BAD_CAFE, seq, &payload);
                sender.protect(&mut stream, &mut buf, header_len).unwrap();
                let view = RtpView::parse(&buf).unwrap();
                let mut damaged = buf.clone();
                damaged[header_len + 7] ^= 0x40;
                assert!(
                    matches!(
                        receiver.unprotect(&damaged, &view, &mut buffer),
                        Err(UnprotectError::Auth)
                    ),
                    "{profile:?} seq {seq}: damaged"
                );
                assert!(buffer.is_empty(), "a refused packet leaves nothing behind");
                let plain = receiver.unprotect(&buf, &view, &mut buffer).unwrap();
                assert_eq!(&plain[header_len..], &payload[..], "{profile:?} seq {seq}");
                assert!(
                    matches!(
                        receiver.unprotect(&buf, &view, &mut buffer),
                        Err(UnprotectError::Replay)
                    ),
                    "{profile:?} seq {seq}: replay"
                );
                let short = &buf[..header_len + profile.overhead() - 1];
                assert!(matches!(
                    receiver.unprotect(short, &view, &mut buffer),
                    Err(UnprotectError::TooShort)
                ));
            }
        }
    }

    /// What the engine encrypts, as a publishing client does, our receiver
    /// decrypts: headers with CSRCs and extensions, two streams, across a
    /// sequence number wrap, reordered within the window; packets older
    /// than the window or from before a stream's first are refused.
    #[test]
    fn the_receiver_decrypts_what_the_engine_encrypts() {
        let provider = rtc::crypto::default_provider().unwrap();
        for (profile, rtc_profile) in BOTH {
            let keys = keys(profile);
            let mut client = engine_context(&keys, rtc_profile, provider.crypto());
            let mut receiver = SrtpReceiver::new(&keys, provider.crypto()).unwrap();
            let mut buffer = BytesMut::new();
            let mut encrypt = |ssrc: u32, seq: u16| {
                let mut header = Header {
                    version: 2,
                    payload_type: 96,
                    sequence_number: seq,
                    timestamp: 90 * seq as u32,
                    ssrc,
                    csrc: vec![7],
                    ..Default::default()
                };
                header.extension = true;
                header.extension_profile = 0xBEDE;
                header
                    .set_extension(3, bytes::Bytes::from(seq.to_be_bytes().to_vec()))
                    .unwrap();
                let payload = vec![(seq % 251) as u8; 100 + (seq % 7) as usize];
                let plain = Packet {
                    header,
                    payload: bytes::Bytes::from(payload),
                }
                .marshal()
                .unwrap();
                (client.encrypt_rtp(&plain).unwrap(), plain)
            };
            // A wrap, a packet from before it arriving after it, a second
            // stream interleaved.
            let order: Vec<(u32, u16)> = [65_533u16, 65_534, 0, 65_535, 1, 2, 3]
                .into_iter()
                .flat_map(|seq| [(1, seq), (2, seq.wrapping_add(100))])
                .collect();
            let mut sent = Vec::new();
            for (ssrc, seq) in order {
                sent.push((ssrc, seq, encrypt(ssrc, seq)));
            }
            for (ssrc, seq, (encrypted, plain)) in &sent {
                let view = RtpView::parse(encrypted).unwrap();
                assert_eq!(view.extension(encrypted, 3), Some(&seq.to_be_bytes()[..]));
                let got = receiver.unprotect(encrypted, &view, &mut buffer).unwrap();
                assert_eq!(&got[..], &plain[..], "{profile:?} ssrc {ssrc} seq {seq}");
            }
            // Stream 1 goes 70 packets on; the packet just past the window
            // is refused, one inside it is taken.
            let late = sent.clone();
            let mut later = Vec::new();
            for seq in 4u16..74 {
                later.push(encrypt(1, seq));
            }
            let (inside, _) = encrypt(1, 20);
            let (outside, _) = encrypt(1, 9);
            for (encrypted, _) in later.iter().filter(|(e, _)| {
                let seq = RtpView::parse(e).unwrap().sequence_number;
                seq != 20
            }) {
                let view = RtpView::parse(encrypted).unwrap();
                receiver.unprotect(encrypted, &view, &mut buffer).unwrap();
            }
            let view = RtpView::parse(&inside).unwrap();
            assert!(receiver.unprotect(&inside, &view, &mut buffer).is_ok());
            let view = RtpView::parse(&outside).unwrap();
            assert!(matches!(
                receiver.unprotect(&outside, &view, &mut buffer),
                Err(UnprotectError::Replay)
            ));
            // Stream 2 keeps a window of its own: its last packet is a
            // replay there, its next one is taken.
            let (_, _, (encrypted, _)) = &late[late.len() - 1];
            let view = RtpView::parse(encrypted).unwrap();
            assert!(matches!(
                receiver.unprotect(encrypted, &view, &mut buffer),
                Err(UnprotectError::Replay)
            ));
            let (next, plain) = encrypt(2, 104);
            let view = RtpView::parse(&next).unwrap();
            assert_eq!(
                &receiver.unprotect(&next, &view, &mut buffer).unwrap()[..],
                &plain[..]
            );
        }
    }

    /// A compound RTCP packet from `ssrc`: a receiver report and a
    /// keyframe request for stream `0x1000 + n`.
    fn rtcp(ssrc: u32, n: u32) -> Vec<u8> {
        use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
        use rtc::rtcp::receiver_report::ReceiverReport;
        let packets: Vec<Box<dyn rtc::rtcp::Packet>> = vec![
            Box::new(ReceiverReport {
                ssrc,
                ..Default::default()
            }),
            Box::new(PictureLossIndication {
                sender_ssrc: ssrc,
                media_ssrc: 0x1000 + n,
            }),
        ];
        rtc::rtcp::packet::marshal(&packets).unwrap().to_vec()
    }

    /// What the engine encrypts as SRTCP, as a client does, our receiver
    /// decrypts once; a replay, a damaged packet and a short one are
    /// refused, and each sender keeps its own window.
    #[test]
    fn srtcp_from_the_engine_decrypts_once() {
        let provider = rtc::crypto::default_provider().unwrap();
        for (profile, rtc_profile) in BOTH {
            let keys = keys(profile);
            let mut client = engine_context(&keys, rtc_profile, provider.crypto());
            let mut receiver = SrtcpReceiver::new(&keys, provider.crypto()).unwrap();
            let mut buffer = BytesMut::new();
            let mut sent = Vec::new();
            for n in 0..5 {
                for ssrc in [0xA, 0xB] {
                    let plain = rtcp(ssrc, n);
                    let encrypted = client.encrypt_rtcp(&plain).unwrap();
                    assert_ne!(&encrypted[8..plain.len()], &plain[8..], "encrypted");
                    sent.push((encrypted, plain));
                }
            }
            for (encrypted, plain) in &sent {
                let mut damaged = encrypted.to_vec();
                damaged[10] ^= 1;
                assert!(
                    matches!(
                        receiver.unprotect(&damaged, &mut buffer),
                        Err(UnprotectError::Auth)
                    ),
                    "{profile:?}: damaged"
                );
                let got = receiver.unprotect(encrypted, &mut buffer).unwrap();
                assert_eq!(&got[..], &plain[..], "{profile:?}");
                assert!(
                    matches!(
                        receiver.unprotect(encrypted, &mut buffer),
                        Err(UnprotectError::Replay)
                    ),
                    "{profile:?}: replay"
                );
                assert!(matches!(
                    receiver.unprotect(&encrypted[..12], &mut buffer),
                    Err(UnprotectError::TooShort)
                ));
            }
            // Parsed, the packets are the ones sent.
            let last = receiver
                .unprotect(&client.encrypt_rtcp(&rtcp(0xB, 9)).unwrap(), &mut buffer)
                .unwrap();
            let mut raw = last.freeze();
            let packets = rtc::rtcp::packet::unmarshal(&mut raw).unwrap();
            assert_eq!(packets.len(), 2);
        }
    }

    #[test]
    fn the_replay_window_takes_each_index_once() {
        let mut w = ReplayWindow::default();
        w.accept(100);
        assert!(w.is_new(101) && !w.is_new(100));
        assert!(w.is_new(99) && w.is_new(37) && !w.is_new(36), "64 behind");
        w.accept(99);
        assert!(!w.is_new(99));
        w.accept(200);
        assert!(!w.is_new(100), "fell out of the window");
        assert!(w.is_new(150) && !w.is_new(200));
        w.accept(150);
        assert!(!w.is_new(150) && w.is_new(151));
    }

    #[test]
    fn packet_index_follows_wraps_and_late_packets() {
        let mut seen = SeqExtender::new();
        let mut index = |seq: u16| {
            let (extended, index) = packet_index(&seen, seq);
            seen.accept(extended);
            index
        };
        assert_eq!(index(65_000), Some(65_000), "the first, in period 0");
        assert_eq!(index(65_500), Some(65_500));
        assert_eq!(index(10), Some(65_536 + 10), "a wrap");
        assert_eq!(index(65_400), Some(65_400), "late, from before the wrap");
        assert_eq!(index(20), Some(65_536 + 20));
        let mut seen = SeqExtender::new();
        seen.extend(10);
        assert_eq!(
            packet_index(&seen, 65_530).1,
            None,
            "from before the first period"
        );
    }
}
