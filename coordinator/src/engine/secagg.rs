//! A run's secure-aggregation round inside the engine: nodes' messages handed to the sans-IO
//! server (`protocol::secagg::server`), its actions turned into relays, and the unmasked sum into
//! the next global model.

use sanctum_protocol::proto::{self, SecAggMessage, directive, sec_agg_message, sec_agg_step};
use sanctum_protocol::secagg::server::{Outcome, ServerAction};
use sanctum_protocol::secagg::wire;

use super::effects::Effect;
use super::run::RunEngine;
use super::{Millis, NodeName, Refused, short};
use crate::round::Action;
use crate::secure::SessionCertVerifier;

impl RunEngine {
    /// A node's secure-aggregation message, handed to the round's state machine.
    pub(super) fn secagg_message(
        &mut self,
        node: &NodeName,
        cert_der: &[u8],
        msg: SecAggMessage,
        now: Millis,
        fx: &mut Vec<Effect>,
    ) -> Result<(), Refused> {
        let at = self.instant(now);
        let sa = self.secagg.as_mut().ok_or(Refused::NoSecAggRound)?;
        let params = sa.server.params();
        if msg.plan_id != params.plan_id || msg.round != params.round {
            return Err(Refused::Invalid(format!(
                "message is for plan {} round {}, but round {} of plan {} is aggregating",
                short(&msg.plan_id),
                msg.round,
                params.round,
                short(&params.plan_id)
            )));
        }
        let (plan_id, round) = (params.plan_id.clone(), params.round);
        let step = msg.step.ok_or_else(|| Refused::Invalid("the message carries no step".into()))?;
        let invalid = |e: &dyn std::fmt::Display| Refused::Invalid(e.to_string());
        let actions = match step {
            sec_agg_message::Step::Keys(mut k) => {
                // The certificate relayed to peers is the one this TLS session verified.
                k.certificate = cert_der.to_vec();
                let ad = wire::keys_from_wire(&k, &plan_id, round).map_err(|e| invalid(&e))?;
                sa.server.advertise(node, ad, &SessionCertVerifier, at)
            }
            sec_agg_message::Step::Shares(list) => {
                sa.server.shares(node, list.shares.iter().map(wire::share_from_wire).collect(), at)
            }
            sec_agg_message::Step::ConsistencySignature(sig) => sa.server.consistency(node, sig, at),
            sec_agg_message::Step::Unmask(u) => {
                let shares = u.shares.iter().map(wire::unmask_from_wire).collect::<Result<Vec<_>, _>>();
                sa.server.unmask(node, shares.map_err(|e| invalid(&e))?, at)
            }
        }
        .map_err(|e| invalid(&e))?;
        self.apply_secagg(actions, now, fx);
        Ok(())
    }

