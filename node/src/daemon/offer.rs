//! Offers: a plan offered to this node is parsed, checked against the policy, the local data and
//! the ledger ([`crate::admission`] decides), its DP standardisation statistics released and
//! charged when its schema asks for them, and a TorchScript model fetched and loaded once.

use std::sync::Arc;

use sanctum_protocol::hash::ContentHash;
use sanctum_protocol::model::ModelSpec;
use sanctum_protocol::plan::Plan;
use sanctum_protocol::privacy::noise::SecureGaussian;
use sanctum_protocol::proto::{self};

use super::{Accepted, Chain, ChargeError, DaemonError, Node};
use crate::admission::{self, Refusal};
use crate::approvals::{self, Approvals};
use crate::budget::{self, DdgPlan, DpPlan};
use crate::data::{self, LocalData};
use crate::policy;
use crate::rounds::Lineage;

impl Node {
    /// Parses the offered plan and checks it against policy and local data; a schema asking for
    /// DP-estimated statistics has them released and charged here, before the node accepts.
    pub(super) fn consider(&mut self, offer: &proto::OfferPlan) -> Result<Accepted, Refusal> {
        let closed = self.releases.is_closed(&offer.plan_id, &offer.run);
        let plan = admission::parse_offer(&offer.plan_id, &offer.plan_toml, &offer.run, closed)?;
        // Only plans still offered in this session: one that ended while the node was away is
        // never offered again and must not hold the node out of new ones.
        let accepted = self
            .plans
            .iter()
            .filter(|(id, _)| self.offered_this_session.contains(*id))
            .map(|(id, a)| (id.as_str(), a.plan.name.as_str(), a.plan.secure_aggregation));
        admission::check_one_secure_aggregation(&plan, &offer.plan_id, accepted)?;
        // A copy (the schema is shared), so that the statistics' charge may borrow the node.
        let dataset = policy::check(&plan, &self.cfg)
            .map_err(|reason| {
                if let Some(held) = policy::other_version(&plan, &self.cfg) {
                    tracing::warn!(
                        "the plan names schema '{}' at another version than the one held here (SHA-256 {held}); ask the consortium for the plan's schema file",
                        plan.data.schema
                    );
                }
                Refusal::Policy(reason)
            })?
            .clone();
        if matches!(plan.model, ModelSpec::Torchscript(_)) {
            // Read again for every offer: an approval or revocation takes effect without a restart.
            let (approvals, problem) = Approvals::load_fail_closed(&self.cfg.policy.model_approvals);
            if let Some(e) = problem {
                tracing::warn!("model approvals: {e}; no TorchScript model is approved until it is fixed");
            }
            approvals::check_model(&plan.model, &approvals).map_err(Refusal::Model)?;
        }
        let schema = dataset.schema().ok_or(Refusal::SchemaNotRead)?;
        // The plan against the schema this hospital holds: inputs, outputs, model kind, weights.
        plan.check_schema(schema)
            .map_err(|e| Refusal::SchemaFit { schema: schema.name().to_string(), reason: e.to_string() })?;
        // Under DP only the schema's public statistics may standardise (and the privacy unit must fit).
        let standardize = data::admit_plan(schema, &plan).map_err(|e| Refusal::Data(e.to_string()))?;
        // The same run offered again (a reconnect) keeps the statistics it released and the data
        // they standardised: estimating again would be a second release.
        let kept = match standardize {
            data::Standardize::EstimateDp { .. } => {
                self.plans.get(&offer.plan_id).filter(|p| p.run == offer.run).map(|p| Arc::clone(&p.data))
            }
            _ => None,
        };
        let fresh = kept.is_none();
        let mut data = match kept {
            Some(data) => data,
            None => Arc::new(data::load(&dataset.source(), schema, &standardize).map_err(|e| {
                // The full detail (path, values, headers) stays in the local log; the coordinator
                // learns only the rule, the file name, the line and the schema's column.
                tracing::warn!("dataset {}: {e}", dataset.path.display());
                Refusal::Data(e.public_reason(self.cfg.policy.share_sample_counts))
            })?),
        };
        admission::check_features(data.features, plan.model.inputs())?;
        let dp = self.privacy_for(&plan, &offer.plan_id, &offer.run, &data)?;
        let ddg = self.distributed_privacy_for(&plan, &offer.plan_id, &offer.run)?;
        if let (data::Standardize::EstimateDp { epsilon }, true) = (&standardize, fresh) {
            let planned = dp.map(|d| (d.epsilon, d.delta)).or(ddg.map(|d| (d.epsilon, d.delta)));
            let raw = Arc::get_mut(&mut data).ok_or(Refusal::SharedData)?;
            self.release_statistics(&plan, &offer.plan_id, &offer.run, schema, *epsilon, planned, raw)?;
        }
        let mut lineage = Lineage::default();
        // The initial model is the plan's own (its seed and init), so the node knows its hash itself.
        if let Ok(bytes) = plan.initial_global().to_safetensors() {
            lineage.models.insert(ContentHash::of(&bytes).to_hex());
        }
        Ok(Accepted { plan, run: offer.run.clone(), lineage, data, dp, ddg, script: None })
    }

