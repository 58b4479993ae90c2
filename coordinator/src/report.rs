//! `audit report`: a self-contained HTML report (inline CSS and SVG plots, no scripts, nothing
//! fetched) and a Markdown variant, built only from verified audit logs: the coordinator's and
//! any hospitals'. Per plan: parameters, participants and refusals, the round timeline with
//! secure-aggregation cohorts, the model lineage (hash chain), every countersignature
//! re-verified and cross-checked against the hospital's own log, every receipt a round record
//! asked for and no log holds (MISSING), failures. Per hospital: what
//! left it, and ε spent against its cap, plotted.
//!
//! A log that fails verification is not used: the report is refused unless the caller allows
//! unverified logs, and then such a log is a red row whose records feed no table. Who wrote a
//! log is read from the certificate bound in its first record, never from its own fields.
//! Without a CA no certificate is checked, so no countersignature counts as verified.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use sanctum_protocol::audit::{self, Record};
use sanctum_protocol::hash::ContentHash;
use serde_json::Value;

use crate::receipts::{self, Checked};

/// One input log, verified.
struct Log {
    path: PathBuf,
    verdict: Result<audit::Verified, String>,
    records: Vec<Record>,
}

impl Log {
    fn load(path: &Path, ca: Option<&str>) -> Self {
        let check = |der: &[u8]| match ca {
            Some(pem) => audit::issued_by(pem, der),
            None => Ok(()),
        };
        let verdict = audit::verify_file(path, Some(&check));
        let records = audit::read_records(path).unwrap_or_default();
        Self { path: path.to_path_buf(), verdict, records }
    }

    /// Who wrote the log, from its verified certificate; a log that failed verification names
    /// no one (what it claims is shown as a claim).
    fn writer(&self) -> String {
        match &self.verdict {
            Ok(v) => v.writer.clone(),
            Err(_) => {
                let claim = self.records.first().map(|r| s(r, "writer")).unwrap_or_default();
                if claim.is_empty() { "unverified".into() } else { format!("unverified (claims '{claim}')") }
            }
        }
    }

    /// The records a report may use: none from a log that failed verification.
    fn trusted(&self) -> &[Record] {
        if self.verdict.is_ok() { &self.records } else { &[] }
    }
}

fn s(r: &Record, k: &str) -> String {
    match r.params.get(k) {
        Some(Value::String(v)) => v.clone(),
        Some(Value::Null) | None => String::new(),
        Some(v) => v.to_string(),
    }
}

fn f(r: &Record, k: &str) -> Option<f64> {
    r.params.get(k).and_then(Value::as_f64)
}

fn list(r: &Record, k: &str) -> Vec<String> {
    r.params
        .get(k)
        .and_then(Value::as_array)
        .map(|a| a.iter().map(|v| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())).collect())
        .unwrap_or_default()
}

