//! The node's side of one secure-aggregation round (Bonawitz et al., CCS 2017, every pair of nodes
//! masked), as a sans-IO state machine: the daemon feeds it what the coordinator relayed and sends
//! what it returns.
//!
//! 1. [`Client::new`]: fresh X25519 keys for the round, to be signed with the certificate key and
//!    advertised.
//! 2. [`Client::receive_peers`]: every advertised key set (with its certificate) is checked; the
//!    self-mask seed b and the mask secret are split t-of-n and each share is encrypted to its
//!    holder (ChaCha20-Poly1305 under a key agreed between the two share keys).
//! 3. [`Client::receive_shares`]: the shares addressed to this node, from the nodes that shared.
//! 4. [`Client::masked_input`]: the quantised update plus the self mask and ± every pairwise mask.
//! 5. [`Client::receive_survivors`]: the coordinator names who sent a masked input; the node signs
//!    that list (consistency check).
//! 6. [`Client::receive_consistency`]: with at least t signatures on the same list, the node answers
//!    for each peer with exactly one kind of share: b for a survivor, the mask secret for a node that
//!    dropped. It refuses to answer twice, and never reveals both kinds for one peer, whatever the
//!    coordinator sends.

use std::collections::{BTreeMap, BTreeSet};

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use x25519_dalek::{PublicKey, StaticSecret};

use super::keys::RoundKeys;
use super::masking::{self, Seed};
use super::shamir::{self, Share};
use super::{SecAggError, ShareKind, UnmaskShare, crypto};

/// Who takes part in a round and how many must remain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoundParams {
    pub plan_id: String,
    pub round: u32,
    /// Every participant of the round, sorted; a node's id is its position plus one.
    pub participants: Vec<String>,
    /// The minimum number of nodes that must remain at every step (t of t-of-n).
    pub threshold: usize,
}

impl RoundParams {
    /// Checks the parameters every party must agree on, including the majority rule 2t > n.
    ///
    /// Why a strict majority: an honest node signs one survivor list per round and answers only
    /// after t signatures on the list it signed, so every list the coordinator gets answers for
    /// was signed by t nodes of its own. With 2t ≤ n two disjoint groups of t can each be shown a
    /// different list: one answers with the self-mask seed b of a node, the other (told that node
    /// dropped) with its mask secret, and with both the coordinator strips every mask from that
    /// node's input. With 2t > n two groups of t signers always share a node, which signed only
    /// one of the lists.
    pub fn validate(&self) -> Result<(), SecAggError> {
        self.validate_shape()?;
        let (n, t) = (self.participants.len(), self.threshold);
        if 2 * t <= n {
            return Err(SecAggError::ThresholdNotMajority { t, n, least: n / 2 + 1 });
        }
        Ok(())
    }

    /// Sorted, distinct participants and 2 ≤ t ≤ n: everything but the majority rule.
    fn validate_shape(&self) -> Result<(), SecAggError> {
        let n = self.participants.len();
        let sorted = self.participants.windows(2).all(|w| w[0] < w[1]);
        if !sorted {
            return Err(SecAggError::Protocol("participants must be sorted and distinct".into()));
        }
        if self.threshold < 2 || self.threshold > n {
            return Err(SecAggError::Protocol(format!(
                "threshold {} is not between 2 and the {n} participants",
                self.threshold
            )));
        }
        Ok(())
    }

