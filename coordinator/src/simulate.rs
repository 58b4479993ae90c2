//! `sanctum-coordinator simulate`: the whole federation on one machine, for real. It makes a
//! throw-away consortium PKI, starts the coordinator on a loopback port, starts one
//! `sanctum-node` process per hospital (each sees only its own data file), runs the plan over
//! mutual TLS and prints the outcome next to the published reference numbers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sanctum_protocol::model::ModelSpec;
use sanctum_protocol::pki::{self, Role, SignSpec};
use sanctum_protocol::plan::Plan;
use sanctum_protocol::proto::PlanFinished;
use sanctum_protocol::tls::TlsMaterial;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

use crate::config::resolve;
use crate::pki::{write_private, write_public};
use crate::service::{Coordinator, CoordinatorOptions};
use crate::watch;

/// What `simulate` was asked to do.
#[derive(Debug, Clone)]
pub struct SimulateOptions {
    pub plan: PathBuf,
    /// Overrides the plan's seed.
    pub seed: Option<u64>,
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

/// The outcome, as written to the JSON summary.
#[derive(Debug)]
pub struct Summary {
    pub finished: PlanFinished,
    pub json: serde_json::Value,
}

fn node_binary(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let exe = std::env::current_exe().context("cannot locate this executable")?;
    let candidate = exe.with_file_name("sanctum-node");
    if candidate.exists() {
        Ok(candidate)
    } else {
        bail!(
            "sanctum-node not found next to {}: build it (`cargo build --release -p sanctum-node`) or pass --node-bin",
            exe.display()
        )
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs the simulation; returns the summary (the plan may have failed: see `finished.success`).
pub async fn simulate(opts: &SimulateOptions) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let text =
        std::fs::read_to_string(&opts.plan).with_context(|| format!("cannot read plan {}", opts.plan.display()))?;
    let mut plan = Plan::parse(&text).with_context(|| format!("plan {}", opts.plan.display()))?;
    if let Some(seed) = opts.seed {
        plan.seed = seed;
    }
    let plan_dir = opts.plan.parent().unwrap_or(Path::new(".")).to_path_buf();
    let files =
        crate::plan_files::resolve(&mut plan, &plan_dir).with_context(|| format!("plan {}", opts.plan.display()))?;
    let mut sim = plan
        .simulation
        .clone()
        .with_context(|| format!("plan {} has no [simulation] section listing the hospitals", opts.plan.display()))?;
    let node_bin = node_binary(opts.node_bin.as_deref())?;
    // Every simulated hospital holds the plan's schema file, as a real one would.
    let schema_path = match &plan.data.schema_file {
        Some(f) => std::fs::canonicalize(resolve(&plan_dir, f))?,
        None => bail!(
            "plan {} names its schema only by hash; simulate needs the file itself (data.schema_file) to give each hospital",
            opts.plan.display()
        ),
    };

    let _tmp;
    let work = match &opts.workdir {
        Some(w) => {
            std::fs::create_dir_all(w)?;
            w.clone()
        }
        None => {
            _tmp = tempfile::Builder::new().prefix("sanctum-sim-").tempdir()?;
            _tmp.path().to_path_buf()
        }
    };
    let work = std::fs::canonicalize(&work)?;
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
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
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
        std::fs::create_dir_all(&dir)?;
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
        std::fs::write(&config_path, config)?;
        if let (ModelSpec::Torchscript(spec), true) = (&plan.model, opts.approve_models) {
            let file = spec
                .file
                .as_ref()
                .map(|f| resolve(&plan_dir, f))
                .context("the TorchScript plan names no model.file")?;
            let out = std::process::Command::new(&node_bin)
                .args(["model", "approve"])
                .arg(&file)
                .arg("--config")
                .arg(&config_path)
                .args(["--by", "simulation", "--inputs", &spec.inputs.to_string()])
                .env_remove("LD_LIBRARY_PATH")
                .output()
                .with_context(|| format!("cannot run {}", node_bin.display()))?;
            if !out.status.success() {
                bail!(
                    "hospital '{}' could not approve {}: {}",
                    h.name,
                    file.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        let log_path = dir.join("node.log");
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new(&node_bin)
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .arg("--exit-after-plan")
            .env_remove("LD_LIBRARY_PATH")
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", node_bin.display()))?;
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
            if let Some(status) = child.try_wait()? {
                bail!("node '{name}' exited ({status}) before connecting; its log ends with:\n{}", tail(log, 20));
            }
        }
        if Instant::now() > deadline {
            bail!("not every node connected within 120 s (connected: {connected:?}); logs are in {}", work.display());
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
        .map_err(|s| anyhow::anyhow!("plan refused: {}", s.message()))?;
    let finished = watch::follow(coordinator.watch(&submitted.run), plan.rounds, metric)
        .await
        .context("the coordinator stopped before the plan finished")?;

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
            .with_context(|| format!("cannot write {}", path.display()))?;
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
) -> anyhow::Result<()> {
    if let Some(only) = &opts.hospitals {
        let known: Vec<&str> = sim.hospitals.iter().map(|h| h.name.as_str()).collect();
        if let Some(bad) = only.iter().find(|n| !known.contains(&n.as_str())) {
            bail!("--hospitals: '{bad}' is not one of the plan's simulated hospitals ({})", known.join(", "));
        }
        if only.is_empty() {
            bail!("--hospitals lists no hospital; name at least one of {}", known.join(", "));
        }
        sim.hospitals.retain(|h| only.contains(&h.name));
    }
    if let Some(name) = &opts.pool {
        sanctum_protocol::pki::validate_name(name).map_err(|e| anyhow::anyhow!("--pool {name:?}: {e}"))?;
        let dir = work.join("pooled");
        std::fs::create_dir_all(&dir)?;
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
        plan.validate().context("the plan with the selected hospitals")?;
    }
    Ok(())
}

/// Concatenates CSV tables with the same header line into `out` (the header once).
fn pool_csv(files: &[PathBuf], out: &Path) -> anyhow::Result<()> {
    let mut text = String::new();
    let mut header: Option<(String, &Path)> = None;
    for f in files {
        if f.extension().and_then(|e| e.to_str()).is_none_or(|e| !e.eq_ignore_ascii_case("csv")) {
            bail!(
                "--pool concatenates CSV tables; {} is not one (convert it to CSV or simulate without --pool)",
                f.display()
            );
        }
        let body = std::fs::read_to_string(f).with_context(|| format!("--pool: cannot read {}", f.display()))?;
        let (head, rows) = body.split_once('\n').unwrap_or((body.as_str(), ""));
        let head = head.trim_end_matches('\r');
        match &header {
            None => {
                text.push_str(head);
                text.push('\n');
                header = Some((head.to_string(), f));
            }
            Some((h, first)) if h != head => bail!(
                "--pool: {} and {} have different header lines; pooled training needs the same columns in the same order",
                first.display(),
                f.display()
            ),
            Some(_) => {}
        }
        text.push_str(rows);
        if !rows.is_empty() && !rows.ends_with('\n') {
            text.push('\n');
        }
    }
    std::fs::write(out, text).with_context(|| format!("cannot write {}", out.display()))
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

    fn options(hospitals: Option<&[&str]>, pool: Option<&str>) -> SimulateOptions {
        SimulateOptions {
            plan: PathBuf::new(),
            seed: None,
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

        // The defaults change nothing.
        let (mut plan, mut sim) = fresh();
        let before = (plan.clone(), sim.clone());
        select_hospitals(&mut plan, &mut sim, &options(None, None), &dir, work.path()).unwrap();
        assert_eq!((plan, sim), before);
    }
}