fn esc(t: &str) -> String {
    t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The first 12 characters (never a byte slice: a name or reason may be any text).
fn short(h: &str) -> &str {
    let end = h.char_indices().nth(12).map_or(h.len(), |(i, _)| i);
    &h[..end]
}

/// A round's `round_opened`, `round_closed` and `aggregate_released` records.
type RoundEvents = (Option<Record>, Option<Record>, Option<Record>);

/// What the report says of one plan.
struct PlanView {
    id: String,
    name: String,
    submitted: Option<Record>,
    decisions: Vec<Record>,
    /// Per round: opened, closed, released. A map, not a vector indexed by round: the round
    /// number is the log's, and a round of 10^12 must cost one entry, not 10^12.
    rounds: BTreeMap<u64, RoundEvents>,
    rejected: Vec<Record>,
    finished: Option<Record>,
    exported: Option<Record>,
    /// SHA-256 of each round's `round_record` line as this log holds it (the latest per round),
    /// and the nodes it was sent to for countersigning (its `reported` list).
    round_records: BTreeMap<u64, (String, Vec<String>)>,
    /// Every countersignature, re-verified, with the hospital's side where its log was given.
    countersignatures: Vec<Countersigned>,
    /// (round, node): a node a round record was sent to, of which no log given holds a receipt
    /// for that record (the coordinator never asked, the node never answered, or the receipt was
    /// deleted from the coordinator's log).
    missing: Vec<(u64, String)>,
}

/// One countersignature as the report shows it.
struct Countersigned {
    /// From the coordinator's `receipt` record, re-verified; `None` when only the hospital's log
    /// holds it (the coordinator's log does not).
    coordinator: Option<Checked>,
    /// The hospital's own `receipt_signed` record, when its log was given.
    hospital: Option<Record>,
    /// The hospital's name and the round, for rows with no coordinator side.
    node: String,
    round: u64,
    /// What differs between the two logs; empty when they agree or only one log was given.
    differences: Vec<String>,
    /// The hospital's log was given (so a missing side is a finding, not an absence).
    cross_checked: bool,
}

impl Countersigned {
    fn failed(&self) -> bool {
        self.coordinator.as_ref().is_none_or(|c| !c.stands()) || !self.differences.is_empty()
    }
}

fn plans(coord: &Log, ca: Option<audit::CertCheck<'_>>) -> Vec<PlanView> {
    let mut out: Vec<PlanView> = Vec::new();
    for r in coord.trusted() {
        let id = s(r, "plan_id");
        if r.event == "plan_submitted" {
            out.push(PlanView {
                id: id.clone(),
                name: s(r, "name"),
                submitted: Some(r.clone()),
                decisions: vec![],
                rounds: BTreeMap::new(),
                rejected: vec![],
                finished: None,
                exported: None,
                round_records: BTreeMap::new(),
                countersignatures: Vec::new(),
                missing: Vec::new(),
            });
            continue;
        }
        let Some(p) = out.iter_mut().rev().find(|p| p.id == id) else { continue };
        let round = r.params.get("round").and_then(Value::as_u64).unwrap_or(0);
        match r.event.as_str() {
            "plan_accepted" | "plan_refused" => p.decisions.push(r.clone()),
            "round_opened" if round > 0 => p.rounds.entry(round).or_default().0 = Some(r.clone()),
            "round_closed" if round > 0 => p.rounds.entry(round).or_default().1 = Some(r.clone()),
            "aggregate_released" if round > 0 => p.rounds.entry(round).or_default().2 = Some(r.clone()),
            "update_rejected" => p.rejected.push(r.clone()),
            "plan_finished" => p.finished = Some(r.clone()),
            "round_record" => {
                p.round_records.insert(round, (ContentHash::of(r.line().as_bytes()).to_hex(), list(r, "reported")));
            }
            "receipt" => {
                let held = p.round_records.get(&round).map(|(h, _)| h.as_str());
                let checked = receipts::check_record(r, held, ca);
                p.countersignatures.push(Countersigned {
                    node: checked.node.clone(),
                    round: checked.round,
                    coordinator: Some(checked),
                    hospital: None,
                    differences: Vec::new(),
                    cross_checked: false,
                });
            }
            "model_exported" => p.exported = Some(r.clone()),
            _ => {}
        }
    }
    out
}

/// Matches each countersignature with the hospital's own record of it, for every hospital whose
/// log was given and verified: what differs, a receipt the hospital's log does not hold, and one
/// it holds that the coordinator's log does not.
fn cross_check(plans: &mut [PlanView], nodes: &[Log]) {
    for node in nodes {
        let Ok(v) = &node.verdict else { continue };
        let mut theirs: Vec<&Record> = node.trusted().iter().filter(|r| r.event == "receipt_signed").collect();
        for p in plans.iter_mut() {
            for c in &mut p.countersignatures {
                let Some(coord) = c.coordinator.as_ref().filter(|c| c.actor == v.fingerprint) else { continue };
                c.cross_checked = true;
                let same = |r: &&Record| {
                    s(r, "plan_id") == coord.plan_id
                        && r.params.get("round").and_then(Value::as_u64) == Some(coord.round)
                };
                // The record with the same hash, else the hospital's last one for that round.
                let pos = theirs
                    .iter()
                    .position(|r| same(r) && s(r, "record_sha256") == coord.record_sha256)
                    .or_else(|| theirs.iter().rposition(same));
                match pos {
                    Some(i) => {
                        let r = theirs.remove(i);
                        c.differences = receipts::differences(coord, r);
                        c.hospital = Some(r.clone());
                    }
                    None => c.differences = vec!["the hospital's log holds no receipt for this round record".into()],
                }
            }
        }
        // What is left the hospital signed, and the coordinator's log does not hold.
        for r in theirs {
            let hash = s(r, "record_sha256");
            let round = r.params.get("round").and_then(Value::as_u64).unwrap_or(0);
            let plan = plans
                .iter_mut()
                .rev()
                .find(|p| p.id == s(r, "plan_id") && p.round_records.get(&round).is_some_and(|(h, _)| *h == hash));
            let Some(p) = plan else { continue };
            p.countersignatures.push(Countersigned {
                coordinator: None,
                hospital: Some(r.clone()),
                node: v.writer.clone(),
                round,
                differences: vec!["the coordinator's log holds no receipt for this countersignature".into()],
                cross_checked: true,
            });
        }
    }
}

/// For each round record, each node it was sent to of which neither log holds a receipt for
/// that record: a dropped receipt is a finding, not an absence. A receipt the coordinator's log
/// holds (verified or not) or the hospital's own record of one (listed by [`cross_check`]) is
/// shown in its own row and is not missing.
fn find_missing(plans: &mut [PlanView]) {
    for p in plans.iter_mut() {
        let mut missing = Vec::new();
        for (round, (hash, reported)) in &p.round_records {
            for node in reported {
                let held = p.countersignatures.iter().any(|c| {
                    c.round == *round
                        && c.node == *node
                        && match (&c.coordinator, &c.hospital) {
                            (Some(k), _) => k.record_sha256 == *hash,
                            (None, Some(h)) => s(h, "record_sha256") == *hash,
                            (None, None) => false,
                        }
                });
                if !held {
                    missing.push((*round, node.clone()));
                }
            }
        }
        p.missing = missing;
    }
}

/// What `audit report` found, for its summary line and exit status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Findings {
    /// Logs that failed verification (only when allowed; otherwise the report is refused).
    pub unverified_logs: usize,
    /// Countersignatures in the coordinator's log, and how many of them stand.
    pub countersignatures: usize,
    pub countersignatures_verified: usize,
    /// Countersignatures whose two logs differ (or one lacks it), over the hospital logs given.
    pub mismatches: usize,
    /// Receipts a round record asked for (one per node in its `reported` list) that no log holds.
    pub missing: usize,
    /// Countersignatures whose signature verifies but whose certificate was not checked against
    /// a CA (no CA given): not counted as verified.
    pub unchecked: usize,
}

