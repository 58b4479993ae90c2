//! The plan state machine's actions carried out for one run: recruiting, starting rounds,
//! dropping late nodes, retries and the final evaluation.

use std::collections::VecDeque;

use sanctum_protocol::audit::AuditEvent;
use sanctum_protocol::proto::{self, directive, plan_event};

use crate::engine::effects::{Actor, Effect, UploadRound};
use crate::engine::{Millis, NodeName};
use crate::round::Action;
use crate::secure::SecAggRound;

use super::RunEngine;

impl RunEngine {
    /// Carries out the plan state machine's actions, and those they lead to.
    pub(in crate::engine) fn apply(&mut self, actions: Vec<Action>, now: Millis, fx: &mut Vec<Effect>) {
        let mut queue: VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            if self.finished || self.finishing.is_some() {
                return;
            }
            let plan_id = self.plan_id.clone();
            match action {
                Action::Offer(nodes) => {
                    let offer = self.offer();
                    for n in nodes {
                        self.send(fx, &n, offer.clone());
                    }
                }
                Action::OpenRound { round, participants, deadline } => {
                    if self.run.rounds_completed() == 0 {
                        // Recruiting is over: who accepted is durable before round 1 starts, so a
                        // restart during round 1 offers the run again to exactly them.
                        fx.push(self.checkpoint_effect(None));
                    }
                    // The old sum freed before the new one is made: never two of the model's size.
                    self.acc.reset(self.global.values().len());
                    // A retry's attempt keeps nothing of the failed one's.
                    self.clear_robust();
                    self.round_metrics.clear();
                    self.round_updates.clear();
                    self.participants = participants.clone();
                    self.secagg = None;
                    let deadline_engine = self.started.saturating_add(deadline);
                    if self.plan.secure_aggregation {
                        let num_params = self.global.values().len();
                        let opened = SecAggRound::open(
                            &self.plan,
                            &plan_id,
                            round,
                            &participants.iter().map(NodeName::to_string).collect::<Vec<_>>(),
                            num_params,
                            self.secagg_noise,
                            self.instant(now),
                            self.instant(deadline_engine),
                        );
                        match opened {
                            Ok(sa) => {
                                tracing::info!(
                                    round,
                                    threshold = sa.setup.threshold,
                                    gamma = sa.encoding.gamma(),
                                    "secure aggregation opened"
                                );
                                self.secagg = Some(sa);
                            }
                            Err(reason) => {
                                queue.extend(self.run.aggregation_failed(&reason.to_string()));
                                continue;
                            }
                        }
                    }
                    fx.push(Effect::OpenUploads(UploadRound {
                        plan_id: plan_id.clone(),
                        run_id: self.run_id.clone(),
                        round,
                        attempt: self.run.attempt().unwrap_or(1),
                        model: self.model,
                        num_params: self.global.values().len(),
                        masked: self.secagg.is_some(),
                        participants: participants.iter().cloned().collect(),
                    }));
                    let start = self.start_round(round, deadline_engine);
                    tracing::info!(round, nodes = participants.len(), model = %self.model.short(), "round opened");
                    fx.push(Effect::Audit {
                        actor: Actor::Coordinator,
                        event: AuditEvent::RoundOpened {
                            plan_id: plan_id.to_string(),
                            round: u64::from(round),
                            participants: participants.iter().map(ToString::to_string).collect(),
                            model_sha256: self.model.to_hex(),
                            secure_aggregation: self.secagg.as_ref().map(|sa| sa.setup.participants.clone()),
                            threshold: self.secagg.as_ref().map(|sa| sa.setup.threshold as u64),
                        },
                    });
                    self.publish(
                        fx,
                        plan_event::Kind::RoundOpened(proto::RoundOpened {
                            round,
                            participants: participants.iter().map(NodeName::to_string).collect(),
                            model_sha256: self.model.to_hex(),
                        }),
                    );
                    for n in &participants {
                        self.send(fx, n, start.clone());
                    }
                }
                Action::Reoffer(node) => {
                    tracing::info!(node = %node, "node reconnected during the plan; offering it again");
                    let offer = self.offer();
                    self.send(fx, &node, offer);
                }
                Action::Rejoin { node, .. } if self.secagg.is_some() => {
                    // Its round keys and shares were lost with its process: it cannot rejoin this
                    // secure-aggregation round, and the round stops waiting for it.
                    tracing::info!(node = %node, "participant reconnected; it rejoins at the next round (secure aggregation)");
                    let t = self.logical(now);
                    queue.extend(self.run.leave_round(&node, t));
                }
                Action::Rejoin { node, round, deadline } => {
                    tracing::info!(node = %node, round, "participant reconnected; sending the round again");
                    let start = self.start_round(round, self.started.saturating_add(deadline));
                    self.send(fx, &node, start);
                }
                Action::CloseRound { round, .. } if self.secagg.is_some() => {
                    // The masked inputs are in; the unmasking steps follow (see `apply_secagg`). The
                    // protocol's input step ends only here or when every input is in, so the sum is
                    // never ready before the plan round closes.
                    fx.push(Effect::CloseUploads { plan_id: plan_id.clone() });
                    let at = self.instant(now);
                    let sa_actions = self.secagg.as_mut().map(|sa| sa.server.end_inputs(at));
                    tracing::info!(round, "masked inputs collected; unmasking");
                    self.apply_secagg(sa_actions.unwrap_or_default(), now, fx);
                }
                Action::CloseRound { round, reported, dropped } => {
                    fx.push(Effect::CloseUploads { plan_id: plan_id.clone() });
                    let next = match self.close_round(round, fx) {
                        Ok(()) => self.publish_round_closed(round, &reported, &dropped, now, fx),
                        Err(reason) => {
                            tracing::error!(round, "aggregation failed: {reason}");
                            self.run.aggregation_failed(&reason.to_string())
                        }
                    };
                    queue.extend(next);
                }
                Action::Evaluate(nodes) => {
                    let ev = directive::Kind::Evaluate(proto::Evaluate {
                        plan_id: plan_id.to_string(),
                        model_sha256: self.model.to_hex(),
                        model_bytes: self.model_bytes,
                        run: self.run_id.to_string(),
                    });
                    for n in nodes {
                        if self.final_metrics.contains_key(&n) {
                            // Its metrics came before a restart (and are in the checkpoint).
                            queue.extend(self.run.evaluated(&n, self.logical(now)));
                        } else {
                            self.send(fx, &n, ev.clone());
                        }
                    }
                }
                Action::RoundFailed { round, attempt, reason, retrying } => {
                    // Nothing of the failed attempt is aggregated: its uploads close, and a retry
                    // starts from the same global model with a fresh accumulator (`OpenRound`).
                    fx.push(Effect::CloseUploads { plan_id: plan_id.clone() });
                    self.secagg = None;
                    self.clear_robust();
                    if retrying {
                        tracing::warn!(round, attempt, "round failed; retrying: {reason}");
                    } else {
                        tracing::error!(round, attempt, "round failed; no retry left: {reason}");
                    }
                    fx.push(Effect::Audit {
                        actor: Actor::Coordinator,
                        event: AuditEvent::RoundFailed {
                            plan_id: plan_id.to_string(),
                            run: self.run_id.to_string(),
                            round: u64::from(round),
                            attempt,
                            reason: reason.clone(),
                            retrying,
                        },
                    });
                    self.publish(
                        fx,
                        plan_event::Kind::RoundFailed(proto::RoundFailed { round, attempt, reason, retrying }),
                    );
                }
                Action::Participant { round, node, phase } => {
                    if let crate::round::ParticipantPhase::Dropped(why) = &phase {
                        tracing::warn!(node = %node, round, "participant dropped from the round: {why}");
                    }
                    self.publish(
                        fx,
                        plan_event::Kind::ParticipantState(proto::ParticipantState {
                            round,
                            node: node.into_string(),
                            state: phase.name().into(),
                            reason: phase.reason().into(),
                        }),
                    );
                }
                Action::Finish { success, reason } => {
                    self.finishing = Some((success, reason));
                    return;
                }
            }
        }
    }

    /// The directive that asks a participant to train `round` on the current global model, due at
    /// `deadline` on the engine's clock.
    pub(super) fn start_round(&self, round: u32, deadline: Millis) -> directive::Kind {
        directive::Kind::StartRound(proto::StartRound {
            plan_id: self.plan_id.to_string(),
            round,
            model_sha256: self.model.to_hex(),
            model_bytes: self.model_bytes,
            deadline_unix_ms: self.epoch_unix_ms.saturating_add(deadline),
            secure_aggregation: self.secagg.as_ref().map(|sa| sa.setup.clone()),
            run: self.run_id.to_string(),
            heartbeat_interval_ms: self.run.heartbeat_interval(),
        })
    }
}