    /// Carries out what the secure-aggregation state machine asks: relays, and the round's end.
    pub(super) fn apply_secagg(&mut self, actions: Vec<ServerAction>, now: Millis, fx: &mut Vec<Effect>) {
        for action in actions {
            let Some(sa) = self.secagg.as_ref() else {
                return;
            };
            let params = sa.server.params().clone();
            let step = |step: sec_agg_step::Step| {
                directive::Kind::Secagg(proto::SecAggStep {
                    plan_id: params.plan_id.clone(),
                    round: params.round,
                    step: Some(step),
                })
            };
            // The setup's names are the participants' `NodeName`s, so each parses; an id the
            // setup does not name is sent nothing (as a send to no connected node was).
            let name = |id: u32| params.name_of(id).and_then(|n| NodeName::parse(n).ok());
            let send = |fx: &mut Vec<Effect>, id: u32, kind: directive::Kind| {
                if let Some(node) = name(id) {
                    fx.push(Effect::Send { node, kind });
                }
            };
            match action {
                ServerAction::SendPeers { to, keys } => {
                    let msg = step(sec_agg_step::Step::Peers(proto::SecAggPeers {
                        keys: keys.iter().map(wire::keys_to_wire).collect(),
                    }));
                    for id in to {
                        send(fx, id, msg.clone());
                    }
                }
                ServerAction::SendShares { u2, per_node } => {
                    // Participants that did not share cannot send a masked input this round.
                    let left: Vec<NodeName> = params
                        .participants
                        .iter()
                        .filter(|p| params.id_of(p).is_some_and(|id| !u2.contains(&id)))
                        .filter_map(|p| NodeName::parse(p).ok())
                        .collect();
                    for id in &u2 {
                        let shares =
                            per_node.get(id).map(|v| v.iter().map(wire::share_to_wire).collect()).unwrap_or_default();
                        let msg = step(sec_agg_step::Step::Shares(proto::SecAggShares {
                            sharing: u2.iter().copied().collect(),
                            shares,
                        }));
                        send(fx, *id, msg);
                    }
                    let mut plan_actions = Vec::new();
                    let t = self.logical(now);
                    for node in left {
                        tracing::warn!(node = %node, "did not share its keys in time; left out of this round");
                        plan_actions.extend(self.run.leave_round(&node, t));
                    }
                    self.apply(plan_actions, now, fx);
                }
                ServerAction::SendSurvivors { u3 } => {
                    let msg = step(sec_agg_step::Step::Survivors(proto::SecAggSurvivors {
                        survivors: u3.iter().copied().collect(),
                    }));
                    for id in u3 {
                        send(fx, id, msg.clone());
                    }
                }
                ServerAction::SendSignatures { to, signatures } => {
                    let msg = step(sec_agg_step::Step::Signatures(proto::SecAggSignatures {
                        signatures: signatures
                            .into_iter()
                            .map(|(id, signature)| proto::NodeSignature { id, signature })
                            .collect(),
                    }));
                    for id in to {
                        send(fx, id, msg.clone());
                    }
                }
                ServerAction::Done(outcome) => {
                    let next = match self.close_secagg_round(outcome, now, fx) {
                        Ok(actions) => actions,
                        Err(reason) => {
                            tracing::error!(round = params.round, "secure aggregation failed: {reason}");
                            self.run.aggregation_failed(&reason.to_string())
                        }
                    };
                    self.apply(next, now, fx);
                }
                ServerAction::Failed(reason) => {
                    tracing::error!(round = params.round, "secure aggregation failed: {reason}");
                    fx.push(Effect::CloseUploads { plan_id: self.plan_id.clone() });
                    let reason = format!("round {}: {reason}", params.round);
                    let next = self.run.aggregation_failed(&reason);
                    self.apply(next, now, fx);
                }
            }
        }
    }

    /// The unmasked sum of a round: decode, apply the server step, store, move on.
    fn close_secagg_round(
        &mut self,
        outcome: Outcome,
        now: Millis,
        fx: &mut Vec<Effect>,
    ) -> Result<Vec<Action>, super::AggregationFailed> {
        let sa = self.secagg.take().ok_or(super::AggregationFailed::NoSecAggRound)?;
        let round = sa.server.params().round;
        if cfg!(feature = "fault-injection") {
            fx.push(Effect::DumpSum { round, words: outcome.sum.clone() });
        }
        let mean = sa.encoding.decode_mean(&outcome.sum, outcome.survivors.len())?;
        // The sum has num_params + 1 words (the update, then the weight); checked all the same,
        // since a panic here would end the engine.
        let update = mean.get(..self.global.values().len()).ok_or(super::AggregationFailed::ShortSum)?;
        // A step that would leave a non-finite model changes nothing and fails the round: the
        // model is neither stored nor published.
        let shape =
            crate::strategy::RoundShape { reported: outcome.survivors.len(), participants: self.participants.len() };
        self.server
            .step(self.global.values_mut(), update, shape)
            .map_err(|source| super::AggregationFailed::Step { round, source })?;
        // The same per-round ρ the nodes charge (`encode::round_rho`, a function of the plan alone).
        if let Some(rho) = sa.encoding.round_rho(update.len() + 1)? {
            self.secagg_rho += rho;
        }
        self.store_global(fx)?;
        // The setup's names are the participants' `NodeName`s: each parses.
        let typed =
            |names: Vec<String>| -> Vec<NodeName> { names.iter().filter_map(|n| NodeName::parse(n).ok()).collect() };
        let reported = typed(sa.names(&outcome.survivors));
        let dropped = typed(sa.names(&outcome.dropped));
        tracing::info!(round, survivors = reported.len(), model = %self.model.short(), "round aggregated securely");
        Ok(self.publish_round_closed(round, &reported, &dropped, now, fx))
    }
}
