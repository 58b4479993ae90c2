//! The lead's and auditors' admin commands: `plan list | status ID | cancel ID`, the id
//! resolution `plan watch ID` uses, `nodes list` and `model export ID --out FILE`.
//!
//! Each command is one call (read-only ones on the `Audit` service, which both an auditor's and
//! the lead's certificate may call; `cancel` and `export` on `Lead`, the lead's alone) and its
//! output, as text for a person or `--json` for a script. The text and JSON are pure functions of
//! the response, tested here; an export is checked (its SHA-256 against the manifest's final
//! model and the last entry of its hash chain) before a byte is written.

use std::path::{Path, PathBuf};

use anyhow::Context;
use sanctum_protocol::hash::ContentHash;
use sanctum_protocol::proto::{
    self, CancelPlanRequest, ExportModelRequest, ListNodesRequest, ListNodesResponse, ListPlansRequest,
    PlanStatusRequest, PlanStatusResponse, PlanSummary, audit_client::AuditClient, lead_client::LeadClient,
};
use sanctum_protocol::tls::{self, TlsMaterial};
use sanctum_protocol::transfer::CHUNK_BYTES;
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::config::{self, LeadConfig};
use crate::status::head;

/// A channel to the coordinator named in `config` (lead.toml or auditor.toml: the same form),
/// holding that file's certificate.
async fn connect(config_path: &Path) -> anyhow::Result<Channel> {
    let cfg: LeadConfig = config::load(config_path)?;
    let material = TlsMaterial::load(&config::resolve_tls(config_path, &cfg.tls))?;
    Ok(tls::connect(&cfg.coordinator, &material).await?)
}

/// What the coordinator said, as an error naming what was asked and the next step where the
/// cause is the certificate.
fn refused(what: &str, s: tonic::Status) -> anyhow::Error {
    let next = match s.code() {
        tonic::Code::PermissionDenied => {
            "; this needs the lead's certificate: pass --config with the lead's lead.toml".to_string()
        }
        tonic::Code::Unavailable => {
            "; check that the coordinator is running and reachable at the address in --config".to_string()
        }
        _ => String::new(),
    };
    anyhow::anyhow!("cannot {what}: {}{next}", s.message())
}

/// `2025-01-31T12:00:00Z` (seconds), or "-" for 0 (not yet).
pub fn time_text(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "-".into();
    }
    i64::try_from(unix_ms / 1000)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| format!("{unix_ms} ms"))
}

fn time_json(unix_ms: u64) -> Value {
    if unix_ms == 0 { Value::Null } else { json!(time_text(unix_ms)) }
}

/// The runs as a table: run id, plan id (short), name, status, rounds done/planned, start, end.
pub fn list_text(plans: &[PlanSummary]) -> String {
    if plans.is_empty() {
        return "no runs since the coordinator started; submit one with `sanctum-coordinator plan submit`".into();
    }
    let mut out = format!(
        "{:<12} {:<12} {:<24} {:<10} {:>7}  {:<20}  {:<20}\n",
        "run", "plan", "name", "status", "rounds", "started", "finished"
    );
    for p in plans {
        out += &format!(
            "{:<12} {:<12} {:<24} {:<10} {:>7}  {:<20}  {:<20}\n",
            head(&p.run, 12),
            head(&p.plan_id, 12),
            head(&p.name, 24),
            p.status,
            format!("{}/{}", p.rounds_completed, p.rounds_planned),
            time_text(p.started_unix_ms),
            time_text(p.finished_unix_ms),
        );
    }
    out
}

/// One run's summary as JSON (without its rounds).
pub fn summary_json(p: &PlanSummary) -> Value {
    json!({
        "run": p.run, "run_number": p.run_number, "plan_id": p.plan_id, "name": p.name, "status": p.status,
        "rounds_completed": p.rounds_completed, "rounds_planned": p.rounds_planned,
        "started": time_json(p.started_unix_ms), "finished": time_json(p.finished_unix_ms),
        "started_unix_ms": p.started_unix_ms, "finished_unix_ms": p.finished_unix_ms,
        "final_model_sha256": p.final_model_sha256, "reason": p.reason,
    })
}

