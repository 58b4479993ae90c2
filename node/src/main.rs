//! `sanctum-node`: parse → load and validate config → build → run until SIGTERM or SIGINT, which
//! drain (the directive in flight finishes, a `node_stopped` audit record, exit 0). Bad
//! configuration exits with code 64 before anything connects.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sanctum_node::config::NodeConfig;
use sanctum_node::daemon::{DaemonError, Node};
use sanctum_node::ledger::Charges;
use sanctum_node::{data, train};
use sanctum_protocol::audit::AuditCommand;
use sanctum_protocol::pki;
use sanctum_protocol::privacy::cli::PrivacyCommand;
use sanctum_protocol::tls::TlsMaterial;

const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(name = "sanctum-node", version, about = "Sanctum's hospital node: local policy, local data, local training")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node daemon.
    Run {
        #[arg(long)]
        config: PathBuf,
        /// Exit once the first plan offered to this node is closed (simulations).
        #[arg(long)]
        exit_after_plan: bool,
    },
    /// Check the config, the certificates and every dataset without connecting.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// What each dataset has spent from its privacy budget, per plan run, from the ledger.
    Budget {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// A table against a schema file, offline: counts per column and the first problem.
    #[command(subcommand)]
    Data(sanctum_node::cli_data::DataCommand),
    /// Privacy accounting: ε of a DP-SGD run, or the noise a target ε needs.
    #[command(subcommand)]
    Privacy(PrivacyCommand),
    /// Audit logs, offline: verify this node's (or any) log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Identity: create this hospital's private key and a CSR for the lead to sign.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// TorchScript models: approve one by its hash, list, revoke, inspect.
    #[command(subcommand)]
    Model(sanctum_node::cli_model::ModelCommand),
    /// A released model on this hospital's own test split, offline: the task's metrics.
    Evaluate(sanctum_node::cli_evaluate::EvaluateArgs),
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Create a private key (stays here) and a CSR (send it to the lead).
    Request {
        #[arg(long)]
        name: String,
        #[arg(long)]
        out_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async_main());
    // A drained node may leave a training thread running whose result nobody waits for (nothing
    // of it was charged or sent): do not wait for it to exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

/// Resolves with the signal's name at the first SIGTERM or SIGINT.
async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "SIGINT",
        },
        Err(e) => {
            tracing::warn!("cannot listen for SIGTERM ({e}); only SIGINT drains the node");
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}

