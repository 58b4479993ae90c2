//! The node daemon: dials out to the coordinator over mutual TLS, follows its directive stream,
//! and answers each directive under the local policy. It reconnects with back-off when the
//! coordinator goes away; training runs on a blocking thread so the connection stays serviced.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sanctum_protocol::hash::ContentHash;
use sanctum_protocol::model::{ModelSpec, Weights};
use sanctum_protocol::plan::{Plan, PrivacyMode};
use sanctum_protocol::privacy::noise::SecureGaussian;
use sanctum_protocol::prost::Message;
use sanctum_protocol::proto::{
    self, Directive, EvaluationReport, PlanResponse, SecAggMessage, SubscribeRequest, UpdateHeader, directive,
    sec_agg_message, sec_agg_step,
};
use sanctum_protocol::secagg::client::{Client as SecAggClient, RoundParams};
use sanctum_protocol::secagg::encode::{Encoding, Weight, encoding_for};
use sanctum_protocol::secagg::wire;
use sanctum_protocol::tls::{self, NodeCertVerifier, TlsMaterial};
use sanctum_protocol::transfer;
use tch::Device;

use sanctum_protocol::audit::AuditLog;
use serde_json::json;

use crate::admission::{self, Refusal};
use crate::approvals::{self, Approvals};
use crate::budget::{self, Cost, DdgPlan, DpPlan};
use crate::config::NodeConfig;
use crate::data::{self, LocalData};
use crate::egress::{EgressLog, Rule};
use crate::ledger::{Charge, Ledger};
use crate::link::{Link, LinkError};
use crate::release::{ReleaseStore, Released};
use crate::rounds::{self, Lineage, RoundDecision, RoundState, RunView, Stored};
use crate::{policy, train};

/// A run of a plan this node accepted, with its validated data.
struct Accepted {
    plan: Plan,
    /// The coordinator's id of this run (`OfferPlan.run`); every release is charged to it.
    run: String,
    /// Models of this run the node may evaluate, and what it evaluated.
    lineage: Lineage,
    data: Arc<LocalData>,
    /// DP-SGD settings derived from this node's own data, when the plan asks for privacy.
    dp: Option<DpPlan>,
    /// Client-level DP by distributed noise under secure aggregation.
    ddg: Option<DdgPlan>,
    /// A TorchScript plan's model file, fetched by hash, checked and loaded once at acceptance.
    script: Option<PathBuf>,
}

impl Accepted {
    /// What the directive decisions need to know of this run.
    fn view(&self) -> RunView<'_> {
        RunView { run: &self.run, rounds: self.plan.rounds, secure_aggregation: self.plan.secure_aggregation }
    }
}

/// What a round of local training returns: the metric of the starting model and the update.
type Trained = Result<(train::Evaluation, train::RoundResult), train::TrainError>;

/// This node's part in the open secure-aggregation round.
struct SecAggRound {
    start: proto::StartRound,
    client: SecAggClient,
    encoding: Encoding,
    /// The quantised (and, under client-level DP, noised) input, once training is done.
    input: Option<Vec<u32>>,
    metrics: Vec<proto::Metric>,
}

/// The running node.
pub struct Node {
    cfg: NodeConfig,
    material: TlsMaterial,
    device: Device,
    /// The only way out: the gRPC client, each message recorded in the egress log first.
    link: Link,
    /// What each dataset has spent; charged before an update leaves.
    ledger: Ledger,
    /// Each open run's latest release, so a repeated round re-sends the same bytes.
    releases: ReleaseStore,
    /// Exit once the plan offered to this node is closed (simulations and tests).
    exit_after_plan: bool,
    plans: HashMap<String, Accepted>,
    /// The last global model fetched, to avoid fetching it twice.
    cached: Option<(ContentHash, Arc<Vec<u8>>)>,
    /// Checks peers' certificates and signatures relayed by the coordinator.
    verifier: NodeCertVerifier,
    secagg: Option<SecAggRound>,
    /// Local training of a secure-aggregation round, run while the directive stream is served.
    training: Option<tokio::task::JoinHandle<Trained>>,
    /// This node's signed, hash-chained audit log.
    audit: AuditLog,
    /// What this node sent per (plan, round): payload hash and size, to check round records.
    sent: HashMap<(String, u32), (String, usize)>,
}

/// What the session loop woke up for.
enum Wake {
    Directive(Result<Option<Directive>, tonic::Status>),
    Trained(Result<Trained, tokio::task::JoinError>),
}

/// What ends a session with the coordinator.
enum SessionEnd {
    /// The stream broke or could not be opened: reconnect.
    Lost(String),
    /// `exit_after_plan` and the plan closed.
    Done,
}

impl Node {
    pub fn new(cfg: NodeConfig, material: TlsMaterial, device: Device, exit_after_plan: bool) -> anyhow::Result<Self> {
        // First of all: one node process per state directory (two would share one budget).
        let lock = crate::state_lock::StateLock::acquire(&cfg.state_dir)?;
        let egress = EgressLog::open(&cfg.state_dir)?;
        let ledger = Ledger::open(lock)?;
        let releases = ReleaseStore::open(&cfg.state_dir)?;
        let verifier = material.node_cert_verifier()?;
        let audit = AuditLog::open_for(&cfg.state_dir.join("audit"), &material)?;
        Ok(Self {
            cfg,
            material,
            device,
            link: Link::new(egress),
            ledger,
            releases,
            exit_after_plan,
            plans: HashMap::new(),
            cached: None,
            verifier,
            secagg: None,
            training: None,
            audit,
            sent: HashMap::new(),
        })
    }

