//! The coordinator's secure-aggregation round: the sans-IO [`Server`] plus what the driver needs
//! around it (the encoding to read the sum, the names behind ids, how the plan round closed).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use sanctum_protocol::plan::Plan;
use sanctum_protocol::proto;
use sanctum_protocol::secagg::client::{PeerVerifier, RoundParams};
use sanctum_protocol::secagg::encode::{Encoding, encoding_for};
use sanctum_protocol::secagg::keys;
use sanctum_protocol::secagg::server::Server;

/// Checks signatures against the certificate the node presented in its TLS session (already
/// verified against the consortium CA by the handshake).
pub struct SessionCertVerifier;

impl PeerVerifier for SessionCertVerifier {
    fn verify(&self, _node: &str, cert_der: &[u8], message: &[u8], signature: &[u8]) -> Result<(), String> {
        keys::verify_message(message, signature, cert_der).map_err(|e| e.to_string())
    }
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
    pub fn open(
        plan: &Plan,
        plan_id: &str,
        round: u32,
        participants: &[String],
        num_params: usize,
        noise: Option<f64>,
        deadline: Instant,
    ) -> Result<Self, String> {
        let now = Instant::now();
        let n = participants.len();
        let t = plan.secagg_threshold(n);
        if t > n {
            return Err(format!(
                "round {round} cannot run secure aggregation: {n} participant(s), the threshold is {t}"
            ));
        }
        let settings = plan.secagg_settings();
        let params =
            RoundParams { plan_id: plan_id.to_string(), round, participants: participants.to_vec(), threshold: t };
        let encoding = encoding_for(plan, n, t, noise)?;
        let step_timeout = Duration::from_secs(settings.step_timeout_secs);
        // The plan round's own deadline ends the masked-input step (`Server::end_inputs` when the
        // round closes), so the plan and the protocol never disagree on who was in time.
        let inputs_until = deadline + Duration::from_secs(86_400);
        let server = Server::new(params, num_params + 1, step_timeout, inputs_until, now).map_err(|e| e.to_string())?;
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
