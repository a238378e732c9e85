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

use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use rtc::crypto::{ActiveKeyExchange, CbcAlgorithm, CbcCipher};
use rtc::crypto::{
    AeadAlgorithm, AeadCipher, BlockCipherAlgorithm, CryptoAlgorithm, CryptoError, HashAlgorithm,
    HmacAlgorithm, KeyExchangeAlgorithm, Mac, PublicKey, RTCCrypto, RTCCryptoProvider, RTCRandom,
    SignatureScheme, SigningKey, StreamCipher, StreamCipherAlgorithm,
};
use rustc_hash::FxHashMap;

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

/// The rollover counter of one outbound SSRC (RFC 3711 3.3.1).
#[derive(Debug, Clone, Copy)]
struct Rollover {
    roc: u32,
    highest: u16,
}

impl Rollover {
    /// The rollover counter for `seq`, sent now: the index closest to the
    /// highest sent so far (a retransmission may be from before a wrap).
    fn index(&mut self, seq: u16) -> u32 {
        let (roc, highest) = (self.roc, self.highest);
        let guess = if highest < 0x8000 {
            if seq > highest && seq - highest > 0x8000 {
                roc.checked_sub(1).unwrap_or(roc)
            } else {
                roc
            }
        } else if seq < highest && highest - seq > 0x8000 {
            roc.wrapping_add(1)
        } else {
            roc
        };
        let wrapped = guess != roc && guess == roc.wrapping_add(1);
        if wrapped || (guess == roc && seq > highest) {
            self.roc = guess;
            self.highest = seq;
        }
        guess
    }
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

/// Encrypts RTP for one connection's outbound direction.
pub struct SrtpSender {
    profile: Profile,
    cipher: Cipher,
    session_salt: Vec<u8>,
    rollover: FxHashMap<u32, Rollover>,
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

impl SrtpSender {
    pub fn new(keys: &MasterKeys, crypto: &dyn RTCCrypto) -> Result<SrtpSender, CryptoError> {
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
        let session_key = derive(crypto, &keys.key, &keys.salt, LABEL_SRTP_ENCRYPTION, 16)?;
        let session_salt = derive(crypto, &keys.key, &keys.salt, LABEL_SRTP_SALT, salt_len)?;
        let cipher = match keys.profile {
            Profile::AeadAes128Gcm => {
                Cipher::Gcm(crypto.new_aead(AeadAlgorithm::Aes128Gcm, &session_key)?)
            }
            Profile::Aes128CmHmacSha1_80 => {
                let auth_key =
                    derive(crypto, &keys.key, &keys.salt, LABEL_SRTP_AUTHENTICATION, 20)?;
                Cipher::CmHmac {
                    stream: crypto
                        .new_stream_cipher(StreamCipherAlgorithm::Aes128Ctr, &session_key)?,
                    auth: crypto.new_hmac(HmacAlgorithm::Sha1, &auth_key)?,
                }
            }
        };
        Ok(SrtpSender {
            profile: keys.profile,
            cipher,
            session_salt,
            rollover: FxHashMap::default(),
        })
    }

    pub fn profile(&self) -> Profile {
        self.profile
    }

