//! Secure aggregation (Bonawitz et al., CCS 2017), sans-IO: Shamir t-of-n sharing over a prime
//! field, the pairwise and self masks that cancel over any survivor set, the unbiased fixed-point
//! encoding of updates into integers mod 2³² with its error bound, round keys signed with the
//! node's certificate key, share encryption, and the node's ([`client`]) and coordinator's
//! ([`server`]) state machines for one round.

pub mod client;
pub mod crypto;
pub mod encode;
pub mod keys;
pub mod masking;
pub mod quantize;
pub mod server;
pub mod shamir;
pub mod sim;
pub mod wire;

/// Which secret a share belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ShareKind {
    /// The self-mask seed b of a node that sent its masked input.
    SelfSeed,
    /// The mask secret of a node that dropped before sending its masked input.
    MaskKey,
}

/// One share a node reveals in the unmasking step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnmaskShare {
    /// Whose secret this is a share of.
    pub of: u32,
    pub kind: ShareKind,
    pub share: shamir::Share,
}

/// Why a secure-aggregation step cannot go on.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SecAggError {
    #[error("secure aggregation: {0}")]
    Protocol(String),
    #[error("secure aggregation: node '{0}': {1}")]
    Peer(String, String),
    #[error("secure aggregation: {got} node(s) remain after {step}, the threshold is {t}")]
    TooFew { step: &'static str, got: usize, t: usize },
    #[error("secure aggregation: {0}")]
    Shamir(#[from] shamir::ShamirError),
    /// The rule 2t > n ([`client::RoundParams::validate`]): with 2t ≤ n a coordinator could show
    /// two disjoint groups of t survivors two different survivor lists and learn both secrets of
    /// one node.
    #[error(
        "secure aggregation: threshold {t} of {n} participants breaks the rule 2t > n (two disjoint survivor lists could each gather t signatures and reveal both secrets of one node); refusing the round: the coordinator must set the threshold to at least {least}"
    )]
    ThresholdNotMajority { t: usize, n: usize, least: usize },
}
