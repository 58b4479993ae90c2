//! `sanctum-coordinator`: parse → load config → build → run. Bad configuration exits with code 64
//! before anything binds a port.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sanctum_coordinator::config::{self, CoordinatorConfig, LeadConfig};
use sanctum_coordinator::service::{Coordinator, CoordinatorOptions, RevocationListError};
use sanctum_coordinator::simulate::{SimulateOptions, simulate};
use sanctum_coordinator::{admin_cli, pki, watch};
use sanctum_protocol::audit::AuditCommand;
use sanctum_protocol::pki::Role;
use sanctum_protocol::plan::Plan;
use sanctum_protocol::privacy::cli::PrivacyCommand;
use sanctum_protocol::proto::{
    self, SubmitPlanRequest, WatchPlanRequest, audit_client::AuditClient, lead_client::LeadClient,
};
use sanctum_protocol::tls::{self, TlsMaterial};
use sanctum_protocol::transfer::CHUNK_BYTES;
use tokio_stream::StreamExt;

/// Exit code for unusable configuration or arguments (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(name = "sanctum-coordinator", version, about = "Sanctum's coordinator: PKI, plans, rounds and aggregation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the coordinator service.
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// Manage the consortium PKI.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Submit, list, inspect, cancel and follow training plans (list and status: auditors too).
    #[command(subcommand)]
    Plan(PlanCommand),
    /// The nodes seen since the coordinator started (lead or auditor certificate).
    #[command(subcommand)]
    Nodes(NodesCommand),
    /// The final models of finished runs (lead certificate).
    #[command(subcommand)]
    Model(ModelCommand),
    /// Privacy accounting: ε of a DP-SGD run, or the noise a target ε needs.
    #[command(subcommand)]
    Privacy(PrivacyCommand),
    /// Audit logs: verify any log offline; fetch the coordinator's and list plans as an auditor.
    #[command(subcommand)]
    Audit(AuditCli),
    /// Run a plan's [simulation] hospitals as real node processes over loopback mutual TLS.
    Simulate {
        #[arg(long)]
        plan: PathBuf,
        #[arg(long)]
        seed: Option<u64>,
        /// Write a JSON summary here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Keep PKI, logs, models and exports here instead of a temporary directory.
        #[arg(long)]
        workdir: Option<PathBuf>,
        /// The sanctum-node binary (default: next to this one).
        #[arg(long)]
        node_bin: Option<PathBuf>,
        /// Device for the nodes: auto, cpu or cuda.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Give every simulated hospital this ε cap (policy.max_epsilon).
        #[arg(long)]
        max_epsilon: Option<f64>,
        /// Every simulated hospital's policy.test_metrics: `exact` (default: a simulation is run on
        /// data whose owner wants to see the accuracy), `auto` (none under DP) or `none`.
        #[arg(long, default_value = "exact", value_parser = ["exact", "auto", "none"])]
        test_metrics: String,
        /// A TorchScript plan: do not approve its model at the simulated hospitals (each then
        /// refuses the plan, naming the hash), to see what an unapproved model does.
        #[arg(long)]
        no_approve: bool,
        /// Only these of the plan's hospitals (comma-separated), e.g. one for local-only training;
        /// min_nodes is lowered to their number.
        #[arg(long, value_delimiter = ',')]
        hospitals: Option<Vec<String>>,
        /// Pooled training: one hospital of this name holding every (selected) hospital's rows,
        /// their CSV tables concatenated into the work directory.
        #[arg(long, value_name = "NAME")]
        pool: Option<String>,
    },
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Create the consortium CA, the coordinator's certificate and the lead's certificate.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "sanctum")]
        consortium: String,
        /// Host names or IPs the coordinator is reached at (repeatable).
        #[arg(long = "host", default_values_t = vec!["localhost".to_string(), "127.0.0.1".to_string()])]
        hosts: Vec<String>,
        #[arg(long, default_value = "lead")]
        lead_name: String,
        #[arg(long, default_value_t = 90)]
        days: i64,
    },
    /// Sign a member's CSR; the identity and role are decided here, not by the request.
    Sign {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        csr: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "node")]
        role: String,
        #[arg(long, default_value_t = 90)]
        days: i64,
        /// Where to write the certificate (default: DIR/issued/NAME.pem).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Every certificate the CA issued: name, role, expiry and status (valid, expired, revoked).
    List {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Revoke every certificate of a member; a coordinator following DIR/revoked.json refuses it
    /// within a second, without a restart.
    Revoke {
        #[arg(long)]
        dir: PathBuf,
        name: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Issue a member a fresh certificate for the same key (its private key never moves).
    Renew {
        #[arg(long)]
        dir: PathBuf,
        name: String,
        #[arg(long, default_value_t = 90)]
        days: i64,
    },
}

/// `audit` subcommands: offline verification, and the auditor's read-only calls.
#[derive(Subcommand)]
enum AuditCli {
    #[command(flatten)]
    Offline(AuditCommand),
    /// Download the coordinator's audit log and its signed head (auditor or lead certificate),
    /// then verify them offline.
    Fetch {
        /// auditor.toml: coordinator address and the auditor's certificate.
        #[arg(long)]
        config: PathBuf,
        /// Directory to write coordinator-audit.jsonl and its head into.
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a self-contained HTML report (and a Markdown variant) from verified audit logs: per
    /// plan and per hospital, with ε against each hospital's cap plotted, and every
    /// countersignature re-verified (and cross-checked against the hospitals' logs given). A log
    /// that fails verification refuses the report (exit 1) unless --allow-unverified.
    Report {
        /// The coordinator's audit log (e.g. from `audit fetch`).
        #[arg(long)]
        log: PathBuf,
        /// A hospital's audit log (repeatable).
        #[arg(long = "node-log")]
        node_logs: Vec<PathBuf>,
        /// The consortium CA certificate, to check every writer's certificate.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Directory for report.html and report.md.
        #[arg(long)]
        out: PathBuf,
        /// Write the report even when a log fails verification: that log is a red row and none of
        /// its records are used.
        #[arg(long)]
        allow_unverified: bool,
    },
    /// List the plans the coordinator ran and their rounds (auditor or lead certificate).
    Plans {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PlanCommand {
    /// Submit a plan and follow it until it finishes.
    Submit {
        /// lead.toml: coordinator address and the lead's certificate.
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        plan: PathBuf,
        /// Run a plan that already ran again, as a new run: every hospital accounts it in full
        /// against its privacy budget. Without it such a plan is refused.
        #[arg(long)]
        again: bool,
    },
    /// Follow a run: ID is a run id, or a plan id (its latest run), or a unique prefix of either.
    Watch {
        #[arg(long)]
        config: PathBuf,
        #[arg(required_unless_present = "plan_id", conflicts_with = "plan_id")]
        id: Option<String>,
        /// The plan (its id, as `plan submit` printed it); the older form of ID.
        #[arg(long)]
        plan_id: Option<String>,
        /// With --plan-id: the run to follow; default: the plan's latest run.
        #[arg(long, default_value = "", requires = "plan_id")]
        run: String,
    },
    /// Every run since the coordinator started: run, plan, name, status, rounds, start and end.
    List {
        /// lead.toml or auditor.toml.
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// One run: status, round, each participant's state, the last round's metrics, ε, the reason
    /// it ended. ID: a run id, or a plan id (its latest run), or a unique prefix of either.
    Status {
        #[arg(long)]
        config: PathBuf,
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// End a running run (lead only): it fails with "cancelled by <lead>" and its nodes are told.
    Cancel {
        #[arg(long)]
        config: PathBuf,
        id: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum NodesCommand {
    /// Every node seen: connected or not, last seen, version, device, the runs it takes part in.
    List {
        /// lead.toml or auditor.toml.
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Write a finished run's final model (safetensors) to FILE and its manifest (the hash chain
    /// of every round's model) to FILE.manifest.json, after checking the model against it.
    Export {
        #[arg(long)]
        config: PathBuf,
        /// A run id, or a plan id (its latest run), or a unique prefix of either.
        id: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: logs redirected to files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // The simulator prints its own progress; the service logs what it does.
    init_tracing(match cli.command {
        Command::Simulate { .. } => "warn",
        _ => "warn,sanctum_coordinator=info",
    });
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<config::ConfigError>().is_some()
                || e.downcast_ref::<tls::TlsError>().is_some()
                || e.downcast_ref::<RevocationListError>().is_some()
            {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The first `n` characters of `s`: a hash, or whatever a peer sent in its place, never cut
/// inside a character (a byte slice of "a東京" at 2 panics).
fn head(s: &str, n: usize) -> &str {
    s.char_indices().nth(n).map_or(s, |(i, _)| &s[..i])
}

/// One plan of `audit plans`, as text: every field the coordinator sent is shown as text.
fn plan_line(p: &sanctum_protocol::proto::PlanSummary) -> String {
    format!(
        "{} {} ({}): {}, {}/{} rounds, final model {}",
        head(&p.plan_id, 12),
        p.name,
        p.reason,
        p.status,
        p.rounds_completed,
        p.rounds_planned,
        head(&p.final_model_sha256, 12)
    )
}

/// Waits for SIGINT or SIGTERM; returns which.
async fn shutdown_signal() -> &'static str {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return "SIGINT";
            }
        };
        tokio::select! { _ = ctrl_c => "SIGINT", _ = term.recv() => "SIGTERM" }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
        "SIGINT"
    }
}

async fn lead_client(config_path: &std::path::Path) -> anyhow::Result<LeadClient<tonic::transport::Channel>> {
    let cfg: LeadConfig = config::load(config_path)?;
    let material = TlsMaterial::load(&config::resolve_tls(config_path, &cfg.tls))?;
    let channel = tls::connect(&cfg.coordinator, &material).await?;
    Ok(LeadClient::new(channel))
}

async fn follow_remote(
    client: &mut LeadClient<tonic::transport::Channel>,
    plan_id: &str,
    run: &str,
    rounds: u32,
) -> anyhow::Result<ExitCode> {
    let stream = client
        .watch_plan(WatchPlanRequest { plan_id: plan_id.to_string(), run: run.to_string() })
        .await
        .map_err(|s| anyhow::anyhow!("cannot watch the plan: {}", s.message()))?
        .into_inner();
    let events = stream.filter_map(|e| e.ok());
    let finished = watch::follow(events, rounds, "metric").await.context("the coordinator closed the watch stream")?;
    println!(
        "plan {}: {} after {} round(s): {}",
        plan_id,
        if finished.success { "finished" } else { "FAILED" },
        finished.rounds_completed,
        finished.reason
    );
    for m in &finished.final_metrics {
        // Each metric under its own name (a node reports every metric of its task).
        let name = if m.name.is_empty() { &finished.metric_name } else { &m.name };
        println!("  {:<14} {name} {:.4} on {} test samples", m.node, m.value, m.samples);
    }
    if finished.client_epsilon > 0.0 {
        println!(
            "client-level DP: ε = {:.3}, δ = {:e} for each hospital",
            finished.client_epsilon, finished.client_delta
        );
    }
    if !finished.model_path.is_empty() {
        println!("final model: {}", finished.model_path);
    }
    Ok(if finished.success { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Runs `audit verify`: the report on stdout and success, or the first bad record on stderr and 1.
fn audit_verdict(cmd: &AuditCommand) -> ExitCode {
    match sanctum_protocol::audit::run(cmd) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(reason) => {
            eprintln!("{reason}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve { config: path } => {
            let cfg: CoordinatorConfig = config::load_coordinator(&path)?;
            let material = TlsMaterial::load(&config::resolve_tls(&path, &cfg.tls))?;
            let base = path.parent().unwrap_or(std::path::Path::new("."));
            let coordinator = Coordinator::start(
                CoordinatorOptions {
                    state_dir: config::resolve(base, &cfg.state_dir),
                    evaluation_deadline: Duration::from_secs(cfg.evaluation_deadline_secs),
                    revocation_list: cfg.revocation_list.as_ref().map(|p| config::resolve(base, p)),
                    limits: cfg.limits.clone(),
                    store: cfg.store.resolve_paths(base),
                },
                &material,
            )?;
            let listener = tokio::net::TcpListener::bind(cfg.listen)
                .await
                .with_context(|| format!("cannot listen on {}", cfg.listen))?;
            // Tests and scripts read the bound address from this line (listen on port 0 works).
            println!("listening on {}", listener.local_addr()?);
            // On SIGTERM or SIGINT the driver records the stop and lets the nodes go (running runs
            // resume at the next start), then the server drains.
            let draining = coordinator.clone();
            let shutdown = async move {
                let signal = shutdown_signal().await;
                draining.drain(signal).await;
            };
            coordinator.serve(listener, &material, shutdown).await?;
            eprintln!("coordinator stopped");
            Ok(ExitCode::SUCCESS)
        }
        Command::Pki(PkiCommand::Init { dir, consortium, hosts, lead_name, days }) => {
            let out = pki::init(&dir, &consortium, &hosts, &lead_name, days)?;
            println!("consortium CA:           {}", out.ca_cert.display());
            println!("coordinator certificate: {} (hosts: {})", out.coordinator_cert.display(), hosts.join(", "));
            println!("lead certificate:        {}", out.lead_cert.display());
            println!(
                "next: give {} to each hospital; sign their CSRs with `sanctum-coordinator pki sign`",
                out.ca_cert.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Pki(PkiCommand::Sign { dir, csr, name, role, days, out }) => {
            let role: Role = role.parse()?;
            let pem = pki::sign(&dir, &csr, &name, role, days)?;
            // The CA keeps what it issued (for `pki list`, `renew` and `revoke`), wherever the copy
            // for the member goes.
            pki::keep_issued(&dir, &name, &pem)?;
            let out = out.unwrap_or_else(|| dir.join("issued").join(format!("{name}.pem")));
            if let Some(parent) = out.parent() {
                std::fs::create_dir_all(parent)?;
            }
            pki::write_public(&out, &pem)?;
            println!("signed {name} as {role} for {days} days: {}", out.display());
            println!("next: send {} and ca.pem back to {name}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Pki(PkiCommand::List { dir, json }) => {
            let certs = pki::list(&dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&certs)?);
            } else {
                println!("{:<16} {:<12} {:<10} {:<28} fingerprint", "name", "role", "status", "expires");
                for c in &certs {
                    println!(
                        "{:<16} {:<12} {:<10} {:<28} {}",
                        c.name,
                        c.role,
                        c.status,
                        c.not_after,
                        head(&c.fingerprint, 16)
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Pki(PkiCommand::Revoke { dir, name, reason }) => {
            for r in pki::revoke(&dir, &name, &reason)? {
                println!("revoked {} (certificate {}) at {}", r.name, head(&r.fingerprint, 16), r.revoked_at);
            }
            println!(
                "a coordinator with revocation_list = \"{}\" refuses it within a second",
                dir.join("revoked.json").display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Pki(PkiCommand::Renew { dir, name, days }) => {
            let (_, path) = pki::renew(&dir, &name, days)?;
            println!("renewed {name} for {days} days: {}", path.display());
            println!(
                "next: send {} to {name}; it replaces its certificate file and restarts its node (same key)",
                path.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan(PlanCommand::Submit { config: path, plan, again }) => {
            let text =
                std::fs::read_to_string(&plan).with_context(|| format!("cannot read plan {}", plan.display()))?;
            let mut parsed = Plan::parse(&text).with_context(|| format!("plan {}", plan.display()))?;
            // The schema and model files the plan names, read here: the coordinator gets the hash
            // and, for TorchScript, the file itself.
            let base = plan.parent().unwrap_or(std::path::Path::new("."));
            let files = sanctum_coordinator::plan_files::resolve(&mut parsed, base)
                .with_context(|| format!("plan {}", plan.display()))?;
            let plan_toml = toml::to_string(&parsed).context("cannot encode the plan")?;
            let mut client = lead_client(&path).await?;
            let submitted = client
                .submit_plan(SubmitPlanRequest { plan_toml, again, model_file: files.model_file })
                .await
                .map_err(|s| anyhow::anyhow!("the coordinator refused the plan: {}", s.message()))?
                .into_inner();
            println!(
                "plan '{}' submitted: {} (run {}, {})",
                parsed.name, submitted.plan_id, submitted.run_number, submitted.run
            );
            // Only this run's events: a plan that ran before has its own history.
            follow_remote(&mut client, &submitted.plan_id, &submitted.run, parsed.rounds).await
        }
        Command::Plan(PlanCommand::Watch { config: path, id, plan_id, run }) => {
            let (plan_id, run, rounds) = match (id, plan_id) {
                (Some(id), _) => {
                    let status = admin_cli::status_of(&path, &id).await?;
                    let p = status.plan.unwrap_or_default();
                    (p.plan_id, p.run, p.rounds_planned)
                }
                (None, Some(plan_id)) => (plan_id, run, 0),
                (None, None) => anyhow::bail!("give the run to watch: `plan watch ID` (see `plan list`)"),
            };
            let mut client = lead_client(&path).await?;
            follow_remote(&mut client, &plan_id, &run, rounds).await
        }
        Command::Plan(PlanCommand::List { config, json }) => {
            println!("{}", admin_cli::plan_list(&config, json).await?.trim_end());
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan(PlanCommand::Status { config, id, json }) => {
            println!("{}", admin_cli::plan_status(&config, &id, json).await?.trim_end());
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan(PlanCommand::Cancel { config, id, json }) => {
            println!("{}", admin_cli::plan_cancel(&config, &id, json).await?.trim_end());
            Ok(ExitCode::SUCCESS)
        }
        Command::Nodes(NodesCommand::List { config, json }) => {
            println!("{}", admin_cli::nodes_list(&config, json).await?.trim_end());
            Ok(ExitCode::SUCCESS)
        }
        Command::Model(ModelCommand::Export { config, id, out, json }) => {
            println!("{}", admin_cli::model_export(&config, &id, &out, json).await?.trim_end());
            Ok(ExitCode::SUCCESS)
        }
        Command::Privacy(cmd) => {
            println!("{}", sanctum_protocol::privacy::cli::run(&cmd)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit(AuditCli::Fetch { config: path, out }) => {
            let cfg: LeadConfig = config::load(&path)?;
            let material = TlsMaterial::load(&config::resolve_tls(&path, &cfg.tls))?;
            let channel = tls::connect(&cfg.coordinator, &material).await?;
            let mut client = AuditClient::new(channel).max_decoding_message_size(2 * CHUNK_BYTES);
            let mut stream = client.stream_audit_log(proto::AuditLogRequest {}).await?.into_inner();
            let (mut log, mut head) = (Vec::new(), Vec::new());
            while let Some(chunk) = stream.message().await? {
                log.extend_from_slice(&chunk.log);
                if !chunk.head.is_empty() {
                    head = chunk.head;
                }
            }
            std::fs::create_dir_all(&out)?;
            let file = out.join("coordinator-audit.jsonl");
            std::fs::write(&file, &log)?;
            std::fs::write(sanctum_protocol::audit::head_path(&file), &head)?;
            println!("fetched {} bytes to {}", log.len(), file.display());
            let verify = AuditCommand::Verify { log: file, ca: Some(config::resolve_tls(&path, &cfg.tls).ca) };
            Ok(audit_verdict(&verify))
        }
        Command::Audit(AuditCli::Report { log, node_logs, ca, out, allow_unverified }) => {
            let written =
                match sanctum_coordinator::report::write(&log, &node_logs, ca.as_deref(), &out, allow_unverified) {
                    Ok(w) => w,
                    Err(e) => {
                        eprintln!("audit report: {e}");
                        return Ok(ExitCode::FAILURE);
                    }
                };
            let f = &written.findings;
            println!("report: {}\nmarkdown: {}", written.html.display(), written.md.display());
            println!(
                "countersignatures: {} verified of {}, {} mismatch(es) with the hospitals' logs, {} missing{}{}",
                f.countersignatures_verified,
                f.countersignatures,
                f.mismatches,
                f.missing,
                if f.unchecked > 0 {
                    format!("; {} NOT CHECKED against a CA (pass --ca)", f.unchecked)
                } else {
                    String::new()
                },
                if f.unverified_logs > 0 {
                    format!("; {} UNVERIFIED log(s), shown in red", f.unverified_logs)
                } else {
                    String::new()
                }
            );
            if ca.is_none() {
                eprintln!(
                    "audit report: no --ca given, so no certificate was checked against the consortium CA and no countersignature counts as verified"
                );
            }
            // The report is written either way; a countersignature that failed, is missing or
            // mismatches makes the exit status 1, so a script cannot mistake it for a clean audit.
            if f.failed() {
                eprintln!(
                    "audit report: {} countersignature(s) FAILED verification, {} MISSING, {} MISMATCH with the hospitals' logs: see {}",
                    f.countersignatures - f.countersignatures_verified - f.unchecked,
                    f.missing,
                    f.mismatches,
                    written.md.display()
                );
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit(AuditCli::Plans { config: path, json }) => {
            let cfg: LeadConfig = config::load(&path)?;
            let material = TlsMaterial::load(&config::resolve_tls(&path, &cfg.tls))?;
            let mut client = AuditClient::new(tls::connect(&cfg.coordinator, &material).await?);
            let plans = client.list_plans(proto::ListPlansRequest {}).await?.into_inner().plans;
            if json {
                let v: Vec<serde_json::Value> = plans
                    .iter()
                    .map(|p| {
                        serde_json::json!({
                            "plan_id": p.plan_id, "name": p.name, "status": p.status,
                            "rounds_planned": p.rounds_planned, "rounds_completed": p.rounds_completed,
                            "final_model_sha256": p.final_model_sha256, "reason": p.reason,
                            "rounds": p.rounds.iter().map(|r| serde_json::json!({
                                "round": r.round, "reported": r.reported, "dropped": r.dropped, "model_sha256": r.new_model_sha256,
                            })).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for p in &plans {
                    println!("{}", plan_line(p));
                    for r in &p.rounds {
                        println!("  round {}: {} reported, dropped {:?}", r.round, r.reported.len(), r.dropped);
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit(AuditCli::Offline(cmd)) => Ok(audit_verdict(&cmd)),
        Command::Simulate {
            plan,
            seed,
            json,
            workdir,
            node_bin,
            device,
            max_epsilon,
            test_metrics,
            no_approve,
            hospitals,
            pool,
        } => {
            let summary = simulate(&SimulateOptions {
                plan,
                seed,
                json,
                workdir,
                node_bin,
                device,
                max_epsilon,
                test_metrics,
                approve_models: !no_approve,
                hospitals,
                pool,
            })
            .await?;
            Ok(if summary.finished.success { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_reasons_in_any_script_are_shown_as_text() {
        assert_eq!(head("a東京大学病院", 3), "a東京");
        assert_eq!(head("Hôpital-Universitaire-Genève", 12), "Hôpital-Univ");
        assert_eq!(head("abc", 12), "abc");
        assert_eq!(head("", 12), "");
        // Byte 12 of each falls inside a character: slicing bytes panicked here.
        let p = sanctum_protocol::proto::PlanSummary {
            plan_id: "a東京大学病院-フェデレーテッド".into(),
            name: "Hôpital-Universitaire-Genève".into(),
            reason: "病院の方針により拒否されました".into(),
            status: "failed".into(),
            final_model_sha256: format!("a{}", "é".repeat(12)),
            rounds_planned: 3,
            rounds_completed: 1,
            ..Default::default()
        };
        assert!(!p.plan_id.is_char_boundary(12) && !p.final_model_sha256.is_char_boundary(12));
        assert_eq!(
            plan_line(&p),
            "a東京大学病院-フェデレ Hôpital-Universitaire-Genève (病院の方針により拒否されました): failed, 1/3 rounds, final model aééééééééééé"
        );
    }
}
