//! The status page as a pure function of a [`Snapshot`]: server-side HTML with inline CSS and
//! inline SVG charts, no script, font or anything fetched, so it works offline inside a hospital
//! network. Every string that came from a node or a plan (names, reasons, metric names, versions)
//! is escaped here, and every list is bounded (runs shown, refusals, reasons' length), so the
//! page's size depends on the consortium, not on what a member sends.

use std::collections::BTreeMap;
use std::fmt::Write;

use sanctum_protocol::proto::{PlanStatusResponse, PlanSummary};

use super::chart::{Series, line_chart};
use crate::metrics::RoundTime;
use crate::status::state;

/// Runs listed in the table (the newest); [`RUNS_DETAILED`] of them get a section each.
pub const RUNS_LISTED: usize = 50;
pub const RUNS_DETAILED: usize = 8;
/// Refusals shown per run (the newest).
pub const REFUSALS_SHOWN: usize = 50;
/// Characters of a reason shown at most.
pub const REASON_CHARS: usize = 300;
/// Hospitals listed at most.
pub const NODES_SHOWN: usize = 500;

/// What the page shows, taken under the coordinator's locks and rendered without them.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// When it was taken (Unix ms).
    pub now_unix_ms: u64,
    /// Seconds between reloads (0: none).
    pub refresh_secs: u64,
    /// Runs since the coordinator started (and those its store remembers), newest first.
    pub runs: Vec<RunView>,
    /// How many runs there are in all (the page lists [`RUNS_LISTED`]).
    pub runs_total: usize,
    /// Every hospital seen or connected, by name.
    pub nodes: Vec<NodeView>,
}

/// One run as the page shows it.
#[derive(Clone, Debug, Default)]
pub struct RunView {
    /// Its summary, with every round this process closed (metrics per node).
    pub summary: PlanSummary,
    /// Its status as `plan status` assembles it (participants and their states, failures).
    pub status: PlanStatusResponse,
    /// When its rounds closed and how long each was open (rounds this process saw).
    pub round_times: Vec<RoundTime>,
    /// Declined offers and rejected updates, oldest first.
    pub refusals: Vec<Refusal>,
}

/// A refusal the run's kept events hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Refusal {
    /// The round (0: the offer).
    pub round: u32,
    pub node: String,
    /// "declined the plan" or "update rejected".
    pub what: &'static str,
    pub reason: String,
}

/// A hospital seen or connected.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    pub connected: bool,
    pub last_seen_unix_ms: u64,
    pub version: String,
    pub device: String,
}

/// HTML-escapes `t` for text and attribute values.
pub fn esc(t: &str) -> String {
    let mut out = String::with_capacity(t.len());
    for c in t.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Control characters (a node's reason with escapes) show as nothing.
            c if c.is_control() && c != '\n' && c != '\t' => {}
            c => out.push(c),
        }
    }
    out
}

/// `t` cut to [`REASON_CHARS`] characters (with an ellipsis) and escaped.
fn clip(t: &str) -> String {
    if t.chars().count() > REASON_CHARS {
        esc(&(t.chars().take(REASON_CHARS).collect::<String>() + "…"))
    } else {
        esc(t)
    }
}

fn short(id: &str) -> String {
    esc(crate::status::head(id, 12))
}

/// A Unix-ms time as `YYYY-MM-DD HH:MM:SS UTC` ("—" for 0).
fn when(ms: u64) -> String {
    if ms == 0 {
        return "—".into();
    }
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000);
    match t {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => "—".into(),
    }
}

/// How long ago `ms` was, before `now`.
fn ago(now: u64, ms: u64) -> String {
    if ms == 0 {
        return "never".into();
    }
    let s = now.saturating_sub(ms) / 1000;
    match s {
        0..=59 => format!("{s} s ago"),
        60..=3599 => format!("{} min ago", s / 60),
        _ => format!("{} h ago", s / 3600),
    }
}

