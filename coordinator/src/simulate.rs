//! `sanctum-coordinator simulate`: the whole federation on one machine, for real. It makes a
//! throw-away consortium PKI, starts the coordinator on a loopback port, starts one
//! `sanctum-node` process per hospital (each sees only its own data file), runs the plan over
//! mutual TLS and prints the outcome next to the published reference numbers.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use sanctum_protocol::model::ModelSpec;
use sanctum_protocol::pki::{self, PkiError, Role, SignSpec};
use sanctum_protocol::plan::{Plan, PlanError};
use sanctum_protocol::proto::PlanFinished;
use sanctum_protocol::tls::{TlsError, TlsMaterial};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

use crate::config::resolve;
use crate::pki::{CaError, write_private, write_public};
use crate::plan_files::PlanFileError;
use crate::service::{Coordinator, CoordinatorOptions, StartError};
use crate::watch;

/// What `simulate` was asked to do.
#[derive(Debug, Clone)]
pub struct SimulateOptions {
    pub plan: PathBuf,
    /// Overrides the plan's seed.
    pub seed: Option<u64>,
    /// Overrides the plan's `init` (how the initial model is drawn from the seed).
    pub init: Option<sanctum_protocol::plan::InitScheme>,
    /// Where to write the JSON summary.
    pub json: Option<PathBuf>,
    /// Where to keep PKI, logs and state; a temporary directory (removed after) when absent.
    pub workdir: Option<PathBuf>,
    /// The node binary; by default the `sanctum-node` next to this executable.
    pub node_bin: Option<PathBuf>,
    /// The nodes' `device` setting (`auto`, `cpu`, `cuda`).
    pub device: String,
    /// Every hospital's `policy.max_epsilon`, if set.
    pub max_epsilon: Option<f64>,
    /// Every hospital's `policy.test_metrics` (`exact`, `auto` or `none`).
    pub test_metrics: String,
    /// A TorchScript plan's model is approved at every simulated hospital with
    /// `sanctum-node model approve` before its node starts, as a hospital would; false leaves it
    /// unapproved (each hospital then refuses the plan).
    pub approve_models: bool,
    /// Only these of the plan's hospitals take part (local-only training with one); `min_nodes`
    /// is lowered to their number. `None`: all of them.
    pub hospitals: Option<Vec<String>>,
    /// Pooled training: one simulated hospital of this name whose table is the concatenation of
    /// every (selected) hospital's CSV, written into the work directory.
    pub pool: Option<String>,
}

