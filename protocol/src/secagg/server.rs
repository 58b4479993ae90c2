//! The coordinator's side of one secure-aggregation round, as a sans-IO state machine with the
//! time as an argument. It relays keys and encrypted shares it cannot read, adds masked inputs into
//! one running sum (memory O(model)), and at the end removes the masks with the shares the
//! survivors reveal, learning only the survivors' sum.
//!
//! Each step closes when every node still expected has answered, or at its deadline; fewer than t
//! answers fail the round with the reason. A node that disconnects stops being waited for.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use x25519_dalek::{PublicKey, StaticSecret};

use super::client::{AdvertisedKeys, EncryptedShare, PeerVerifier, RoundParams};
use super::masking::{self, Seed};
use super::shamir::{self, Share};
use super::{SecAggError, ShareKind, UnmaskShare};

/// Longest signature the coordinator accepts and relays (keys and consistency): 72 bytes, the
/// longest ASN.1 DER encoding of an ECDSA P-256 signature (two 33-byte integers, their headers
/// and the sequence's), the only scheme node keys use ([`super::keys`]). Every survivor's
/// signature travels to every survivor in one message, so one oversized signature would push
/// that message past the nodes' decode limit and knock every honest node out of the round.
pub const MAX_SIGNATURE_BYTES: usize = 72;
/// Longest node certificate relayed with its keys (it comes from the TLS session; a consortium
/// certificate is under 1 KiB).
pub const MAX_CERTIFICATE_BYTES: usize = 16 * 1024;
/// The exact size of an encrypted share pair: the two 72-byte shares sealed with
/// ChaCha20-Poly1305, which appends a 16-byte tag ([`super::crypto`]).
pub const SHARE_CIPHERTEXT_BYTES: usize = 2 * 72 + 16;

/// What the coordinator must send next.
#[derive(Clone, Debug)]
pub enum ServerAction {
    /// Send every advertised key set (U1) to each node of U1.
    SendPeers { to: BTreeSet<u32>, keys: Vec<AdvertisedKeys> },
    /// Send each node of U2 the list U2 and the shares addressed to it.
    SendShares { u2: BTreeSet<u32>, per_node: BTreeMap<u32, Vec<EncryptedShare>> },
    /// Tell the survivors U3 who sent a masked input.
    SendSurvivors { u3: BTreeSet<u32> },
    /// Send the consistency signatures of U4 to each node of U4.
    SendSignatures { to: BTreeSet<u32>, signatures: Vec<(u32, Vec<u8>)> },
    /// The round's sum is known.
    Done(Outcome),
    /// The round cannot complete.
    Failed(String),
}

/// The result of a round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Σ of the survivors' inputs, mod 2³².
    pub sum: Vec<u32>,
    /// U3: the nodes whose input is in the sum.
    pub survivors: BTreeSet<u32>,
    /// Nodes that were participants but whose input is not in the sum.
    pub dropped: BTreeSet<u32>,
}

#[derive(Debug)]
enum Step {
    Keys,
    Shares,
    Input,
    Consistency,
    Unmask,
    Over,
}

/// The coordinator's state for one round.
pub struct Server {
    params: RoundParams,
    input_len: usize,
    step_timeout: Duration,
    input_deadline: Instant,
    step: Step,
    deadline: Instant,
    gone: BTreeSet<u32>,
    keys: BTreeMap<u32, AdvertisedKeys>,
    shares: BTreeMap<u32, Vec<EncryptedShare>>,
    u2: BTreeSet<u32>,
    inputs: BTreeSet<u32>,
    sum: Vec<u32>,
    u3: BTreeSet<u32>,
    signatures: BTreeMap<u32, Vec<u8>>,
    u4: BTreeSet<u32>,
    unmask: BTreeMap<u32, Vec<UnmaskShare>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("step", &self.step).field("round", &self.params.round).finish_non_exhaustive()
    }
}

/// `what` of `len` bytes within `max`, or the peer's error naming the field and the limit.
fn check_len(node: &str, what: &str, len: usize, max: usize) -> Result<(), SecAggError> {
    if len > max {
        return Err(SecAggError::Peer(node.into(), format!("{what} is {len} bytes; at most {max} are relayed")));
    }
    Ok(())
}

