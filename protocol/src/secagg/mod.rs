//! Secure aggregation primitives (Bonawitz et al., CCS 2017), sans-IO: Shamir t-of-n sharing over
//! a prime field, the pairwise and self masks that cancel over any survivor set, and the unbiased
//! fixed-point encoding of updates into integers mod 2³² with its error bound, and round keys
//! signed with the node's certificate key. The round
//! protocol that drives them over the gRPC session is not built yet (issue 4).

pub mod keys;
pub mod masking;
pub mod quantize;
pub mod shamir;