fn round_json(r: &proto::RoundClosed) -> Value {
    json!({
        "round": r.round, "reported": r.reported, "dropped": r.dropped, "model_sha256": r.new_model_sha256,
        "metrics": r.metrics.iter().map(metric_json).collect::<Vec<_>>(),
    })
}

fn metric_json(m: &proto::NodeMetric) -> Value {
    json!({"node": m.node, "name": m.name, "value": m.value, "samples": m.samples})
}

/// A run's status as JSON.
pub fn status_json(s: &PlanStatusResponse) -> Value {
    let mut v = s.plan.as_ref().map(summary_json).unwrap_or_else(|| json!({}));
    v["current_round"] = json!(s.current_round);
    v["participants"] = s
        .participants
        .iter()
        .map(|p| {
            json!({
                "node": p.node, "state": p.state, "reason": p.reason, "round": p.round,
                "epsilon": p.privacy.as_ref().map(|c| c.epsilon), "delta": p.privacy.as_ref().map(|c| c.delta),
            })
        })
        .collect();
    v["last_round"] = s.last_round.as_ref().map_or(Value::Null, round_json);
    v["client_epsilon"] = if s.client_epsilon > 0.0 { json!(s.client_epsilon) } else { Value::Null };
    v["client_delta"] = if s.client_epsilon > 0.0 { json!(s.client_delta) } else { Value::Null };
    v["metric_name"] = json!(s.metric_name);
    v["final_metrics"] = s.final_metrics.iter().map(metric_json).collect();
    v["events_kept"] = json!(s.events_kept);
    v["round_failures"] = s
        .round_failures
        .iter()
        .map(|f| json!({"round": f.round, "attempt": f.attempt, "reason": f.reason, "retrying": f.retrying}))
        .collect();
    v
}

/// A run's status for a person: what it is, where it stands, who takes part and how, the last
/// round's metrics, ε, and why it ended.
pub fn status_text(s: &PlanStatusResponse) -> String {
    let p = s.plan.clone().unwrap_or_default();
    let mut out = format!(
        "run {} (run {} of plan '{}', {})\nstatus: {}\nround {}/{}{}\nstarted {}, finished {}\n",
        p.run,
        p.run_number,
        p.name,
        p.plan_id,
        p.status,
        p.rounds_completed,
        p.rounds_planned,
        if s.current_round > 0 { format!(" (round {} open)", s.current_round) } else { String::new() },
        time_text(p.started_unix_ms),
        time_text(p.finished_unix_ms),
    );
    if !p.reason.is_empty() {
        let label = if p.status == "succeeded" { "outcome" } else { "reason" };
        out += &format!("{label}: {}\n", p.reason);
    }
    if s.participants.is_empty() {
        out += "participants: none yet\n";
    } else {
        out += "participants:\n";
        for n in &s.participants {
            let state = match (n.state.as_str(), n.round) {
                (crate::status::state::IN_ROUND, round) => format!("in round {round}, no outcome yet"),
                (state, 0) => state.to_string(),
                (state, round) => format!("{state} in round {round}"),
            };
            let why = if n.reason.is_empty() { String::new() } else { format!(": {}", n.reason) };
            let eps = n.privacy.as_ref().map(|c| format!(" (ε = {:.3}, δ = {:e})", c.epsilon, c.delta));
            out += &format!("  {:<20} {state}{why}{}\n", n.node, eps.unwrap_or_default());
        }
    }
    if !s.events_kept {
        out += "  (this run's events are no longer kept: participants are from its round records)\n";
    }
    for f in &s.round_failures {
        let next = if f.retrying { "retried" } else { "no retry left" };
        out += &format!("round {} attempt {} FAILED ({next}): {}\n", f.round, f.attempt, f.reason);
    }
    if let Some(r) = &s.last_round {
        out += &format!(
            "last round {}: {} reported, {} dropped{}\n",
            r.round,
            r.reported.len(),
            r.dropped.len(),
            if r.dropped.is_empty() { String::new() } else { format!(" ({})", r.dropped.join(", ")) }
        );
        for m in &r.metrics {
            out += &format!("  {:<20} {} {:.4} on {} samples\n", m.node, m.name, m.value, m.samples);
        }
    }
    if !s.final_metrics.is_empty() {
        out += "final model:\n";
        for m in &s.final_metrics {
            out += &format!("  {:<20} {} {:.4} on {} test samples\n", m.node, m.name, m.value, m.samples);
        }
    }
    if s.client_epsilon > 0.0 {
        out += &format!("client-level DP: ε = {:.3}, δ = {:e} for each hospital\n", s.client_epsilon, s.client_delta);
    }
    out
}

