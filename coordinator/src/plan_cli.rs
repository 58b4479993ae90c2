//! `sanctum-coordinator plan …`, `nodes …` and `model …`: the lead's and auditors' commands.
//! `plan submit` and `plan watch` follow a run as it goes ([`crate::watch`]); the one-call
//! commands (`plan list | status | cancel`, `nodes list`, `model export`) are
//! [`crate::admin_cli`]'s, printed here.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use sanctum_protocol::plan::Plan;
use sanctum_protocol::proto::{SubmitPlanRequest, WatchPlanRequest, lead_client::LeadClient};
use sanctum_protocol::tls::{self, TlsMaterial};
use tokio_stream::StreamExt;

use crate::config::{self, LeadConfig};
use crate::{admin_cli, watch};

/// `plan` subcommands.
#[derive(Subcommand)]
pub enum PlanCommand {
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

/// `nodes` subcommands.
#[derive(Subcommand)]
pub enum NodesCommand {
    /// Every node seen: connected or not, last seen, version, device, the runs it takes part in.
    List {
        /// lead.toml or auditor.toml.
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

/// `model` subcommands.
#[derive(Subcommand)]
pub enum ModelCommand {
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

/// Runs one `plan` command; `submit` and `watch` exit 1 when the run fails.
pub async fn run_plan(cmd: PlanCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PlanCommand::Submit { config: path, plan, again } => {
            let text =
                std::fs::read_to_string(&plan).with_context(|| format!("cannot read plan {}", plan.display()))?;
            let mut parsed = Plan::parse(&text).with_context(|| format!("plan {}", plan.display()))?;
            // The schema and model files the plan names, read here: the coordinator gets the hash
            // and, for TorchScript, the file itself.
            let base = plan.parent().unwrap_or(std::path::Path::new("."));
            let files =
                crate::plan_files::resolve(&mut parsed, base).with_context(|| format!("plan {}", plan.display()))?;
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
        PlanCommand::Watch { config: path, id, plan_id, run } => {
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
        PlanCommand::List { config, json } => {
            println!("{}", admin_cli::plan_list(&config, json).await?.trim_end());
            Ok(ExitCode::SUCCESS)
        }
        PlanCommand::Status { config, id, json } => {
            println!("{}", admin_cli::plan_status(&config, &id, json).await?.trim_end());
            Ok(ExitCode::SUCCESS)
        }
        PlanCommand::Cancel { config, id, json } => {
            println!("{}", admin_cli::plan_cancel(&config, &id, json).await?.trim_end());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Runs one `nodes` command.
pub async fn run_nodes(cmd: NodesCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        NodesCommand::List { config, json } => {
            println!("{}", admin_cli::nodes_list(&config, json).await?.trim_end());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Runs one `model` command.
pub async fn run_model(cmd: ModelCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ModelCommand::Export { config, id, out, json } => {
            println!("{}", admin_cli::model_export(&config, &id, &out, json).await?.trim_end());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A lead client for the coordinator `config_path` names (lead.toml).
async fn lead_client(config_path: &std::path::Path) -> anyhow::Result<LeadClient<tonic::transport::Channel>> {
    let cfg: LeadConfig = config::load(config_path)?;
    let material = TlsMaterial::load(&config::resolve_tls(config_path, &cfg.tls))?;
    let channel = tls::connect(&cfg.coordinator, &material).await?;
    Ok(LeadClient::new(channel))
}

/// Follows a run's events until it ends: progress, then the final metrics, ε and model path.
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
