//! Secure aggregation's cost with every state machine in one process (`cargo bench -p
//! sanctum-protocol`): 100 nodes × 1,000,000 parameters, threshold 51; the coordinator's
//! unmasking time (rebuilding secrets from shares and removing every mask) at 0 %, 10 % and 30 %
//! of the nodes dropping before their masked input, and each node's masking time. Every run's
//! unmasked sum is checked against the survivors' inputs summed directly.
//!
//! Beside each unmasking time, its keystream bound: the mask words the coordinator must expand
//! (one self mask per survivor, one pairwise mask per survivor and dropped node, each as long as
//! the model) at the raw ChaCha20 keystream rate on every core, measured in the same run; the
//! ratio says how close unmasking comes to the PRG's own speed.
//!
//! Targets are printed, never asserted (shared machines are noisy). Goals: coordinator under 5 s
//! at 10 % dropout on 2 cores; unmasking within 1.5x of its keystream bound. The block between
//! the `secagg` markers is the table `scripts/bench` pastes into BENCHMARKS.md.

use std::collections::BTreeSet;
use std::hint::black_box;
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::{ChaCha8Rng, ChaCha20Rng};
use sanctum_protocol::secagg::client::RoundParams;
use sanctum_protocol::secagg::sim::{self, DropAt, Members};

const NODES: usize = 100;
const PARAMS: usize = 1_000_000;
const THRESHOLD: usize = 51;

fn input(id: u32) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(u64::from(id));
    (0..PARAMS).map(|_| rng.next_u32() >> 8).collect()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The raw ChaCha20 keystream's rate in u32 words per second on `cores` threads, each expanding
/// its own stream through a block buffer as the masking code does, without the additions.
fn keystream_words_per_sec(cores: usize) -> f64 {
    const WORDS: usize = 1 << 24;
    let run = || {
        let t = Instant::now();
        std::thread::scope(|scope| {
            for i in 0..cores {
                scope.spawn(move || {
                    let mut rng = ChaCha20Rng::seed_from_u64(i as u64);
                    let mut buf = [0u32; 4096];
                    for _ in 0..WORDS / buf.len() {
                        rng.fill(&mut buf[..]);
                        black_box(&buf);
                    }
                });
            }
        });
        (WORDS * cores) as f64 / t.elapsed().as_secs_f64()
    };
    let mut rates: Vec<f64> = (0..5).map(|_| run()).collect();
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("secure aggregation: {NODES} nodes x {PARAMS} parameters, threshold {THRESHOLD}, {cores} core(s)");
    let members = Members::new(NODES)?;
    let params =
        RoundParams { plan_id: "bench".into(), round: 1, participants: members.names.clone(), threshold: THRESHOLD };
    let mut table = Vec::new();
    for dropout in [0.0, 0.1, 0.3] {
        let dropped = (NODES as f64 * dropout).round() as usize;
        // The last `dropped` nodes leave after sharing keys, before their masked input: the
        // coordinator must rebuild their mask keys and cancel their masks with every survivor.
        let drop_at: Vec<DropAt> =
            (0..NODES).map(|i| if i >= NODES - dropped { DropAt::Input } else { DropAt::Never }).collect();
        let (result, _, timings) = sim::run_round(&members, &params, PARAMS, &input, &drop_at, false);
        let outcome = result?;
        let survivors: BTreeSet<u32> = (1..=(NODES - dropped) as u32).collect();
        let mut want = vec![0u32; PARAMS];
        for &id in &survivors {
            for (w, x) in want.iter_mut().zip(input(id)) {
                *w = w.wrapping_add(x);
            }
        }
        let correct = outcome.survivors == survivors && outcome.sum == want;
        println!(
            "dropout {:>3.0}% ({dropped:>2} nodes): coordinator unmasking {:.2} s (goal < 5 s at 10%), per-node masking {:.3} s (median of {}), sum {}",
            dropout * 100.0,
            timings.unmasking.as_secs_f64(),
            median(timings.masking.clone()).as_secs_f64(),
            timings.masking.len(),
            if correct { "exact" } else { "WRONG" }
        );
        if !correct {
            return Err("the unmasked sum differs from the survivors' inputs".into());
        }
        // Measured right after the round, so the same machine state is behind both figures.
        let rate = keystream_words_per_sec(cores);
        let survivors = NODES - dropped;
        let words = (survivors + survivors * dropped) * PARAMS;
        let bound = words as f64 / rate;
        let unmasking = timings.unmasking.as_secs_f64();
        println!(
            "  keystream bound: {words} mask words at {:.0} M words/s = {bound:.2} s; unmasking / bound {:.2} (goal <= 1.5)",
            rate / 1e6,
            unmasking / bound
        );
        table.push(format!(
            "| {:.0} % ({dropped} nodes) | {unmasking:.2} | {:.3} | {:.0} M | {bound:.2} | {:.2} | {} |",
            dropout * 100.0,
            median(timings.masking.clone()).as_secs_f64(),
            words as f64 / 1e6,
            unmasking / bound,
            if unmasking / bound <= 1.5 { "met" } else { "not met" }
        ));
    }
    println!("<!-- secagg:begin -->");
    println!(
        "{NODES} nodes × {PARAMS} parameters, threshold {THRESHOLD}, {cores} core(s); raw ChaCha20 keystream measured in the same run.\n"
    );
    println!(
        "| dropout | coordinator unmasking s | per-node masking s | mask words | keystream bound s | unmasking / bound | goal ≤ 1.5 |"
    );
    println!("|---|---:|---:|---:|---:|---:|---|");
    for row in table {
        println!("{row}");
    }
    println!("<!-- secagg:end -->");
    Ok(())
}
