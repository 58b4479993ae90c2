//! Heartbeats while a round trains: the coordinator drops a participant that goes silent for its
//! heartbeat timeout (so the round need not wait for its deadline), and a node that is merely
//! slow says so. One `Heartbeat` when training starts, then one every
//! `StartRound.heartbeat_interval_ms` until training ends, and one "uploading" before the update
//! leaves (from there the round's deadline alone bounds the node). A coordinator that asks for
//! none (interval 0) gets none. Each heartbeat goes through the link, so it is in the egress log.

use std::time::Duration;

use sanctum_protocol::proto::{self, HeartbeatPhase, HeartbeatRequest};

use super::{DaemonError, Node, Trained};

/// The least time between two heartbeats, whatever the coordinator asks: more often would not
/// count (`round::HEARTBEAT_MIN_GAP` on the coordinator).
const MIN_INTERVAL: Duration = Duration::from_secs(1);

impl Node {
    /// Runs one round's training job on a blocking thread, sending heartbeats meanwhile, then the
    /// "uploading" one.
    pub(super) async fn train_alive(
        &mut self,
        start: &proto::StartRound,
        job: impl FnOnce() -> Trained + Send + 'static,
    ) -> Result<(crate::train::Evaluation, crate::train::RoundResult), DaemonError> {
        let interval = (start.heartbeat_interval_ms > 0)
            .then(|| Duration::from_millis(start.heartbeat_interval_ms).max(MIN_INTERVAL));
        if interval.is_some() {
            self.heartbeat(start, HeartbeatPhase::Training).await;
        }
        #[cfg(feature = "fault-injection")]
        self.faults.stall_before_training(start.round).await;
        let mut handle = tokio::task::spawn_blocking(job);
        let trained = match interval {
            None => handle.await?,
            Some(every) => {
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        done = &mut handle => break done?,
                        _ = tick.tick() => self.heartbeat(start, HeartbeatPhase::Training).await,
                    }
                }
            }
        };
        let trained = trained?;
        if interval.is_some() {
            self.heartbeat(start, HeartbeatPhase::Uploading).await;
        }
        Ok(trained)
    }

    /// One heartbeat; a failure is logged, never an error of the round (the coordinator decides
    /// what silence means). Bounded by a second so a stuck call cannot hold up the round's work.
    async fn heartbeat(&mut self, start: &proto::StartRound, phase: HeartbeatPhase) {
        let msg = HeartbeatRequest {
            plan_id: start.plan_id.clone(),
            round: start.round,
            run: start.run.clone(),
            phase: phase as i32,
        };
        match tokio::time::timeout(MIN_INTERVAL, self.link.heartbeat(msg)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(round = start.round, "heartbeat not taken: {e}"),
            Err(_) => tracing::debug!(round = start.round, "heartbeat timed out"),
        }
    }
}