    /// `[standardize] with = "dp"`: checks the release against the caps together with the run's
    /// planned spend (`planned`: its ε and δ), releases the statistics of `data`'s kept rows
    /// ([`crate::dp_stats`]), charges them to the ledger under `RUN/statistics` (fsync'd, before
    /// anything computed from them can leave) and standardises `data` with them.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn release_statistics(
        &mut self,
        plan: &Plan,
        plan_id: &str,
        run: &str,
        schema: &sanctum_protocol::dataset::Schema,
        epsilon: f64,
        planned: Option<(f64, f64)>,
        data: &mut LocalData,
    ) -> Result<(), Refusal> {
        let delta = admission::statistics_delta(plan, schema.name(), epsilon)?;
        let features = data::dp_features(schema).map_err(|e| Refusal::Statistics(e.to_string()))?;
        let key = format!("{run}/statistics");
        let releases = self.ledger.releases(plan_id, &key) + 1;
        let stats = crate::dp_stats::cost_for(epsilon, delta).map_err(|e| Refusal::Statistics(e.to_string()))?;
        // A node restarted mid-run estimates again: a second release, composed with the first.
        let spent = crate::dp_stats::epsilon_after(stats.noise_multiplier, u64::from(releases), delta)
            .map_err(|e| Refusal::Statistics(format!("cannot account the standardisation statistics: {e}")))?;
        // Every other run, plus this run's training as planned, plus the statistics
        // (`admission::check_statistics`); `charge_dataset` checks the exact sum.
        let already = self.ledger.spent(&plan.data.schema, Some((plan_id, run)));
        admission::check_statistics(&self.cfg.policy, &already, planned, spent, delta, schema.name())?;
        // Over train and test rows together: one row more changes exactly one contribution,
        // whatever the split rule (`dp_stats`, Sensitivity).
        let rows = [data.train_x.as_slice(), data.test_x.as_slice()];
        let released =
            crate::dp_stats::estimate(&rows, data.features, &features, &stats, &mut SecureGaussian::from_os())
                .map_err(|e| Refusal::Statistics(e.to_string()))?;
        let cost = budget::statistics_cost(stats.noise_multiplier, releases, delta, spent);
        self.charge_dataset(&plan.data.schema, &plan.name, plan_id, &key, releases, &cost).map_err(|e| {
            // A cap or pricing refusal is the plan's, in the words of the policy; a ledger or
            // audit failure names this hospital's files, which stay in its own log.
            tracing::error!("the standardisation statistics were not charged: {}", Chain(&e));
            Refusal::StatisticsCharge(match &e {
                ChargeError::Budget(b) => b.to_string(),
                _ => {
                    "this hospital's privacy ledger could not record the charge; the hospital's node log has the detail"
                        .to_string()
                }
            })
        })?;
        data::standardize_with(data, &features, &released);
        Ok(())
    }

    /// A TorchScript run trains and evaluates only while its model stays approved here: a
    /// revocation stops the run's next round and its evaluation (the approvals file is read
    /// each time, fail closed). Zoo models need no approval.
    pub(super) fn still_approved(&self, plan: &Plan) -> Result<(), approvals::ModelRefused> {
        if !matches!(plan.model, ModelSpec::Torchscript(_)) {
            return Ok(());
        }
        let (approvals, problem) = Approvals::load_fail_closed(&self.cfg.policy.model_approvals);
        if let Some(e) = problem {
            tracing::warn!("model approvals: {e}; no TorchScript model is approved until it is fixed");
        }
        approvals::check_model(&plan.model, &approvals)
    }

    /// Approvals and revocations made with `sanctum-node model` while this node ran reach the
    /// audit log here, each once ([`approvals::audit_pending`]).
    pub(super) fn audit_approvals(&mut self) -> Result<(), DaemonError> {
        let (approvals, _) = Approvals::load_fail_closed(&self.cfg.policy.model_approvals);
        approvals::audit_pending(&approvals, &self.cfg.state_dir, &mut self.audit)?;
        Ok(())
    }

    /// A TorchScript plan's model file: fetched from the coordinator by its hash (once; kept in
    /// `STATE/models/SHA.pt`), then loaded with the plan's initial weights, which checks the hash,
    /// the parameters and one forward pass. A file that does not load refuses the plan, naming
    /// why; the node goes on serving.
    pub(super) async fn prepare_script(&mut self, plan_id: &str, mut accepted: Accepted) -> Result<Accepted, Refusal> {
        let ModelSpec::Torchscript(spec) = &accepted.plan.model else {
            return Ok(accepted);
        };
        let spec = spec.clone();
        let spec_hash = spec.sha256.clone();
        let dir = self.cfg.state_dir.join("models");
        let path = dir.join(format!("{}.pt", spec.sha256));
        if !path.exists() {
            let limit = sanctum_protocol::plan::limits::MAX_MODEL_FILE_BYTES as u64;
            let bytes = self
                .fetch(plan_id, &spec.sha256, limit)
                .await
                .map_err(|e| Refusal::ScriptFetch { sha256: spec.sha256.clone(), reason: e.to_string() })?;
            let write = || -> std::io::Result<()> {
                std::fs::create_dir_all(&dir)?;
                let mut tmp = tempfile::NamedTempFile::new_in(&dir)?;
                std::io::Write::write_all(&mut tmp, &bytes)?;
                tmp.as_file().sync_all()?;
                tmp.persist(&path).map_err(|e| e.error)?;
                Ok(())
            };
            write().map_err(|e| Refusal::ScriptStore { sha256: spec.sha256.clone(), reason: e.to_string() })?;
            // The global-model cache holds one model: this file is not one.
            self.cached = None;
        }
        let init = accepted.plan.model.init(accepted.plan.seed);
        let device = self.device;
        let check = path.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            crate::torchscript::ScriptNet::load(&check, &spec, &init, device).map(|_| ())
        })
        .await
        .map_err(|e| Refusal::ScriptJoin(e.to_string()))?;
        if let Err(e) = loaded {
            tracing::warn!("TorchScript model {}: {e}", path.display());
            // Only a stored file that is not what its name says is removed (to be fetched again);
            // a plan whose declared parameters do not fit the file says nothing about the file.
            if matches!(
                e,
                crate::torchscript::ScriptError::HashMismatch { .. } | crate::torchscript::ScriptError::Read { .. }
            ) {
                let _ = std::fs::remove_file(&path);
            }
            return Err(Refusal::ScriptLoad { sha256: spec_hash, reason: e.public_reason().to_string() });
        }
        accepted.script = Some(path);
        Ok(accepted)
    }

    /// This node's DP-SGD settings for a plan ([`admission::example_dp`]), logged.
    pub(super) fn privacy_for(
        &self,
        plan: &Plan,
        plan_id: &str,
        run: &str,
        data: &LocalData,
    ) -> Result<Option<DpPlan>, Refusal> {
        // Charges of this same run (offered again after a reconnect) are part of its own ε; every
        // other run, of this plan or another, adds to what the dataset already spent.
        let already = self.ledger.spent(&plan.data.schema, Some((plan_id, run)));
        let dp = admission::example_dp(plan, &self.cfg.policy, data.train_len(), &already).inspect_err(|e| {
            if let Refusal::PublicBound { train_rows, bound } = e {
                tracing::error!(
                    train_rows,
                    bound,
                    "policy.public_min_train_rows is more than the training rows this dataset has"
                );
            }
        })?;
        if let Some(dp) = &dp {
            tracing::info!(
                epsilon = format!("{:.3}", dp.epsilon),
                delta = dp.delta,
                steps = dp.steps,
                sampling_rate = format!("{:.4}", dp.setup.sampling_rate),
                noise_multiplier = format!("{:.3}", dp.setup.noise_multiplier),
                clip_norm = dp.setup.clip_norm,
                "plan uses example-level DP"
            );
        }
        Ok(dp)
    }

    /// Client-level DP by distributed noise ([`admission::distributed_dp`]), logged.
    pub(super) fn distributed_privacy_for(
        &self,
        plan: &Plan,
        plan_id: &str,
        run: &str,
    ) -> Result<Option<DdgPlan>, Refusal> {
        let already = self.ledger.spent(&plan.data.schema, Some((plan_id, run)));
        let ddg = admission::distributed_dp(plan, &self.cfg.policy, &already)?;
        if let Some(d) = &ddg {
            tracing::info!(
                epsilon = format!("{:.3}", d.epsilon),
                delta = d.delta,
                noise_multiplier = format!("{:.3}", d.noise_multiplier),
                "plan uses client-level DP with distributed noise under secure aggregation"
            );
        }
        Ok(ddg)
    }
}
