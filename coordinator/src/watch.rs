//! The lead's live view of a plan: a progress bar over rounds and one line per round with the
//! nodes reporting and the mean metric, then the final outcome.

use indicatif::{ProgressBar, ProgressStyle};
use sanctum_protocol::proto::{PlanEvent, PlanFinished, plan_event};
use tokio_stream::{Stream, StreamExt};

/// Mean of the values, or `None` for none.
pub fn mean(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.into_iter().fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// ": the plan will spend ε = … (δ = …) over N steps (σ = …, q = …)" for a node's decision line
/// (DP-SGD steps, or rounds of distributed noise).
fn describe_cost(p: &sanctum_protocol::proto::PrivacyCost) -> String {
    let detail = if p.sampling_rate > 0.0 {
        format!(", σ = {:.3}, q = {:.4}", p.noise_multiplier, p.sampling_rate)
    } else {
        String::new()
    };
    format!(": the plan will spend ε = {:.3} (δ = {:e}) over {} steps{detail}", p.epsilon, p.delta, p.steps)
}

/// Prints a plan's events as they come and returns its outcome (`None` if the stream ended first).
pub async fn follow(events: impl Stream<Item = PlanEvent>, rounds: u32, metric: &str) -> Option<PlanFinished> {
    let bar = ProgressBar::new(u64::from(rounds));
    bar.set_style(
        ProgressStyle::with_template("{spinner} round {pos}/{len} [{bar:30}] {elapsed_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let say = |line: String| {
        if bar.is_hidden() {
            println!("{line}");
        } else {
            bar.println(line);
        }
    };
    let mut events = std::pin::pin!(events);
    while let Some(ev) = events.next().await {
        match ev.kind {
            Some(plan_event::Kind::NodeDecision(d)) if d.accepted => say(format!(
                "  {} accepted the plan{}",
                d.node,
                d.privacy.map(|p| describe_cost(&p)).unwrap_or_default()
            )),
            Some(plan_event::Kind::NodeDecision(d)) => say(format!("  {} REFUSED the plan: {}", d.node, d.reason)),
            Some(plan_event::Kind::RoundOpened(r)) => {
                bar.set_message(format!("training on {} nodes", r.participants.len()));
            }
            Some(plan_event::Kind::UpdateRejected(r)) => {
                say(format!("  round {}: update from {} rejected: {}", r.round, r.node, r.reason));
            }
            Some(plan_event::Kind::RoundClosed(r)) => {
                // The test metric only: ε spent travels in the same list.
                let m = mean(
                    r.metrics.iter().filter(|m| m.name != sanctum_protocol::EPSILON_SPENT_METRIC).map(|m| m.value),
                );
                let dropped =
                    if r.dropped.is_empty() { String::new() } else { format!(", dropped: {}", r.dropped.join(", ")) };
                say(format!(
                    "round {:>3}/{rounds}: {} node(s) reporting, mean {metric} of the round's starting model {}{dropped}",
                    r.round,
                    r.reported.len(),
                    m.map(|m| format!("{m:.4}")).unwrap_or_else(|| "n/a".into()),
                ));
                bar.inc(1);
            }
            Some(plan_event::Kind::RoundFailed(f)) => {
                let next = if f.retrying { "retrying the round" } else { "no retry left" };
                say(format!("round {:>3}/{rounds} FAILED (attempt {}): {}; {next}", f.round, f.attempt, f.reason));
            }
            Some(plan_event::Kind::ParticipantState(p)) if !p.reason.is_empty() => {
                say(format!("  round {}: {} {}: {}", p.round, p.node, p.state, p.reason));
            }
            Some(plan_event::Kind::ParticipantState(_)) => {}
            Some(plan_event::Kind::PlanFinished(f)) => {
                bar.finish_and_clear();
                return Some(f);
            }
            None => {}
        }
    }
    bar.abandon();
    None
}
