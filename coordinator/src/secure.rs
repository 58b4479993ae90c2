//! The coordinator's secure-aggregation round: the sans-IO [`Server`] plus what the driver needs
//! around it (the encoding to read the sum, the names behind ids, how the plan round closed).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use sanctum_protocol::plan::Plan;
use sanctum_protocol::proto;
use sanctum_protocol::secagg::SecAggError;
use sanctum_protocol::secagg::client::{PeerRefusal, PeerVerifier, RoundParams};
use sanctum_protocol::secagg::encode::{Encoding, encoding_for};
use sanctum_protocol::secagg::keys;
use sanctum_protocol::secagg::server::Server;

/// Checks signatures against the certificate the node presented in its TLS session (already
/// verified against the consortium CA by the handshake).
pub struct SessionCertVerifier;

impl PeerVerifier for SessionCertVerifier {
    fn verify(&self, _node: &str, cert_der: &[u8], message: &[u8], signature: &[u8]) -> Result<(), PeerRefusal> {
        Ok(keys::verify_message(message, signature, cert_der)?)
    }
}

/// Why a round cannot open secure aggregation; the plan round fails with it (and is retried as
/// the plan says).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SecAggOpenError {
    /// The plan's threshold floor (or `min_nodes`) is above the round's participants.
    #[error(
        "round {round} cannot run secure aggregation: {participants} participant(s), the threshold is {threshold}; lower secagg.threshold or min_nodes in the plan, or recruit more hospitals"
    )]
    TooFewParticipants { round: u32, participants: usize, threshold: usize },
    /// The encoding or the protocol's own parameter checks refused the round.
    #[error(transparent)]
    SecAgg(#[from] SecAggError),
}

/// One round's secure aggregation at the coordinator.
pub struct SecAggRound {
    pub server: Server,
    pub encoding: Encoding,
    pub setup: proto::SecAggSetup,
}

impl SecAggRound {
    /// Opens secure aggregation for a round among `participants` (sorted).
    /// `noise` is the plan's distributed-noise multiplier (computed once per plan); the masked
    /// inputs are due by `deadline`.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        plan: &Plan,
        plan_id: &str,
        round: u32,
        participants: &[String],
        num_params: usize,
        noise: Option<f64>,
        now: Instant,
        deadline: Instant,
    ) -> Result<Self, SecAggOpenError> {
        let n = participants.len();
        let t = plan.secagg_threshold(n);
        if t > n {
            return Err(SecAggOpenError::TooFewParticipants { round, participants: n, threshold: t });
        }
        let settings = plan.secagg_settings();
        let params =
            RoundParams { plan_id: plan_id.to_string(), round, participants: participants.to_vec(), threshold: t };
        let encoding = encoding_for(plan, n, t, noise)?;
        let step_timeout = Duration::from_secs(settings.step_timeout_secs);
        // The plan round's own deadline ends the masked-input step (`Server::end_inputs` when the
        // round closes), so the plan and the protocol never disagree on who was in time.
        let inputs_until = deadline + Duration::from_secs(86_400);
        let server = Server::new(params, num_params + 1, step_timeout, inputs_until, now)?;
        let setup = proto::SecAggSetup {
            participants: participants.to_vec(),
            threshold: t as u32,
            clip_norm: settings.clip_norm,
            max_samples: settings.max_samples,
            step_timeout_secs: settings.step_timeout_secs,
        };
        Ok(Self { server, encoding, setup })
    }

    /// Names of the ids in `ids`.
    pub fn names(&self, ids: &BTreeSet<u32>) -> Vec<String> {
        ids.iter().filter_map(|&id| self.server.params().name_of(id).map(str::to_string)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(threshold: Option<usize>, min_nodes: usize) -> Plan {
        let secagg = threshold.map_or(String::new(), |t| format!("threshold = {t}\n"));
        Plan::parse(&format!(
            r#"
name = "t"
rounds = 1
min_nodes = {min_nodes}
secure_aggregation = true
[secagg]
{secagg}
[model]
kind = "logistic_regression"
inputs = 13
[data]
schema = "heart_disease"
schema_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
[local]
steps = 1
batch_size = 4
learning_rate = 0.01
[strategy]
kind = "fedavg"
"#
        ))
        .unwrap()
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("node-{i:03}")).collect()
    }

    #[test]
    fn the_coordinator_raises_a_plan_threshold_with_2t_le_n_to_a_strict_majority() {
        // A plan asking for t = 2 opens 5-participant rounds at t = 3, which every node accepts
        // (t = 2 would be refused by each node's Client::new); larger floors are kept.
        for (threshold, min_nodes, n, want) in [
            (Some(2), 2, 5, 3),
            (Some(2), 2, 4, 3),
            (None, 2, 5, 3),
            (Some(4), 2, 5, 4),
            (None, 4, 4, 4),
            (None, 2, 2, 2),
        ] {
            let round = SecAggRound::open(
                &plan(threshold, min_nodes),
                "p",
                1,
                &names(n),
                14,
                None,
                Instant::now(),
                Instant::now(),
            )
            .unwrap();
            assert_eq!(round.setup.threshold as usize, want, "threshold {threshold:?} of {n}");
            assert_eq!(round.server.params().threshold, want);
            assert!(2 * want > n);
        }
        // A floor above the round's participants cannot run, and says so.
        let e = SecAggRound::open(&plan(Some(4), 2), "p", 1, &names(3), 14, None, Instant::now(), Instant::now())
            .err()
            .unwrap();
        assert_eq!(e, SecAggOpenError::TooFewParticipants { round: 1, participants: 3, threshold: 4 });
        assert!(e.to_string().contains("3 participant(s), the threshold is 4"), "{e}");
    }
}