/// The nodes as a table: name, connected, last seen, version, device, runs.
pub fn nodes_text(list: &ListNodesResponse) -> String {
    if list.nodes.is_empty() {
        return "no node has connected since the coordinator started".into();
    }
    let mut out =
        format!("{:<20} {:<10} {:<20}  {:<10} {:<8} runs\n", "name", "connected", "last seen", "version", "device");
    for n in &list.nodes {
        let runs: Vec<String> =
            n.runs.iter().map(|r| format!("{} {} ({})", head(&r.run, 12), r.name, r.status)).collect();
        out += &format!(
            "{:<20} {:<10} {:<20}  {:<10} {:<8} {}\n",
            n.name,
            if n.connected { "yes" } else { "no" },
            time_text(n.last_seen_unix_ms),
            if n.version.is_empty() { "-" } else { &n.version },
            if n.device.is_empty() { "-" } else { &n.device },
            if runs.is_empty() { "-".to_string() } else { runs.join(", ") }
        );
    }
    out
}

/// The nodes as JSON.
pub fn nodes_json(list: &ListNodesResponse) -> Value {
    list.nodes
        .iter()
        .map(|n| {
            json!({
                "name": n.name, "connected": n.connected, "last_seen": time_json(n.last_seen_unix_ms),
                "last_seen_unix_ms": n.last_seen_unix_ms, "version": n.version, "device": n.device,
                "runs": n.runs.iter().map(|r| json!({"run": r.run, "plan_id": r.plan_id, "name": r.name, "status": r.status})).collect::<Vec<_>>(),
            })
        })
        .collect()
}

fn pretty(v: &Value) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(v)?)
}

/// `plan list`.
pub async fn plan_list(config: &Path, json: bool) -> anyhow::Result<String> {
    let mut client = AuditClient::new(connect(config).await?);
    let plans =
        client.list_plans(ListPlansRequest {}).await.map_err(|s| refused("list the runs", s))?.into_inner().plans;
    if json { pretty(&plans.iter().map(summary_json).collect()) } else { Ok(list_text(&plans)) }
}

/// One run's status (`plan status ID`, and the resolution `plan watch ID` needs).
pub async fn status_of(config: &Path, id: &str) -> anyhow::Result<PlanStatusResponse> {
    let mut client = AuditClient::new(connect(config).await?);
    let status = client
        .plan_status(PlanStatusRequest { id: id.to_string() })
        .await
        .map_err(|s| refused("read the run's status", s))?
        .into_inner();
    Ok(status)
}

/// `plan status ID`.
pub async fn plan_status(config: &Path, id: &str, json: bool) -> anyhow::Result<String> {
    let s = status_of(config, id).await?;
    if json { pretty(&status_json(&s)) } else { Ok(status_text(&s)) }
}