    /// SHA-256 of the sorted participant list (each name length-prefixed, so no two lists share
    /// an encoding) and t. It enters the round context (so the HKDF salt of every pairwise mask
    /// and share-encryption key, the shares' AAD and the consistency message) and the signed
    /// round-key message: keys, shares and signatures made for a round announced with one list or
    /// threshold are useless in a round announced with another.
    pub fn roster_digest(&self) -> [u8; 32] {
        let mut h = ring::digest::Context::new(&ring::digest::SHA256);
        h.update(b"sanctum secagg roster v1\0");
        h.update(&(self.participants.len() as u64).to_le_bytes());
        for p in &self.participants {
            h.update(&(p.len() as u64).to_le_bytes());
            h.update(p.as_bytes());
        }
        h.update(&(self.threshold as u64).to_le_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(h.finish().as_ref());
        out
    }

    /// A participant's id (position + 1).
    pub fn id_of(&self, name: &str) -> Option<u32> {
        self.participants.binary_search_by(|p| p.as_str().cmp(name)).ok().map(|i| i as u32 + 1)
    }

    /// The name behind an id.
    pub fn name_of(&self, id: u32) -> Option<&str> {
        self.participants.get((id as usize).checked_sub(1)?).map(String::as_str)
    }

    /// The bytes that bind keys, masks and shares to this plan, round, participant list and
    /// threshold ([`RoundParams::roster_digest`]).
    pub fn context(&self) -> Vec<u8> {
        let mut c = b"sanctum secagg v2\0".to_vec();
        c.extend_from_slice(&(self.plan_id.len() as u64).to_le_bytes());
        c.extend_from_slice(self.plan_id.as_bytes());
        c.extend_from_slice(&self.round.to_le_bytes());
        c.extend_from_slice(&self.roster_digest());
        c
    }

    /// The round-key message `keys` must carry a signature over in this round: built from this
    /// round's plan, round and roster digest, never from what was relayed, so keys signed for
    /// another participant list or threshold do not verify.
    pub fn keys_message(&self, keys: &RoundKeys) -> Vec<u8> {
        RoundKeys { plan_id: self.plan_id.clone(), round: self.round, roster: self.roster_digest(), ..keys.clone() }
            .signed_message()
    }

    /// What every node of U3 signs in the consistency check: the round and the survivor list.
    pub fn consistency_message(&self, survivors: &BTreeSet<u32>) -> Vec<u8> {
        let mut m = self.context();
        m.extend_from_slice(b"survivors\0");
        for id in survivors {
            m.extend_from_slice(&id.to_le_bytes());
        }
        m
    }
}

/// A peer's advertised keys as the coordinator relays them.
#[derive(Clone, Debug)]
pub struct AdvertisedKeys {
    pub keys: RoundKeys,
    pub signature: Vec<u8>,
    /// The peer's certificate (DER), which the node checks against the consortium CA.
    pub cert_der: Vec<u8>,
}

/// One share encrypted from one node to another.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncryptedShare {
    pub from: u32,
    pub to: u32,
    pub ciphertext: Vec<u8>,
}

/// Checks a certificate (chain to the consortium CA, role node, the expected name) and a signature
/// made with the key it certifies. Supplied by the daemon so this module does no PKI I/O.
pub trait PeerVerifier {
    /// `Ok` if `cert_der` is a valid node certificate for `node` and `signature` is its key's
    /// signature over `message`.
    fn verify(&self, node: &str, cert_der: &[u8], message: &[u8], signature: &[u8]) -> Result<(), PeerRefusal>;
}

/// Why a [`PeerVerifier`] refuses a peer's certificate or signature. The round aborts with it
/// ([`SecAggError::Peer`] names the peer), so each says what is wrong with what the peer sent.
#[derive(Debug, thiserror::Error)]
pub enum PeerRefusal {
    /// The certificate does not chain to the consortium CA, has expired or is not yet valid
    /// (the verifier's wording).
    #[error("certificate refused: {0}")]
    Certificate(String),
    /// The certificate chains, but names another party or role.
    #[error("the certificate is {found}'s, not node '{node}''s")]
    WrongIdentity { found: String, node: String },
    /// The identity cannot be read from the certificate.
    #[error(transparent)]
    Identity(#[from] crate::pki::PkiError),
    /// Not the certificate this verifier knows for the node (the simulation's own members).
    #[error("unknown certificate")]
    UnknownCertificate,
    /// The signature does not verify against the certified key, or the certificate is unreadable.
    #[error(transparent)]
    Signature(#[from] super::keys::KeySignatureError),
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    Advertised,
    Shared,
    Ready,
    Masked,
    Signed,
    Unmasked,
    Aborted,
}

struct Peer {
    share_key: PublicKey,
    mask_key: PublicKey,
    cert_der: Vec<u8>,
}

/// The node's state for one round.
pub struct Client {
    params: RoundParams,
    me: u32,
    share_secret: StaticSecret,
    mask_secret: StaticSecret,
    self_seed: Seed,
    phase: Phase,
    /// U1: every peer whose keys verified, including this node.
    peers: BTreeMap<u32, Peer>,
    /// U2: the nodes that shared, as the coordinator announced.
    u2: BTreeSet<u32>,
    /// Shares other nodes gave this node: (share of b, share of the mask secret).
    held: BTreeMap<u32, (Share, Share)>,
    /// U3, once announced.
    u3: Option<BTreeSet<u32>>,
    /// What this node revealed for each peer: the guard that it never reveals both kinds.
    revealed: BTreeMap<u32, ShareKind>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never prints secrets.
        f.debug_struct("Client").field("me", &self.me).field("phase", &self.phase).finish_non_exhaustive()
    }
}

impl Client {
    /// Starts a round as `me`: fresh keys and self-mask seed from the OS. Returns the keys to sign
    /// with the certificate key and advertise. Refuses parameters that break [`RoundParams::validate`],
    /// a threshold with 2t ≤ n among them ([`SecAggError::ThresholdNotMajority`]).
    pub fn new(params: RoundParams, me: &str) -> Result<(Self, RoundKeys), SecAggError> {
        params.validate()?;
        Self::start(params, me)
    }