/// Why a simulation could not run to the plan's end. A wrapped cause is the variant's `source()`,
/// not part of its message: `main` prints the chain (`{:#}`), so the text reads "MESSAGE: CAUSE".
/// A plan that runs and fails is not an error: see [`Summary`].
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error("cannot locate this executable")]
    NoExecutable(#[source] io::Error),
    #[error(
        "sanctum-node not found next to {}: build it (`cargo build --release -p sanctum-node`) or pass --node-bin",
        exe.display()
    )]
    NoNodeBinary { exe: PathBuf },
    #[error("cannot read plan {}", path.display())]
    ReadPlan { path: PathBuf, source: io::Error },
    #[error("plan {}", path.display())]
    Plan { path: PathBuf, source: PlanError },
    #[error("plan {}", path.display())]
    PlanFiles { path: PathBuf, source: PlanFileError },
    #[error("plan {} has no [simulation] section listing the hospitals", path.display())]
    NoSimulation { path: PathBuf },
    #[error(
        "plan {} names its schema only by hash; simulate needs the file itself (data.schema_file) to give each hospital",
        path.display()
    )]
    SchemaByHashOnly { path: PathBuf },
    #[error("the TorchScript plan names no model.file")]
    NoModelFile,
    #[error("cannot resolve {}", path.display())]
    Resolve { path: PathBuf, source: io::Error },
    #[error("cannot create {}", path.display())]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot write {}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot create a temporary work directory")]
    TempDir(#[source] io::Error),
    #[error("cannot listen on a loopback port")]
    Listen(#[source] io::Error),
    /// The throw-away consortium's keys or certificates (generated here, so not expected).
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The in-process coordinator did not start.
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("cannot run {}", bin.display())]
    RunNode { bin: PathBuf, source: io::Error },
    #[error("hospital '{hospital}' could not approve {}: {stderr}", file.display())]
    Approve {
        hospital: String,
        file: PathBuf,
        /// What `sanctum-node model approve` wrote to stderr (its reason), trimmed.
        stderr: String,
    },
    #[error("cannot start {}", bin.display())]
    StartNode { bin: PathBuf, source: io::Error },
    #[error("cannot wait for node '{name}'")]
    WaitNode { name: String, source: io::Error },
    #[error("node '{name}' exited ({status}) before connecting; its log ends with:\n{log_tail}")]
    NodeExited { name: String, status: ExitStatus, log_tail: String },
    #[error("not every node connected within 120 s (connected: {connected:?}); logs are in {}", work.display())]
    NotConnected { connected: Vec<String>, work: PathBuf },
    /// The coordinator refused the plan (the gRPC status's message, as the lead would read it).
    #[error("plan refused: {message}")]
    Refused { message: String },
    #[error("the coordinator stopped before the plan finished")]
    CoordinatorStopped,
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error("--hospitals: '{name}' is not one of the plan's simulated hospitals ({known})")]
    UnknownHospital {
        name: String,
        /// The plan's simulated hospitals, comma-separated.
        known: String,
    },
    #[error("--hospitals lists no hospital; name at least one of {known}")]
    NoHospitals {
        /// The plan's simulated hospitals, comma-separated.
        known: String,
    },
    #[error("--pool {name:?}")]
    PoolName { name: String, source: PkiError },
    #[error("the plan with the selected hospitals")]
    SelectedPlan(#[source] PlanError),
    #[error(
        "--pool concatenates CSV tables; {} is not one (convert it to CSV or simulate without --pool)",
        path.display()
    )]
    PoolNotCsv { path: PathBuf },
    #[error("--pool: cannot read {}", path.display())]
    PoolRead { path: PathBuf, source: io::Error },
    #[error(
        "--pool: {} and {} have different header lines; pooled training needs the same columns in the same order",
        first.display(),
        other.display()
    )]
    PoolHeaders { first: PathBuf, other: PathBuf },
}

fn create_dir(path: &Path) -> Result<(), SimulateError> {
    std::fs::create_dir_all(path).map_err(|source| SimulateError::Create { path: path.into(), source })
}

fn canonical(path: &Path) -> Result<PathBuf, SimulateError> {
    std::fs::canonicalize(path).map_err(|source| SimulateError::Resolve { path: path.into(), source })
}

/// The outcome, as written to the JSON summary.
#[derive(Debug)]
pub struct Summary {
    pub finished: PlanFinished,
    pub json: serde_json::Value,
}

fn node_binary(explicit: Option<&Path>) -> Result<PathBuf, SimulateError> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let exe = std::env::current_exe().map_err(SimulateError::NoExecutable)?;
    let candidate = exe.with_file_name("sanctum-node");
    if candidate.exists() { Ok(candidate) } else { Err(SimulateError::NoNodeBinary { exe }) }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs the simulation; returns the summary (the plan may have failed: see `finished.success`).