impl Server {
    /// Opens a round: nodes advertise keys within `step_timeout`; masked inputs are accepted until
    /// `input_deadline`.
    pub fn new(
        params: RoundParams,
        input_len: usize,
        step_timeout: Duration,
        input_deadline: Instant,
        now: Instant,
    ) -> Result<Self, SecAggError> {
        params.validate()?;
        Ok(Self {
            params,
            input_len,
            step_timeout,
            input_deadline,
            step: Step::Keys,
            deadline: now + step_timeout,
            gone: BTreeSet::new(),
            keys: BTreeMap::new(),
            shares: BTreeMap::new(),
            u2: BTreeSet::new(),
            inputs: BTreeSet::new(),
            sum: vec![0; input_len],
            u3: BTreeSet::new(),
            signatures: BTreeMap::new(),
            u4: BTreeSet::new(),
            unmask: BTreeMap::new(),
        })
    }

    /// The round's parameters.
    pub fn params(&self) -> &RoundParams {
        &self.params
    }

    /// Whether `node` may send its masked input now.
    pub fn accepts_input_from(&self, node: u32) -> bool {
        matches!(self.step, Step::Input) && self.u2.contains(&node) && !self.inputs.contains(&node)
    }

    /// Whether the round is over (done or failed).
    pub fn is_over(&self) -> bool {
        matches!(self.step, Step::Over)
    }

    fn id(&self, node: &str) -> Result<u32, SecAggError> {
        self.params.id_of(node).ok_or_else(|| SecAggError::Peer(node.into(), "not a participant of this round".into()))
    }

    fn wrong_step(&self, what: &str, node: &str) -> SecAggError {
        SecAggError::Peer(node.into(), format!("{what} arrived during the {:?} step", self.step))
    }

    /// A node's advertised keys (`node` is the name its TLS certificate proved).
    pub fn advertise(
        &mut self,
        node: &str,
        keys: AdvertisedKeys,
        verifier: &dyn PeerVerifier,
        now: Instant,
    ) -> Result<Vec<ServerAction>, SecAggError> {
        let id = self.id(node)?;
        if !matches!(self.step, Step::Keys) {
            return Err(self.wrong_step("keys", node));
        }
        if keys.keys.node != node || keys.keys.plan_id != self.params.plan_id || keys.keys.round != self.params.round {
            return Err(SecAggError::Peer(node.into(), "keys name another node, plan or round".into()));
        }
        // Before any verification: what is relayed is bounded whether or not it verifies.
        check_len(node, "the keys' signature", keys.signature.len(), MAX_SIGNATURE_BYTES)?;
        check_len(node, "the certificate", keys.cert_der.len(), MAX_CERTIFICATE_BYTES)?;
        // Under this round's own roster digest, not one relayed with the keys.
        verifier
            .verify(node, &keys.cert_der, &self.params.keys_message(&keys.keys), &keys.signature)
            .map_err(|why| SecAggError::Peer(node.into(), why.to_string()))?;
        if self.keys.contains_key(&id) {
            return Err(SecAggError::Peer(node.into(), "keys were already advertised".into()));
        }
        self.keys.insert(id, keys);
        Ok(self.advance(now))
    }

    /// A node's encrypted shares, one for each node of U1.
    pub fn shares(
        &mut self,
        node: &str,
        shares: Vec<EncryptedShare>,
        now: Instant,
    ) -> Result<Vec<ServerAction>, SecAggError> {
        let id = self.id(node)?;
        if !matches!(self.step, Step::Shares) {
            return Err(self.wrong_step("shares", node));
        }
        if !self.keys.contains_key(&id) || self.shares.contains_key(&id) {
            return Err(SecAggError::Peer(node.into(), "did not advertise keys, or already shared".into()));
        }
        let targets: BTreeSet<u32> = shares.iter().map(|s| s.to).collect();
        let u1: BTreeSet<u32> = self.keys.keys().copied().collect();
        if shares.iter().any(|s| s.from != id) || targets != u1 || shares.len() != u1.len() {
            return Err(SecAggError::Peer(node.into(), "shares must be one for each node that advertised keys".into()));
        }
        if let Some(bad) = shares.iter().find(|s| s.ciphertext.len() != SHARE_CIPHERTEXT_BYTES) {
            return Err(SecAggError::Peer(
                node.into(),
                format!(
                    "the share for node id {} is {} bytes; an encrypted share is exactly {SHARE_CIPHERTEXT_BYTES}",
                    bad.to,
                    bad.ciphertext.len()
                ),
            ));
        }
        self.shares.insert(id, shares);
        Ok(self.advance(now))
    }