    /// Encrypts the RTP packet in `packet` (header of `header_len` bytes,
    /// then payload) in place and appends the tag. `packet` should have
    /// [`Profile::overhead`] bytes of spare capacity.
    pub fn protect(
        &mut self,
        packet: &mut BytesMut,
        header_len: usize,
    ) -> Result<(), ProtectError> {
        if packet.len() < 12 || header_len < 12 || header_len > packet.len() {
            return Err(ProtectError::NotRtp);
        }
        let seq = u16::from_be_bytes([packet[2], packet[3]]);
        let ssrc = u32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]);
        let roc = self
            .rollover
            .entry(ssrc)
            .or_insert(Rollover {
                roc: 0,
                highest: seq,
            })
            .index(seq);
        match &mut self.cipher {
            Cipher::Gcm(aead) => {
                // RFC 7714 8.1: 00 00 || SSRC || ROC || SEQ, XOR the salt.
                let mut nonce = [0u8; 12];
                nonce[2..6].copy_from_slice(&ssrc.to_be_bytes());
                nonce[6..10].copy_from_slice(&roc.to_be_bytes());
                nonce[10..12].copy_from_slice(&seq.to_be_bytes());
                for (n, s) in nonce.iter_mut().zip(&self.session_salt) {
                    *n ^= s;
                }
                let mut tag = [0u8; 16];
                let (aad, payload) = packet.split_at_mut(header_len);
                aead.seal_in_place(&nonce, aad, payload, &mut tag)?;
                packet.extend_from_slice(&tag);
            }
            Cipher::CmHmac { stream, auth } => {
                // RFC 3711 4.1.1: salt * 2^16 XOR SSRC * 2^64 XOR index * 2^16.
                let mut iv = [0u8; 16];
                iv[..14].copy_from_slice(&self.session_salt);
                for (i, b) in ssrc.to_be_bytes().into_iter().enumerate() {
                    iv[4 + i] ^= b;
                }
                for (i, b) in roc.to_be_bytes().into_iter().enumerate() {
                    iv[8 + i] ^= b;
                }
                for (i, b) in seq.to_be_bytes().into_iter().enumerate() {
                    iv[12 + i] ^= b;
                }
                stream.apply_keystream(&iv, &mut packet[header_len..])?;
                let mut tag = [0u8; 20];
                auth.sign(&[&packet[..], &roc.to_be_bytes()], &mut tag)?;
                packet.extend_from_slice(&tag[..10]);
            }
        }
        Ok(())
    }
}

/// Decrypts inbound RTP of one connection with its inbound keys: the
/// engine's own SRTP context (rollover estimation, the same 64-packet
/// replay window the engine keeps), used by the room directly.
pub struct SrtpReceiver {
    context: rtc::srtp::context::Context,
}

/// Why an inbound packet could not be decrypted.
#[derive(Debug, thiserror::Error)]
pub enum UnprotectError {
    #[error("replayed packet")]
    Replay,
    #[error(transparent)]
    Srtp(rtc::shared::error::Error),
}

/// Inbound replay window, as the engine's (packets).
const REPLAY_WINDOW: usize = 64;

impl SrtpReceiver {
    pub fn new(keys: &MasterKeys, crypto: &dyn RTCCrypto) -> Result<SrtpReceiver, UnprotectError> {
        let profile = match keys.profile {
            Profile::AeadAes128Gcm => {
                rtc::srtp::protection_profile::ProtectionProfile::AeadAes128Gcm
            }
            Profile::Aes128CmHmacSha1_80 => {
                rtc::srtp::protection_profile::ProtectionProfile::Aes128CmHmacSha1_80
            }
        };
        let context = rtc::srtp::context::Context::new(
            &keys.key,
            &keys.salt,
            profile,
            Some(rtc::srtp::option::srtp_replay_protection(REPLAY_WINDOW)),
            None,
            crypto,
        )
        .map_err(UnprotectError::Srtp)?;
        Ok(SrtpReceiver { context })
    }

    /// The decrypted packet (header and payload, tag removed) of the SRTP
    /// packet `encrypted`, whose header is `header`.
    pub fn unprotect(
        &mut self,
        encrypted: &[u8],
        header: &rtc::rtp::Header,
    ) -> Result<BytesMut, UnprotectError> {
        self.context
            .decrypt_rtp_with_header(encrypted, header)
            .map_err(|e| match e {
                rtc::shared::error::Error::SrtpSsrcDuplicated(..) => UnprotectError::Replay,
                e => UnprotectError::Srtp(e),
            })
    }
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