/// `plan cancel ID`.
pub async fn plan_cancel(config: &Path, id: &str, json: bool) -> anyhow::Result<String> {
    let mut client = LeadClient::new(connect(config).await?);
    let done = client
        .cancel_plan(CancelPlanRequest { id: id.to_string() })
        .await
        .map_err(|s| refused("cancel the run", s))?
        .into_inner();
    if json {
        pretty(&json!({"plan_id": done.plan_id, "run": done.run, "status": "cancelled", "reason": done.reason}))
    } else {
        Ok(format!(
            "run {} of plan {} cancelled: {}; its nodes were told the plan closed",
            done.run,
            head(&done.plan_id, 12),
            done.reason
        ))
    }
}

/// `nodes list`.
pub async fn nodes_list(config: &Path, json: bool) -> anyhow::Result<String> {
    let mut client = AuditClient::new(connect(config).await?);
    let list = client.list_nodes(ListNodesRequest {}).await.map_err(|s| refused("list the nodes", s))?.into_inner();
    if json { pretty(&nodes_json(&list)) } else { Ok(nodes_text(&list)) }
}

/// Why a received export is not written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExportError {
    #[error("the coordinator sent an export manifest that is not JSON ({0}); nothing was written")]
    Manifest(String),
    #[error("the export manifest has no {0}; nothing was written")]
    Missing(&'static str),
    #[error(
        "the model received has SHA-256 {got}, but the manifest's final_model_sha256 is {want}: nothing was written; try again, and if it persists the coordinator's stored model is damaged (check state/models and state/exports)"
    )]
    Hash { got: String, want: String },
    #[error(
        "the manifest's hash chain ends at {last}, not at its final model {want}: nothing was written; the manifest is damaged (check state/exports)"
    )]
    Chain { last: String, want: String },
    #[error(
        "the model stream ended after {got} of {total} bytes (or its chunks were out of order); nothing was written; try again"
    )]
    Incomplete { got: u64, total: u64 },
}

/// What a verified export is: the manifest (parsed) and the model's hash.
#[derive(Debug)]
pub struct VerifiedExport {
    pub manifest: Value,
    pub sha256: String,
}

/// Checks a received model against its manifest: its SHA-256 is the manifest's
/// `final_model_sha256`, which is the last entry of the `lineage` hash chain.
pub fn verify_export(manifest: &[u8], model: &[u8]) -> Result<VerifiedExport, ExportError> {
    let manifest: Value = serde_json::from_slice(manifest).map_err(|e| ExportError::Manifest(e.to_string()))?;
    let want = manifest
        .get("final_model_sha256")
        .and_then(Value::as_str)
        .ok_or(ExportError::Missing("final_model_sha256"))?
        .to_string();
    let last = manifest
        .get("lineage")
        .and_then(Value::as_array)
        .and_then(|l| l.last())
        .and_then(Value::as_str)
        .ok_or(ExportError::Missing("lineage (the hash chain)"))?
        .to_string();
    let got = ContentHash::of(model).to_hex();
    if got != want {
        return Err(ExportError::Hash { got, want });
    }
    if last != want {
        return Err(ExportError::Chain { last, want });
    }
    Ok(VerifiedExport { manifest, sha256: got })
}

/// `FILE.manifest.json` beside `FILE`.
pub fn manifest_path(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".manifest.json");
    PathBuf::from(name)
}

