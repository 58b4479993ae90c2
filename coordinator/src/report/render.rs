//! The report's two renderings, written side by side so they say the same: the HTML page (inline
//! CSS and SVG, no script) and its Markdown variant. Everything shown comes from the typed events
//! of the [`super::model`] views.

use std::fmt::Write as _;

use sanctum_protocol::audit::AuditEvent;
use sanctum_protocol::plan::PrivacyMode;

use super::Findings;
use super::model::{Countersigned, Entry, Log, PlanView, charges, short};
use crate::receipts::Checked;

pub(super) fn esc(t: &str) -> String {
    t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A number as the log holds it (JSON's spelling: `1.0`, and `null` for none or non-finite).
fn num(x: Option<f64>) -> String {
    x.map_or_else(|| "null".to_string(), |x| serde_json::Value::from(x).to_string())
}

fn privacy(mode: PrivacyMode) -> &'static str {
    match mode {
        PrivacyMode::None => "none",
        PrivacyMode::Example => "example",
        PrivacyMode::Client => "client",
    }
}

/// The HTML page and the Markdown text after their headers and summaries: the logs, each plan,
/// the authentication failures and each hospital.
pub(super) fn body(coord: &Log, nodes: &[Log], plans: &[PlanView], ca_checked: bool, h: &mut String, m: &mut String) {
    logs(coord, nodes, h, m);
    for p in plans {
        plan(p, ca_checked, h, m);
    }
    authentication_failures(coord, h, m);
    for node in nodes.iter().filter(|n| n.verdict.is_ok()) {
        hospital(node, h, m);
    }
}

/// The verification verdicts, and any record a verified log holds that this version cannot read.
fn logs(coord: &Log, nodes: &[Log], h: &mut String, m: &mut String) {
    h.push_str(
        "<h2 id=\"logs\">Logs</h2><table><tr><th>writer</th><th>log</th><th>records</th><th>verification</th></tr>",
    );
    m.push_str("## Logs\n\n| writer | log | records | verification |\n|---|---|---|---|\n");
    for log in std::iter::once(coord).chain(nodes.iter()) {
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
    let unreadable: Vec<(&Log, String)> = std::iter::once(coord)
        .chain(nodes.iter())
        .flat_map(|l| l.trusted_unreadable().iter().map(move |e| (l, e.to_string())))
        .collect();
    if !unreadable.is_empty() {
        h.push_str("<h2 id=\"unreadable\">Unreadable records</h2><ul>");
        m.push_str("## Unreadable records\n\n");
        for (log, e) in unreadable {
            let _ = write!(h, "<li class=\"bad\">{}: {}</li>", esc(&log.path.display().to_string()), esc(&e));
            let _ = writeln!(m, "- **{}: {e}**", log.path.display());
        }
        h.push_str("</ul>");
        m.push('\n');
    }
}

fn plan(p: &PlanView, ca_checked: bool, h: &mut String, m: &mut String) {
    let _ = write!(h, "<h2 id=\"plan-{}\">Plan {} <code>{}</code></h2>", short(&p.id), esc(&p.name), short(&p.id));
    let _ = writeln!(m, "## Plan {} `{}`\n", p.name, short(&p.id));
    let sub = &p.submitted;
    let mut params = vec![
        ("submitted", sub.record.time.clone()),
        ("submitted by (certificate)", short(&sub.record.actor).to_string()),
    ];
    let mut initial = String::new();
    if let AuditEvent::PlanSubmitted {
        run,
        run_number,
        rounds,
        strategy,
        privacy: mode,
        noise_multiplier,
        target_epsilon,
        delta,
        secure_aggregation,
        initial_model,
        ..
    } = &sub.event
    {
        let run = match run.as_deref() {
            None | Some("") => "—".to_string(),
            Some(run) => format!("{} ({})", run_number.map(|n| n.to_string()).unwrap_or_default(), short(run)),
        };
        params.extend([
            ("run", run),
            ("rounds", rounds.to_string()),
            ("strategy", strategy.clone()),
            ("differential privacy", privacy(*mode).to_string()),
            ("noise multiplier", num(*noise_multiplier)),
            ("target ε", num(*target_epsilon)),
            ("δ", num(*delta)),
            ("secure aggregation", secure_aggregation.to_string()),
            ("initial model", short(initial_model).to_string()),
        ]);
        initial = initial_model.clone();
    }
    h.push_str("<table>");
    m.push_str("| parameter | value |\n|---|---|\n");
    for (k, v) in &params {
        let v = if v.is_empty() || v == "null" { "—" } else { v };
        let _ = write!(h, "<tr><th>{k}</th><td>{}</td></tr>", esc(v));
        let _ = writeln!(m, "| {k} | {v} |");
    }
    h.push_str("</table>");
    m.push('\n');
    participants(p, h, m);
    rounds(p, ca_checked, h, m);
    countersignature_table(p, ca_checked, h, m);
    let released = p.rounds.values().filter_map(|(_, _, a)| match a.as_ref().map(|e| &e.event) {
        Some(AuditEvent::AggregateReleased { model_sha256, .. }) => Some(model_sha256.clone()),
        _ => None,
    });
    let chain: Vec<String> = std::iter::once(initial).chain(released).map(|x| short(&x).to_string()).collect();
    let _ = write!(h, "<p>Hash chain: <code>{}</code></p>", esc(&chain.join(" → ")));
    let _ = writeln!(m, "Hash chain: `{}`\n", chain.join(" → "));
    if let Some(AuditEvent::ModelExported { path, model_sha256, .. }) = p.exported.as_ref().map(|e| &e.event) {
        let _ = write!(h, "<p>Exported: <code>{}</code> (model {})</p>", esc(path), short(model_sha256));
        let _ = writeln!(m, "Exported: `{path}` (model {})\n", short(model_sha256));
    }
    outcome(p, h, m);
}

fn participants(p: &PlanView, h: &mut String, m: &mut String) {
    h.push_str("<h3>Participants</h3><table><tr><th>hospital</th><th>decision</th><th>reason</th><th>ε it would spend</th></tr>");
    m.push_str("### Participants\n\n| hospital | decision | reason | ε |\n|---|---|---|---|\n");
    for d in &p.decisions {
        let (decision, d) = match &d.event {
            AuditEvent::PlanAccepted(d) => ("accepted", d),
            AuditEvent::PlanRefused(d) => ("refused", d),
            _ => continue,
        };
        let eps = d.epsilon.filter(|e| e.is_finite()).map(|e| format!("{e:.3}")).unwrap_or_else(|| "—".into());
        let node = d.node.clone().unwrap_or_default();
        let _ = write!(
            h,
            "<tr><td>{}</td><td class=\"{}\">{decision}</td><td>{}</td><td>{eps}</td></tr>",
            esc(&node),
            if decision == "accepted" { "ok" } else { "bad" },
            esc(&d.reason)
        );
        let _ = writeln!(m, "| {node} | {decision} | {} | {eps} |", d.reason);
    }
    h.push_str("</table>");
    m.push('\n');
}

fn rounds(p: &PlanView, ca_checked: bool, h: &mut String, m: &mut String) {
    h.push_str("<h3>Rounds and model lineage</h3><table><tr><th>round</th><th>opened</th><th>participants</th><th>secure aggregation (t)</th><th>reported</th><th>dropped</th><th>starting model</th><th>released model</th><th>receipts</th></tr>");
    m.push_str("### Rounds and model lineage\n\n| round | opened | participants | SA threshold | reported | dropped | starting model | released model | receipts |\n|---|---|---|---|---|---|---|---|---|\n");
    for (round, (open, close, agg)) in &p.rounds {
        let (opened, participants, threshold, starting) = match open.as_ref().map(|e| (&e.record, &e.event)) {
            Some((r, AuditEvent::RoundOpened { participants, threshold, model_sha256, .. })) => {
                (r.time.clone(), participants.join(", "), *threshold, model_sha256.clone())
            }
            _ => Default::default(),
        };
        let (reported, dropped) = match close.as_ref().map(|e| &e.event) {
            Some(AuditEvent::RoundClosed { reported, dropped, .. }) => (reported.join(", "), dropped.join(", ")),
            _ => Default::default(),
        };
        let released = match agg.as_ref().map(|e| &e.event) {
            Some(AuditEvent::AggregateReleased { model_sha256, .. }) => model_sha256.clone(),
            _ => String::new(),
        };
        let row = [
            round.to_string(),
            opened,
            participants,
            threshold.map_or_else(|| "off".to_string(), |t| format!("t = {t}")),
            reported,
            dropped,
            short(&starting).to_string(),
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
}

/// Failures (rejected updates, dropped nodes) and how the plan ended.
fn outcome(p: &PlanView, h: &mut String, m: &mut String) {
    h.push_str("<h3>Failures and outcome</h3><ul>");
    m.push_str("### Failures and outcome\n\n");
    for e in &p.rejected {
        let AuditEvent::UpdateRejected { node, round, reason, .. } = &e.event else { continue };
        let time = &e.record.time;
        let _ = write!(h, "<li>{} round {round}: update from {} rejected: {}</li>", esc(time), esc(node), esc(reason));
        let _ = writeln!(m, "- {time} round {round}: update from {node} rejected: {reason}");
    }
    for (round, (_, close, _)) in &p.rounds {
        if let Some(AuditEvent::RoundClosed { dropped, .. }) = close.as_ref().map(|e| &e.event)
            && !dropped.is_empty()
        {
            let _ = write!(h, "<li>round {round}: dropped {}</li>", esc(&dropped.join(", ")));
            let _ = writeln!(m, "- round {round}: dropped {}", dropped.join(", "));
        }
    }
    match p.finished.as_ref().map(|e| &e.event) {
        Some(AuditEvent::PlanFinished {
            success,
            reason,
            rounds_completed,
            final_model_sha256,
            client_epsilon,
            client_delta,
            ..
        }) => {
            let ok = *success;
            let eps = Some(*client_epsilon)
                .filter(|e| *e > 0.0)
                .map(|e| format!("; client-level ε = {e:.3}, δ = {}", num(Some(*client_delta))))
                .unwrap_or_default();
            let _ = write!(
                h,
                "<li class=\"{}\">{}: {} after {rounds_completed} round(s), final model {}{}</li>",
                if ok { "ok" } else { "bad" },
                if ok { "succeeded" } else { "failed" },
                esc(reason),
                short(final_model_sha256),
                esc(&eps)
            );
            let _ = writeln!(
                m,
                "- {}: {reason} after {rounds_completed} round(s), final model {}{eps}",
                if ok { "succeeded" } else { "failed" },
                short(final_model_sha256)
            );
        }
        _ => {
            h.push_str("<li>still running when the log was read</li>");
            m.push_str("- still running when the log was read\n");
        }
    }
    h.push_str("</ul>");
    m.push('\n');
}

fn authentication_failures(coord: &Log, h: &mut String, m: &mut String) {
    let auth: Vec<(&str, &str, &str)> = coord
        .trusted()
        .iter()
        .filter_map(|e| match &e.event {
            AuditEvent::AuthenticationFailed { remote, reason, .. } => {
                Some((e.record.time.as_str(), remote.as_str(), reason.as_str()))
            }
            _ => None,
        })
        .collect();
    if auth.is_empty() {
        return;
    }
    h.push_str("<h2 id=\"auth\">Authentication failures</h2><ul>");
    m.push_str("## Authentication failures\n\n");
    for (time, remote, reason) in auth {
        let _ = write!(h, "<li>{} from {}: {}</li>", esc(time), esc(remote), esc(reason));
        let _ = writeln!(m, "- {time} from {remote}: {reason}");
    }
    h.push_str("</ul>");
    m.push('\n');
}

/// What left a hospital (from its own log) and the ε it spent against its cap.
fn hospital(node: &Log, h: &mut String, m: &mut String) {
    let name = node.writer();
    let _ = write!(h, "<h2 id=\"hospital-{}\">Hospital {}</h2>", esc(&name), esc(&name));
    let _ = writeln!(m, "## Hospital {name}\n");
    let (mut sent, mut bytes, mut masked) = (0usize, 0u64, 0usize);
    let mut decisions: Vec<String> = Vec::new();
    for e in node.trusted() {
        match &e.event {
            AuditEvent::UpdateSent { bytes: b, masked: mk, .. } => {
                sent += 1;
                bytes = bytes.saturating_add(*b);
                masked += usize::from(*mk);
            }
            AuditEvent::PlanAccepted(d) | AuditEvent::PlanRefused(d) => {
                let verb = if matches!(e.event, AuditEvent::PlanAccepted(_)) { "accepted" } else { "refused" };
                let why = if d.reason.is_empty() { String::new() } else { format!(" ({})", d.reason) };
                decisions.push(format!("{verb} {}{why}", short(&d.plan_id)));
            }
            _ => {}
        }
    }
    let _ = write!(
        h,
        "<p>Plans: {}. Updates that left: {sent} ({masked} masked under secure aggregation), {bytes} bytes; each one's SHA-256 is in the log.</p>",
        esc(&decisions.join("; ")),
    );
    let _ =
        writeln!(m, "Plans: {}. Updates that left: {sent} ({masked} masked), {bytes} bytes.\n", decisions.join("; "));
    let series = charges(node);
    if series.is_empty() {
        h.push_str("<p>No differential-privacy charges.</p>");
        m.push_str("No differential-privacy charges.\n\n");
    } else {
        h.push_str(&super::chart::epsilon_plot(&format!("{name}: ε spent against the cap"), &series));
        m.push_str("| plan | rounds charged | ε spent | cap |\n|---|---|---|---|\n");
        for (plan, pts) in &series {
            let last = pts.last().map(|c| c.1).unwrap_or(0.0);
            let cap = pts.last().and_then(|c| c.2).map(|c| c.to_string()).unwrap_or_else(|| "none".into());
            let _ = writeln!(m, "| {plan} | {} | {last:.3} | {cap} |", pts.len());
        }
        m.push('\n');
    }
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

/// The hospital's own verdict and reason, when only its log holds the countersignature.
fn hospital_side(e: &Entry) -> (&'static str, String) {
    match &e.event {
        AuditEvent::ReceiptSigned { agrees, reason, .. } => {
            (if *agrees { "agrees" } else { "disputes" }, reason.clone())
        }
        _ => ("—", String::new()),
    }
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
            (None, Some(e)) => hospital_side(e),
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

/// The summary line over all countersignatures (both renderings).
pub(super) fn summary(findings: &Findings, ca_checked: bool) -> String {
    let bad = findings.countersignatures - findings.countersignatures_verified - findings.unchecked;
    let unchecked = if ca_checked {
        String::new()
    } else {
        format!(
            " ({} with a valid signature NOT CHECKED AGAINST A CA, so not verified: pass the consortium CA)",
            findings.unchecked
        )
    };
    let unreadable = match findings.unreadable_records {
        0 => String::new(),
        n => format!(" {n} record(s) of verified logs could not be read (listed under Unreadable records)."),
    };
    format!(
        "Countersignatures: {} in the coordinator's log, {} verified{unchecked}, {bad} FAILED, {} MISSING; {} mismatch(es) with the hospitals' own logs.{unreadable}",
        findings.countersignatures, findings.countersignatures_verified, findings.missing, findings.mismatches
    )
}