    /// [`Client::new`] without the majority rule: only for the test that shows what the rule
    /// prevents (the split-survivor-list attack in `sim`).
    #[cfg(test)]
    pub(crate) fn new_without_majority_rule(params: RoundParams, me: &str) -> Result<(Self, RoundKeys), SecAggError> {
        params.validate_shape()?;
        Self::start(params, me)
    }

    fn start(params: RoundParams, me: &str) -> Result<(Self, RoundKeys), SecAggError> {
        let my_id = params.id_of(me).ok_or_else(|| SecAggError::Protocol(format!("'{me}' is not a participant")))?;
        let mut rng = ChaCha20Rng::from_os_rng();
        let (share_secret, share_public) = crypto::key_pair(&mut rng);
        let (mask_secret, mask_public) = crypto::key_pair(&mut rng);
        let mut self_seed = [0u8; 32];
        rng.fill_bytes(&mut self_seed);
        let keys = RoundKeys {
            plan_id: params.plan_id.clone(),
            round: params.round,
            roster: params.roster_digest(),
            node: me.to_string(),
            share_key: share_public.to_bytes(),
            mask_key: mask_public.to_bytes(),
        };
        let client = Self {
            params,
            me: my_id,
            share_secret,
            mask_secret,
            self_seed,
            phase: Phase::Advertised,
            peers: BTreeMap::new(),
            u2: BTreeSet::new(),
            held: BTreeMap::new(),
            u3: None,
            revealed: BTreeMap::new(),
        };
        Ok((client, keys))
    }

    /// This node's id in the round.
    pub fn id(&self) -> u32 {
        self.me
    }

    /// The round's parameters.
    pub fn params(&self) -> &RoundParams {
        &self.params
    }

    fn expect(&mut self, phase: Phase, step: &str) -> Result<(), SecAggError> {
        if self.phase != phase {
            let err = SecAggError::Protocol(format!("{step} arrived in phase {:?}", self.phase));
            self.phase = Phase::Aborted;
            return Err(err);
        }
        Ok(())
    }

    fn abort<T>(&mut self, err: SecAggError) -> Result<T, SecAggError> {
        self.phase = Phase::Aborted;
        Err(err)
    }

