//! Share encryption between two nodes: X25519 between their round share keys, HKDF-SHA256 bound
//! to the round, ChaCha20-Poly1305 from `ring`. Both directions of a pair derive the same key, so
//! the nonce carries the sender's id: each (key, nonce) seals exactly one message per round.

use rand::RngCore;
use ring::{aead, hkdf};
use x25519_dalek::{PublicKey, StaticSecret};

use super::SecAggError;
use super::shamir::Share;

/// A fresh static X25519 key pair drawn from `rng` (a CSPRNG seeded from the OS).
pub(crate) fn key_pair(rng: &mut impl RngCore) -> (StaticSecret, PublicKey) {
    let mut bytes = [0u8; 32];
    rng.fill_bytes(&mut bytes);
    let secret = StaticSecret::from(bytes);
    let public = PublicKey::from(&secret);
    (secret, public)
}

fn aead_key(mine: &StaticSecret, theirs: &PublicKey, context: &[u8]) -> Result<aead::LessSafeKey, SecAggError> {
    let shared = mine.diffie_hellman(theirs);
    if !shared.was_contributory() {
        return Err(SecAggError::Protocol("a peer's share key is a low-order point".into()));
    }
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, context).extract(shared.as_bytes());
    let okm = prk
        .expand(&[b"sanctum secagg share encryption"], &aead::CHACHA20_POLY1305)
        .map_err(|_| SecAggError::Protocol("key derivation failed".into()))?;
    let key = aead::UnboundKey::from(okm);
    Ok(aead::LessSafeKey::new(key))
}

fn nonce(from: u32) -> aead::Nonce {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&from.to_le_bytes());
    aead::Nonce::assume_unique_for_key(n)
}

fn aad(context: &[u8], from: u32, to: u32) -> Vec<u8> {
    let mut a = context.to_vec();
    a.extend_from_slice(&from.to_le_bytes());
    a.extend_from_slice(&to.to_le_bytes());
    a
}

/// Encrypts `plaintext` from node `from` to node `to`.
pub(crate) fn seal(
    mine: &StaticSecret,
    theirs: &PublicKey,
    context: &[u8],
    from: u32,
    to: u32,
    plaintext: &[u8],
) -> Result<Vec<u8>, SecAggError> {
    let key = aead_key(mine, theirs, context)?;
    let mut buf = plaintext.to_vec();
    key.seal_in_place_append_tag(nonce(from), aead::Aad::from(aad(context, from, to)), &mut buf)
        .map_err(|_| SecAggError::Protocol("encryption failed".into()))?;
    Ok(buf)
}

/// Decrypts a share sealed by `from` for `to`; any change to it, or to whom it claims to be from,
/// fails.
pub(crate) fn open(
    mine: &StaticSecret,
    theirs: &PublicKey,
    context: &[u8],
    from: u32,
    to: u32,
    ciphertext: &[u8],
) -> Result<Vec<u8>, SecAggError> {
    let key = aead_key(mine, theirs, context)?;
    let mut buf = ciphertext.to_vec();
    let plain = key.open_in_place(nonce(from), aead::Aad::from(aad(context, from, to)), &mut buf).map_err(|_| {
        SecAggError::Protocol(format!("the share from node id {from} does not decrypt (altered or misaddressed)"))
    })?;
    Ok(plain.to_vec())
}

/// A share's wire form: the evaluation point then the eight limb values, little-endian u64s.
pub fn encode_share(share: &Share) -> Vec<u8> {
    let mut out = Vec::with_capacity(72);
    out.extend_from_slice(&share.x.to_le_bytes());
    for y in share.y {
        out.extend_from_slice(&y.to_le_bytes());
    }
    out
}

/// Reads a share written by [`encode_share`].
pub fn decode_share(bytes: &[u8]) -> Result<Share, SecAggError> {
    if bytes.len() != 72 {
        return Err(SecAggError::Protocol(format!("a share is 72 bytes, got {}", bytes.len())));
    }
    let word = |i: usize| u64::from_le_bytes(bytes[8 * i..8 * i + 8].try_into().unwrap_or([0; 8]));
    let mut y = [0u64; 8];
    for (l, v) in y.iter_mut().enumerate() {
        *v = word(l + 1);
    }
    Ok(Share { x: word(0), y })
}

pub(crate) fn encode_share_pair(b: &Share, s: &Share) -> Vec<u8> {
    let mut out = encode_share(b);
    out.extend_from_slice(&encode_share(s));
    out
}

pub(crate) fn decode_share_pair(bytes: &[u8], holder: u32) -> Result<(Share, Share), SecAggError> {
    if bytes.len() != 144 {
        return Err(SecAggError::Protocol(format!("a share pair is 144 bytes, got {}", bytes.len())));
    }
    let (b, s) = (decode_share(&bytes[..72])?, decode_share(&bytes[72..])?);
    if b.x != u64::from(holder) || s.x != u64::from(holder) {
        return Err(SecAggError::Protocol("a share is evaluated at another node's point".into()));
    }
    Ok((b, s))
}