async fn async_main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,sanctum_node=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: logs redirected to files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<sanctum_node::config::ConfigError>().is_some()
                || e.downcast_ref::<sanctum_protocol::tls::TlsError>().is_some()
            {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The daemon's error as `main` reports it: a TLS error stays one, so that it exits with code 64
/// as bad configuration (`async_main` looks for it), as it did when the daemon's errors were untyped.
fn daemon_error(e: DaemonError) -> anyhow::Error {
    match e {
        DaemonError::Tls(e) => e.into(),
        e => e.into(),
    }
}

/// A node whose certificate expired is refused by the coordinator; say so, and how to renew,
/// before trying.
fn check_not_expired(cfg: &NodeConfig, material: &TlsMaterial) -> anyhow::Result<()> {
    let not_after = sanctum_protocol::pki::not_after(material.cert_der())?;
    if not_after < time::OffsetDateTime::now_utc() {
        let name = &material.identity().name;
        anyhow::bail!(
            "this node's certificate ({}) expired at {not_after}: the coordinator refuses expired certificates. Ask the consortium lead to renew it (`sanctum-coordinator pki renew --dir PKI {name}`; your private key stays here), put the new certificate at {}, and start the node again",
            material.identity(),
            cfg.tls.cert.display()
        );
    }
    Ok(())
}

fn load(config: &std::path::Path) -> anyhow::Result<(NodeConfig, TlsMaterial, tch::Device)> {
    let cfg = NodeConfig::load(config)?;
    let material = TlsMaterial::load(&cfg.tls)?;
    let config_error = |e: train::DeviceError| sanctum_node::config::ConfigError {
        path: config.to_path_buf(),
        problem: sanctum_node::config::ConfigProblem::Device(e),
    };
    let device = train::parse_device(&cfg.device).map_err(config_error)?;
    train::check_device(device).map_err(config_error)?;
    if let Some(n) = cfg.threads {
        tch::set_num_threads(n as i32);
    }
    Ok((cfg, material, device))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config, exit_after_plan } => {
            let (cfg, material, device) = load(&config)?;
            check_not_expired(&cfg, &material)?;
            let why = match (cfg.device.as_str(), device) {
                ("auto", tch::Device::Cpu) => " (auto: no CUDA device found)",
                ("auto", _) => " (auto: CUDA device found)",
                _ => "",
            };
            tracing::info!(
                node = material.identity().name,
                device = train::device_name(device),
                "starting; training on {}{why}",
                train::device_name(device)
            );
            // The end-to-end tests' hooks, read here only: the library never reads the environment.
            #[cfg(feature = "fault-injection")]
            let faults = sanctum_node::faults::FaultOptions::from_lookup(|var| std::env::var(var).ok())?;
            let node = Node::new(cfg, material, device, exit_after_plan)
                .map_err(daemon_error)
                .context("cannot open the node's state directory")?;
            #[cfg(feature = "fault-injection")]
            let node = node.with_faults(faults);
            let (ask, stop) = tokio::sync::watch::channel(None);
            tokio::spawn(async move {
                let signal = stop_signal().await;
                let _ = ask.send(Some(signal));
            });
            node.run(stop).await.map_err(daemon_error)
        }
        Command::Check { config } => {
            let (cfg, material, device) = load(&config)?;
            println!("identity: {}", material.identity());
            println!("device:   {}", train::device_name(device));
            for d in &cfg.datasets {
                let schema = d.schema().context("the dataset's schema file was not read")?;
                let data =
                    data::load(&d.source(), schema, &data::admit(schema, sanctum_protocol::plan::PrivacyMode::None)?)?;
                println!(
                    "dataset {} (schema {}, SHA-256 {}; {}): {} train rows, {} test rows, task {}, {} features",
                    schema.name(),
                    d.schema.display(),
                    schema.sha256().to_hex(),
                    d.path.display(),
                    data.train_len(),
                    data.test_len(),
                    schema.task(),
                    data.features
                );
                for (column, rows) in &data.dropped {
                    println!("  {rows} row(s) left out: column {column} missing (drop_row)");
                }
                match data::admit(schema, sanctum_protocol::plan::PrivacyMode::Example) {
                    Ok(s) => println!("  under DP: standardised with {s}"),
                    Err(e) => println!("  under DP: refused, {e}"),
                }
            }
            Ok(())
        }
        Command::Data(cmd) => sanctum_node::cli_data::run(&cmd),
        Command::Evaluate(args) => {
            print!("{}", sanctum_node::cli_evaluate::run(&args)?);
            Ok(())
        }
        Command::Budget { config, json } => {
            let cfg = NodeConfig::load(&config)?;
            // Read only: the node may be running and holds the state directory.
            let ledger = Charges::read(&cfg.state_dir)?;
            let cap = cfg.policy.max_epsilon;
            let mut names: Vec<String> = cfg.datasets.iter().map(|d| d.name()).collect();
            names.extend(ledger.datasets());
            names.sort();
            names.dedup();
            let mut out = Vec::new();
            for name in &names {
                let spent = ledger.spent(name, None);
                let mut runs = Vec::new();
                for ((plan_id, run), c) in ledger.runs(name) {
                    let mut v = serde_json::to_value(&c)?;
                    v["releases"] = ledger.releases(&plan_id, &run).into();
                    runs.push(v);
                }
                out.push(serde_json::json!({
                    "dataset": name,
                    "epsilon_spent": spent.epsilon,
                    "delta_spent": spent.delta,
                    "epsilon_cap": cap,
                    "epsilon_remaining": cap.map(|c| (c - spent.epsilon).max(0.0)),
                    "delta_cap": cfg.policy.max_delta,
                    "delta_remaining": cfg.policy.max_delta.map(|c| (c - spent.delta).max(0.0)),
                    "accountant": "pld (connect-the-dots) or zCDP within a plan run; basic composition (sum) across runs",
                    "runs": runs,
                }));
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&out)?);
                return Ok(());
            }
            println!("privacy ledger: {}", ledger.path().display());
            println!("accountant: PLD (connect-the-dots) or zCDP within a plan run; ε and δ add up across runs");
            for name in &names {
                let spent = ledger.spent(name, None);
                let cap_text = match cap {
                    Some(c) => format!("of {c} (remaining {:.3})", (c - spent.epsilon).max(0.0)),
                    None => "(no cap: policy.max_epsilon is not set)".to_string(),
                };
                let delta_text = match cfg.policy.max_delta {
                    Some(c) => format!("of {c:e} (remaining {:e})", (c - spent.delta).max(0.0)),
                    None => "(no cap: policy.max_delta is not set)".to_string(),
                };
                println!(
                    "dataset {name}: ε spent {:.3} {cap_text}, δ spent {:e} {delta_text}",
                    spent.epsilon, spent.delta
                );
                for ((plan_id, run), c) in ledger.runs(name) {
                    let run_text = if run.is_empty() { "(before runs were recorded)".to_string() } else { run.clone() };
                    println!(
                        "  plan {} ({}) run {run_text}: {} release(s), {} steps at q = {:.4}, σ = {:.3}: ε = {:.3}, δ = {:e}",
                        c.plan_name,
                        // Characters, not bytes: a byte slice panics inside a character.
                        plan_id.char_indices().nth(12).map_or(plan_id.as_str(), |(i, _)| &plan_id[..i]),
                        ledger.releases(&plan_id, &run),
                        c.steps,
                        c.sampling_rate,
                        c.noise_multiplier,
                        c.epsilon,
                        ledger.run_spent(&plan_id, &run).delta
                    );
                }
            }
            Ok(())
        }
        Command::Privacy(cmd) => {
            println!("{}", sanctum_protocol::privacy::cli::run(&cmd)?);
            Ok(())
        }
        Command::Audit(cmd) => match sanctum_protocol::audit::run(&cmd) {
            Ok(report) => {
                println!("{report}");
                Ok(())
            }
            Err(reason) => {
                eprintln!("{reason}");
                std::process::exit(1);
            }
        },
        Command::Model(cmd) => {
            print!("{}", sanctum_node::cli_model::run(&cmd)?);
            Ok(())
        }
        Command::Pki(PkiCommand::Request { name, out_dir }) => {
            let (key, csr) = pki::request(&name)?;
            std::fs::create_dir_all(&out_dir)?;
            let key_path = out_dir.join(format!("{name}.key"));
            let csr_path = out_dir.join(format!("{name}.csr"));
            pki::write_private_key(&key_path, &key)
                .with_context(|| format!("cannot create {} (a key is never overwritten)", key_path.display()))?;
            std::fs::write(&csr_path, csr)?;
            println!("private key: {} (keep it here; it never leaves the hospital)", key_path.display());
            println!("request:     {}", csr_path.display());
            println!("next: send {} to the consortium lead for `sanctum-coordinator pki sign`", csr_path.display());
            Ok(())
        }
    }
}
