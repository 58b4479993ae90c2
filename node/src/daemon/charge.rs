//! Charges: what a release costs ([`crate::budget`] prices and checks it against the caps) and
//! its record, the ledger line (fsync'd) and the audit record written together, with nothing
//! awaited between them, before anything of the release leaves.

use sanctum_protocol::audit::AuditEvent;

use super::{ChargeError, Node};
use crate::budget::{self, Cost};
use crate::ledger::Charge;

impl Node {
    /// Rounds of the run released before `round` (by the release store or the ledger, whichever
    /// counts more: the cost of the next release is never understated).
    pub(super) fn releases_before(&self, plan_id: &str, run: &str, round: u32) -> Result<u32, ChargeError> {
        let released = self.releases.released_rounds(plan_id, run)?;
        Ok(self.count_before(&released, plan_id, run, round))
    }

    /// [`Node::releases_before`] with the run's released rounds already read.
    pub(super) fn count_before(
        &self,
        released: &std::collections::BTreeSet<u32>,
        plan_id: &str,
        run: &str,
        round: u32,
    ) -> u32 {
        let charged = self.ledger.releases(plan_id, run);
        budget::releases_before(released, round, charged, self.ledger.is_charged(plan_id, run, round))
    }

    /// What releasing `round` now costs the run under DP: the run's cumulative ε after one more
    /// release than it already made (every step actually taken counts, whatever round numbers
    /// the coordinator uses). `None` without DP.
    pub(super) fn round_cost(&self, plan_id: &str, round: u32) -> Result<Option<Cost>, ChargeError> {
        let accepted = self.plans.get(plan_id).ok_or(ChargeError::PlanClosed)?;
        let before = self.releases_before(plan_id, &accepted.run, round)?;
        Ok(budget::round_cost(&accepted.plan, accepted.dp.as_ref(), accepted.ddg.as_ref(), before)?)
    }

    /// Checks a release's cost against the caps and appends it to the ledger (fsync'd) and the
    /// audit log, at most once per (plan, run, round); the caller sends nothing if this fails.
    pub(super) fn charge_cost(&mut self, plan_id: &str, round: u32, cost: &Cost) -> Result<(), ChargeError> {
        let run = self.plans.get(plan_id).map(|a| a.run.clone()).unwrap_or_default();
        self.charge_to(plan_id, &run, round, cost)
    }

    /// [`Node::charge_cost`] under a ledger run key of its own (`RUN/metrics` for noised metrics).
    pub(super) fn charge_to(&mut self, plan_id: &str, run: &str, round: u32, cost: &Cost) -> Result<(), ChargeError> {
        let accepted = self.plans.get(plan_id).ok_or(ChargeError::PlanClosed)?;
        let (dataset, plan_name) = (accepted.plan.data.schema.clone(), accepted.plan.name.clone());
        self.charge_dataset(&dataset, &plan_name, plan_id, run, round, cost)
    }

    /// [`Node::charge_to`] for a plan that may not be accepted yet (its DP statistics).
    pub(super) fn charge_dataset(
        &mut self,
        dataset: &str,
        plan_name: &str,
        plan_id: &str,
        run: &str,
        round: u32,
        cost: &Cost,
    ) -> Result<(), ChargeError> {
        let dataset = dataset.to_string();
        let run = run.to_string();
        let others = self.ledger.spent(&dataset, Some((plan_id, &run)));
        budget::check_charge(&self.cfg.policy, &others, &dataset, round, cost)?;
        let charge = Charge {
            dataset,
            plan_id: plan_id.to_string(),
            run: run.clone(),
            plan_name: plan_name.to_string(),
            round,
            epsilon: cost.epsilon,
            delta: cost.delta,
            steps: cost.steps,
            sampling_rate: cost.sampling_rate,
            noise_multiplier: cost.noise_multiplier,
            accountant: cost.accountant.into(),
            time_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        };
        let fresh = self.ledger.charge(charge)?;
        if fresh {
            self.audit(AuditEvent::EpsilonCharged {
                plan_id: plan_id.to_string(),
                run: Some(run.to_string()),
                round: u64::from(round),
                epsilon: cost.epsilon,
                delta: cost.delta,
                accountant: cost.accountant.to_string(),
                epsilon_cap: self.cfg.policy.max_epsilon,
            })?;
        }
        tracing::info!(
            round,
            epsilon_spent = format!("{:.3}", cost.epsilon),
            of = format!("{:.3}", cost.plan_epsilon),
            accountant = cost.accountant,
            charged = if fresh { "now" } else { "already (retry)" },
            "privacy charged to the ledger"
        );
        Ok(())
    }
}