/// `model export ID --out FILE`: the run's final model into FILE and its manifest into
/// FILE.manifest.json, each written atomically, only once the model matches the manifest.
pub async fn model_export(config: &Path, id: &str, out: &Path, json: bool) -> anyhow::Result<String> {
    // The manifest (up to 8 MiB: the plan and one hash per round) comes in one message.
    let mut client = LeadClient::new(connect(config).await?).max_decoding_message_size(2 * CHUNK_BYTES + (8 << 20));
    let mut stream = client
        .export_model(ExportModelRequest { id: id.to_string() })
        .await
        .map_err(|s| refused("export the model", s))?
        .into_inner();
    let (mut manifest, mut model, mut total) = (Vec::new(), Vec::new(), 0u64);
    while let Some(chunk) = stream.message().await.map_err(|s| refused("export the model", s))? {
        if !chunk.manifest_json.is_empty() {
            manifest = chunk.manifest_json;
        }
        total = chunk.total_bytes;
        if chunk.offset != model.len() as u64 {
            return Err(ExportError::Incomplete { got: model.len() as u64, total }.into());
        }
        model.extend_from_slice(&chunk.data);
    }
    if model.len() as u64 != total {
        return Err(ExportError::Incomplete { got: model.len() as u64, total }.into());
    }
    let verified = verify_export(&manifest, &model)?;
    let manifest_out = manifest_path(out);
    crate::store::write_atomic(out, &model).with_context(|| format!("cannot write {}", out.display()))?;
    crate::store::write_atomic(&manifest_out, &manifest)
        .with_context(|| format!("cannot write {}", manifest_out.display()))?;
    let m = &verified.manifest;
    if json {
        return pretty(&json!({
            "model": out, "manifest": manifest_out, "sha256": verified.sha256, "bytes": model.len(),
            "plan_id": m.get("plan_id"), "run": m.get("run"), "rounds_completed": m.get("rounds_completed"),
        }));
    }
    Ok(format!(
        "wrote {} ({} bytes, SHA-256 {}, checked against the manifest and its hash chain of {} models)\nmanifest: {}",
        out.display(),
        model.len(),
        verified.sha256,
        m.get("lineage").and_then(Value::as_array).map_or(0, Vec::len),
        manifest_out.display()
    ))
}

#[cfg(test)]
mod tests {
    use sanctum_protocol::proto::{NodeInfo, NodeRun, ParticipantStatus, RoundClosed};

    use super::*;

    fn summary() -> PlanSummary {
        PlanSummary {
            plan_id: "ab".repeat(32),
            run: "12".repeat(16),
            run_number: 1,
            name: "heart".into(),
            status: "failed".into(),
            rounds_planned: 5,
            rounds_completed: 2,
            reason: "cancelled by lead".into(),
            started_unix_ms: 1_700_000_000_000,
            finished_unix_ms: 1_700_000_060_500,
            ..Default::default()
        }
    }

    #[test]
    fn times_are_utc_seconds_and_zero_is_not_yet() {
        assert_eq!(time_text(1_700_000_000_999), "2023-11-14T22:13:20Z");
        assert_eq!(time_text(0), "-");
        assert_eq!(time_json(0), Value::Null);
    }

    #[test]
    fn the_list_shows_each_run_on_one_line() {
        let text = list_text(&[summary()]);
        let line = text.lines().nth(1).unwrap_or_default();
        for want in
            ["121212121212", "abababababab", "heart", "failed", "2/5", "2023-11-14T22:13:20Z", "2023-11-14T22:14:20Z"]
        {
            assert!(line.contains(want), "{want} missing: {line}");
        }
        assert!(list_text(&[]).contains("plan submit"));
        let v = summary_json(&summary());
        assert_eq!(v["status"], "failed");
        assert_eq!(v["started"], "2023-11-14T22:13:20Z");
        assert_eq!(v["rounds_completed"], 2);
    }

