//! What a hospital signs when it countersigns the coordinator's record of a round: one
//! domain-separated message that covers the record (by its SHA-256) *and* the hospital's verdict
//! and reason, so no one but the hospital can turn a dispute into agreement or the reverse.
//!
//! # The message (`sanctum-receipt-v1`)
//! ```text
//! "sanctum-receipt-v1\0"
//! u64 LE length || plan_id (UTF-8)
//! u32 LE round
//! u64 LE length || record_sha256 (64 lowercase hex characters)
//! u8 agrees (1 = agrees, 0 = disputes)
//! u64 LE length || reason (UTF-8)
//! ```
//! Every variable field is length-prefixed, so no two statements encode to the same bytes (a
//! reason cannot borrow bytes from the plan id). The run is not a field of its own: the record's
//! hash pins the exact line, and the line carries its sequence number and the hash of the record
//! before it, so a receipt for one run's round can never stand for another run's.
//!
//! The signature is ECDSA P-256 (SHA-256, ASN.1) with the node's certificate key, checked against
//! the certificate; that the certificate was issued by the consortium CA is the caller's check.

use crate::hash::ContentHash;
use crate::secagg::keys;

/// The domain separator: a receipt signature can never be taken for any other signed message.
pub const DOMAIN: &[u8] = b"sanctum-receipt-v1\0";

/// The most a receipt's reason may hold (bytes of UTF-8): a node shortens its own, and the
/// coordinator refuses a longer one rather than write it to its log.
pub const MAX_REASON_BYTES: usize = 2048;

/// What a hospital says about one round record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Statement<'a> {
    pub plan_id: &'a str,
    pub round: u32,
    /// SHA-256 of the round record's exact line in the coordinator's audit log.
    pub record_sha256: ContentHash,
    /// False when the record does not match what the hospital sent.
    pub agrees: bool,
    /// Why it disputes (empty when it agrees).
    pub reason: &'a str,
}

/// Why a countersignature does not stand.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReceiptError {
    #[error("the countersignature cannot be made: {0}")]
    Sign(String),
    #[error("the certificate cannot be read: {0}")]
    Certificate(String),
    #[error(
        "the signature does not verify over the recorded verdict, reason and record hash: the receipt was altered or forged"
    )]
    BadSignature,
}

fn put(m: &mut Vec<u8>, field: &[u8]) {
    m.extend_from_slice(&(field.len() as u64).to_le_bytes());
    m.extend_from_slice(field);
}

impl Statement<'_> {
    /// The exact bytes signed.
    pub fn message(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(DOMAIN.len() + 3 * 8 + 4 + 1 + 64 + self.plan_id.len() + self.reason.len());
        m.extend_from_slice(DOMAIN);
        put(&mut m, self.plan_id.as_bytes());
        m.extend_from_slice(&self.round.to_le_bytes());
        put(&mut m, self.record_sha256.to_hex().as_bytes());
        m.push(u8::from(self.agrees));
        put(&mut m, self.reason.as_bytes());
        m
    }

    /// Signs the statement with a certificate key (e.g. `TlsMaterial::sign`).
    pub fn sign<E: std::fmt::Display>(
        &self,
        sign_with_cert_key: impl FnOnce(&[u8]) -> Result<Vec<u8>, E>,
    ) -> Result<Vec<u8>, ReceiptError> {
        sign_with_cert_key(&self.message()).map_err(|e| ReceiptError::Sign(e.to_string()))
    }

    /// Checks `signature` over this statement against the key `cert_der` certifies.
    pub fn verify(&self, signature: &[u8], cert_der: &[u8]) -> Result<(), ReceiptError> {
        keys::verify_message(&self.message(), signature, cert_der).map_err(|e| match e {
            keys::KeySignatureError::BadSignature => ReceiptError::BadSignature,
            other => ReceiptError::Certificate(other.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::pki::{self, Role, SignSpec};

    fn statement<'a>(plan_id: &'a str, reason: &'a str, agrees: bool) -> Statement<'a> {
        Statement { plan_id, round: 3, record_sha256: ContentHash::of(b"record"), agrees, reason }
    }

    /// The layout in the module doc, written out by hand field by field (not by `message`).
    #[test]
    fn the_message_is_the_documented_layout() {
        let s = statement("p1", "no", false);
        let hash = ContentHash::of(b"record").to_hex();
        let mut want = b"sanctum-receipt-v1\0".to_vec();
        want.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 0]);
        want.extend_from_slice(b"p1");
        want.extend_from_slice(&[3, 0, 0, 0]);
        want.extend_from_slice(&[64, 0, 0, 0, 0, 0, 0, 0]);
        want.extend_from_slice(hash.as_bytes());
        want.push(0);
        want.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 0]);
        want.extend_from_slice(b"no");
        assert_eq!(s.message(), want);
        assert_eq!(statement("p1", "", true).message()[DOMAIN.len() + 8 + 2 + 4 + 8 + 64], 1, "the agrees byte");
    }

    #[test]
    fn every_field_changes_the_message() {
        let base = statement("plan", "reason", true);
        let variants = [
            Statement { plan_id: "plan2", ..base.clone() },
            Statement { round: 4, ..base.clone() },
            Statement { record_sha256: ContentHash::of(b"other"), ..base.clone() },
            Statement { agrees: false, ..base.clone() },
            Statement { reason: "reason2", ..base.clone() },
        ];
        for v in &variants {
            assert_ne!(v.message(), base.message(), "{v:?}");
        }
    }

    proptest! {
        /// Moving bytes between the plan id and the reason never yields the same message: the
        /// fields are length-prefixed.
        #[test]
        fn fields_cannot_borrow_bytes_from_each_other(a in ".{0,12}", b in ".{0,12}", c in ".{0,12}", d in ".{0,12}") {
            prop_assume!((a.as_str(), b.as_str()) != (c.as_str(), d.as_str()));
            prop_assert_ne!(statement(&a, &b, true).message(), statement(&c, &d, true).message());
        }
    }

    #[test]
    fn a_signature_verifies_only_over_the_statement_it_was_made_for() {
        let ca = pki::init_ca("t", 1).unwrap();
        let me = pki::issue(&ca.cert_pem, &ca.key_pem, &SignSpec { name: "h", role: Role::Node, days: 1, hosts: &[] })
            .unwrap();
        let der = keys::cert_der_from_pem(&me.cert_pem).unwrap();
        let s = statement("plan", "", true);
        let sig = s.sign(|m| keys::sign_message(m, &me.key_pem)).unwrap();
        assert_eq!(s.verify(&sig, &der), Ok(()));
        let flipped = Statement { agrees: false, reason: "the record lists an update this node never sent", ..s };
        assert_eq!(flipped.verify(&sig, &der), Err(ReceiptError::BadSignature));
        // A signature over the bare record line (the old scheme) is not a receipt.
        let old = keys::sign_message(b"record", &me.key_pem).unwrap();
        assert_eq!(s.verify(&old, &der), Err(ReceiptError::BadSignature));
        assert!(matches!(s.verify(&sig, b"not a certificate"), Err(ReceiptError::Certificate(_))));
    }
}
