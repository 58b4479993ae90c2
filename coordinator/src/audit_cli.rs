//! `sanctum-coordinator audit …`: verify any audit log offline; as an auditor (or the lead),
//! fetch the coordinator's log and its signed head and list the plans it ran; write the HTML and
//! Markdown report ([`crate::report`]) from verified logs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use sanctum_protocol::audit::AuditCommand;
use sanctum_protocol::proto::{self, audit_client::AuditClient};
use sanctum_protocol::tls::{self, TlsMaterial};
use sanctum_protocol::transfer::CHUNK_BYTES;

use crate::config::{self, LeadConfig};
use crate::status::head;

/// `audit` subcommands: offline verification, and the auditor's read-only calls.
#[derive(Subcommand)]
pub enum AuditCli {
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

/// Runs one `audit` command: exit 1 when a log fails verification or the report finds a
/// countersignature failed, missing or mismatched.
pub async fn run(cmd: AuditCli) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCli::Fetch { config: path, out } => {
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
        AuditCli::Report { log, node_logs, ca, out, allow_unverified } => {
            let written = match crate::report::write(&log, &node_logs, ca.as_deref(), &out, allow_unverified) {
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
        AuditCli::Plans { config: path, json } => {
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
        AuditCli::Offline(cmd) => Ok(audit_verdict(&cmd)),
    }
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
