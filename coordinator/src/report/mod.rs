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
//!
//! Every record is read as its typed [`AuditEvent`](sanctum_protocol::audit::AuditEvent); a
//! record of a known kind whose parameters do not fit is listed (red) and used nowhere.
//!
//! # Layout
//! - this file: [`write`], [`Findings`], [`ReportError`].
//! - `model`: the logs read as typed events, each plan's view, each hospital's ε charges.
//! - `render`: the HTML page and its Markdown variant, side by side.
//! - `chart`: the ε plot (SVG).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use sanctum_protocol::audit;

use crate::receipts::Checked;

mod chart;
mod model;
mod render;
#[cfg(test)]
mod tests;

use model::Log;

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
    /// Records of verified logs whose parameters do not fit their kind: listed, never used.
    pub unreadable_records: usize,
}

impl Findings {
    /// A countersignature failed, is missing or mismatches (the report's exit status is 1).
    pub fn failed(&self) -> bool {
        self.countersignatures_verified + self.unchecked < self.countersignatures
            || self.mismatches > 0
            || self.missing > 0
            || self.unreadable_records > 0
    }
}

/// The report's files and what it found.
#[derive(Debug)]
pub struct Written {
    pub html: PathBuf,
    pub md: PathBuf,
    pub findings: Findings,
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
    let mut plans = model::plans(&coord, ca_pem.as_ref().map(|_| &ca_check as audit::CertCheck<'_>));
    model::cross_check(&mut plans, &nodes);
    model::find_missing(&mut plans);
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
        unreadable_records: std::iter::once(&coord).chain(nodes.iter()).map(|l| l.trusted_unreadable().len()).sum(),
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
        let _ = write!(h, "<p class=\"banner\">{}</p>", render::esc(&text));
        let _ = writeln!(m, "> **{text}**\n");
    }
    let summary = render::summary(&findings, ca_checked);
    let alarm = findings.failed() || !ca_checked;
    let _ = write!(h, "<p class=\"{}\">{}</p>", if alarm { "bad" } else { "ok" }, render::esc(&summary));
    let _ = writeln!(m, "{}\n", if alarm { format!("**{summary}**") } else { summary.clone() });
    render::body(&coord, &nodes, &plans, ca_checked, &mut h, &mut m);
    h.push_str("</body></html>\n");
    std::fs::create_dir_all(out)?;
    let (html, md) = (out.join("report.html"), out.join("report.md"));
    std::fs::write(&html, h)?;
    std::fs::write(&md, m)?;
    Ok(Written { html, md, findings })
}