    /// Our encryption, decrypted by the engine's own SRTP implementation,
    /// across a sequence-number wrap and with a retransmission from before
    /// it.
    fn round_trip(profile: Profile, rtc_profile: ProtectionProfile) {
        let provider = rtc::crypto::default_provider().unwrap();
        let keys = keys(profile);
        let mut sender = SrtpSender::new(&keys, provider.crypto()).unwrap();
        let mut receiver = Context::new(
            &keys.key,
            &keys.salt,
            rtc_profile,
            None,
            None,
            provider.crypto(),
        )
        .unwrap();
        let seqs: Vec<u16> = (65_530..=65_535).chain(0..6).chain([65_534, 7]).collect();
        for (i, seq) in seqs.into_iter().enumerate() {
            let payload = vec![i as u8; 200 + i];
            let (mut buf, header_len) = packet(0x1234_5678, seq, &payload);
            sender.protect(&mut buf, header_len).unwrap();
            assert_eq!(buf.len(), header_len + payload.len() + profile.overhead());
            assert_ne!(&buf[header_len..header_len + payload.len()], &payload[..]);
            let plain = receiver.decrypt_rtp(&buf).unwrap();
            assert_eq!(&plain[header_len..], &payload[..], "seq {seq}");
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
        for (profile, rtc_profile) in [
            (Profile::AeadAes128Gcm, ProtectionProfile::AeadAes128Gcm),
            (
                Profile::Aes128CmHmacSha1_80,
                ProtectionProfile::Aes128CmHmacSha1_80,
            ),
        ] {
            let capture = KeyCapture::with_default_provider().unwrap();
            let local = keys(profile);
            let mut remote = keys(profile);
            remote.key.reverse();
            assert_eq!(capture.outbound(), None);
            for k in [&local, &remote] {
                Context::new(&k.key, &k.salt, rtc_profile, None, None, &capture).unwrap();
            }
            assert_eq!(capture.outbound(), Some(local));
            assert_eq!(capture.inbound(), Some(remote));
        }
    }

    /// What our sender protects, our receiver takes back once: a replay
    /// and a damaged packet are refused.
    #[test]
    fn the_receiver_decrypts_once_and_refuses_damage() {
        use rtc::shared::marshal::Unmarshal;
        let provider = rtc::crypto::default_provider().unwrap();
        for profile in [Profile::AeadAes128Gcm, Profile::Aes128CmHmacSha1_80] {
            let keys = keys(profile);
            let mut sender = SrtpSender::new(&keys, provider.crypto()).unwrap();
            let mut receiver = SrtpReceiver::new(&keys, provider.crypto()).unwrap();
            for seq in [65_534u16, 65_535, 0, 1] {
                let payload = vec![seq as u8; 300];
                let (mut buf, header_len) = packet(0x0BAD_CAFE, seq, &payload);
                sender.protect(&mut buf, header_len).unwrap();
                let header = rtc::rtp::Header::unmarshal(&mut &buf[..]).unwrap();
                let mut damaged = buf.clone();
                damaged[header_len + 7] ^= 0x40;
                assert!(
                    matches!(
                        receiver.unprotect(&damaged, &header),
                        Err(UnprotectError::Srtp(_))
                    ),
                    "{profile:?} seq {seq}: damaged"
                );
                let plain = receiver.unprotect(&buf, &header).unwrap();
                assert_eq!(&plain[header_len..], &payload[..], "{profile:?} seq {seq}");
                assert!(
                    matches!(
                        receiver.unprotect(&buf, &header),
                        Err(UnprotectError::Replay)
                    ),
                    "{profile:?} seq {seq}: replay"
                );
            }
        }
    }

    #[test]
    fn rollover_follows_wraps_and_late_packets() {
        let mut r = Rollover {
            roc: 0,
            highest: 65_000,
        };
        assert_eq!(r.index(65_500), 0);
        assert_eq!(r.index(10), 1);
        assert_eq!(r.index(65_400), 0, "a retransmission from before the wrap");
        assert_eq!(r.index(20), 1);
        assert_eq!(r.roc, 1);
        assert_eq!(r.highest, 20);
    }
}