    /// Step 2: checks every advertised key set, then returns this node's shares encrypted to each
    /// holder (one per node of U1, this node included).
    pub fn receive_peers(
        &mut self,
        advertised: &[AdvertisedKeys],
        verifier: &dyn PeerVerifier,
    ) -> Result<Vec<EncryptedShare>, SecAggError> {
        self.expect(Phase::Advertised, "peer keys")?;
        let mut peers = BTreeMap::new();
        for a in advertised {
            let Some(id) = self.params.id_of(&a.keys.node) else {
                return self.abort(SecAggError::Peer(a.keys.node.clone(), "not a participant of this round".into()));
            };
            if a.keys.plan_id != self.params.plan_id || a.keys.round != self.params.round {
                return self.abort(SecAggError::Peer(a.keys.node.clone(), "keys are for another plan or round".into()));
            }
            // Checked under this node's own roster: keys a peer signed for a round announced to it
            // with another participant list or threshold fail here.
            let message = self.params.keys_message(&a.keys);
            if let Err(why) = verifier.verify(&a.keys.node, &a.cert_der, &message, &a.signature) {
                return self.abort(SecAggError::Peer(a.keys.node.clone(), why.to_string()));
            }
            if a.keys.share_key == a.keys.mask_key {
                return self.abort(SecAggError::Peer(a.keys.node.clone(), "share and mask keys are equal".into()));
            }
            let peer = Peer {
                share_key: PublicKey::from(a.keys.share_key),
                mask_key: PublicKey::from(a.keys.mask_key),
                cert_der: a.cert_der.clone(),
            };
            if peers.insert(id, peer).is_some() {
                return self.abort(SecAggError::Peer(a.keys.node.clone(), "advertised twice".into()));
            }
        }
        if !peers.contains_key(&self.me) {
            return self.abort(SecAggError::Protocol("this node's own keys are missing from the list".into()));
        }
        if peers.len() < self.params.threshold {
            return self.abort(SecAggError::TooFew {
                step: "key advertisement",
                got: peers.len(),
                t: self.params.threshold,
            });
        }
        // The coordinator may not substitute this node's own keys either.
        let mine = &peers[&self.me];
        if mine.share_key != PublicKey::from(&self.share_secret) || mine.mask_key != PublicKey::from(&self.mask_secret)
        {
            return self.abort(SecAggError::Protocol("the relayed keys for this node are not its own".into()));
        }
        let n = self.params.participants.len();
        let t = self.params.threshold;
        let mut rng = ChaCha20Rng::from_os_rng();
        // Shares are evaluated at every participant's id so ids and evaluation points coincide.
        let b_shares = shamir::split(&self.self_seed, t, n, &mut rng)?;
        let s_shares = shamir::split(&self.mask_secret.to_bytes(), t, n, &mut rng)?;
        let context = self.params.context();
        let mut out = Vec::with_capacity(peers.len());
        for (&to, peer) in &peers {
            let i = to as usize - 1;
            let plaintext = crypto::encode_share_pair(&b_shares[i], &s_shares[i]);
            let ciphertext = crypto::seal(&self.share_secret, &peer.share_key, &context, self.me, to, &plaintext)?;
            out.push(EncryptedShare { from: self.me, to, ciphertext });
        }
        self.peers = peers;
        self.phase = Phase::Shared;
        Ok(out)
    }

    /// Step 3: U2 and the shares addressed to this node from each member of U2.
    pub fn receive_shares(&mut self, u2: &BTreeSet<u32>, shares: &[EncryptedShare]) -> Result<(), SecAggError> {
        self.expect(Phase::Shared, "shares")?;
        if !u2.contains(&self.me) {
            return self.abort(SecAggError::Protocol("this node is not among the nodes that shared".into()));
        }
        if let Some(unknown) = u2.iter().find(|id| !self.peers.contains_key(id)) {
            return self.abort(SecAggError::Protocol(format!("node id {unknown} shared without advertising keys")));
        }
        if u2.len() < self.params.threshold {
            return self.abort(SecAggError::TooFew { step: "key sharing", got: u2.len(), t: self.params.threshold });
        }
        let context = self.params.context();
        let mut held = BTreeMap::new();
        for s in shares {
            if s.to != self.me || !u2.contains(&s.from) {
                return self
                    .abort(SecAggError::Protocol(format!("a share from {} to {} was relayed here", s.from, s.to)));
            }
            let peer = &self.peers[&s.from];
            let plaintext =
                match crypto::open(&self.share_secret, &peer.share_key, &context, s.from, s.to, &s.ciphertext) {
                    Ok(p) => p,
                    Err(e) => return self.abort(e),
                };
            let pair = match crypto::decode_share_pair(&plaintext, self.me) {
                Ok(p) => p,
                Err(e) => return self.abort(e),
            };
            if held.insert(s.from, pair).is_some() {
                return self.abort(SecAggError::Protocol(format!("two shares from node id {}", s.from)));
            }
        }
        if let Some(missing) = u2.iter().find(|id| !held.contains_key(id)) {
            return self
                .abort(SecAggError::Protocol(format!("no share from node id {missing}, which is listed as sharing")));
        }
        self.u2 = u2.clone();
        self.held = held;
        self.phase = Phase::Ready;
        Ok(())
    }