const STYLE: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:20px;color:#1d2329;background:#f6f7f9}\
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ccd;padding-bottom:4px}\
h3{font-size:15px;margin:16px 0 6px}.muted{color:#667}table{border-collapse:collapse;background:#fff;margin:4px 0 10px}\
td,th{border:1px solid #d5d8de;padding:3px 8px;font-size:13px;text-align:left;vertical-align:top}th{background:#eceff3}\
code{font-size:12px}.running{color:#0b63b6;font-weight:600}.succeeded{color:#18794e;font-weight:600}\
.failed,.cancelled{color:#b42318;font-weight:600}.st{display:inline-block;padding:1px 6px;border-radius:8px;font-size:12px}\
.idle{background:#e9ecef}.in_round{background:#fff3bf}.training{background:#d0ebff}.uploading{background:#b2f2bb}\
.late{background:#ffd8a8}.dropped,.refused{background:#ffc9c9}.disconnected{background:#dee2e6;color:#555}\
.bar{display:inline-block;width:120px;height:10px;background:#e3e6ea;vertical-align:middle;margin-right:6px}\
.bar span{display:block;height:10px;background:#3b82c4}.charts{display:flex;flex-wrap:wrap;gap:12px}\
.cards{display:flex;gap:12px;margin:12px 0}.card{background:#fff;border:1px solid #d5d8de;padding:8px 14px}\
.card b{display:block;font-size:20px}td.n{white-space:nowrap}.note{font-size:12px;color:#556;max-width:900px}";

/// The whole page.
pub fn render(s: &Snapshot) -> String {
    let mut h = String::with_capacity(64 * 1024);
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">");
    if s.refresh_secs > 0 {
        let _ = write!(h, "<meta http-equiv=\"refresh\" content=\"{}\">", s.refresh_secs);
    }
    let _ = write!(h, "<title>Sanctum coordinator status</title><style>{STYLE}</style></head><body>");
    h.push_str("<h1>Sanctum coordinator</h1>");
    let _ = write!(
        h,
        "<div class=\"muted\">status at {}{} · read-only · metrics at <a href=\"/metrics\">/metrics</a></div>",
        when(s.now_unix_ms),
        if s.refresh_secs > 0 { format!(" · reloads every {} s", s.refresh_secs) } else { String::new() }
    );
    let running = s.runs.iter().filter(|r| r.summary.status == "running").count();
    let connected = s.nodes.iter().filter(|n| n.connected).count();
    let _ = write!(
        h,
        "<div class=\"cards\"><div class=\"card\"><b>{running}</b>runs running</div><div class=\"card\"><b>{}</b>runs in all</div>\
         <div class=\"card\"><b>{connected} / {}</b>hospitals connected</div></div>",
        s.runs_total,
        s.nodes.len()
    );
    runs_table(&mut h, s);
    for run in s.runs.iter().take(RUNS_DETAILED) {
        run_section(&mut h, s, run);
    }
    nodes_table(&mut h, s);
    h.push_str(
        "<h2>What this page knows</h2><p class=\"note\">Everything here is what the coordinator holds: the runs' \
         summaries, the events it keeps of each run (<code>limits.events_per_run</code>), the nodes it has seen, and \
         round times it measured since it started (a run resumed after a restart has no times for its earlier rounds). \
         <b>ε per hospital</b>: <i>spent on this run so far</i> is the ε the hospital sent with its latest update \
         (<code>epsilon_spent</code>); <i>for the whole plan</i> is what it declared when it accepted: its total \
         for this plan after the plan's last round (<code>PrivacyCost</code>). <i>Spent in all</i> adds what its \
         data had spent on other plans and runs when it accepted, and the cap is its <code>policy.max_epsilon</code>: \
         a hospital sends both only if its <code>policy.share_budget</code> says so, and the page does not guess \
         them otherwise. They are the hospital's word; its own ledger and audit log are the record \
         (<code>sanctum-node budget</code>, <code>sanctum-coordinator audit report --node-log</code>). \
         Client-level ε of a DP-FedAvg plan is shown once the run has finished.</p>",
    );
    h.push_str("</body></html>\n");
    h
}

fn status_class(status: &str) -> &'static str {
    match status {
        "running" => "running",
        "succeeded" => "succeeded",
        "cancelled" => "cancelled",
        _ => "failed",
    }
}

fn runs_table(h: &mut String, s: &Snapshot) {
    h.push_str("<h2>Plans and runs</h2>");
    if s.runs.is_empty() {
        h.push_str("<p class=\"muted\">no plan has been submitted yet</p>");
        return;
    }
    h.push_str(
        "<table><tr><th>plan</th><th>plan id</th><th>run</th><th>#</th><th>status</th><th>rounds</th>\
         <th>started</th><th>finished</th><th>reason</th></tr>",
    );
    for r in s.runs.iter().take(RUNS_LISTED) {
        let p = &r.summary;
        let pct = if p.rounds_planned > 0 {
            (f64::from(p.rounds_completed) / f64::from(p.rounds_planned) * 100.0).min(100.0)
        } else {
            0.0
        };
        let _ = write!(
            h,
            "<tr><td>{}</td><td><code>{}</code></td><td><code>{}</code></td><td>{}</td><td class=\"{}\">{}</td>\
             <td><span class=\"bar\"><span style=\"width:{pct:.0}%\"></span></span>{} / {}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&p.name),
            short(&p.plan_id),
            short(&p.run),
            p.run_number,
            status_class(&p.status),
            esc(&p.status),
            p.rounds_completed,
            p.rounds_planned,
            when(p.started_unix_ms),
            when(p.finished_unix_ms),
            clip(&p.reason)
        );
    }
    h.push_str("</table>");
    if s.runs_total > RUNS_LISTED.min(s.runs.len()) {
        let _ = write!(
            h,
            "<p class=\"muted\">the newest {} of {} runs; `sanctum-coordinator plan list` lists them all</p>",
            RUNS_LISTED.min(s.runs.len()),
            s.runs_total
        );
    }
}

/// The state a hospital is in for a run, as the page names it: idle (accepted, or reported its
/// last round and waiting for the next), in round (not heard from yet: fetching the model),
/// training, uploading, late, dropped, refused; disconnected when its stream is closed and it
/// is not in a round.
pub fn hospital_state(participant_state: &str, connected: bool) -> &'static str {
    let s = match participant_state {
        state::ACCEPTED | state::REPORTED => "idle",
        state::IN_ROUND => "in_round",
        state::TRAINING => "training",
        state::UPLOADING => "uploading",
        state::LATE => "late",
        state::DROPPED => "dropped",
        state::REFUSED => "refused",
        _ => "idle",
    };
    if !connected && s == "idle" { "disconnected" } else { s }
}

fn state_label(s: &str) -> &'static str {
    match s {
        "in_round" => "in round (fetching)",
        "idle" => "idle",
        "training" => "training",
        "uploading" => "uploading",
        "late" => "late",
        "dropped" => "dropped",
        "refused" => "refused",
        _ => "disconnected",
    }
}

fn run_section(h: &mut String, s: &Snapshot, run: &RunView) {
    let p = &run.summary;
    let _ = write!(
        h,
        "<h2>{} <span class=\"muted\">run {} · <code>{}</code></span> <span class=\"{}\">{}</span></h2>",
        esc(&p.name),
        p.run_number,
        short(&p.run),
        status_class(&p.status),
        esc(&p.status)
    );
    let mut line = format!("{} of {} rounds completed", p.rounds_completed, p.rounds_planned);
    if run.status.current_round > 0 {
        let _ = write!(line, " · round {} open", run.status.current_round);
    }
    if run.status.client_epsilon > 0.0 {
        let _ =
            write!(line, " · client-level ε = {:.3} (δ = {:e})", run.status.client_epsilon, run.status.client_delta);
    }
    let _ = write!(h, "<p>{line}</p>");
    // Hospitals of this run.
    let connected: BTreeMap<&str, bool> = s.nodes.iter().map(|n| (n.name.as_str(), n.connected)).collect();
    if run.status.participants.is_empty() {
        h.push_str("<p class=\"muted\">no hospital has answered the offer yet</p>");
    } else {
        h.push_str(
            "<table><tr><th>hospital</th><th>state</th><th>round</th><th>ε spent on this run so far (reported)</th>\
             <th>ε for the whole plan (declared)</th><th>δ</th><th>ε spent in all, against the hospital's cap</th>\
             <th>reason</th></tr>",
        );
        let spent = epsilon_spent(p);
        for part in &run.status.participants {
            let finished = p.status != "running";
            let st = if finished && part.state != state::REFUSED {
                // A finished run has no live states: say what the hospital's last round was.
                if part.state == state::LATE || part.state == state::DROPPED { "dropped" } else { "idle" }
            } else {
                hospital_state(&part.state, connected.get(part.node.as_str()).copied().unwrap_or(false))
            };
            let (eps, delta) = match &part.privacy {
                Some(c) if c.epsilon.is_finite() && c.epsilon > 0.0 => {
                    (format!("{:.3}", c.epsilon), format!("{:e}", c.delta))
                }
                _ => ("— (no DP at this hospital's answer)".into(), "—".into()),
            };
            let reported = spent.get(part.node.as_str()).copied();
            let so_far = reported.map_or_else(|| "—".to_string(), |(round, e)| format!("{e:.3} (round {round})"));
            let budget = budget_cell(Budget::of(part.privacy.as_ref()), reported.map_or(0.0, |(_, e)| e));
            let _ = write!(
                h,
                "<tr><td>{}</td><td><span class=\"st {st}\">{}</span></td><td>{}</td><td class=\"n\">{so_far}</td>\
                 <td class=\"n\">{eps}</td><td class=\"n\">{delta}</td><td>{budget}</td><td>{}</td></tr>",
                esc(&part.node),
                state_label(st),
                if part.round > 0 { part.round.to_string() } else { "—".into() },
                clip(&part.reason)
            );
        }
        h.push_str("</table>");
    }
    // Charts: rounds over time, and the headline metric per hospital over rounds.
    h.push_str("<div class=\"charts\">");
    let start = p.started_unix_ms;
    // Seconds for a run shorter than ten minutes, minutes after that.
    let span_ms = run.round_times.last().map_or(0, |t| t.closed_unix_ms.saturating_sub(start));
    let (unit_ms, x_desc) = if span_ms < 600_000 {
        (1_000.0, "seconds since the run started")
    } else {
        (60_000.0, "minutes since the run started")
    };
    let timeline: Vec<(f64, f64)> = run
        .round_times
        .iter()
        .map(|t| (t.closed_unix_ms.saturating_sub(start) as f64 / unit_ms, f64::from(t.round)))
        .collect();
    let mut series = vec![Series::line("rounds completed", timeline)];
    let durations: Vec<(f64, f64)> =
        run.round_times.iter().filter_map(|t| Some((f64::from(t.round), t.seconds?))).collect();
    h.push_str(&line_chart("Rounds over time", x_desc, "round", &series));
    series = vec![Series::line("seconds open", durations)];
    h.push_str(&line_chart("Round duration", "round", "seconds", &series));
    match headline(p) {
        Some(metric) => {
            let series = metric_series(p, &metric, true);
            h.push_str(&line_chart(&format!("{metric} over rounds"), "round", &metric, &series));
        }
        None => h.push_str(
            "<p class=\"muted\">no test metric reported: each hospital's <code>policy.test_metrics</code> \
             decides whether its metric leaves</p>",
        ),
    }
    let eps = epsilon_series(p, &run.status);
    if !eps.is_empty() {
        h.push_str(&line_chart("ε spent per hospital, against its cap", "round", "ε spent", &eps));
    }
    h.push_str("</div>");
    // Refusals and failures.
    let failures = &run.status.round_failures;
    if run.refusals.is_empty() && failures.is_empty() {
        h.push_str("<p class=\"muted\">no refusals or failed rounds in the kept events</p>");
    } else {
        h.push_str("<h3>Refusals and failed rounds</h3><table><tr><th>round</th><th>hospital</th><th>what</th><th>reason</th></tr>");
        let skip = run.refusals.len().saturating_sub(REFUSALS_SHOWN);
        for r in run.refusals.iter().skip(skip) {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                if r.round > 0 { r.round.to_string() } else { "offer".into() },
                esc(&r.node),
                r.what,
                clip(&r.reason)
            );
        }
        for f in failures {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>—</td><td>round attempt {} failed{}</td><td>{}</td></tr>",
                f.round,
                f.attempt,
                if f.retrying { ", retrying" } else { "" },
                clip(&f.reason)
            );
        }
        h.push_str("</table>");
        if skip > 0 {
            let _ = write!(h, "<p class=\"muted\">{skip} earlier refusals not shown</p>");
        }
    }
}

/// The metric nodes send with each update for the ε they have spent on the run so far (the
/// node's `round_metrics`); plotted on its own, never as the headline.
const EPSILON_SPENT: &str = sanctum_protocol::EPSILON_SPENT_METRIC;

/// A hospital's budget as it shared it with its answer (`policy.share_budget`); figures that
/// are not finite non-negative numbers are treated as not shared.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Budget {
    /// ε its data had spent on other plans and runs when it answered.
    before: Option<f64>,
    /// Its `policy.max_epsilon`.
    cap: Option<f64>,
}

impl Budget {
    fn of(cost: Option<&sanctum_protocol::proto::PrivacyCost>) -> Self {
        let ok = |v: Option<f64>| v.filter(|v| v.is_finite() && *v >= 0.0);
        let Some(c) = cost else { return Self::default() };
        Self { before: ok(c.epsilon_spent_before), cap: ok(c.max_epsilon).filter(|c| *c > 0.0) }
    }
}

/// The table cell for a hospital's ε in all (before this run plus `so_far` on it) against its cap.
fn budget_cell(b: Budget, so_far: f64) -> String {
    match (b.before, b.cap) {
        (Some(before), Some(cap)) => {
            let total = before + so_far;
            let class = if total > cap { "st dropped" } else { "n" };
            format!(
                "<span class=\"{class}\">{total:.3} of {cap}</span> ({:.0} %; {before:.3} before this run)",
                100.0 * total / cap
            )
        }
        (Some(before), None) => format!("{:.3} (no cap set; {before:.3} before this run)", before + so_far),
        (None, Some(cap)) => format!("cap {cap}"),
        (None, None) => "<span class=\"muted\">not shared (<code>policy.share_budget</code>)</span>".into(),
    }
}

/// Per hospital, the ε its data has spent in all over the run's rounds (from what it had spent
/// before the run, at round 0) and its cap as a dashed line over the planned rounds; a hospital
/// that shares no budget is drawn with this run's ε alone.
fn epsilon_series(p: &PlanSummary, status: &PlanStatusResponse) -> Vec<Series> {
    let budgets: BTreeMap<&str, Budget> =
        status.participants.iter().map(|s| (s.node.as_str(), Budget::of(s.privacy.as_ref()))).collect();
    let mut out = Vec::new();
    for s in metric_series(p, EPSILON_SPENT, false) {
        let b = budgets.get(s.label.as_str()).copied().unwrap_or_default();
        let Some(before) = b.before else {
            out.push(Series::line(format!("{} (this run)", s.label), s.points));
            continue;
        };
        let points = std::iter::once((0.0, before)).chain(s.points.iter().map(|(x, y)| (*x, before + y))).collect();
        out.push(Series::line(s.label.clone(), points));
        if let Some(cap) = b.cap {
            let end = f64::from(p.rounds_planned.max(1));
            out.push(Series { dashed: true, ..Series::line(format!("{} cap", s.label), vec![(0.0, cap), (end, cap)]) });
        }
    }
    out
}

/// The run's headline metric: the first name the nodes reported that is not [`EPSILON_SPENT`]
/// (none when every hospital's `policy.test_metrics` keeps it at home).
fn headline(p: &PlanSummary) -> Option<String> {
    p.rounds
        .iter()
        .flat_map(|r| r.metrics.iter())
        .map(|m| m.name.as_str())
        .find(|n| !n.is_empty() && *n != EPSILON_SPENT)
        .map(|n| n.chars().take(40).collect())
}

/// Metric `name` per hospital over rounds, from the round records this process holds, with the
/// sample-weighted mean when `mean` (not for ε, whose "samples" are DP steps).
fn metric_series(p: &PlanSummary, name: &str, mean: bool) -> Vec<Series> {
    let mut per_node: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    let mut means = Vec::new();
    for r in &p.rounds {
        let (mut sum, mut weight) = (0.0, 0.0);
        for m in r.metrics.iter().filter(|m| m.name == name && m.value.is_finite()) {
            per_node.entry(m.node.as_str()).or_default().push((f64::from(r.round), m.value));
            let w = m.samples.max(1) as f64;
            sum += w * m.value;
            weight += w;
        }
        if weight > 0.0 {
            means.push((f64::from(r.round), sum / weight));
        }
    }
    let mut series = Vec::new();
    if mean {
        series.push(Series { bold: true, ..Series::line("mean (by samples)", means) });
    }
    series.extend(per_node.into_iter().map(|(node, points)| Series::line(node, points)));
    series
}

/// Each hospital's latest reported ε spent on the plan, with the round it came with.
fn epsilon_spent(p: &PlanSummary) -> BTreeMap<&str, (u32, f64)> {
    let mut out = BTreeMap::new();
    for r in &p.rounds {
        for m in r.metrics.iter().filter(|m| m.name == EPSILON_SPENT && m.value.is_finite()) {
            out.insert(m.node.as_str(), (r.round, m.value));
        }
    }
    out
}

fn nodes_table(h: &mut String, s: &Snapshot) {
    h.push_str("<h2>Hospitals</h2>");
    if s.nodes.is_empty() {
        h.push_str("<p class=\"muted\">no hospital has connected since the coordinator's store began</p>");
        return;
    }
    // Each hospital's state in the running runs.
    let mut states: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for run in s.runs.iter().filter(|r| r.summary.status == "running") {
        for part in &run.status.participants {
            let connected = s.nodes.iter().any(|n| n.name == part.node && n.connected);
            let st = hospital_state(&part.state, connected);
            states.entry(part.node.as_str()).or_default().push(format!(
                "<span class=\"st {st}\">{}</span> in {}",
                state_label(st),
                esc(&run.summary.name)
            ));
        }
    }
    h.push_str("<table><tr><th>hospital</th><th>connected</th><th>last seen</th><th>version</th><th>device</th><th>in running runs</th></tr>");
    for n in s.nodes.iter().take(NODES_SHOWN) {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&n.name),
            if n.connected { "yes" } else { "no" },
            if n.connected { "now".into() } else { ago(s.now_unix_ms, n.last_seen_unix_ms) },
            esc(&n.version),
            esc(&n.device),
            states.get(n.name.as_str()).map(|v| v.join("<br>")).unwrap_or_else(|| "—".into())
        );
    }
    h.push_str("</table>");
    if s.nodes.len() > NODES_SHOWN {
        let _ = write!(h, "<p class=\"muted\">the first {NODES_SHOWN} of {} hospitals</p>", s.nodes.len());
    }
}

#[cfg(test)]
mod tests {
    use sanctum_protocol::proto::{NodeMetric, ParticipantStatus, PrivacyCost, RoundClosed, RoundFailed};

    use super::*;

    const EVIL: &str = "<script>alert('x')</script><img src=http://evil.example/x>";

    fn snapshot() -> Snapshot {
        let rounds: Vec<RoundClosed> = (1..=3)
            .map(|round| RoundClosed {
                round,
                reported: vec!["cleveland".into(), "va".into()],
                metrics: vec![
                    NodeMetric {
                        node: "cleveland".into(),
                        value: 0.6 + 0.05 * f64::from(round),
                        samples: 200,
                        name: "accuracy".into(),
                    },
                    NodeMetric {
                        node: "va".into(),
                        value: 0.5 + 0.05 * f64::from(round),
                        samples: 100,
                        name: "accuracy".into(),
                    },
                    NodeMetric {
                        node: "cleveland".into(),
                        value: 0.8 * f64::from(round),
                        samples: 40,
                        name: EPSILON_SPENT.into(),
                    },
                ],
                ..Default::default()
            })
            .collect();
        let summary = PlanSummary {
            plan_id: "a".repeat(64),
            run: "b".repeat(32),
            run_number: 1,
            name: format!("heart {EVIL}"),
            status: "running".into(),
            rounds_planned: 10,
            rounds_completed: 3,
            rounds,
            started_unix_ms: 1_700_000_000_000,
            ..Default::default()
        };
        let participants = vec![
            ParticipantStatus {
                node: "cleveland".into(),
                state: state::TRAINING.into(),
                round: 4,
                privacy: Some(PrivacyCost {
                    epsilon: 2.5,
                    delta: 1e-5,
                    max_epsilon: Some(10.0),
                    epsilon_spent_before: Some(1.0),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ParticipantStatus { node: "va".into(), state: state::REPORTED.into(), round: 3, ..Default::default() },
            ParticipantStatus {
                node: "hungarian".into(),
                state: state::REFUSED.into(),
                reason: format!("budget {EVIL}"),
                ..Default::default()
            },
        ];
        let status = PlanStatusResponse {
            participants,
            current_round: 4,
            round_failures: vec![RoundFailed { round: 2, attempt: 1, reason: "too few".into(), retrying: true }],
            ..Default::default()
        };
        let round_times = (1..=3)
            .map(|round| RoundTime {
                round,
                closed_unix_ms: 1_700_000_000_000 + u64::from(round) * 30_000,
                seconds: Some(29.0),
            })
            .collect();
        let refusals =
            vec![Refusal { round: 0, node: "hungarian".into(), what: "declined the plan", reason: EVIL.repeat(100) }];
        Snapshot {
            now_unix_ms: 1_700_000_100_000,
            refresh_secs: 5,
            runs: vec![RunView { summary, status, round_times, refusals }],
            runs_total: 1,
            nodes: ["cleveland", "hungarian", "va"]
                .iter()
                .map(|n| NodeView {
                    name: n.to_string(),
                    connected: *n != "va",
                    version: format!("0.1 {EVIL}"),
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn the_page_names_plans_hospitals_states_and_escapes_what_members_send() {
        let html = render(&snapshot());
        assert!(html.contains("<meta http-equiv=\"refresh\" content=\"5\">"));
        assert!(html.contains("heart &lt;script&gt;"), "the plan's name, escaped");
        assert!(!html.contains("<script") && !html.contains("<img"), "nothing a member sent is markup");
        for want in
            ["cleveland", "hungarian", "training", "refused", "3 / 10", "round 4 open", "2.500", "accuracy over rounds"]
        {
            assert!(html.contains(want), "page lacks {want}");
        }
        // va reported round 3 and its stream is closed: disconnected, not idle.
        assert!(html.contains("<span class=\"st disconnected\">disconnected</span>"));
        // cleveland shares its budget: 1.0 before the run and 2.4 on it, against its cap of 10.
        assert!(html.contains("3.400 of 10</span> (34 %; 1.000 before this run)"), "ε in all against the cap");
        assert!(html.contains("cleveland cap"), "the cap is drawn in the ε chart");
        // va shares nothing: the page says so and does not guess.
        assert!(html.contains("not shared (<code>policy.share_budget</code>)"), "an unshared budget is said to be");
        assert!(html.contains("round attempt 1 failed, retrying"));
        assert_eq!(html.matches("<svg").count(), 4, "rounds over time, durations, the metric, ε spent");
        assert!(html.contains("2.400 (round 3)"), "cleveland's ε spent so far, from its last update");
        assert!(
            !html.contains("src=\"")
                && !html.contains("href=\"http")
                && !html.contains("<link")
                && !html.contains("@import"),
            "nothing is fetched"
        );
        assert!(html.len() < 200_000, "{} bytes", html.len());
    }

    #[test]
    fn a_long_reason_is_cut_and_lists_are_bounded() {
        let mut s = snapshot();
        let run = s.runs[0].clone();
        s.runs = (0..200).map(|_| run.clone()).collect();
        s.runs_total = 200;
        s.runs[0].refusals = (0..1000)
            .map(|i| Refusal { round: 1, node: format!("n{i}"), what: "update rejected", reason: "x".repeat(10_000) })
            .collect();
        let html = render(&s);
        assert!(html.contains("the newest 50 of 200 runs"));
        assert!(html.contains("950 earlier refusals not shown"));
        assert!(!html.contains(&"x".repeat(REASON_CHARS + 1)));
        assert!(html.len() < 3_000_000, "{} bytes", html.len());
    }

    #[test]
    fn states_map_to_what_the_page_names() {
        assert_eq!(hospital_state(state::ACCEPTED, true), "idle");
        assert_eq!(hospital_state(state::REPORTED, false), "disconnected");
        assert_eq!(hospital_state(state::TRAINING, false), "training");
        assert_eq!(hospital_state(state::UPLOADING, true), "uploading");
        assert_eq!(hospital_state(state::LATE, true), "late");
        assert_eq!(hospital_state(state::DROPPED, true), "dropped");
        assert_eq!(hospital_state(state::IN_ROUND, true), "in_round");
        assert_eq!(esc("a\u{1b}[31m<b>'"), "a[31m&lt;b&gt;&#39;");
    }

    #[test]
    fn a_budget_is_shown_only_as_the_hospital_shared_it_and_nonsense_is_not_shared() {
        let cost = |cap: Option<f64>, before: Option<f64>| PrivacyCost {
            max_epsilon: cap,
            epsilon_spent_before: before,
            ..Default::default()
        };
        assert_eq!(Budget::of(None), Budget::default());
        assert_eq!(Budget::of(Some(&cost(Some(f64::NAN), Some(-1.0)))), Budget::default());
        assert_eq!(Budget::of(Some(&cost(Some(0.0), Some(f64::INFINITY)))), Budget::default());
        let b = Budget::of(Some(&cost(Some(3.0), Some(2.5))));
        assert_eq!(b, Budget { before: Some(2.5), cap: Some(3.0) });
        assert!(
            budget_cell(b, 1.0).contains("<span class=\"st dropped\">3.500 of 3</span> (117 %"),
            "over the cap stands out"
        );
        assert!(budget_cell(Budget { before: Some(0.5), cap: None }, 1.0).starts_with("1.500 (no cap set"));
    }

    #[test]
    fn an_empty_coordinator_renders() {
        let html = render(&Snapshot { refresh_secs: 0, ..Default::default() });
        assert!(html.contains("no plan has been submitted yet") && !html.contains("http-equiv"));
    }
}