pub async fn simulate(opts: &SimulateOptions) -> Result<Summary, SimulateError> {
    let started = Instant::now();
    let text = std::fs::read_to_string(&opts.plan)
        .map_err(|source| SimulateError::ReadPlan { path: opts.plan.clone(), source })?;
    let mut plan = Plan::parse(&text).map_err(|source| SimulateError::Plan { path: opts.plan.clone(), source })?;
    if let Some(seed) = opts.seed {
        plan.seed = seed;
    }
    if let Some(init) = opts.init {
        plan.init = init;
    }
    let plan_dir = opts.plan.parent().unwrap_or(Path::new(".")).to_path_buf();
    let files = crate::plan_files::resolve(&mut plan, &plan_dir)
        .map_err(|source| SimulateError::PlanFiles { path: opts.plan.clone(), source })?;
    let mut sim = plan.simulation.clone().ok_or_else(|| SimulateError::NoSimulation { path: opts.plan.clone() })?;
    let node_bin = node_binary(opts.node_bin.as_deref())?;
    // Every simulated hospital holds the plan's schema file, as a real one would.
    let schema_path = match &plan.data.schema_file {
        Some(f) => canonical(&resolve(&plan_dir, f))?,
        None => return Err(SimulateError::SchemaByHashOnly { path: opts.plan.clone() }),
    };

    let _tmp;
    let work = match &opts.workdir {
        Some(w) => {
            create_dir(w)?;
            w.clone()
        }
        None => {
            _tmp = tempfile::Builder::new().prefix("sanctum-sim-").tempdir().map_err(SimulateError::TempDir)?;
            _tmp.path().to_path_buf()
        }
    };
    let work = canonical(&work)?;
    select_hospitals(&mut plan, &mut sim, opts, &plan_dir, &work)?;

    // A throw-away consortium: CA, coordinator, and each hospital's own key and CSR.
    let ca = pki::init_ca("simulation", 1)?;
    let hosts = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let coord = pki::issue(
        &ca.cert_pem,
        &ca.key_pem,
        &SignSpec { name: "coordinator", role: Role::Coordinator, days: 1, hosts: &hosts },
    )?;
    let material = TlsMaterial::from_pem(&ca.cert_pem, &coord.cert_pem, &coord.key_pem)?;

    let state_dir = work.join("coordinator");
    let coordinator = Coordinator::start(
        CoordinatorOptions {
            state_dir: state_dir.clone(),
            evaluation_deadline: Duration::from_secs(plan.round_deadline_secs),
            revocation_list: None,
            limits: crate::config::Limits::default(),
            store: crate::db::StoreConfig::default(),
            #[cfg(feature = "fault-injection")]
            faults: crate::faults::FaultOptions::default(),
        },
        &material,
    )?;
    let listener = TcpListener::bind("127.0.0.1:0").await.map_err(SimulateError::Listen)?;
    let port = listener.local_addr().map_err(SimulateError::Listen)?.port();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = {
        let coordinator = coordinator.clone();
        tokio::spawn(async move {
            coordinator
                .serve(listener, &material, async {
                    let _ = stop_rx.await;
                })
                .await
        })
    };

    let mut children: Vec<(String, Child, PathBuf)> = Vec::new();
    for h in &sim.hospitals {
        let dir = work.join("nodes").join(&h.name);
        create_dir(&dir)?;
        let (key_pem, csr_pem) = pki::request(&h.name)?;
        let cert_pem = pki::sign(
            &ca.cert_pem,
            &ca.key_pem,
            &csr_pem,
            &SignSpec { name: &h.name, role: Role::Node, days: 1, hosts: &[] },
        )?;
        let key_path = dir.join("node.key");
        let _ = std::fs::remove_file(&key_path);
        write_private(&key_path, &key_pem)?;
        write_public(&dir.join("node.pem"), &cert_pem)?;
        write_public(&dir.join("ca.pem"), &ca.cert_pem)?;
        let data = resolve(&plan_dir, &h.data);
        let data = std::fs::canonicalize(&data).unwrap_or(data);
        let config = format!(
            "coordinator = \"localhost:{port}\"\ndevice = {device}\nthreads = 1\nstate_dir = \"state\"\n\n[tls]\nca = \"ca.pem\"\ncert = \"node.pem\"\nkey = \"node.key\"\n\n[[datasets]]\nschema = {schema}\npath = {path}\n\n[policy]\nallowed_models = [\"logistic_regression\", \"mlp\", \"cnn\", \"cox\", \"torchscript\"]\ntest_metrics = {metrics}\n{cap}",
            metrics = toml_str(&opts.test_metrics),
            device = toml_str(&opts.device),
            cap = opts.max_epsilon.map(|e| format!("max_epsilon = {e:?}\n")).unwrap_or_default(),
            schema = toml_str(&schema_path.display().to_string()),
            path = toml_str(&data.display().to_string()),
        );
        let config_path = dir.join("node.toml");
        std::fs::write(&config_path, config)
            .map_err(|source| SimulateError::Write { path: config_path.clone(), source })?;
        if let (ModelSpec::Torchscript(spec), true) = (&plan.model, opts.approve_models) {
            let file = spec.file.as_ref().map(|f| resolve(&plan_dir, f)).ok_or(SimulateError::NoModelFile)?;
            let out = std::process::Command::new(&node_bin)
                .args(["model", "approve"])
                .arg(&file)
                .arg("--config")
                .arg(&config_path)
                .args(["--by", "simulation", "--inputs", &spec.inputs.to_string()])
                .env_remove("LD_LIBRARY_PATH")
                .output()
                .map_err(|source| SimulateError::RunNode { bin: node_bin.clone(), source })?;
            if !out.status.success() {
                return Err(SimulateError::Approve {
                    hospital: h.name.clone(),
                    file,
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                });
            }
        }
        let log_path = dir.join("node.log");
        let log_error = |source| SimulateError::Create { path: log_path.clone(), source };
        let log = std::fs::File::create(&log_path).map_err(log_error)?;
        let child = Command::new(&node_bin)
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .arg("--exit-after-plan")
            .env_remove("LD_LIBRARY_PATH")
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().map_err(log_error)?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| SimulateError::StartNode { bin: node_bin.clone(), source })?;
        children.push((h.name.clone(), child, log_path));
    }

    // Wait until every hospital is connected, or one of them gives up.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let connected = coordinator.connected_nodes();
        if sim.hospitals.iter().all(|h| connected.contains(&h.name)) {
            break;
        }
        for (name, child, log) in &mut children {
            let exited = child.try_wait().map_err(|source| SimulateError::WaitNode { name: name.clone(), source })?;
            if let Some(status) = exited {
                return Err(SimulateError::NodeExited { name: name.clone(), status, log_tail: tail(log, 20) });
            }
        }
        if Instant::now() > deadline {
            return Err(SimulateError::NotConnected { connected, work });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "plan '{}': {} on {} hospitals, {} rounds x {} local steps, seed {}",
        plan.name,
        plan.strategy.name(),
        sim.hospitals.len(),
        plan.rounds,
        plan.local.steps,
        plan.seed
    );

    let metric = files.schema.as_ref().map_or("metric", |s| s.task().primary_metric());
    let submitted = coordinator
        .submit_with_model(plan.clone(), files.model_file, false)
        .await
        .map_err(|s| SimulateError::Refused { message: s.message().to_string() })?;
    let finished = watch::follow(coordinator.watch(&submitted.run), plan.rounds, metric)
        .await
        .ok_or(SimulateError::CoordinatorStopped)?;

    // Nodes exit on their own once the plan is closed.
    for (name, child, log) in &mut children {
        match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(Ok(status)) => {
                eprintln!("node '{name}' exited with {status}; log: {}", log.display())
            }
            _ => {
                eprintln!("node '{name}' did not exit; stopping it");
                let _ = child.kill().await;
            }
        }
    }
    let _ = stop_tx.send(());
    let _ = server.await;

    // With a kept work directory, the auditor's view of the run: every log verified, one report.
    if opts.workdir.is_some() {
        let node_logs: Vec<PathBuf> =
            children.iter().map(|(name, _, _)| work.join("nodes").join(name).join("state/audit/audit.jsonl")).collect();
        let ca = work.join("nodes").join(&sim.hospitals[0].name).join("ca.pem");
        // Unverified logs are allowed here: the simulation's own report shows them in red.
        let coordinator_log = state_dir.join("audit/audit.jsonl");
        match crate::report::write(&coordinator_log, &node_logs, Some(&ca), &work.join("report"), true) {
            Ok(w) => println!("audit report: {}", w.html.display()),
            Err(e) => eprintln!("audit report not written: {e:#}"),
        }
    }
    let metric = finished.metric_name.clone();
    let mut all: BTreeMap<String, BTreeMap<String, (f64, u64)>> = BTreeMap::new();
    for m in &finished.final_metrics {
        // A node's metrics come in its task's order; the map keeps them by name.
        let name = if m.name.is_empty() { metric.clone() } else { m.name.clone() };
        all.entry(m.node.clone()).or_default().insert(name, (m.value, m.samples));
    }
    let per_node: BTreeMap<String, (f64, u64)> =
        all.iter().filter_map(|(n, ms)| ms.get(&metric).map(|v| (n.clone(), *v))).collect();
    let mean_metric = watch::mean(per_node.values().map(|(v, _)| *v));
    let mut names: Vec<String> = all.values().flat_map(|ms| ms.keys().cloned()).collect();
    names.sort();
    names.dedup();
    let means: BTreeMap<String, f64> = names
        .iter()
        .filter_map(|n| watch::mean(all.values().filter_map(|ms| ms.get(n).map(|v| v.0))).map(|m| (n.clone(), m)))
        .collect();
    print_table(&finished, &per_node, mean_metric, &metric, sim.reference.as_ref());
    for name in names.iter().filter(|n| **n != metric) {
        let row: Vec<String> =
            all.iter().filter_map(|(n, ms)| ms.get(name).map(|v| format!("{n} {:.4}", v.0))).collect();
        println!("{name}: {} (mean {:.4})", row.join(", "), means.get(name).copied().unwrap_or(f64::NAN));
    }
    if !finished.success {
        for (name, _, log) in &children {
            eprintln!("--- last lines of {name}'s log ({}):\n{}", log.display(), tail(log, 8));
        }
    }
    let json = json!({
        "plan": plan.name,
        "strategy": plan.strategy.name(),
        "seed": plan.seed,
        "init": plan.init,
        "success": finished.success,
        "reason": finished.reason,
        "rounds_completed": finished.rounds_completed,
        "metric": metric,
        "mean_metric": mean_metric,
        "per_node": all.iter().map(|(n, ms)| {
            let (v, s) = ms.get(&metric).copied().map_or((None, 0), |(v, s)| (Some(v), s));
            (n.clone(), json!({
                "metric": v,
                "samples": s,
                "metrics": ms.iter().map(|(k, (v, _))| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
            }))
        }).collect::<serde_json::Map<_, _>>(),
        "mean_metrics": means,
        "final_model_sha256": finished.final_model_sha256,
        "model_path": if opts.workdir.is_some() { json!(finished.model_path) } else { json!(null) },
        "wall_seconds": started.elapsed().as_secs_f64(),
        "client_epsilon": (finished.client_epsilon > 0.0).then_some(finished.client_epsilon),
        "client_delta": (finished.client_delta > 0.0).then_some(finished.client_delta),
        "reference": sim.reference.as_ref().map(|r| json!({"source": r.source, "mean": r.mean, "per_node": r.per_node})),
    });
    if let Some(path) = &opts.json {
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .map_err(|source| SimulateError::Write { path: path.clone(), source })?;
    }
    Ok(Summary { finished, json })
}