impl Findings {
    /// A countersignature failed, is missing or mismatches (the report's exit status is 1).
    pub fn failed(&self) -> bool {
        self.countersignatures_verified + self.unchecked < self.countersignatures
            || self.mismatches > 0
            || self.missing > 0
    }
}

/// The report's files and what it found.
#[derive(Debug)]
pub struct Written {
    pub html: PathBuf,
    pub md: PathBuf,
    pub findings: Findings,
}

/// ε charged by a hospital, per plan run (the short plan id, and the run when the log names one)
/// in round order: (round, ε spent so far, the cap). Two runs of one plan are two series.
type Charges = BTreeMap<String, Vec<(u64, f64, Option<f64>)>>;

fn charges(node: &Log) -> Charges {
    let mut out = Charges::new();
    for r in node.trusted().iter().filter(|r| r.event == "epsilon_charged") {
        let round = r.params.get("round").and_then(Value::as_u64).unwrap_or(0);
        let (plan, run) = (s(r, "plan_id"), s(r, "run"));
        let key =
            if run.is_empty() { short(&plan).to_string() } else { format!("{} run {}", short(&plan), short(&run)) };
        out.entry(key).or_default().push((round, f(r, "epsilon").unwrap_or(0.0), f(r, "epsilon_cap")));
    }
    out
}

/// An SVG plot of ε against rounds for each plan, with the cap as a dashed line.
fn epsilon_plot(title: &str, series: &Charges) -> String {
    let mut svg = String::new();
    let rounds = series.values().flatten().map(|c| c.0).max().unwrap_or(1).max(1);
    let cap = series.values().flatten().filter_map(|c| c.2).fold(0.0f64, f64::max);
    let top = series.values().flatten().map(|c| c.1).fold(cap, f64::max).max(1e-3) * 1.15;
    {
        let root = SVGBackend::with_string(&mut svg, (640, 300)).into_drawing_area();
        let draw = || -> Result<(), Box<dyn std::error::Error + '_>> {
            root.fill(&WHITE)?;
            let mut chart = ChartBuilder::on(&root)
                .caption(title, ("sans-serif", 16))
                .margin(12)
                .x_label_area_size(32)
                .y_label_area_size(48)
                .build_cartesian_2d(0u64..rounds, 0f64..top)?;
            chart.configure_mesh().x_desc("round").y_desc("ε spent").draw()?;
            let palette = [BLUE, RED, GREEN, MAGENTA, CYAN];
            for (i, (plan, points)) in series.iter().enumerate() {
                let color = palette[i % palette.len()];
                let pts: Vec<(u64, f64)> = std::iter::once((0, 0.0)).chain(points.iter().map(|c| (c.0, c.1))).collect();
                chart
                    .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
                    .label(format!("plan {plan}"))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
                chart.draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
            }
            if cap > 0.0 {
                chart
                    .draw_series(DashedLineSeries::new(vec![(0, cap), (rounds, cap)], 6, 4, BLACK.stroke_width(1)))?
                    .label(format!("policy.max_epsilon = {cap}"))
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK));
            }
            chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
            root.present()?;
            Ok(())
        };
        if let Err(e) = draw() {
            return format!("<p>plot unavailable: {}</p>", esc(&e.to_string()));
        }
    }
    svg
}

const CSS: &str = "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}\
h1{border-bottom:2px solid #345}h2{margin-top:2em;border-bottom:1px solid #ccc}\
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:3px 8px;font-size:.9em;text-align:left}\
th{background:#eef}.ok{color:#070;font-weight:bold}.bad{color:#b00;font-weight:bold}code{font-size:.85em}\
tr.bad td{background:#fdd}.banner{background:#b00;color:#fff;padding:.6em 1em;font-weight:bold}";

