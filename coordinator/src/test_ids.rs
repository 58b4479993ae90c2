//! Well-formed ids for tests, named by a short label so a test reads as before (`run("r1")`).
//! Each label gives one id, the same every time, and different labels give different ids.

use sanctum_protocol::hash::ContentHash;
use sanctum_protocol::ids::{NodeName, PlanId, RunId};

/// The plan id of `label` (the SHA-256 of the label).
pub(crate) fn plan(label: &str) -> PlanId {
    PlanId::of_hash(&ContentHash::of(label.as_bytes()))
}

/// The run id of `label` (the first 128 bits of the label's SHA-256).
pub(crate) fn run(label: &str) -> RunId {
    RunId::parse(&ContentHash::of(label.as_bytes()).to_hex()[..32]).unwrap()
}

/// `name` as a node name; a test that passes a malformed one fails here.
pub(crate) fn node(name: &str) -> NodeName {
    NodeName::parse(name).unwrap()
}

/// Several node names.
pub(crate) fn nodes(names: &[&str]) -> Vec<NodeName> {
    names.iter().map(|n| node(n)).collect()
}