/// `--hospitals` and `--pool`: which of the plan's hospitals take part, or one pooled hospital
/// holding all their rows. A plan changed here is a baseline, not the consortium's plan: its
/// published reference numbers no longer apply and are dropped.
fn select_hospitals(
    plan: &mut Plan,
    sim: &mut sanctum_protocol::plan::Simulation,
    opts: &SimulateOptions,
    plan_dir: &Path,
    work: &Path,
) -> Result<(), SimulateError> {
    if let Some(only) = &opts.hospitals {
        let known: Vec<&str> = sim.hospitals.iter().map(|h| h.name.as_str()).collect();
        if let Some(bad) = only.iter().find(|n| !known.contains(&n.as_str())) {
            return Err(SimulateError::UnknownHospital { name: bad.clone(), known: known.join(", ") });
        }
        if only.is_empty() {
            return Err(SimulateError::NoHospitals { known: known.join(", ") });
        }
        sim.hospitals.retain(|h| only.contains(&h.name));
    }
    if let Some(name) = &opts.pool {
        pki::validate_name(name).map_err(|source| SimulateError::PoolName { name: name.clone(), source })?;
        let dir = work.join("pooled");
        create_dir(&dir)?;
        let out = dir.join(format!("{name}.csv"));
        let files: Vec<PathBuf> = sim.hospitals.iter().map(|h| resolve(plan_dir, &h.data)).collect();
        pool_csv(&files, &out)?;
        let names: Vec<&str> = sim.hospitals.iter().map(|h| h.name.as_str()).collect();
        println!("pooled training: one hospital '{name}' holding the rows of {} ({})", names.join(", "), out.display());
        sim.hospitals = vec![sanctum_protocol::plan::SimulatedHospital { name: name.clone(), data: out }];
    }
    if opts.hospitals.is_some() || opts.pool.is_some() {
        sim.reference = None;
        let n = sim.hospitals.len();
        if plan.min_nodes > n {
            println!("min_nodes lowered from {} to {n} (the hospitals simulated)", plan.min_nodes);
            plan.min_nodes = n;
        }
        plan.simulation = Some(sim.clone());
        plan.validate().map_err(SimulateError::SelectedPlan)?;
    }
    Ok(())
}