    /// Whether the node may now send its masked input.
    pub fn ready_to_mask(&self) -> bool {
        self.phase == Phase::Ready
    }

    /// Step 4: `x` (quantised, mod 2³²) masked with the self mask and a pairwise mask towards every
    /// other member of U2.
    pub fn masked_input(&mut self, x: &[u32]) -> Result<Vec<u32>, SecAggError> {
        self.expect(Phase::Ready, "masking")?;
        let context = self.params.context();
        let mut pairs = Vec::with_capacity(self.u2.len());
        for &v in self.u2.iter().filter(|&&v| v != self.me) {
            let seed = masking::pairwise_seed(&self.mask_secret, &self.peers[&v].mask_key, &context);
            pairs.push((v, seed));
        }
        let y = masking::mask(x, self.me, &self.self_seed, &pairs);
        self.phase = Phase::Masked;
        Ok(y)
    }

    /// Step 5: the survivors U3; returns the message to sign for the consistency check.
    pub fn receive_survivors(&mut self, u3: &BTreeSet<u32>) -> Result<Vec<u8>, SecAggError> {
        self.expect(Phase::Masked, "survivor list")?;
        if !u3.contains(&self.me) {
            return self.abort(SecAggError::Protocol("this node is not among the survivors".into()));
        }
        if !u3.is_subset(&self.u2) {
            return self.abort(SecAggError::Protocol("a survivor did not take part in key sharing".into()));
        }
        if u3.len() < self.params.threshold {
            return self.abort(SecAggError::TooFew { step: "masked input", got: u3.len(), t: self.params.threshold });
        }
        self.u3 = Some(u3.clone());
        self.phase = Phase::Signed;
        Ok(self.params.consistency_message(u3))
    }

    /// Step 6: the survivors' signatures on U3; returns this node's unmasking shares: b for every
    /// survivor, the mask secret for every node of U2 that is not a survivor. Refuses (and
    /// aborts) on fewer than t valid signatures, and never reveals both kinds for one peer.
    pub fn receive_consistency(
        &mut self,
        signatures: &[(u32, Vec<u8>)],
        verifier: &dyn PeerVerifier,
    ) -> Result<Vec<UnmaskShare>, SecAggError> {
        self.expect(Phase::Signed, "consistency signatures")?;
        let Some(u3) = self.u3.clone() else {
            return self.abort(SecAggError::Protocol("no survivor list".into()));
        };
        let message = self.params.consistency_message(&u3);
        let mut signers = BTreeSet::new();
        for (id, sig) in signatures {
            if !u3.contains(id) {
                return self.abort(SecAggError::Protocol(format!("node id {id} signed but is not a survivor")));
            }
            let Some(name) = self.params.name_of(*id).map(str::to_string) else {
                return self.abort(SecAggError::Protocol(format!("unknown node id {id}")));
            };
            let cert = self.peers[id].cert_der.clone();
            if let Err(why) = verifier.verify(&name, &cert, &message, sig) {
                return self.abort(SecAggError::Peer(name, format!("consistency signature: {why}")));
            }
            signers.insert(*id);
        }
        if signers.len() < self.params.threshold {
            return self.abort(SecAggError::TooFew {
                step: "consistency check",
                got: signers.len(),
                t: self.params.threshold,
            });
        }
        let mut out = Vec::new();
        for (&of, (b_share, s_share)) in &self.held {
            let kind = if u3.contains(&of) { ShareKind::SelfSeed } else { ShareKind::MaskKey };
            match self.revealed.get(&of) {
                Some(k) if *k != kind => {
                    return self.abort(SecAggError::Protocol(format!(
                        "asked for both kinds of share of node id {of}; refusing"
                    )));
                }
                _ => {}
            }
            self.revealed.insert(of, kind);
            let share = if kind == ShareKind::SelfSeed { b_share.clone() } else { s_share.clone() };
            out.push(UnmaskShare { of, kind, share });
        }
        self.phase = Phase::Unmasked;
        Ok(out)
    }

    /// What this node has revealed, per peer (for tests and the audit trail).
    pub fn revealed(&self) -> &BTreeMap<u32, ShareKind> {
        &self.revealed
    }
}