    #[test]
    fn a_status_names_each_participants_state_and_the_reason() {
        let s = PlanStatusResponse {
            plan: Some(summary()),
            participants: vec![
                ParticipantStatus {
                    node: "cleveland".into(),
                    state: "reported".into(),
                    round: 2,
                    ..Default::default()
                },
                ParticipantStatus {
                    node: "va".into(),
                    state: "refused".into(),
                    reason: "ε over the cap".into(),
                    ..Default::default()
                },
            ],
            last_round: Some(RoundClosed {
                round: 2,
                reported: vec!["cleveland".into()],
                dropped: vec!["hungarian".into()],
                metrics: vec![proto::NodeMetric {
                    node: "cleveland".into(),
                    value: 0.8125,
                    samples: 61,
                    name: "accuracy".into(),
                }],
                new_model_sha256: String::new(),
            }),
            client_epsilon: 2.5,
            client_delta: 1e-5,
            events_kept: true,
            round_failures: vec![proto::RoundFailed {
                round: 2,
                attempt: 1,
                reason:
                    "round 2 failed: 1 node(s) reported, min_nodes is 2; dropped: hungarian (no heartbeat for 30 s)"
                        .into(),
                retrying: true,
            }],
            ..Default::default()
        };
        let text = status_text(&s);
        for want in [
            "status: failed",
            "round 2/5",
            "reason: cancelled by lead",
            "cleveland            reported in round 2",
            "va                   refused: ε over the cap",
            "last round 2: 1 reported, 1 dropped (hungarian)",
            "accuracy 0.8125 on 61 samples",
            "ε = 2.500",
            "round 2 attempt 1 FAILED (retried): round 2 failed: 1 node(s) reported, min_nodes is 2; dropped: hungarian (no heartbeat for 30 s)",
        ] {
            assert!(text.contains(want), "{want:?} missing:\n{text}");
        }
        let v = status_json(&s);
        assert_eq!(v["participants"][1]["reason"], "ε over the cap");
        assert_eq!(v["last_round"]["dropped"][0], "hungarian");
        assert_eq!(v["client_epsilon"], 2.5);
        assert_eq!(v["round_failures"][0]["retrying"], true);
    }

    #[test]
    fn the_nodes_table_shows_connection_version_device_and_runs() {
        let list = ListNodesResponse {
            nodes: vec![NodeInfo {
                name: "cleveland".into(),
                connected: true,
                last_seen_unix_ms: 1_700_000_000_000,
                version: "0.1.0".into(),
                device: "cuda:0".into(),
                runs: vec![NodeRun {
                    run: "12".repeat(16),
                    name: "heart".into(),
                    status: "running".into(),
                    plan_id: String::new(),
                }],
            }],
        };
        let text = nodes_text(&list);
        let line = text.lines().nth(1).unwrap_or_default();
        assert!(
            line.starts_with("cleveland")
                && line.contains(" yes ")
                && line.contains("0.1.0")
                && line.contains("cuda:0"),
            "{line}"
        );
        assert!(line.ends_with("121212121212 heart (running)"), "{line}");
        assert_eq!(nodes_json(&list)[0]["device"], "cuda:0");
    }

    fn manifest(final_hash: &str, lineage: &[&str]) -> Vec<u8> {
        serde_json::to_vec(&json!({"final_model_sha256": final_hash, "lineage": lineage})).unwrap_or_default()
    }

    #[test]
    fn an_export_is_written_only_when_the_model_matches_the_manifest_and_its_chain() {
        let model = b"safetensors bytes";
        let h = ContentHash::of(model).to_hex();
        let first = ContentHash::of(b"initial").to_hex();
        let ok = verify_export(&manifest(&h, &[&first, &h]), model);
        assert_eq!(ok.map(|v| v.sha256).ok(), Some(h.clone()));
        // One byte changed in transit (or on the coordinator's disk).
        let e = verify_export(&manifest(&h, &[&first, &h]), b"safetensors bytez").unwrap_err();
        assert!(matches!(&e, ExportError::Hash { want, .. } if *want == h), "{e:?}");
        assert!(e.to_string().contains("nothing was written"));
        // A manifest whose chain does not end at its own final model.
        let e = verify_export(&manifest(&h, &[&h, &first]), model).unwrap_err();
        assert!(matches!(e, ExportError::Chain { .. }), "{e:?}");
        assert!(matches!(verify_export(&manifest(&h, &[]), model), Err(ExportError::Missing(_))));
        assert!(matches!(verify_export(b"{", model), Err(ExportError::Manifest(_))));
        assert_eq!(manifest_path(Path::new("out/model.safetensors")), Path::new("out/model.safetensors.manifest.json"));
    }
}