    /// Runs until the process is stopped (or, with `exit_after_plan`, the plan closes).
    pub async fn run(mut self) -> anyhow::Result<()> {
        let mut backoff = Duration::from_millis(500);
        loop {
            match tls::connect(&self.cfg.coordinator, &self.material).await {
                Ok(channel) => {
                    backoff = Duration::from_millis(500);
                    self.link.connect(channel);
                    let end = self.session().await;
                    self.link.disconnect();
                    match end {
                        SessionEnd::Done => return Ok(()),
                        SessionEnd::Lost(why) => {
                            tracing::warn!("connection to the coordinator lost: {why}; reconnecting")
                        }
                    }
                }
                Err(e) if e.to_string().contains("Expired") => tracing::error!(
                    "{e}: the coordinator refused this node's certificate as expired; ask the consortium lead to renew it (`sanctum-coordinator pki renew --dir PKI {}`) and replace {}; retrying in {:.1} s",
                    self.material.identity().name,
                    self.cfg.tls.cert.display(),
                    backoff.as_secs_f64()
                ),
                Err(e) => tracing::warn!("{e}; retrying in {:.1} s", backoff.as_secs_f64()),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    /// Appends to the audit log; this node's own action, so its own certificate is the actor.
    fn audit<const N: usize>(&mut self, event: &str, params: [(&str, serde_json::Value); N]) -> anyhow::Result<()> {
        let params = params.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        let own = self.audit.own_fingerprint().to_string();
        self.audit.append(&own, event, params)?;
        Ok(())
    }

    async fn session(&mut self) -> SessionEnd {
        let hello = SubscribeRequest {
            software_version: sanctum_protocol::VERSION.to_string(),
            device: train::device_name(self.device),
        };
        let mut stream = match self.link.subscribe(hello).await {
            Ok(stream) => stream,
            Err(LinkError::Rpc(s)) => return SessionEnd::Lost(format!("{}: {}", s.code(), s.message())),
            Err(e) => return SessionEnd::Lost(e.to_string()),
        };
        tracing::info!(coordinator = self.cfg.coordinator, "connected; waiting for plans");
        if let Err(e) = self.audit("connected", [("coordinator", json!(self.cfg.coordinator))]) {
            return SessionEnd::Lost(format!("audit log: {e}"));
        }
        loop {
            let wake = match self.training.as_mut() {
                Some(handle) => tokio::select! {
                    joined = handle => Wake::Trained(joined),
                    msg = stream.message() => Wake::Directive(msg),
                },
                None => Wake::Directive(stream.message().await),
            };
            let msg = match wake {
                Wake::Trained(joined) => {
                    self.training = None;
                    if let Err(e) = self.secagg_trained(joined).await {
                        tracing::error!("secure-aggregation round not completed: {e:#}");
                        self.secagg = None;
                    }
                    continue;
                }
                Wake::Directive(msg) => msg,
            };
            match msg {
                Ok(Some(Directive { kind: Some(kind) })) => {
                    if let Some(end) = self.handle(kind).await {
                        return end;
                    }
                }
                Ok(Some(Directive { kind: None })) => tracing::warn!("empty directive ignored"),
                Ok(None) => return SessionEnd::Lost("the coordinator closed the stream".into()),
                Err(s) => return SessionEnd::Lost(format!("{}: {}", s.code(), s.message())),
            }
        }
    }

    async fn handle(&mut self, kind: directive::Kind) -> Option<SessionEnd> {
        match kind {
            directive::Kind::OfferPlan(offer) => {
                if let Err(e) = self.audit_approvals() {
                    return Some(SessionEnd::Lost(format!("audit log: {e}")));
                }
                let considered = match self.consider(&offer) {
                    Ok(accepted) => self.prepare_script(&offer.plan_id, accepted).await,
                    Err(reason) => Err(reason),
                };
                let (accept, reason) = match considered {
                    Ok(mut accepted) => {
                        tracing::info!(
                            plan = accepted.plan.name,
                            run = accepted.run,
                            train = accepted.data.train_len(),
                            test = accepted.data.test_len(),
                            "accepting plan"
                        );
                        // The same run offered again (a reconnect) keeps what the node saw of it.
                        if let Some(prev) = self.plans.get(&offer.plan_id).filter(|p| p.run == offer.run) {
                            accepted.lineage.models.extend(prev.lineage.models.iter().cloned());
                            accepted.lineage.evaluated.clone_from(&prev.lineage.evaluated);
                            accepted.lineage.saw_last_round |= prev.lineage.saw_last_round;
                            accepted.lineage.final_model.clone_from(&prev.lineage.final_model);
                        }
                        self.plans.insert(offer.plan_id.clone(), accepted);
                        (true, String::new())
                    }
                    Err(reason) => {
                        tracing::warn!(plan = offer.plan_id, "refusing plan: {reason}");
                        (false, reason.to_string())
                    }
                };
                let accepted = self.plans.get(&offer.plan_id).filter(|_| accept);
                // When the policy withholds dataset sizes every figure here is accounted at the
                // public lower bound on the rows (`DpPlan::accounted_rate`), so none reveals n.
                let privacy = accepted.and_then(|a| a.dp).map(|dp| proto::PrivacyCost {
                    epsilon: dp.epsilon,
                    delta: dp.delta,
                    steps: dp.steps,
                    sampling_rate: dp.accounted_rate,
                    noise_multiplier: dp.setup.noise_multiplier,
                });
                // Client-level DP by distributed noise: one release per round, no sampling.
                let privacy = privacy.or_else(|| {
                    accepted.and_then(|a| a.ddg.map(|d| (d, a.plan.rounds))).map(|(d, rounds)| proto::PrivacyCost {
                        epsilon: d.epsilon,
                        delta: d.delta,
                        steps: u64::from(rounds),
                        sampling_rate: 1.0,
                        noise_multiplier: d.noise_multiplier,
                    })
                });
                if let Err(e) = self.audit(
                    if accept { "plan_accepted" } else { "plan_refused" },
                    [
                        ("plan_id", json!(offer.plan_id)),
                        ("run", json!(offer.run)),
                        ("reason", json!(reason)),
                        ("epsilon", json!(privacy.as_ref().map(|p| p.epsilon))),
                        ("delta", json!(privacy.as_ref().map(|p| p.delta))),
                    ],
                ) {
                    return Some(SessionEnd::Lost(format!("audit log: {e}")));
                }
                let msg =
                    PlanResponse { plan_id: offer.plan_id.clone(), accept, reason, privacy, run: offer.run.clone() };
                match self.link.respond_to_plan(msg).await {
                    Ok(()) => {}
                    Err(LinkError::Rpc(s)) => return Some(SessionEnd::Lost(format!("RespondToPlan: {}", s.message()))),
                    Err(e) => return Some(SessionEnd::Lost(e.to_string())),
                }
            }
            directive::Kind::StartRound(start) if start.secure_aggregation.is_some() => {
                if let Err(e) = self.start_secagg_round(&start).await {
                    tracing::error!(round = start.round, "not taking part in this secure-aggregation round: {e:#}");
                    // A refused directive never ends another round this node is in.
                    if self.secagg_is(&start.plan_id, start.round) {
                        self.secagg = None;
                    }
                }
            }
            directive::Kind::StartRound(start) => {
                if let Err(e) = self.run_round(&start).await {
                    tracing::error!(round = start.round, "round not completed: {e:#}");
                }
            }
            directive::Kind::RoundReceipt(receipt) => {
                if let Err(e) = self.countersign(&receipt).await {
                    tracing::error!(round = receipt.round, "round record not countersigned: {e:#}");
                }
            }
            directive::Kind::Secagg(step) => {
                let (plan_id, round) = (step.plan_id.clone(), step.round);
                if let Err(e) = self.secagg_step(step).await {
                    tracing::error!("secure-aggregation step refused: {e:#}");
                    if self.secagg_is(&plan_id, round) {
                        self.secagg = None;
                    }
                }
            }
            directive::Kind::Evaluate(ev) => {
                if let Err(e) = self.evaluate(&ev).await {
                    tracing::error!("final evaluation not completed: {e:#}");
                }
            }
            directive::Kind::PlanClosed(closed) => {
                let ours = self.plans.get(&closed.plan_id).is_some_and(|a| a.run == closed.run);
                if ours && self.secagg.as_ref().is_some_and(|r| r.start.plan_id == closed.plan_id) {
                    self.secagg = None;
                    if let Some(h) = self.training.take() {
                        h.abort();
                    }
                }
                let name = if ours { self.plans.remove(&closed.plan_id).map(|a| a.plan.name) } else { None };
                // The run is over for this node: its kept releases go, and it is never run again.
                // Runs it never heard of leave nothing on disk.
                if (ours || self.releases.knows(&closed.plan_id, &closed.run))
                    && let Err(e) = self.releases.close(&closed.plan_id, &closed.run)
                {
                    tracing::error!("{e}");
                }
                if let Err(e) = self.audit(
                    "plan_closed",
                    [
                        ("plan_id", json!(closed.plan_id)),
                        ("run", json!(closed.run)),
                        ("success", json!(closed.success)),
                        ("reason", json!(closed.reason)),
                    ],
                ) {
                    return Some(SessionEnd::Lost(format!("audit log: {e}")));
                }
                tracing::info!(
                    plan = name.as_deref().unwrap_or(&closed.plan_id),
                    success = closed.success,
                    reason = closed.reason,
                    "plan closed"
                );
                // A simulated node serves one plan, whether it took part or refused it.
                if self.exit_after_plan {
                    return Some(SessionEnd::Done);
                }
            }
        }
        None
    }

    /// Parses the offered plan and checks it against policy and local data; a schema asking for
    /// DP-estimated statistics has them released and charged here, before the node accepts.
    fn consider(&mut self, offer: &proto::OfferPlan) -> Result<Accepted, Refusal> {
        let closed = self.releases.is_closed(&offer.plan_id, &offer.run);
        let plan = admission::parse_offer(&offer.plan_id, &offer.plan_toml, &offer.run, closed)?;
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
        // The initial model is the plan's own (its seed), so the node knows its hash itself.
        if let Ok(bytes) = plan.model.init(plan.seed).to_safetensors() {
            lineage.models.insert(ContentHash::of(&bytes).to_hex());
        }
        Ok(Accepted { plan, run: offer.run.clone(), lineage, data, dp, ddg, script: None })
    }

    /// `[standardize] with = "dp"`: checks the release against the caps together with the run's
    /// planned spend (`planned`: its ε and δ), releases the statistics of `data`'s kept rows
    /// ([`crate::dp_stats`]), charges them to the ledger under `RUN/statistics` (fsync'd, before
    /// anything computed from them can leave) and standardises `data` with them.
    #[allow(clippy::too_many_arguments)]
    fn release_statistics(
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
        let features = data::dp_features(schema).map_err(Refusal::Statistics)?;
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
        self.charge_dataset(&plan.data.schema, &plan.name, plan_id, &key, releases, &cost)
            .map_err(|e| Refusal::StatisticsCharge(format!("{e:#}")))?;
        data::standardize_with(data, &features, &released);
        Ok(())
    }

    /// A TorchScript run trains and evaluates only while its model stays approved here: a
    /// revocation stops the run's next round and its evaluation (the approvals file is read
    /// each time, fail closed). Zoo models need no approval.
    fn still_approved(&self, plan: &Plan) -> Result<(), String> {
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
    fn audit_approvals(&mut self) -> anyhow::Result<()> {
        let (approvals, _) = Approvals::load_fail_closed(&self.cfg.policy.model_approvals);
        approvals::audit_pending(&approvals, &self.cfg.state_dir, &mut self.audit)?;
        Ok(())
    }

    /// A TorchScript plan's model file: fetched from the coordinator by its hash (once; kept in
    /// `STATE/models/SHA.pt`), then loaded with the plan's initial weights, which checks the hash,
    /// the parameters and one forward pass. A file that does not load refuses the plan, naming
    /// why; the node goes on serving.
    async fn prepare_script(&mut self, plan_id: &str, mut accepted: Accepted) -> Result<Accepted, Refusal> {
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
    fn privacy_for(&self, plan: &Plan, plan_id: &str, run: &str, data: &LocalData) -> Result<Option<DpPlan>, Refusal> {
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
    fn distributed_privacy_for(&self, plan: &Plan, plan_id: &str, run: &str) -> Result<Option<DdgPlan>, Refusal> {
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

    /// A model by hash, from the one-model cache or the coordinator.
    async fn fetch(&mut self, plan_id: &str, hash_hex: &str, size: u64) -> anyhow::Result<Arc<Vec<u8>>> {
        let hash = ContentHash::parse(hash_hex).map_err(anyhow::Error::msg)?;
        if let Some((h, bytes)) = &self.cached
            && *h == hash
        {
            return Ok(Arc::clone(bytes));
        }
        // Drop the previous model before fetching the next one: one model in memory at a time.
        self.cached = None;
        let bytes = Arc::new(self.link.fetch_model(plan_id, hash_hex, size).await?);
        self.cached = Some((hash, Arc::clone(&bytes)));
        Ok(bytes)
    }

    /// What this node's own state says about a `StartRound` (see [`rounds::start_round`]).
    fn round_decision(&self, start: &proto::StartRound) -> anyhow::Result<RoundDecision> {
        let Some(accepted) = self.plans.get(&start.plan_id) else {
            return Ok(RoundDecision::Refuse(format!(
                "round for plan {} which this node did not accept",
                start.plan_id
            )));
        };
        let view = accepted.view();
        let with_setup = start.secure_aggregation.is_some();
        if start.run != accepted.run {
            return Ok(rounds::start_round(&view, &start.run, start.round, with_setup, RoundState::default()));
        }
        // Only whether a release is stored, not its bytes (an update can be hundreds of MB).
        let stored = self
            .releases
            .stored(&start.plan_id, &accepted.run, start.round)
            .map(|masked| if masked { Stored::Masked } else { Stored::Update });
        let released = self.releases.released_rounds(&start.plan_id, &accepted.run)?;
        let state = RoundState {
            stored,
            charged: self.ledger.is_charged(&start.plan_id, &accepted.run, start.round),
            released_ever: released.contains(&start.round),
            released_before: self.count_before(&released, &start.plan_id, &accepted.run, start.round),
        };
        Ok(rounds::start_round(&view, &start.run, start.round, with_setup, state))
    }

    /// Rounds of the run released before `round` (by the release store or the ledger, whichever
    /// counts more: the cost of the next release is never understated).
    fn releases_before(&self, plan_id: &str, run: &str, round: u32) -> anyhow::Result<u32> {
        let released = self.releases.released_rounds(plan_id, run)?;
        Ok(self.count_before(&released, plan_id, run, round))
    }

    /// [`Node::releases_before`] with the run's released rounds already read.
    fn count_before(&self, released: &std::collections::BTreeSet<u32>, plan_id: &str, run: &str, round: u32) -> u32 {
        let charged = self.ledger.releases(plan_id, run);
        budget::releases_before(released, round, charged, self.ledger.is_charged(plan_id, run, round))
    }

    /// Refuses a directive: logged and audited here, nothing sent.
    fn refuse_directive(&mut self, what: &str, plan_id: &str, round: u32, reason: &str) -> anyhow::Result<()> {
        tracing::warn!(plan = plan_id, round, "{what} refused: {reason}");
        self.audit(
            "directive_refused",
            [
                ("directive", json!(what)),
                ("plan_id", json!(plan_id)),
                ("round", json!(round)),
                ("reason", json!(reason)),
            ],
        )
    }

    /// Whether the open secure-aggregation round is (plan, round).
    fn secagg_is(&self, plan_id: &str, round: u32) -> bool {
        self.secagg.as_ref().is_some_and(|r| r.start.plan_id == plan_id && r.start.round == round)
    }

    /// Records, once a round's release has left, the model it was trained on in the run's
    /// lineage (and whether it was the plan's last round). Only models the node really trained
    /// on, and only after it released something for them, enter the lineage.
    fn note_round(&mut self, start: &proto::StartRound) {
        if let Some(a) = self.plans.get_mut(&start.plan_id).filter(|a| a.run == start.run) {
            a.lineage.models.insert(start.model_sha256.clone());
            a.lineage.saw_last_round |= start.round == a.plan.rounds;
        }
    }

    async fn run_round(&mut self, start: &proto::StartRound) -> anyhow::Result<()> {
        let decision = self.round_decision(start)?;
        if let RoundDecision::Refuse(reason) = &decision {
            self.refuse_directive("StartRound", &start.plan_id, start.round, reason)?;
            anyhow::bail!("{reason}");
        }
        let Some(accepted) = self.plans.get(&start.plan_id) else {
            anyhow::bail!("round for plan {} which this node did not accept", start.plan_id);
        };
        let run = accepted.run.clone();
        match decision {
            RoundDecision::Resend | RoundDecision::ChargeAndSend => {
                let Some(Released::Update { header, payload }) =
                    self.releases.get(&start.plan_id, &run, start.round)?
                else {
                    anyhow::bail!("round {}'s stored release disappeared", start.round);
                };
                let header = UpdateHeader::decode(header.as_slice())
                    .map_err(|e| anyhow::anyhow!("round {}'s stored release is damaged: {e}", start.round))?;
                // The same round asked for again must name the model it was trained on.
                if header.base_model_sha256 != start.model_sha256 {
                    let reason = format!(
                        "round {} was trained on model {}, not {}; it is re-sent only as it was",
                        start.round,
                        short(&header.base_model_sha256),
                        short(&start.model_sha256)
                    );
                    self.refuse_directive("StartRound", &start.plan_id, start.round, &reason)?;
                    anyhow::bail!("{reason}");
                }
                if decision == RoundDecision::ChargeAndSend {
                    if let Some(cost) = self.round_cost(&start.plan_id, start.round)? {
                        self.charge_cost(&start.plan_id, start.round, &cost)?;
                    }
                    tracing::info!(round = start.round, "sending the stored update, charged now (it never left)");
                    self.send_update(header, payload, Rule::ModelUpdate).await?;
                    self.note_round(start);
                    return Ok(());
                }
                tracing::info!(
                    round = start.round,
                    "round asked for again: re-sending the same bytes (no new release)"
                );
                self.send_update(header, payload, Rule::ModelUpdateResend).await?;
                self.note_round(start);
                Ok(())
            }
            RoundDecision::Train => {
                self.train_and_send(start, &run).await?;
                self.note_round(start);
                Ok(())
            }
            RoundDecision::Refuse(_) => Ok(()),
        }
    }

    /// Trains a round, then stores, charges and sends its update, in that order.
    async fn train_and_send(&mut self, start: &proto::StartRound, run: &str) -> anyhow::Result<()> {
        let Some(accepted) = self.plans.get(&start.plan_id) else {
            anyhow::bail!("round for plan {} which this node did not accept", start.plan_id);
        };
        if let Err(reason) = self.still_approved(&accepted.plan) {
            self.refuse_directive("StartRound", &start.plan_id, start.round, &reason)?;
            anyhow::bail!("{reason}");
        }
        let plan = accepted.plan.clone();
        let data = accepted.data.clone();
        let dp = accepted.dp;
        let script = accepted.script.clone();
        let bytes = self.fetch(&start.plan_id, &start.model_sha256, start.model_bytes).await?;
        let global = Weights::from_safetensors(&bytes, &plan.model.layout())?;
        let job = self.training_job(plan, global, data, dp, start.round, script);
        let (metric, result) = tokio::task::spawn_blocking(job).await??;
        tracing::info!(
            round = start.round,
            metric_before = format!("{:.4}", metric.primary().unwrap_or(f64::NAN)),
            loss = format!("{:.4}", result.mean_loss),
            seconds = format!("{:.2}", result.seconds),
            "local training done"
        );
        let cost = self.round_cost(&start.plan_id, start.round)?;
        let header = UpdateHeader {
            plan_id: start.plan_id.clone(),
            round: start.round,
            base_model_sha256: start.model_sha256.clone(),
            num_params: result.delta.len() as u64,
            sample_count: if self.cfg.policy.share_sample_counts {
                self.plans.get(&start.plan_id).map_or(0, |a| a.data.train_len() as u64)
            } else {
                0
            },
            payload_sha256: String::new(),
            metrics: self.round_metrics(&start.plan_id, &metric, cost.as_ref())?,
            masked: false,
        };
        let payload = transfer::f32_to_le_bytes(&result.delta);
        // Stored first, so a repeated round gets these bytes back; then charged, durably, before
        // anything about this round leaves.
        self.releases.put(
            &start.plan_id,
            run,
            start.round,
            &Released::Update { header: header.encode_to_vec(), payload: payload.clone() },
        )?;
        if let Some(cost) = &cost {
            self.charge_cost(&start.plan_id, start.round, cost)?;
            crash_after_charge();
        }
        self.send_update(header, payload, Rule::ModelUpdate).await
    }

    /// The metrics that may go with a round's update: the starting model's test metric only as
    /// `policy.test_metrics` allows, ε spent only when it reveals nothing of the data's size.
    fn round_metrics(
        &mut self,
        plan_id: &str,
        metric: &train::Evaluation,
        cost: Option<&Cost>,
    ) -> anyhow::Result<Vec<proto::Metric>> {
        let mut m: Vec<proto::Metric> = self.release_metric(plan_id, metric)?;
        // With sizes withheld, the cost is accounted at the public bound: it reveals nothing.
        if let Some(cost) = cost {
            m.push(proto::Metric { name: "epsilon_spent".into(), value: cost.epsilon, samples: cost.steps });
        }
        Ok(m)
    }

    /// Test-split metrics as `policy.test_metrics` lets them leave ([`crate::metrics::release`]):
    /// not at all, exact, or the accuracy noised and charged to the ledger first.
    fn release_metric(&mut self, plan_id: &str, eval: &train::Evaluation) -> anyhow::Result<Vec<proto::Metric>> {
        let Some(accepted) = self.plans.get(plan_id) else {
            return Ok(vec![]);
        };
        let dp = accepted.plan.privacy.mode != PrivacyMode::None;
        let share = self.cfg.policy.share_sample_counts;
        let (accuracy, samples, noise, delta) =
            match crate::metrics::release(&self.cfg.policy, dp, accepted.plan.privacy.delta, eval) {
                crate::metrics::Release::Withheld(why) => {
                    tracing::info!("no test metric sent: {why}");
                    return Ok(vec![]);
                }
                crate::metrics::Release::Exact(m) => {
                    return Ok(m
                        .into_iter()
                        .map(|(name, value, samples)| proto::Metric { name: name.into(), value, samples })
                        .collect());
                }
                crate::metrics::Release::Noised { accuracy, samples, noise, delta } => {
                    (accuracy, samples, noise, delta)
                }
            };
        let key = format!("{}/metrics", accepted.run);
        let releases = self.ledger.releases(plan_id, &key) + 1;
        let cost = budget::metric_cost(noise, releases, delta)?;
        self.charge_to(plan_id, &key, releases, &cost)?;
        let noised = crate::metrics::noised_accuracy(accuracy, samples, noise, &mut SecureGaussian::from_os());
        Ok(vec![proto::Metric {
            name: "accuracy".into(),
            value: noised.value,
            samples: if share { noised.samples } else { 0 },
        }])
    }

    /// One round's work for a blocking thread: evaluate the starting model, then train (DP-SGD
    /// when the plan asks for example-level privacy).
    fn training_job(
        &self,
        plan: Plan,
        global: Weights,
        data: Arc<LocalData>,
        dp: Option<DpPlan>,
        round: u32,
        script: Option<PathBuf>,
    ) -> impl FnOnce() -> Trained + Send + 'static {
        let device = self.device;
        // Each node and round gets its own batch order, reproducible from the plan's seed.
        let seed = plan.seed
            ^ u64::from(round).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ name_seed(&self.material.identity().name);
        move || {
            let script = script.as_deref();
            let metric = train::evaluate(&plan.model, &global, &data, device, script)?;
            let result = match &dp {
                Some(dp) => train::train_round_dp(&plan, &global, &data, device, &dp.setup, script)?,
                None => train::train_round(&plan, &global, &data, device, seed, script)?,
            };
            Ok((metric, result))
        }
    }

    /// Starts this node's part in a secure-aggregation round: checks the setup against the plan
    /// and the policy, advertises signed round keys, then trains while the steps go on.
    async fn start_secagg_round(&mut self, start: &proto::StartRound) -> anyhow::Result<()> {
        let Some(setup) = start.secure_aggregation.clone() else {
            anyhow::bail!("no secure-aggregation setup");
        };
        if let Some(accepted) = self.plans.get(&start.plan_id)
            && let Err(reason) = self.still_approved(&accepted.plan)
        {
            self.refuse_directive("StartRound", &start.plan_id, start.round, &reason)?;
            anyhow::bail!("{reason}");
        }
        // A masked input is made once per (run, round) and never re-sent.
        match self.round_decision(start)? {
            RoundDecision::Train => {}
            RoundDecision::Refuse(reason) => {
                self.refuse_directive("StartRound", &start.plan_id, start.round, &reason)?;
                anyhow::bail!("{reason}");
            }
            RoundDecision::Resend | RoundDecision::ChargeAndSend => {
                let reason = format!("round {}'s input was already made; it is not masked again", start.round);
                self.refuse_directive("StartRound", &start.plan_id, start.round, &reason)?;
                anyhow::bail!("{reason}");
            }
        }
        let Some(accepted) = self.plans.get(&start.plan_id) else {
            anyhow::bail!("round for plan {} which this node did not accept", start.plan_id);
        };
        let plan = accepted.plan.clone();
        if !plan.secure_aggregation {
            anyhow::bail!("the coordinator asks for secure aggregation, which the accepted plan does not use");
        }
        let me = self.material.identity().name.clone();
        let n = setup.participants.len();
        let t = setup.threshold as usize;
        let wanted = plan.secagg_threshold(n);
        if t < wanted {
            anyhow::bail!("the coordinator set threshold {t} for {n} participants; the plan requires {wanted}");
        }
        if let Some(min) = self.cfg.policy.min_cohort
            && t < min
        {
            anyhow::bail!("threshold {t} would release sums of fewer hospitals than policy.min_cohort = {min}");
        }
        let settings = plan.secagg_settings();
        if setup.clip_norm != settings.clip_norm || setup.max_samples != settings.max_samples {
            anyhow::bail!("the round's clip_norm or max_samples differ from the plan's");
        }
        let params = RoundParams {
            plan_id: start.plan_id.clone(),
            round: start.round,
            participants: setup.participants.clone(),
            threshold: t,
        };
        let encoding =
            encoding_for(&plan, n, t, accepted.ddg.map(|d| d.noise_multiplier)).map_err(anyhow::Error::msg)?;
        let (sa, keys) = SecAggClient::new(params, &me)?;
        let signature = self.material.sign(&keys.signed_message())?;
        let msg = SecAggMessage {
            plan_id: start.plan_id.clone(),
            round: start.round,
            step: Some(sec_agg_message::Step::Keys(proto::SecAggKeys {
                node: me,
                share_key: keys.share_key.to_vec(),
                mask_key: keys.mask_key.to_vec(),
                signature,
                certificate: vec![],
            })),
        };
        self.link.sec_agg(msg).await?;
        self.secagg = Some(SecAggRound { start: start.clone(), client: sa, encoding, input: None, metrics: vec![] });
        // Train while the key steps go on.
        let accepted = self.plans.get(&start.plan_id).ok_or_else(|| anyhow::anyhow!("plan closed"))?;
        let (data, dp, script) = (accepted.data.clone(), accepted.dp, accepted.script.clone());
        let bytes = self.fetch(&start.plan_id, &start.model_sha256, start.model_bytes).await?;
        let global = Weights::from_safetensors(&bytes, &plan.model.layout())?;
        let job = self.training_job(plan, global, data, dp, start.round, script);
        self.training = Some(tokio::task::spawn_blocking(job));
        Ok(())
    }

    /// Local training of the secure-aggregation round finished: charge, encode, and mask as soon
    /// as the shares are in.
    async fn secagg_trained(&mut self, joined: Result<Trained, tokio::task::JoinError>) -> anyhow::Result<()> {
        let (metric, result) = joined??;
        let Some(start) = self.secagg.as_ref().map(|r| r.start.clone()) else {
            return Ok(());
        };
        let accepted = self.plans.get(&start.plan_id).ok_or_else(|| anyhow::anyhow!("plan closed during training"))?;
        if accepted.run != start.run {
            anyhow::bail!(
                "run {:?} was replaced by run {:?} during training; nothing is sent",
                start.run,
                accepted.run
            );
        }
        let run = accepted.run.clone();
        tracing::info!(
            round = start.round,
            metric_before = format!("{:.4}", metric.primary().unwrap_or(f64::NAN)),
            loss = format!("{:.4}", result.mean_loss),
            seconds = format!("{:.2}", result.seconds),
            "local training done"
        );
        // The round is marked released (its masked input is never made again), then its privacy
        // cost is charged, durably, before anything about it leaves.
        let cost = self.round_cost(&start.plan_id, start.round)?;
        self.releases.put(&start.plan_id, &run, start.round, &Released::Masked)?;
        if let Some(cost) = &cost {
            self.charge_cost(&start.plan_id, start.round, cost)?;
            crash_after_charge();
        }
        let metrics = self.round_metrics(&start.plan_id, &metric, cost.as_ref())?;
        let accepted = self.plans.get(&start.plan_id).ok_or_else(|| anyhow::anyhow!("plan closed during training"))?;
        let weight = match accepted.plan.strategy.weighting() {
            sanctum_protocol::plan::Weighting::Samples => Weight::Samples(accepted.data.train_len() as u64),
            sanctum_protocol::plan::Weighting::Uniform => Weight::Uniform,
        };
        let Some(round) = self.secagg.as_mut() else {
            return Ok(());
        };
        let mut rng = <rand_chacha::ChaCha20Rng as rand::SeedableRng>::from_os_rng();
        let (words, norm) = round.encoding.encode(&result.delta, weight, &mut rng)?;
        tracing::info!(
            round = start.round,
            update_norm = format!("{norm:.4}"),
            "update encoded for secure aggregation"
        );
        test_dump_input(&self.material.identity().name, start.round, &words);
        round.input = Some(words);
        round.metrics = metrics;
        if round.client.ready_to_mask() {
            self.send_masked().await?;
        }
        Ok(())
    }

    /// Masks the input and uploads it.
    async fn send_masked(&mut self) -> anyhow::Result<()> {
        let Some(round) = self.secagg.as_mut() else {
            return Ok(());
        };
        let Some(words) = round.input.take() else {
            return Ok(());
        };
        test_fault("before_input", round.start.round);
        let masked = round.client.masked_input(&words)?;
        let start = round.start.clone();
        let header = UpdateHeader {
            plan_id: start.plan_id.clone(),
            round: start.round,
            base_model_sha256: start.model_sha256.clone(),
            num_params: masked.len() as u64,
            sample_count: 0,
            payload_sha256: String::new(),
            metrics: std::mem::take(&mut round.metrics),
            masked: true,
        };
        self.send_update(header, wire::words_to_le(&masked), Rule::ModelUpdate).await?;
        self.note_round(&start);
        test_fault("after_input", start.round);
        Ok(())
    }

    /// One secure-aggregation step relayed by the coordinator.
    async fn secagg_step(&mut self, step: proto::SecAggStep) -> anyhow::Result<()> {
        let Some(round) = self.secagg.as_mut() else {
            anyhow::bail!("no secure-aggregation round is open here (round {} step ignored)", step.round);
        };
        if step.plan_id != round.start.plan_id || step.round != round.start.round {
            anyhow::bail!("step for round {} but this node is in round {}", step.round, round.start.round);
        }
        let reply = |s: sec_agg_message::Step| SecAggMessage {
            plan_id: step.plan_id.clone(),
            round: step.round,
            step: Some(s),
        };
        match step.step.clone().ok_or_else(|| anyhow::anyhow!("empty step"))? {
            sec_agg_step::Step::Peers(p) => {
                let ads = p
                    .keys
                    .iter()
                    .map(|k| wire::keys_from_wire(k, &step.plan_id, step.round))
                    .collect::<Result<Vec<_>, _>>()?;
                let shares = round.client.receive_peers(&ads, &self.verifier)?;
                let msg = reply(sec_agg_message::Step::Shares(proto::SecAggShareList {
                    shares: shares.iter().map(wire::share_to_wire).collect(),
                }));
                self.link.sec_agg(msg).await?;
            }
            sec_agg_step::Step::Shares(s) => {
                let u2 = s.sharing.iter().copied().collect();
                let shares: Vec<_> = s.shares.iter().map(wire::share_from_wire).collect();
                round.client.receive_shares(&u2, &shares)?;
                if round.input.is_some() {
                    self.send_masked().await?;
                }
            }
            sec_agg_step::Step::Survivors(s) => {
                let u3 = s.survivors.iter().copied().collect();
                let message = round.client.receive_survivors(&u3)?;
                let signature = self.material.sign(&message)?;
                let msg = reply(sec_agg_message::Step::ConsistencySignature(signature));
                self.link.sec_agg(msg).await?;
            }
            sec_agg_step::Step::Signatures(s) => {
                let sigs: Vec<(u32, Vec<u8>)> = s.signatures.into_iter().map(|n| (n.id, n.signature)).collect();
                let shares = round.client.receive_consistency(&sigs, &self.verifier)?;
                let msg = reply(sec_agg_message::Step::Unmask(proto::SecAggUnmask {
                    shares: shares.iter().map(wire::unmask_to_wire).collect(),
                }));
                self.link.sec_agg(msg).await?;
                tracing::info!(round = step.round, "secure-aggregation shares for unmasking sent");
            }
        }
        Ok(())
    }

    /// Uploads an update (plain or masked), then remembers and audits what left: its hash and size.
    async fn send_update(&mut self, header: UpdateHeader, payload: Vec<u8>, rule: Rule) -> anyhow::Result<()> {
        let (plan_id, round, masked) = (header.plan_id.clone(), header.round, header.masked);
        let (hash, bytes) = self.link.upload(header, payload, rule).await?;
        self.sent.insert((plan_id.clone(), round), (hash.clone(), bytes));
        self.audit(
            "update_sent",
            [
                ("plan_id", json!(plan_id)),
                ("round", json!(round)),
                ("payload_sha256", json!(hash)),
                ("bytes", json!(bytes)),
                ("masked", json!(masked)),
                ("resend", json!(matches!(rule, Rule::ModelUpdateResend))),
            ],
        )
    }

    /// Checks the coordinator's record of a closed round against what this node sent, and
    /// countersigns it (agreeing or, with the reason, disputing): the decision and the signed
    /// statement are `receipt`'s; this sends it and keeps it in the node's own audit log.
    async fn countersign(&mut self, receipt: &proto::RoundReceipt) -> anyhow::Result<()> {
        let me = self.material.identity().name.clone();
        let sent = self.sent.get(&(receipt.plan_id.clone(), receipt.round));
        let sent = sent.map(|(hash, bytes)| crate::receipt::Sent { payload_sha256: hash, bytes: *bytes as u64 });
        let verdict = crate::receipt::judge(&receipt.record, &receipt.plan_id, receipt.round, &me, sent);
        let signature = verdict.statement(&receipt.plan_id, receipt.round).sign(|m| self.material.sign(m))?;
        self.audit(
            "receipt_signed",
            [
                ("plan_id", json!(receipt.plan_id)),
                ("round", json!(receipt.round)),
                ("record_sha256", json!(verdict.record_sha256.to_hex())),
                ("agrees", json!(verdict.agrees)),
                ("reason", json!(verdict.reason)),
                ("signature", json!(crate::receipt::hex(&signature))),
            ],
        )?;
        if !verdict.agrees {
            tracing::error!(
                round = receipt.round,
                "the coordinator's round record does not match what this node sent: {}",
                verdict.reason
            );
        }
        let msg = proto::Countersignature {
            plan_id: receipt.plan_id.clone(),
            round: receipt.round,
            record_sha256: verdict.record_sha256.to_hex(),
            signature,
            agrees: verdict.agrees,
            reason: verdict.reason,
        };
        self.link.countersign(msg).await?;
        Ok(())
    }

    /// What releasing `round` now costs the run under DP: the run's cumulative ε after one more
    /// release than it already made (every step actually taken counts, whatever round numbers
    /// the coordinator uses). `None` without DP.
    fn round_cost(&self, plan_id: &str, round: u32) -> anyhow::Result<Option<Cost>> {
        let accepted = self.plans.get(plan_id).ok_or_else(|| anyhow::anyhow!("plan closed during training"))?;
        let before = self.releases_before(plan_id, &accepted.run, round)?;
        Ok(budget::round_cost(&accepted.plan, accepted.dp.as_ref(), accepted.ddg.as_ref(), before)?)
    }

    /// Checks a release's cost against the caps and appends it to the ledger (fsync'd) and the
    /// audit log, at most once per (plan, run, round); the caller sends nothing if this fails.
    fn charge_cost(&mut self, plan_id: &str, round: u32, cost: &Cost) -> anyhow::Result<()> {
        let run = self.plans.get(plan_id).map(|a| a.run.clone()).unwrap_or_default();
        self.charge_to(plan_id, &run, round, cost)
    }

    /// [`Node::charge_cost`] under a ledger run key of its own (`RUN/metrics` for noised metrics).
    fn charge_to(&mut self, plan_id: &str, run: &str, round: u32, cost: &Cost) -> anyhow::Result<()> {
        let accepted = self.plans.get(plan_id).ok_or_else(|| anyhow::anyhow!("plan closed during training"))?;
        let (dataset, plan_name) = (accepted.plan.data.schema.clone(), accepted.plan.name.clone());
        self.charge_dataset(&dataset, &plan_name, plan_id, run, round, cost)
    }

    /// [`Node::charge_to`] for a plan that may not be accepted yet (its DP statistics).
    fn charge_dataset(
        &mut self,
        dataset: &str,
        plan_name: &str,
        plan_id: &str,
        run: &str,
        round: u32,
        cost: &Cost,
    ) -> anyhow::Result<()> {
        let dataset = dataset.to_string();
        let run = run.to_string();
        let others = self.ledger.spent(&dataset, Some((plan_id, &run)));
        budget::check_charge(&self.cfg.policy, &others, &dataset, round, cost)?;
        let charge = Charge {
            dataset,
            plan_id: plan_id.to_string(),
            run: run.clone(),
            plan_name: plan_name.to_string(),
            round,
            epsilon: cost.epsilon,
            delta: cost.delta,
            steps: cost.steps,
            sampling_rate: cost.sampling_rate,
            noise_multiplier: cost.noise_multiplier,
            accountant: cost.accountant.into(),
            time_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        };
        let fresh = self.ledger.charge(charge)?;
        if fresh {
            self.audit(
                "epsilon_charged",
                [
                    ("plan_id", json!(plan_id)),
                    ("run", json!(run)),
                    ("round", json!(round)),
                    ("epsilon", json!(cost.epsilon)),
                    ("delta", json!(cost.delta)),
                    ("accountant", json!(cost.accountant)),
                    ("epsilon_cap", json!(self.cfg.policy.max_epsilon)),
                ],
            )?;
        }
        tracing::info!(
            round,
            epsilon_spent = format!("{:.3}", cost.epsilon),
            of = format!("{:.3}", cost.plan_epsilon),
            accountant = cost.accountant,
            charged = if fresh { "now" } else { "already (retry)" },
            "privacy charged to the ledger"
        );
        Ok(())
    }

    /// Refuses an evaluation (audited, logged) and answers it without a value, so an honest
    /// coordinator does not wait for this node; the refusal is returned as the error.
    async fn decline_evaluation(&mut self, ev: &proto::Evaluate, reason: &str) -> anyhow::Result<()> {
        self.refuse_directive("Evaluate", &ev.plan_id, 0, reason)?;
        let report =
            EvaluationReport { plan_id: ev.plan_id.clone(), model_sha256: ev.model_sha256.clone(), metrics: vec![] };
        self.link.report_evaluation(report).await?;
        anyhow::bail!("{reason}")
    }

    /// Evaluates a model of an accepted run's lineage on the test split, and reports the metric
    /// only as `policy.test_metrics` allows.
    async fn evaluate(&mut self, ev: &proto::Evaluate) -> anyhow::Result<()> {
        let Some(accepted) = self.plans.get(&ev.plan_id) else {
            let reason = format!("evaluation for plan {} which this node did not accept", ev.plan_id);
            return self.decline_evaluation(ev, &reason).await;
        };
        let view = accepted.view();
        if let Err(reason) = accepted.lineage.evaluate(&view, &ev.run, &ev.model_sha256) {
            return self.decline_evaluation(ev, &reason).await;
        }
        if let Err(reason) = self.still_approved(&accepted.plan) {
            return self.decline_evaluation(ev, &reason).await;
        }
        let allowed = self
            .cfg
            .policy
            .test_metrics
            .allows(accepted.plan.privacy.mode != PrivacyMode::None, self.cfg.policy.share_sample_counts);
        let layout = accepted.plan.model.layout();
        let model = accepted.plan.model.clone();
        let data = accepted.data.clone();
        let script = accepted.script.clone();
        if let Some(a) = self.plans.get_mut(&ev.plan_id) {
            a.lineage.record_evaluation(&ev.model_sha256);
        }
        let metrics = if allowed {
            let bytes = self.fetch(&ev.plan_id, &ev.model_sha256, ev.model_bytes).await?;
            let weights = Weights::from_safetensors(&bytes, &layout)?;
            let device = self.device;
            let eval = tokio::task::spawn_blocking(move || {
                train::evaluate(&model, &weights, &data, device, script.as_deref())
            })
            .await??;
            tracing::info!(metrics = ?eval.metrics, samples = eval.samples, "final model evaluated");
            self.release_metric(&ev.plan_id, &eval)?
        } else {
            tracing::info!(
                "final model not evaluated for the coordinator: policy.test_metrics keeps test metrics here"
            );
            vec![]
        };
        // An answer without a value tells the coordinator not to wait for this node.
        let report = EvaluationReport { plan_id: ev.plan_id.clone(), model_sha256: ev.model_sha256.clone(), metrics };
        let first = report.metrics.first();
        self.audit(
            "evaluation_sent",
            [
                ("plan_id", json!(ev.plan_id)),
                ("run", json!(ev.run)),
                ("model_sha256", json!(ev.model_sha256)),
                ("value", json!(first.map(|m| m.value))),
                ("samples", json!(first.map(|m| m.samples))),
            ],
        )?;
        self.link.report_evaluation(report).await?;
        Ok(())
    }
}

/// Test hook for the crash-between-charge-and-send fault test
/// (`SANCTUM_FAULT_CRASH_AFTER_CHARGE`); never set in production.
fn crash_after_charge() {
    if std::env::var_os("SANCTUM_FAULT_CRASH_AFTER_CHARGE").is_some() {
        tracing::error!("SANCTUM_FAULT_CRASH_AFTER_CHARGE is set: exiting before the update is sent");
        std::process::exit(70);
    }
}

/// Test hook for the secure-aggregation dropout tests (`SANCTUM_FAULT_SECAGG_EXIT` =
/// `before_input` | `after_input`, in the first round that gets there or, with
/// `SANCTUM_FAULT_SECAGG_ROUND=R`, only in round R, so one test can drop nodes in different rounds
/// of one plan); never set in production.
fn test_fault(at: &str, round: u32) {
    let in_round = std::env::var("SANCTUM_FAULT_SECAGG_ROUND").ok().is_none_or(|r| r == round.to_string());
    if in_round && std::env::var("SANCTUM_FAULT_SECAGG_EXIT").is_ok_and(|v| v == at) {
        tracing::error!("SANCTUM_FAULT_SECAGG_EXIT={at} in round {round}: exiting");
        std::process::exit(71);
    }
}

/// Test hook: with `SANCTUM_TEST_SECAGG_DUMP=DIR` the quantised input is also written to
/// `DIR/NAME-round-R.u32` so a test can check the aggregate out of band; never set in production.
fn test_dump_input(name: &str, round: u32, words: &[u32]) {
    if let Some(dir) = std::env::var_os("SANCTUM_TEST_SECAGG_DUMP") {
        let path = std::path::Path::new(&dir).join(format!("{name}-round-{round}.u32"));
        if let Err(e) = std::fs::write(&path, wire::words_to_le(words)) {
            tracing::warn!("test dump {}: {e}", path.display());
        }
    }
}

/// The first 12 hex digits of a hash, for messages.
fn short(hex: &str) -> &str {
    hex.get(..12).unwrap_or(hex)
}

fn name_seed(name: &str) -> u64 {
    let h = ContentHash::of(name.as_bytes()).to_hex();
    u64::from_str_radix(&h[..16], 16).unwrap_or(0)
}
