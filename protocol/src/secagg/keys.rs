//! Round keys signed with the node's certificate key, so the coordinator cannot substitute them.
//!
//! Bonawitz et al. sign each node's advertised X25519 public keys with a long-term signing key;
//! here that key is the one the node's certificate certifies (ECDSA P-256 from `sanctum-node pki
//! request`), so a round key is bound to the same identity mutual TLS authenticates, with no second
//! key to distribute. The signature covers the plan, the round, the round's roster (a digest of
//! its sorted participant list and threshold) and the node's name, so a key advertised for one
//! round cannot be replayed in another, nor in the same round announced with another list or t.

use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, UnparsedPublicKey};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};

/// A node's advertised public keys for one secure-aggregation round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoundKeys {
    pub plan_id: String,
    pub round: u32,
    /// The digest of the participant list and threshold the keys were made for
    /// ([`super::client::RoundParams::roster_digest`]). Not sent on the wire: whoever checks the
    /// signature builds the message with its own round's digest
    /// ([`super::client::RoundParams::keys_message`]), so [`super::wire::keys_from_wire`] leaves it
    /// zero.
    pub roster: [u8; 32],
    pub node: String,
    /// X25519 key for encrypting shares to this node.
    pub share_key: [u8; 32],
    /// X25519 key for pairwise masks.
    pub mask_key: [u8; 32],
}

impl RoundKeys {
    /// The bytes the node signs: a domain tag, the plan, the node, the round, the roster digest
    /// and both keys.
    pub fn signed_message(&self) -> Vec<u8> {
        let mut m = b"sanctum secagg round keys v2\0".to_vec();
        for field in [self.plan_id.as_bytes(), self.node.as_bytes()] {
            m.extend_from_slice(&(field.len() as u64).to_le_bytes());
            m.extend_from_slice(field);
        }
        m.extend_from_slice(&self.round.to_le_bytes());
        m.extend_from_slice(&self.roster);
        m.extend_from_slice(&self.share_key);
        m.extend_from_slice(&self.mask_key);
        m
    }
}

/// Why keys cannot be signed or do not verify.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeySignatureError {
    #[error("the node's private key is not a PKCS#8 ECDSA P-256 key: {0}")]
    Key(String),
    #[error("the certificate cannot be read: {0}")]
    Certificate(String),
    #[error("the round keys' signature does not verify against the node's certificate")]
    BadSignature,
}

/// Signs `keys` with the node's certificate key (PEM, PKCS#8).
pub fn sign(keys: &RoundKeys, key_pem: &str) -> Result<Vec<u8>, KeySignatureError> {
    sign_message(&keys.signed_message(), key_pem)
}

/// Signs any secure-aggregation message with the node's certificate key (PEM, PKCS#8).
pub fn sign_message(message: &[u8], key_pem: &str) -> Result<Vec<u8>, KeySignatureError> {
    let der =
        PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| KeySignatureError::Key(e.to_string()))?;
    sign_message_pkcs8(message, der.secret_pkcs8_der())
}

/// Signs a message with a PKCS#8 (DER) ECDSA P-256 key.
pub fn sign_message_pkcs8(message: &[u8], pkcs8_der: &[u8]) -> Result<Vec<u8>, KeySignatureError> {
    let rng = SystemRandom::new();
    let pair = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8_der, &rng)
        .map_err(|e| KeySignatureError::Key(e.to_string()))?;
    pair.sign(&rng, message).map(|s| s.as_ref().to_vec()).map_err(|e| KeySignatureError::Key(e.to_string()))
}

/// Checks a signature on `keys` against the node's certificate (PEM or DER, already validated
/// against the consortium CA by TLS).
pub fn verify(keys: &RoundKeys, signature_bytes: &[u8], cert_der: &[u8]) -> Result<(), KeySignatureError> {
    verify_message(&keys.signed_message(), signature_bytes, cert_der)
}

/// Checks a signature on any message against the key a certificate (DER) certifies.
pub fn verify_message(message: &[u8], signature_bytes: &[u8], cert_der: &[u8]) -> Result<(), KeySignatureError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|e| KeySignatureError::Certificate(e.to_string()))?;
    let spki = cert.public_key().subject_public_key.data.to_vec();
    UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, spki)
        .verify(message, signature_bytes)
        .map_err(|_| KeySignatureError::BadSignature)
}

/// The DER of the first certificate in a PEM file's contents.
pub fn cert_der_from_pem(pem: &str) -> Result<Vec<u8>, KeySignatureError> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|c| c.to_vec())
        .map_err(|e| KeySignatureError::Certificate(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{self, Role, SignSpec};

    fn member(ca: &pki::Issued, name: &str) -> pki::Issued {
        pki::issue(&ca.cert_pem, &ca.key_pem, &SignSpec { name, role: Role::Node, days: 1, hosts: &[] }).unwrap()
    }

    #[test]
    fn keys_verify_only_against_their_own_certificate_and_unaltered() {
        let ca = pki::init_ca("t", 1).unwrap();
        let (a, b) = (member(&ca, "cleveland"), member(&ca, "va"));
        let keys = RoundKeys {
            plan_id: "p".into(),
            round: 3,
            roster: [5; 32],
            node: "cleveland".into(),
            share_key: [1; 32],
            mask_key: [2; 32],
        };
        let sig = sign(&keys, &a.key_pem).unwrap();
        let cert_a = cert_der_from_pem(&a.cert_pem).unwrap();
        let cert_b = cert_der_from_pem(&b.cert_pem).unwrap();
        assert_eq!(verify(&keys, &sig, &cert_a), Ok(()));
        // The coordinator swapping in its own mask key, replaying into another round, or
        // presenting the keys as another node's: all refused.
        assert_eq!(
            verify(&RoundKeys { mask_key: [9; 32], ..keys.clone() }, &sig, &cert_a),
            Err(KeySignatureError::BadSignature)
        );
        assert_eq!(
            verify(&RoundKeys { round: 4, ..keys.clone() }, &sig, &cert_a),
            Err(KeySignatureError::BadSignature)
        );
        // The same round announced with another participant list or threshold.
        assert_eq!(
            verify(&RoundKeys { roster: [6; 32], ..keys.clone() }, &sig, &cert_a),
            Err(KeySignatureError::BadSignature)
        );
        assert_eq!(verify(&keys, &sig, &cert_b), Err(KeySignatureError::BadSignature));
        let mut flipped = sig.clone();
        flipped[10] ^= 1;
        assert_eq!(verify(&keys, &flipped, &cert_a), Err(KeySignatureError::BadSignature));
        assert!(sign(&keys, "not a key").is_err());
    }
}
