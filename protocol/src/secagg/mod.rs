//! Secure aggregation primitives (Bonawitz et al., CCS 2017), sans-IO: Shamir t-of-n sharing over
//! a prime field, and the pairwise and self masks that cancel over any survivor set. The round
//! protocol that drives them over the gRPC session is not built yet (issue 4).

pub mod masking;
pub mod shamir;
