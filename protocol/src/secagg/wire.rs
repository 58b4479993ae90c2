//! Conversions between the secure-aggregation state machines' types and the wire messages, with
//! the checks a decoder owes its caller (key and share lengths).

use super::client::{AdvertisedKeys, EncryptedShare};
use super::crypto;
use super::keys::RoundKeys;
use super::{SecAggError, ShareKind, UnmaskShare};
use crate::proto;

fn key32(bytes: &[u8], what: &str, node: &str) -> Result<[u8; 32], SecAggError> {
    bytes.try_into().map_err(|_| SecAggError::Peer(node.into(), format!("{what} is {} bytes, not 32", bytes.len())))
}

/// Advertised keys as sent (`certificate` is filled in by the coordinator from the TLS session).
pub fn keys_to_wire(a: &AdvertisedKeys) -> proto::SecAggKeys {
    proto::SecAggKeys {
        node: a.keys.node.clone(),
        share_key: a.keys.share_key.to_vec(),
        mask_key: a.keys.mask_key.to_vec(),
        signature: a.signature.clone(),
        certificate: a.cert_der.clone(),
    }
}

/// Advertised keys as received, for the plan and round they are relayed in. The roster digest is
/// not on the wire and is left zero: the state machine that checks the signature uses its own
/// round's ([`super::client::RoundParams::keys_message`]).
pub fn keys_from_wire(k: &proto::SecAggKeys, plan_id: &str, round: u32) -> Result<AdvertisedKeys, SecAggError> {
    Ok(AdvertisedKeys {
        keys: RoundKeys {
            plan_id: plan_id.to_string(),
            round,
            roster: [0; 32],
            node: k.node.clone(),
            share_key: key32(&k.share_key, "share_key", &k.node)?,
            mask_key: key32(&k.mask_key, "mask_key", &k.node)?,
        },
        signature: k.signature.clone(),
        cert_der: k.certificate.clone(),
    })
}

pub fn share_to_wire(s: &EncryptedShare) -> proto::EncryptedShare {
    proto::EncryptedShare { from: s.from, to: s.to, ciphertext: s.ciphertext.clone() }
}

pub fn share_from_wire(s: &proto::EncryptedShare) -> EncryptedShare {
    EncryptedShare { from: s.from, to: s.to, ciphertext: s.ciphertext.clone() }
}

pub fn unmask_to_wire(s: &UnmaskShare) -> proto::UnmaskingShare {
    proto::UnmaskingShare { of: s.of, self_seed: s.kind == ShareKind::SelfSeed, share: crypto::encode_share(&s.share) }
}

pub fn unmask_from_wire(s: &proto::UnmaskingShare) -> Result<UnmaskShare, SecAggError> {
    Ok(UnmaskShare {
        of: s.of,
        kind: if s.self_seed { ShareKind::SelfSeed } else { ShareKind::MaskKey },
        share: crypto::decode_share(&s.share)?,
    })
}

/// Little-endian u32 words of a masked input.
pub fn words_from_le(bytes: &[u8]) -> Result<Vec<u32>, SecAggError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(SecAggError::Protocol(format!("masked input of {} bytes is not whole u32 words", bytes.len())));
    }
    Ok(bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

pub fn words_to_le(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}