    /// A node's masked input, folded into the running sum at once.
    pub fn masked_input(&mut self, node: &str, y: &[u32], now: Instant) -> Result<Vec<ServerAction>, SecAggError> {
        let id = self.id(node)?;
        if !self.accepts_input_from(id) {
            return Err(self.wrong_step("a masked input", node));
        }
        if y.len() != self.input_len {
            return Err(SecAggError::Peer(
                node.into(),
                format!("masked input has {} words, expected {}", y.len(), self.input_len),
            ));
        }
        for (s, w) in self.sum.iter_mut().zip(y) {
            *s = s.wrapping_add(*w);
        }
        self.inputs.insert(id);
        Ok(self.advance(now))
    }

    /// A survivor's signature on U3.
    pub fn consistency(
        &mut self,
        node: &str,
        signature: Vec<u8>,
        now: Instant,
    ) -> Result<Vec<ServerAction>, SecAggError> {
        let id = self.id(node)?;
        if !matches!(self.step, Step::Consistency) || !self.u3.contains(&id) || self.signatures.contains_key(&id) {
            return Err(self.wrong_step("a consistency signature", node));
        }
        check_len(node, "the consistency signature", signature.len(), MAX_SIGNATURE_BYTES)?;
        self.signatures.insert(id, signature);
        Ok(self.advance(now))
    }

    /// A node's unmasking shares: b of every survivor, the mask secret of every dropped node of U2.
    pub fn unmask(
        &mut self,
        node: &str,
        shares: Vec<UnmaskShare>,
        now: Instant,
    ) -> Result<Vec<ServerAction>, SecAggError> {
        let id = self.id(node)?;
        if !matches!(self.step, Step::Unmask) || !self.u4.contains(&id) || self.unmask.contains_key(&id) {
            return Err(self.wrong_step("unmasking shares", node));
        }
        let want: BTreeMap<u32, ShareKind> = self
            .u2
            .iter()
            .map(|&v| (v, if self.u3.contains(&v) { ShareKind::SelfSeed } else { ShareKind::MaskKey }))
            .collect();
        let got: BTreeMap<u32, ShareKind> = shares.iter().map(|s| (s.of, s.kind)).collect();
        if got != want || shares.len() != want.len() || shares.iter().any(|s| s.share.x != u64::from(id)) {
            return Err(SecAggError::Peer(node.into(), "unmasking shares do not match the survivor list".into()));
        }
        self.unmask.insert(id, shares);
        Ok(self.advance(now))
    }

    /// The round's deadline for masked inputs is now (the plan's round closed): the step ends with
    /// the inputs that arrived.
    pub fn end_inputs(&mut self, now: Instant) -> Vec<ServerAction> {
        if matches!(self.step, Step::Input) {
            self.deadline = now;
        }
        self.advance(now)
    }

    /// The nodes of U2 (those that shared keys), once known.
    pub fn sharing(&self) -> &BTreeSet<u32> {
        &self.u2
    }

    /// A node's connection went away: it is no longer waited for.
    pub fn disconnected(&mut self, node: &str, now: Instant) -> Vec<ServerAction> {
        if let Some(id) = self.params.id_of(node) {
            self.gone.insert(id);
        }
        self.advance(now)
    }

    /// Time passed.
    pub fn tick(&mut self, now: Instant) -> Vec<ServerAction> {
        self.advance(now)
    }

    fn fail(&mut self, reason: String) -> Vec<ServerAction> {
        self.step = Step::Over;
        vec![ServerAction::Failed(reason)]
    }

    fn all_in(&self, expected: &BTreeSet<u32>, answered: impl Fn(&u32) -> bool) -> bool {
        expected.iter().all(|id| answered(id) || self.gone.contains(id))
    }

