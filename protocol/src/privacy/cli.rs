//! `privacy epsilon` and `privacy noise`, shared by both binaries so a hospital and the lead get
//! the same answers from the same code.

use clap::{Args, Subcommand};

use super::{Accountant, PrivacyError, SampledGaussian, epsilon, epsilon_with, noise_for_epsilon};

/// Privacy accounting questions.
#[derive(Debug, Subcommand)]
pub enum PrivacyCommand {
    /// ε spent by T steps of DP-SGD (Poisson sampling at rate Q, noise multiplier S) at δ.
    Epsilon {
        #[command(flatten)]
        run: RunArgs,
        /// Noise multiplier σ (noise standard deviation / clipping norm).
        #[arg(long)]
        noise_multiplier: f64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The smallest noise multiplier that keeps ε at or below a target.
    Noise {
        #[command(flatten)]
        run: RunArgs,
        #[arg(long)]
        target_epsilon: f64,
        /// Accountant that must certify the target: pld (tight) or rdp.
        #[arg(long, value_enum, default_value_t = AccountantArg::Pld)]
        accountant: AccountantArg,
        #[arg(long)]
        json: bool,
    },
}

/// The run being accounted.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Poisson sampling rate q (expected batch size / dataset size).
    #[arg(long)]
    pub sampling_rate: f64,
    /// Number of DP-SGD steps.
    #[arg(long)]
    pub steps: u64,
    #[arg(long)]
    pub delta: f64,
}

/// Accountant choice on the command line.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum AccountantArg {
    Pld,
    Rdp,
}

impl From<AccountantArg> for Accountant {
    fn from(a: AccountantArg) -> Self {
        match a {
            AccountantArg::Pld => Accountant::Pld,
            AccountantArg::Rdp => Accountant::Rdp,
        }
    }
}

/// Answers a privacy question; returns the text to print.
pub fn run(cmd: &PrivacyCommand) -> Result<String, PrivacyError> {
    match cmd {
        PrivacyCommand::Epsilon { run, noise_multiplier, json } => {
            let g = SampledGaussian {
                sampling_rate: run.sampling_rate,
                noise_multiplier: *noise_multiplier,
                steps: run.steps,
            };
            let r = epsilon(&g, run.delta)?;
            if *json {
                return Ok(serde_json::to_string_pretty(&r).unwrap_or_default());
            }
            Ok(format!(
                "q = {}, σ = {}, T = {}, δ = {:e}\n  RDP (Mironov et al. 2019, Opacus's orders): ε = {:.4} (order α = {})\n  PLD (connect-the-dots, interval 1e-4):      ε = {:.4} (tight)",
                r.sampling_rate, r.noise_multiplier, r.steps, r.delta, r.rdp_epsilon, r.rdp_order, r.pld_epsilon
            ))
        }
        PrivacyCommand::Noise { run, target_epsilon, accountant, json } => {
            let acc: Accountant = (*accountant).into();
            let sigma = noise_for_epsilon(acc, *target_epsilon, run.sampling_rate, run.steps, run.delta)?;
            let g = SampledGaussian { sampling_rate: run.sampling_rate, noise_multiplier: sigma, steps: run.steps };
            let rdp = epsilon_with(Accountant::Rdp, &g, run.delta)?;
            let pld = epsilon_with(Accountant::Pld, &g, run.delta)?;
            if *json {
                let v = serde_json::json!({
                    "noise_multiplier": sigma, "accountant": acc, "target_epsilon": target_epsilon,
                    "sampling_rate": run.sampling_rate, "steps": run.steps, "delta": run.delta,
                    "rdp_epsilon": rdp, "pld_epsilon": pld,
                });
                return Ok(serde_json::to_string_pretty(&v).unwrap_or_default());
            }
            Ok(format!(
                "noise multiplier σ = {sigma:.4} keeps ε ≤ {target_epsilon} under {} (q = {}, T = {}, δ = {:e})\n  at that σ: RDP ε = {rdp:.4}, PLD ε = {pld:.4}",
                match acc {
                    Accountant::Pld => "PLD",
                    Accountant::Rdp => "RDP",
                },
                run.sampling_rate,
                run.steps,
                run.delta
            ))
        }
    }
}