/// Concatenates CSV tables with the same header line into `out` (the header once).
fn pool_csv(files: &[PathBuf], out: &Path) -> Result<(), SimulateError> {
    let mut text = String::new();
    let mut header: Option<(String, &Path)> = None;
    for f in files {
        if f.extension().and_then(|e| e.to_str()).is_none_or(|e| !e.eq_ignore_ascii_case("csv")) {
            return Err(SimulateError::PoolNotCsv { path: f.clone() });
        }
        let body = std::fs::read_to_string(f).map_err(|source| SimulateError::PoolRead { path: f.clone(), source })?;
        let (head, rows) = body.split_once('\n').unwrap_or((body.as_str(), ""));
        let head = head.trim_end_matches('\r');
        match &header {
            None => {
                text.push_str(head);
                text.push('\n');
                header = Some((head.to_string(), f));
            }
            Some((h, first)) if h != head => {
                return Err(SimulateError::PoolHeaders { first: first.to_path_buf(), other: f.clone() });
            }
            Some(_) => {}
        }
        text.push_str(rows);
        if !rows.is_empty() && !rows.ends_with('\n') {
            text.push('\n');
        }
    }
    std::fs::write(out, text).map_err(|source| SimulateError::Write { path: out.into(), source })
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn print_table(
    finished: &PlanFinished,
    per_node: &BTreeMap<String, (f64, u64)>,
    mean_metric: Option<f64>,
    metric: &str,
    reference: Option<&sanctum_protocol::plan::Reference>,
) {
    println!();
    if !finished.success {
        println!("plan FAILED after {} round(s): {}", finished.rounds_completed, finished.reason);
    } else {
        println!(
            "plan finished: {} round(s), final model {}",
            finished.rounds_completed,
            &finished.final_model_sha256[..12]
        );
    }
    let ref_head = if reference.is_some() { "  published" } else { "" };
    println!("{:<14} {:>12} {:>10}{ref_head}", "hospital", "test samples", metric);
    for (node, (value, samples)) in per_node {
        let r = reference.and_then(|r| r.per_node.get(node)).map(|v| format!("  {v:>9.3}")).unwrap_or_default();
        println!("{node:<14} {samples:>12} {value:>10.4}{r}");
    }
    let r = reference.map(|r| format!("  {:>9.3}", r.mean)).unwrap_or_default();
    match mean_metric {
        Some(m) => println!("{:<14} {:>12} {m:>10.4}{r}", "mean", ""),
        None => println!("{:<14} {:>12} {:>10}{r}", "mean", "", "n/a"),
    }
    if finished.client_epsilon > 0.0 {
        println!(
            "client-level DP (DP-FedAvg): every released model protects each hospital's whole dataset at ε = {:.3}, δ = {:e}",
            finished.client_epsilon, finished.client_delta
        );
    }
    if let Some(r) = reference {
        println!("published: {}", r.source);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn pool_csv_keeps_one_header_and_every_row_and_refuses_other_columns() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.csv");
        let b = dir.path().join("b.csv");
        let c = dir.path().join("c.csv");
        std::fs::write(&a, "x,y,split\n1,0,train\n2,1,test").unwrap(); // no final newline
        std::fs::write(&b, "x,y,split\r\n3,1,train\r\n").unwrap();
        std::fs::write(&c, "y,x,split\n4,0,train\n").unwrap();
        let out = dir.path().join("pooled.csv");
        pool_csv(&[a.clone(), b.clone()], &out).unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "x,y,split\n1,0,train\n2,1,test\n3,1,train\r\n");
        let err = pool_csv(&[a, c], &out).unwrap_err().to_string();
        assert!(err.contains("different header lines") && err.contains("c.csv"), "{err}");
        let err = pool_csv(&[dir.path().join("t.parquet")], &out).unwrap_err().to_string();
        assert!(err.contains("is not one"), "{err}");
    }

    /// What the CLI prints for an error (`{:#}`): the message, then each cause after ": ".
    fn chain(e: &(dyn std::error::Error + 'static)) -> String {
        sanctum_protocol::errors::Chain(e).to_string()
    }

    #[test]
    fn a_missing_plan_names_the_file_and_the_cause_once() {
        let dir = tempfile::tempdir().unwrap();
        let plan = dir.path().join("plan.toml");
        let os_gone = std::fs::read(&plan).unwrap_err().to_string();
        let opts = SimulateOptions { plan: plan.clone(), ..options(None, None) };
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let err = runtime.block_on(simulate(&opts)).unwrap_err();
        assert_eq!(chain(&err), format!("cannot read plan {}: {os_gone}", plan.display()));
    }

    fn options(hospitals: Option<&[&str]>, pool: Option<&str>) -> SimulateOptions {
        SimulateOptions {
            plan: PathBuf::new(),
            seed: None,
            init: None,
            json: None,
            workdir: None,
            node_bin: None,
            device: "cpu".into(),
            max_epsilon: None,
            test_metrics: "exact".into(),
            approve_models: true,
            hospitals: hospitals.map(|h| h.iter().map(|s| s.to_string()).collect()),
            pool: pool.map(str::to_string),
        }
    }

    #[test]
    fn hospitals_restrict_and_lower_min_nodes_and_pool_makes_one_node_of_all_rows() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/heart_disease");
        let text = std::fs::read_to_string(dir.join("fedavg_multiclass.toml")).unwrap();
        let fresh = || {
            let plan = Plan::parse(&text).unwrap();
            let sim = plan.simulation.clone().unwrap();
            (plan, sim)
        };
        let work = tempfile::tempdir().unwrap();

        let (mut plan, mut sim) = fresh();
        select_hospitals(&mut plan, &mut sim, &options(Some(&["va"]), None), &dir, work.path()).unwrap();
        assert_eq!(sim.hospitals.iter().map(|h| h.name.as_str()).collect::<Vec<_>>(), ["va"]);
        assert_eq!(plan.min_nodes, 1);

        let (mut plan, mut sim) = fresh();
        let err = select_hospitals(&mut plan, &mut sim, &options(Some(&["va", "oslo"]), None), &dir, work.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("'oslo'") && err.contains("cleveland"), "{err}");

        let (mut plan, mut sim) = fresh();
        select_hospitals(&mut plan, &mut sim, &options(None, Some("pooled")), &dir, work.path()).unwrap();
        assert_eq!(sim.hospitals.len(), 1);
        assert_eq!(plan.min_nodes, 1);
        let pooled = std::fs::read_to_string(&sim.hospitals[0].data).unwrap();
        let rows: usize = ["cleveland", "hungarian", "switzerland", "va"]
            .iter()
            .map(|h| std::fs::read_to_string(dir.join(format!("data/multiclass/{h}.csv"))).unwrap().lines().count() - 1)
            .sum();
        assert_eq!(pooled.lines().count(), rows + 1);

        // A pooled hospital's name is a member name; the refusal reads as the CLI printed it before.
        let (mut plan, mut sim) = fresh();
        let err =
            select_hospitals(&mut plan, &mut sim, &options(None, Some("Bad Name")), &dir, work.path()).unwrap_err();
        assert_eq!(chain(&err), format!("--pool \"Bad Name\": {}", PkiError::InvalidName("Bad Name".into())));

        // The defaults change nothing.
        let (mut plan, mut sim) = fresh();
        let before = (plan.clone(), sim.clone());
        select_hospitals(&mut plan, &mut sim, &options(None, None), &dir, work.path()).unwrap();
        assert_eq!((plan, sim), before);
    }
}
