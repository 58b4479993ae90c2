//! Heartbeats while a round trains: the coordinator drops a participant that goes silent for its
//! heartbeat timeout (so the round need not wait for its deadline), and a node that is merely
//! slow says so. One `Heartbeat` when training starts, then one every
//! `StartRound.heartbeat_interval_ms` until training ends, and one "uploading" before the update
//! leaves (from there the round's deadline alone bounds the node). A coordinator that asks for
//! none (interval 0) gets none. Each heartbeat goes through the link, so it is in the egress log.
//! None goes that the coordinator would refuse as too frequent ([`HeartbeatGate`]), so rounds
//! shorter than a second cost no heartbeat round trips that count for nothing.

use std::time::{Duration, Instant};

use sanctum_protocol::proto::{self, HeartbeatPhase, HeartbeatRequest};

use super::{DaemonError, Node, Trained};

/// The least time between two heartbeats, whatever the coordinator asks: more often would not
/// count (`round::HEARTBEAT_MIN_GAP` on the coordinator).
const MIN_INTERVAL: Duration = Duration::from_millis(sanctum_protocol::HEARTBEAT_MIN_GAP_MS);

/// The coordinator's two heartbeat rules, kept on the node's side so that it sends only what
/// counts: a token bucket per node (one a second, a burst of [`sanctum_protocol::HEARTBEAT_BURST`]),
/// and, within a round, at most one a second of the same phase (a change of phase counts at once).
/// Pure: the caller passes the time. It mirrors the coordinator's arithmetic; the coordinator
/// counts from when a heartbeat arrives, so latency jitter can make the two differ by a few ms,
/// which costs at most one refused heartbeat or one interval unwatched.
#[derive(Debug, Default)]
pub(super) struct HeartbeatGate {
    /// Tokens left and when they were counted; `None` before the first heartbeat (a full bucket).
    bucket: Option<(f64, Instant)>,
    /// The round, phase and time of the last heartbeat sent.
    last: Option<(u32, HeartbeatPhase, Instant)>,
}

impl HeartbeatGate {
    /// Whether a heartbeat for `round` in `phase` sent at `now` would count; if so it is counted
    /// as sent.
    pub(super) fn admit(&mut self, round: u32, phase: HeartbeatPhase, now: Instant) -> bool {
        if self
            .last
            .is_some_and(|(r, p, at)| r == round && p == phase && now.saturating_duration_since(at) < MIN_INTERVAL)
        {
            return false;
        }
        let burst = sanctum_protocol::HEARTBEAT_BURST;
        let tokens = match self.bucket {
            None => burst,
            Some((tokens, at)) => {
                (tokens + now.saturating_duration_since(at).as_secs_f64() / MIN_INTERVAL.as_secs_f64()).min(burst)
            }
        };
        if tokens < 1.0 {
            self.bucket = Some((tokens, now));
            return false;
        }
        self.bucket = Some((tokens - 1.0, now));
        self.last = Some((round, phase, now));
        true
    }
}

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
    /// One the coordinator would refuse ([`HeartbeatGate`]) is not sent: it would only add a
    /// round trip to a short round.
    async fn heartbeat(&mut self, start: &proto::StartRound, phase: HeartbeatPhase) {
        if !self.heartbeats.admit(start.round, phase, Instant::now()) {
            tracing::debug!(round = start.round, "heartbeat not sent: the coordinator would refuse it as too frequent");
            return;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    const TRAINING: HeartbeatPhase = HeartbeatPhase::Training;
    const UPLOADING: HeartbeatPhase = HeartbeatPhase::Uploading;

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn a_second_heartbeat_of_one_phase_in_a_round_within_a_second_is_not_sent() {
        let (mut g, t0) = (HeartbeatGate::default(), Instant::now());
        assert!(g.admit(1, TRAINING, t0));
        assert!(!g.admit(1, TRAINING, ms(t0, 999)));
        assert!(g.admit(1, TRAINING, ms(t0, 1000)));
        // A change of phase counts at once: "uploading" 10 ms after training began.
        assert!(g.admit(1, UPLOADING, ms(t0, 1010)));
        // A new round's first heartbeat counts at once (the round machine keeps rounds apart).
        assert!(g.admit(2, TRAINING, ms(t0, 1011)));
    }

    #[test]
    fn a_heartbeat_held_back_by_the_round_rule_takes_no_token() {
        let (mut g, t0) = (HeartbeatGate::default(), Instant::now());
        assert!(g.admit(1, TRAINING, t0));
        for _ in 0..10 {
            assert!(!g.admit(1, TRAINING, t0));
        }
        // Three tokens are left for three other rounds at the same instant, then none.
        for r in 2..=4 {
            assert!(g.admit(r, TRAINING, t0), "round {r}");
        }
        assert!(!g.admit(5, TRAINING, t0));
    }

    #[test]
    fn short_rounds_send_the_burst_then_one_a_second_as_the_coordinators_bucket_counts() {
        let (mut g, t0) = (HeartbeatGate::default(), Instant::now());
        // Rounds every 125 ms (exact in binary), a heartbeat wanted at each round's start.
        let sent: Vec<u32> = (1..=30).filter(|&r| g.admit(r, TRAINING, ms(t0, u64::from(r) * 125))).collect();
        // Four from the burst, then one per second of refill (every eighth round).
        assert_eq!(sent, vec![1, 2, 3, 4, 9, 17, 25]);
    }

    #[test]
    fn the_bucket_refills_to_the_burst_and_no_further() {
        let (mut g, t0) = (HeartbeatGate::default(), Instant::now());
        for r in 1..=4 {
            assert!(g.admit(r, TRAINING, t0));
        }
        assert!(!g.admit(5, TRAINING, t0));
        // An hour idle refills four tokens, not 3,600.
        let later = ms(t0, 3_600_000);
        let sent = (6..=20).filter(|&r| g.admit(r, TRAINING, later)).count();
        assert_eq!(sent, 4);
    }
}