    fn advance(&mut self, now: Instant) -> Vec<ServerAction> {
        let t = self.params.threshold;
        let all: BTreeSet<u32> = (1..=self.params.participants.len() as u32).collect();
        match self.step {
            Step::Keys => {
                if !self.all_in(&all, |id| self.keys.contains_key(id)) && now < self.deadline {
                    return vec![];
                }
                // Keys of nodes that went away are still relayed: they may come back before shares.
                if self.keys.len() < t {
                    return self.fail(format!(
                        "{} of {} node(s) advertised keys, the threshold is {t}",
                        self.keys.len(),
                        all.len()
                    ));
                }
                self.step = Step::Shares;
                self.deadline = now + self.step_timeout;
                let to: BTreeSet<u32> = self.keys.keys().copied().collect();
                vec![ServerAction::SendPeers { to, keys: self.keys.values().cloned().collect() }]
            }
            Step::Shares => {
                let u1: BTreeSet<u32> = self.keys.keys().copied().collect();
                if !self.all_in(&u1, |id| self.shares.contains_key(id)) && now < self.deadline {
                    return vec![];
                }
                if self.shares.len() < t {
                    return self.fail(format!("{} node(s) shared their keys, the threshold is {t}", self.shares.len()));
                }
                self.u2 = self.shares.keys().copied().collect();
                let mut per_node: BTreeMap<u32, Vec<EncryptedShare>> = BTreeMap::new();
                for shares in self.shares.values() {
                    for s in shares.iter().filter(|s| self.u2.contains(&s.to)) {
                        per_node.entry(s.to).or_default().push(s.clone());
                    }
                }
                self.shares.clear();
                self.step = Step::Input;
                self.deadline = self.input_deadline;
                vec![ServerAction::SendShares { u2: self.u2.clone(), per_node }]
            }
            Step::Input => {
                if !self.all_in(&self.u2, |id| self.inputs.contains(id)) && now < self.deadline {
                    return vec![];
                }
                if self.inputs.len() < t {
                    return self
                        .fail(format!("{} node(s) sent a masked input, the threshold is {t}", self.inputs.len()));
                }
                self.u3 = self.inputs.clone();
                self.step = Step::Consistency;
                self.deadline = now + self.step_timeout;
                vec![ServerAction::SendSurvivors { u3: self.u3.clone() }]
            }
            Step::Consistency => {
                if !self.all_in(&self.u3, |id| self.signatures.contains_key(id)) && now < self.deadline {
                    return vec![];
                }
                if self.signatures.len() < t {
                    return self.fail(format!(
                        "{} survivor(s) signed the survivor list, the threshold is {t}",
                        self.signatures.len()
                    ));
                }
                self.u4 = self.signatures.keys().copied().collect();
                self.step = Step::Unmask;
                self.deadline = now + self.step_timeout;
                let signatures = self.signatures.iter().map(|(k, v)| (*k, v.clone())).collect();
                vec![ServerAction::SendSignatures { to: self.u4.clone(), signatures }]
            }
            Step::Unmask => {
                if !self.all_in(&self.u4, |id| self.unmask.contains_key(id)) && now < self.deadline {
                    return vec![];
                }
                if self.unmask.len() < t {
                    return self
                        .fail(format!("{} node(s) sent unmasking shares, the threshold is {t}", self.unmask.len()));
                }
                match self.finish() {
                    Ok(outcome) => {
                        self.step = Step::Over;
                        vec![ServerAction::Done(outcome)]
                    }
                    Err(e) => self.fail(e.to_string()),
                }
            }
            Step::Over => vec![],
        }
    }

    fn finish(&mut self) -> Result<Outcome, SecAggError> {
        let t = self.params.threshold;
        let context = self.params.context();
        let shares_of = |of: u32, kind: ShareKind| -> Vec<Share> {
            self.unmask
                .values()
                .flat_map(|v| v.iter())
                .filter(|s| s.of == of && s.kind == kind)
                .map(|s| s.share.clone())
                .collect()
        };
        let mut self_seeds: Vec<(u32, Seed)> = Vec::new();
        for &u in &self.u3 {
            self_seeds.push((u, shamir::reconstruct(&shares_of(u, ShareKind::SelfSeed), t)?));
        }
        let mut dropped_pairs: Vec<(u32, u32, Seed)> = Vec::new();
        for &v in self.u2.difference(&self.u3) {
            let secret = StaticSecret::from(shamir::reconstruct(&shares_of(v, ShareKind::MaskKey), t)?);
            let advertised = PublicKey::from(self.keys[&v].keys.mask_key);
            if PublicKey::from(&secret) != advertised {
                let name = self.params.name_of(v).unwrap_or("?").to_string();
                return Err(SecAggError::Peer(
                    name,
                    "the mask secret rebuilt from shares does not match its key".into(),
                ));
            }
            for &u in &self.u3 {
                let mask_u = PublicKey::from(self.keys[&u].keys.mask_key);
                dropped_pairs.push((u, v, masking::pairwise_seed(&secret, &mask_u, &context)));
            }
        }
        let sum = masking::unmask(&self.sum, &self_seeds, &dropped_pairs);
        let all: BTreeSet<u32> = (1..=self.params.participants.len() as u32).collect();
        Ok(Outcome { sum, survivors: self.u3.clone(), dropped: all.difference(&self.u3).copied().collect() })
    }
}