/// Why no report was written.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "refused: {0} failed verification, so nothing it says can be reported; fix or replace it, or pass --allow-unverified to write a report that marks it in red and uses none of its records"
    )]
    Unverified(String),
    #[error("cannot write the report: {0}")]
    Write(#[from] std::io::Error),
}

/// Writes `report.html` and `report.md` into `out`. Any log that fails verification refuses the
/// report, unless `allow_unverified`: then it is a red row and none of its records are used.
pub fn write(
    coordinator_log: &Path,
    node_logs: &[PathBuf],
    ca: Option<&Path>,
    out: &Path,
    allow_unverified: bool,
) -> Result<Written, ReportError> {
    let ca_pem = match ca {
        Some(p) => Some(std::fs::read_to_string(p).map_err(|source| ReportError::Read { path: p.into(), source })?),
        None => None,
    };
    let coord = Log::load(coordinator_log, ca_pem.as_deref());
    let nodes: Vec<Log> = node_logs.iter().map(|p| Log::load(p, ca_pem.as_deref())).collect();
    let failed: Vec<String> = std::iter::once(&coord)
        .chain(nodes.iter())
        .filter_map(|l| l.verdict.as_ref().err().map(|e| format!("{} ({e})", l.path.display())))
        .collect();
    if !failed.is_empty() && !allow_unverified {
        return Err(ReportError::Unverified(failed.join("; ")));
    }
    let ca_check = |der: &[u8]| match &ca_pem {
        Some(pem) => audit::issued_by(pem, der),
        None => Ok(()),
    };
    let mut plans = plans(&coord, ca_pem.as_ref().map(|_| &ca_check as audit::CertCheck<'_>));
    cross_check(&mut plans, &nodes);
    find_missing(&mut plans);
    let ca_checked = ca_pem.is_some();
    let all = || plans.iter().flat_map(|p| p.countersignatures.iter());
    let standing = all().filter(|c| c.coordinator.as_ref().is_some_and(Checked::stands)).count();
    let findings = Findings {
        unverified_logs: failed.len(),
        countersignatures: all().filter(|c| c.coordinator.is_some()).count(),
        countersignatures_verified: if ca_checked { standing } else { 0 },
        mismatches: all().filter(|c| !c.differences.is_empty()).count(),
        missing: plans.iter().map(|p| p.missing.len()).sum(),
        unchecked: if ca_checked { 0 } else { standing },
    };
    let (mut h, mut m) = (String::new(), String::new());
    let now = audit::now_rfc3339();
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Sanctum audit report</title><style>{CSS}</style></head><body>\
         <h1>Sanctum audit report</h1><p>Generated {now} from {} audit log(s), each verified offline (signatures, hash chain, sequence, signed head{}).</p>",
        1 + nodes.len(),
        if ca.is_some() { ", writer certificate against the consortium CA" } else { "" }
    );
    let _ = writeln!(
        m,
        "# Sanctum audit report\n\nGenerated {now} from {} audit log(s), each verified offline.\n",
        1 + nodes.len()
    );
    if !failed.is_empty() {
        let text = format!(
            "UNVERIFIED: {} log(s) failed verification; none of their records are used below: {}",
            failed.len(),
            failed.join("; ")
        );
        let _ = write!(h, "<p class=\"banner\">{}</p>", esc(&text));
        let _ = writeln!(m, "> **{text}**\n");
    }
    let bad = findings.countersignatures - findings.countersignatures_verified - findings.unchecked;
    let unchecked = if ca_checked {
        String::new()
    } else {
        format!(
            " ({} with a valid signature NOT CHECKED AGAINST A CA, so not verified: pass the consortium CA)",
            findings.unchecked
        )
    };
    let summary = format!(
        "Countersignatures: {} in the coordinator's log, {} verified{unchecked}, {bad} FAILED, {} MISSING; {} mismatch(es) with the hospitals' own logs.",
        findings.countersignatures, findings.countersignatures_verified, findings.missing, findings.mismatches
    );
    let alarm = findings.failed() || !ca_checked;
    let _ = write!(h, "<p class=\"{}\">{}</p>", if alarm { "bad" } else { "ok" }, esc(&summary));
    let _ = writeln!(m, "{}\n", if alarm { format!("**{summary}**") } else { summary.clone() });
    // Verification verdicts.
    h.push_str(
        "<h2 id=\"logs\">Logs</h2><table><tr><th>writer</th><th>log</th><th>records</th><th>verification</th></tr>",
    );
    m.push_str("## Logs\n\n| writer | log | records | verification |\n|---|---|---|---|\n");
    for log in std::iter::once(&coord).chain(nodes.iter()) {
        let (class, verdict) = match &log.verdict {
            Ok(v) => ("ok", format!("OK ({} records, certificate {})", v.records, short(&v.fingerprint))),
            Err(e) => ("bad", format!("FAILED: {e}")),
        };
        let _ = write!(
            h,
            "<tr class=\"{class}\"><td>{}</td><td><code>{}</code></td><td>{}</td><td class=\"{class}\">{}</td></tr>",
            esc(&log.writer()),
            esc(&log.path.display().to_string()),
            log.records.len(),
            esc(&verdict)
        );
        let mark = if log.verdict.is_ok() { "" } else { "**" };
        let _ = writeln!(
            m,
            "| {} | `{}` | {} | {mark}{}{mark} |",
            log.writer(),
            log.path.display(),
            log.records.len(),
            verdict
        );
    }
    h.push_str("</table>");
    m.push('\n');

    for p in &plans {
        let sub = p.submitted.as_ref();
        let get = |k: &str| sub.map(|r| s(r, k)).unwrap_or_default();
        let _ = write!(h, "<h2 id=\"plan-{}\">Plan {} <code>{}</code></h2>", short(&p.id), esc(&p.name), short(&p.id));
        let _ = writeln!(m, "## Plan {} `{}`\n", p.name, short(&p.id));
        let params = [
            ("submitted", sub.map(|r| r.time.clone()).unwrap_or_default()),
            ("submitted by (certificate)", short(&sub.map(|r| r.actor.clone()).unwrap_or_default()).to_string()),
            ("run", {
                let (run, n) = (get("run"), get("run_number"));
                if run.is_empty() { "—".to_string() } else { format!("{n} ({})", short(&run)) }
            }),
            ("rounds", get("rounds")),
            ("strategy", get("strategy")),
            ("differential privacy", get("privacy")),
            ("noise multiplier", get("noise_multiplier")),
            ("target ε", get("target_epsilon")),
            ("δ", get("delta")),
            ("secure aggregation", get("secure_aggregation")),
            ("initial model", short(&get("initial_model")).to_string()),
        ];
        h.push_str("<table>");
        m.push_str("| parameter | value |\n|---|---|\n");
        for (k, v) in &params {
            let v = if v.is_empty() || v == "null" { "—" } else { v };
            let _ = write!(h, "<tr><th>{k}</th><td>{}</td></tr>", esc(v));
            let _ = writeln!(m, "| {k} | {v} |");
        }
        h.push_str("</table>");
        m.push('\n');
        // Participants.
        h.push_str("<h3>Participants</h3><table><tr><th>hospital</th><th>decision</th><th>reason</th><th>ε it would spend</th></tr>");
        m.push_str("### Participants\n\n| hospital | decision | reason | ε |\n|---|---|---|---|\n");
        for d in &p.decisions {
            let decision = if d.event == "plan_accepted" { "accepted" } else { "refused" };
            let eps = f(d, "epsilon").map(|e| format!("{e:.3}")).unwrap_or_else(|| "—".into());
            let _ = write!(
                h,
                "<tr><td>{}</td><td class=\"{}\">{decision}</td><td>{}</td><td>{eps}</td></tr>",
                esc(&s(d, "node")),
                if decision == "accepted" { "ok" } else { "bad" },
                esc(&s(d, "reason"))
            );
            let _ = writeln!(m, "| {} | {decision} | {} | {eps} |", s(d, "node"), s(d, "reason"));
        }
        h.push_str("</table>");
        m.push('\n');
        // Rounds and lineage.
        h.push_str("<h3>Rounds and model lineage</h3><table><tr><th>round</th><th>opened</th><th>participants</th><th>secure aggregation (t)</th><th>reported</th><th>dropped</th><th>starting model</th><th>released model</th><th>receipts</th></tr>");
        m.push_str("### Rounds and model lineage\n\n| round | opened | participants | SA threshold | reported | dropped | starting model | released model | receipts |\n|---|---|---|---|---|---|---|---|---|\n");
        for (round, (open, close, agg)) in &p.rounds {
            let o = |k: &str| open.as_ref().map(|r| s(r, k)).unwrap_or_default();
            let c = |k: &str| close.as_ref().map(|r| list(r, k).join(", ")).unwrap_or_default();
            let t = o("threshold");
            let t = if t.is_empty() || t == "null" { "off".to_string() } else { format!("t = {t}") };
            let released = agg.as_ref().map(|r| s(r, "model_sha256")).unwrap_or_default();
            let row = [
                round.to_string(),
                open.as_ref().map(|r| r.time.clone()).unwrap_or_default(),
                open.as_ref().map(|r| list(r, "participants").join(", ")).unwrap_or_default(),
                t,
                c("reported"),
                c("dropped"),
                short(&o("model_sha256")).to_string(),
                short(&released).to_string(),
                receipts_cell(p, *round, ca_checked),
            ];
            h.push_str("<tr>");
            for cell in &row {
                let _ = write!(h, "<td>{}</td>", esc(cell));
            }
            h.push_str("</tr>");
            let _ = writeln!(m, "| {} |", row.join(" | "));
        }
        h.push_str("</table>");
        m.push('\n');
        countersignature_table(p, ca_checked, &mut h, &mut m);
        let chain: Vec<String> = std::iter::once(get("initial_model"))
            .chain(p.rounds.values().filter_map(|(_, _, a)| a.as_ref().map(|r| s(r, "model_sha256"))))
            .map(|x| short(&x).to_string())
            .collect();
        let _ = write!(h, "<p>Hash chain: <code>{}</code></p>", esc(&chain.join(" → ")));
        let _ = writeln!(m, "Hash chain: `{}`\n", chain.join(" → "));
        if let Some(e) = &p.exported {
            let _ = write!(
                h,
                "<p>Exported: <code>{}</code> (model {})</p>",
                esc(&s(e, "path")),
                short(&s(e, "model_sha256"))
            );
            let _ = writeln!(m, "Exported: `{}` (model {})\n", s(e, "path"), short(&s(e, "model_sha256")));
        }
        // Failures and the outcome.
        h.push_str("<h3>Failures and outcome</h3><ul>");
        m.push_str("### Failures and outcome\n\n");
        for r in &p.rejected {
            let _ = write!(
                h,
                "<li>{} round {}: update from {} rejected: {}</li>",
                esc(&r.time),
                s(r, "round"),
                esc(&s(r, "node")),
                esc(&s(r, "reason"))
            );
            let _ = writeln!(
                m,
                "- {} round {}: update from {} rejected: {}",
                r.time,
                s(r, "round"),
                s(r, "node"),
                s(r, "reason")
            );
        }
        for (round, (_, close, _)) in &p.rounds {
            if let Some(c) = close
                && !list(c, "dropped").is_empty()
            {
                let _ = write!(h, "<li>round {round}: dropped {}</li>", esc(&list(c, "dropped").join(", ")));
                let _ = writeln!(m, "- round {round}: dropped {}", list(c, "dropped").join(", "));
            }
        }
        match &p.finished {
            Some(r) => {
                let ok = s(r, "success") == "true";
                let eps = f(r, "client_epsilon")
                    .filter(|e| *e > 0.0)
                    .map(|e| format!("; client-level ε = {e:.3}, δ = {}", s(r, "client_delta")))
                    .unwrap_or_default();
                let _ = write!(
                    h,
                    "<li class=\"{}\">{}: {} after {} round(s), final model {}{}</li>",
                    if ok { "ok" } else { "bad" },
                    if ok { "succeeded" } else { "failed" },
                    esc(&s(r, "reason")),
                    s(r, "rounds_completed"),
                    short(&s(r, "final_model_sha256")),
                    esc(&eps)
                );
                let _ = writeln!(
                    m,
                    "- {}: {} after {} round(s), final model {}{eps}",
                    if ok { "succeeded" } else { "failed" },
                    s(r, "reason"),
                    s(r, "rounds_completed"),
                    short(&s(r, "final_model_sha256"))
                );
            }
            None => {
                h.push_str("<li>still running when the log was read</li>");
                m.push_str("- still running when the log was read\n");
            }
        }
        h.push_str("</ul>");
        m.push('\n');
    }
    let auth: Vec<&Record> = coord.trusted().iter().filter(|r| r.event == "authentication_failed").collect();
    if !auth.is_empty() {
        h.push_str("<h2 id=\"auth\">Authentication failures</h2><ul>");
        m.push_str("## Authentication failures\n\n");
        for r in auth {
            let _ = write!(h, "<li>{} from {}: {}</li>", esc(&r.time), esc(&s(r, "remote")), esc(&s(r, "reason")));
            let _ = writeln!(m, "- {} from {}: {}", r.time, s(r, "remote"), s(r, "reason"));
        }
        h.push_str("</ul>");
        m.push('\n');
    }
    for node in nodes.iter().filter(|n| n.verdict.is_ok()) {
        let name = node.writer();
        let _ = write!(h, "<h2 id=\"hospital-{}\">Hospital {}</h2>", esc(&name), esc(&name));
        let _ = writeln!(m, "## Hospital {name}\n");
        let sent: Vec<&Record> = node.trusted().iter().filter(|r| r.event == "update_sent").collect();
        let bytes: u64 = sent.iter().filter_map(|r| r.params.get("bytes").and_then(Value::as_u64)).sum();
        let masked = sent.iter().filter(|r| s(r, "masked") == "true").count();
        let decisions: Vec<String> = node
            .trusted()
            .iter()
            .filter(|r| r.event == "plan_accepted" || r.event == "plan_refused")
            .map(|r| {
                format!(
                    "{} {}{}",
                    if r.event == "plan_accepted" { "accepted" } else { "refused" },
                    short(&s(r, "plan_id")),
                    if s(r, "reason").is_empty() { String::new() } else { format!(" ({})", s(r, "reason")) }
                )
            })
            .collect();
        let _ = write!(
            h,
            "<p>Plans: {}. Updates that left: {} ({} masked under secure aggregation), {} bytes; each one's SHA-256 is in the log.</p>",
            esc(&decisions.join("; ")),
            sent.len(),
            masked,
            bytes
        );
        let _ = writeln!(
            m,
            "Plans: {}. Updates that left: {} ({masked} masked), {bytes} bytes.\n",
            decisions.join("; "),
            sent.len()
        );
        let series = charges(node);
        if series.is_empty() {
            h.push_str("<p>No differential-privacy charges.</p>");
            m.push_str("No differential-privacy charges.\n\n");
        } else {
            h.push_str(&epsilon_plot(&format!("{name}: ε spent against the cap"), &series));
            m.push_str("| plan | rounds charged | ε spent | cap |\n|---|---|---|---|\n");
            for (plan, pts) in &series {
                let last = pts.last().map(|c| c.1).unwrap_or(0.0);
                let cap = pts.last().and_then(|c| c.2).map(|c| c.to_string()).unwrap_or_else(|| "none".into());
                let _ = writeln!(m, "| {plan} | {} | {last:.3} | {cap} |", pts.len());
            }
            m.push('\n');
        }
    }
    h.push_str("</body></html>\n");
    std::fs::create_dir_all(out)?;
    let (html, md) = (out.join("report.html"), out.join("report.md"));
    std::fs::write(&html, h)?;
    std::fs::write(&md, m)?;
    Ok(Written { html, md, findings })
}

/// The round table's receipts cell: only countersignatures that verify count as agreement or
/// dispute; the rest are counted as failed.
fn receipts_cell(p: &PlanView, round: u64, ca_checked: bool) -> String {
    let of_round: Vec<&Checked> =
        p.countersignatures.iter().filter_map(|c| c.coordinator.as_ref()).filter(|c| c.round == round).collect();
    let missing: Vec<&str> = p.missing.iter().filter(|(r, _)| *r == round).map(|(_, n)| n.as_str()).collect();
    if of_round.is_empty() && missing.is_empty() {
        return "none".into();
    }
    let ok = of_round.iter().filter(|c| c.stands() && c.agrees).count();
    let disputes: Vec<String> =
        of_round.iter().filter(|c| c.stands() && !c.agrees).map(|c| format!("{}: {}", c.node, c.reason)).collect();
    let failed: Vec<&str> = of_round.iter().filter(|c| !c.stands()).map(|c| c.node.as_str()).collect();
    let mut cell = format!("{ok} countersigned");
    if !ca_checked {
        cell.push_str(" (certificates not checked against a CA)");
    }
    if !disputes.is_empty() {
        let _ = write!(cell, "; DISPUTED by {}", disputes.join("; "));
    }
    if !failed.is_empty() {
        let _ = write!(cell, "; {} FAILED verification ({})", failed.len(), failed.join(", "));
    }
    if !missing.is_empty() {
        let _ = write!(cell, "; {} MISSING ({})", missing.len(), missing.join(", "));
    }
    cell
}

/// Every countersignature of a plan: its verdict, whether it verifies, and whether the
/// hospital's own log says the same. A failed one is a red row (HTML) and **FAILED** /
/// **MISMATCH** (Markdown), with what is wrong.
fn countersignature_table(p: &PlanView, ca_checked: bool, h: &mut String, m: &mut String) {
    if p.countersignatures.is_empty() && p.missing.is_empty() {
        return;
    }
    h.push_str("<h3>Countersignatures</h3><table><tr><th>round</th><th>hospital</th><th>verdict</th><th>reason</th><th>signature</th><th>hospital's own log</th></tr>");
    m.push_str("### Countersignatures\n\n| round | hospital | verdict | reason | signature | hospital's own log |\n|---|---|---|---|---|---|\n");
    let mut rows: Vec<&Countersigned> = p.countersignatures.iter().collect();
    rows.sort_by_key(|c| c.round);
    for c in rows {
        let (verdict, reason) = match (&c.coordinator, &c.hospital) {
            (Some(k), _) => (if k.agrees { "agrees" } else { "disputes" }, k.reason.clone()),
            (None, Some(r)) => (if s(r, "agrees") == "true" { "agrees" } else { "disputes" }, s(r, "reason")),
            (None, None) => ("—", String::new()),
        };
        let signature = match &c.coordinator {
            Some(k) if k.stands() && ca_checked => "verified".to_string(),
            Some(k) if k.stands() => "signature verifies; certificate not checked against a CA".to_string(),
            Some(k) => format!("FAILED: {}", k.problems.join("; ")),
            None => "FAILED: not in the coordinator's log".to_string(),
        };
        let hospital = if !c.differences.is_empty() {
            format!("MISMATCH: {}", c.differences.join("; "))
        } else if c.cross_checked {
            "matches".to_string()
        } else {
            "not given".to_string()
        };
        let class = if c.failed() { "bad" } else { "ok" };
        let _ = write!(
            h,
            "<tr class=\"{class}\"><td>{}</td><td>{}</td><td>{verdict}</td><td>{}</td><td class=\"{}\">{}</td><td class=\"{}\">{}</td></tr>",
            c.round,
            esc(&c.node),
            esc(&reason),
            if signature == "verified" { "ok" } else { "bad" },
            esc(&signature),
            if c.differences.is_empty() { "ok" } else { "bad" },
            esc(&hospital)
        );
        let md = |t: &str| t.replace('|', "\\|").replace('\n', " ");
        let strong = |t: String| {
            if t.starts_with("FAILED") || t.starts_with("MISMATCH") || t.starts_with("signature verifies;") {
                format!("**{t}**")
            } else {
                t
            }
        };
        let _ = writeln!(
            m,
            "| {} | {} | {verdict} | {} | {} | {} |",
            c.round,
            md(&c.node),
            md(&reason),
            strong(md(&signature)),
            strong(md(&hospital))
        );
    }
    // A receipt a round record asked for that no log holds: its own red row.
    for (round, node) in &p.missing {
        let text = format!("MISSING: no countersignature from {node}");
        let _ = write!(
            h,
            "<tr class=\"bad\"><td>{round}</td><td>{}</td><td>—</td><td></td><td class=\"bad\">{}</td><td>—</td></tr>",
            esc(node),
            esc(&text)
        );
        let _ = writeln!(m, "| {round} | {} | — |  | **{}** | — |", node.replace('|', "\\|"), text.replace('|', "\\|"));
    }
    h.push_str("</table>");
    m.push('\n');
}

#[cfg(test)]
mod tests {
    use sanctum_protocol::audit::GENESIS_PREV;
    use serde_json::json;

    use super::*;

    fn record(seq: u64, event: &str, params: Value) -> Record {
        Record {
            seq,
            time: "t".into(),
            actor: "c".into(),
            event: event.into(),
            params: serde_json::from_value(params).unwrap(),
            prev: GENESIS_PREV.into(),
            sig: "00".into(),
        }
    }

    fn log(records: Vec<Record>) -> Log {
        let verified = audit::Verified {
            records: records.len() as u64,
            writer: "coordinator".into(),
            role: "coordinator".into(),
            fingerprint: "ff".into(),
            head_behind: false,
        };
        Log { path: "audit.jsonl".into(), verdict: Ok(verified), records }
    }

    /// A round number is the log's: a `round_opened` of round 10^12 is one entry (it once
    /// resized a vector to 10^12 slots and exhausted memory).
    #[test]
    fn a_huge_round_number_costs_one_entry() {
        let coord = log(vec![
            record(1, "plan_submitted", json!({"plan_id": "p", "name": "n", "rounds": 2})),
            record(2, "round_opened", json!({"plan_id": "p", "round": 1_000_000_000_000u64})),
            record(3, "round_closed", json!({"plan_id": "p", "round": u64::MAX})),
            record(4, "round_opened", json!({"plan_id": "p", "round": 1})),
        ]);
        let plans = plans(&coord, None);
        let rounds: Vec<u64> = plans[0].rounds.keys().copied().collect();
        assert_eq!(rounds, vec![1, 1_000_000_000_000, u64::MAX]);
    }

    /// Each node a round record was sent to owes a receipt for that record: one the log holds
    /// (even a failed one, shown as FAILED) is not missing; one for another record is.
    #[test]
    fn a_receipt_a_round_record_asked_for_and_no_log_holds_is_missing() {
        let rr = record(2, "round_record", json!({"plan_id": "p", "round": 1, "reported": ["a", "b", "c"]}));
        let hash = ContentHash::of(rr.line().as_bytes()).to_hex();
        let receipt = |node: &str, hash: &str| {
            record(
                3,
                "receipt",
                json!({"plan_id": "p", "round": 1, "node": node, "record_sha256": hash, "agrees": true}),
            )
        };
        let coord = log(vec![
            record(1, "plan_submitted", json!({"plan_id": "p", "name": "n"})),
            rr,
            receipt("a", &hash),
            receipt("c", &"ab".repeat(32)),
        ]);
        let mut plans = plans(&coord, None);
        cross_check(&mut plans, &[]);
        find_missing(&mut plans);
        assert_eq!(plans[0].missing, vec![(1, "b".to_string()), (1, "c".to_string())]);
        assert!(plans[0].countersignatures.iter().all(|c| !c.coordinator.as_ref().unwrap().stands()));
    }
}
