//! `sanctum-coordinator`: parse → load config → build → run. Bad configuration exits with code 64
//! before anything binds a port. `serve` is here; every other command is a library module's
//! (`pki_cli`, `plan_cli`, `audit_cli`, `admin_cli`, the protocol's privacy CLI, `simulate`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sanctum_coordinator::config::{self, CoordinatorConfig};
use sanctum_coordinator::service::{Coordinator, CoordinatorOptions, RevocationListError, ServeError, StartError};
use sanctum_coordinator::simulate::{SimulateOptions, simulate};
use sanctum_coordinator::{audit_cli, pki_cli, plan_cli};
use sanctum_protocol::privacy::cli::PrivacyCommand;
use sanctum_protocol::tls::{self, TlsMaterial};

/// jemalloc, not the system's allocator: a coordinator runs for months with tens of uploads at
/// once, each with its own megabyte buffers on its own worker thread, and glibc's per-thread
/// arenas kept that memory fragmented (the resident set after each round of 50 uploads of 40 MB
/// climbed, and the peak was 12× the model; BENCHMARKS.md, section 5).
#[cfg(all(unix, not(target_env = "musl")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    Pki(pki_cli::PkiCommand),
    /// Submit, list, inspect, cancel and follow training plans (list and status: auditors too).
    #[command(subcommand)]
    Plan(plan_cli::PlanCommand),
    /// The nodes seen since the coordinator started (lead or auditor certificate).
    #[command(subcommand)]
    Nodes(plan_cli::NodesCommand),
    /// The final models of finished runs (lead certificate).
    #[command(subcommand)]
    Model(plan_cli::ModelCommand),
    /// Privacy accounting: ε of a DP-SGD run, or the noise a target ε needs.
    #[command(subcommand)]
    Privacy(PrivacyCommand),
    /// Audit logs: verify any log offline; fetch the coordinator's and list plans as an auditor.
    #[command(subcommand)]
    Audit(audit_cli::AuditCli),
    /// Run a plan's [simulation] hospitals as real node processes over loopback mutual TLS.
    Simulate {
        #[arg(long)]
        plan: PathBuf,
        #[arg(long)]
        seed: Option<u64>,
        /// How the initial model is drawn from the seed: `chacha20` (Sanctum's) or `pytorch`
        /// (exactly PyTorch's after `torch.manual_seed(seed)`, to start where a PyTorch baseline
        /// such as FLamby's starts); overrides the plan's `init`.
        #[arg(long, value_parser = parse_init)]
        init: Option<sanctum_protocol::plan::InitScheme>,
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
            if is_config_error(&e) { ExitCode::from(EXIT_CONFIG) } else { ExitCode::FAILURE }
        }
    }
}

/// Whether `e` is the operator's to fix in a file (a config, TLS material, the revocation list):
/// exit 64, as `sysexits.h`'s EX_USAGE. Typed errors that wrap one transparently are looked into,
/// since a transparent wrapper hides the inner error from the chain.
fn is_config_error(e: &anyhow::Error) -> bool {
    e.downcast_ref::<config::ConfigError>().is_some()
        || e.downcast_ref::<tls::TlsError>().is_some()
        || e.downcast_ref::<RevocationListError>().is_some()
        || matches!(e.downcast_ref::<StartError>(), Some(StartError::RevocationList(_)))
        || matches!(e.downcast_ref::<ServeError>(), Some(ServeError::Tls(_)))
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

/// Serves, or hands the command to its module.
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
                    // The test hooks, only in a `fault-injection` build; only `main` reads the
                    // environment for them.
                    #[cfg(feature = "fault-injection")]
                    faults: sanctum_coordinator::faults::FaultOptions::from_lookup(|v| std::env::var(v).ok())?,
                },
                &material,
            )?;
            // The read-only status page and metrics (`[status]`), logged with the address bound.
            if let Some(status) = &cfg.status {
                coordinator.serve_status(status, &material).await?;
            }
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
        Command::Pki(cmd) => {
            print!("{}", pki_cli::run(cmd)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan(cmd) => plan_cli::run_plan(cmd).await,
        Command::Nodes(cmd) => plan_cli::run_nodes(cmd).await,
        Command::Model(cmd) => plan_cli::run_model(cmd).await,
        Command::Privacy(cmd) => {
            println!("{}", sanctum_protocol::privacy::cli::run(&cmd)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit(cmd) => audit_cli::run(cmd).await,
        Command::Simulate {
            plan,
            seed,
            init,
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
                init,
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

/// `--init`: the names a plan's `init` takes.
fn parse_init(s: &str) -> Result<sanctum_protocol::plan::InitScheme, String> {
    match s {
        "chacha20" => Ok(sanctum_protocol::plan::InitScheme::Chacha20),
        "pytorch" => Ok(sanctum_protocol::plan::InitScheme::Pytorch),
        other => Err(format!("unknown init '{other}': use chacha20 or pytorch")),
    }
}
