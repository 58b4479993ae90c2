//! DP-SGD's cost, measured side by side in one run (`cargo bench -p sanctum-node --bench dpsgd`):
//! - the raw keystream of each candidate CSPRNG (rand_chacha's ChaCha20, RustCrypto's chacha20
//!   with its AVX2 backend, AES-128-CTR and AES-256-CTR with AES-NI), one thread each;
//! - the secure Gaussian generator's samples per second against the bound its keystream
//!   (AES-256-CTR) sets: 4 u64 per sample (two samples take four Box–Muller pairs of two
//!   uniforms each, one u64 per uniform), so bound = keystream u64/s ÷ 4;
//! - one DP-SGD step (ghost-clipped per-example sum + secure Gaussian noise, drawn ahead on a
//!   background thread during the step before, + update) against one plain SGD step, for MLPs
//!   and a small CNN at batch 64, 256 and 1024, interleaved so machine drift hits both alike.
//!
//! Prints medians of per-repetition ratios and one markdown table between the lines
//! `<!-- dpsgd:begin -->` and `<!-- dpsgd:end -->` (scripts/bench pastes it into BENCHMARKS.md);
//! goals are reported, met or with their gap, never asserted (shared machines are noisy).

use std::hint::black_box;
use std::time::Instant;

use aes::cipher::{KeyIvInit, StreamCipher};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sanctum_node::step_bench::StepBench;
use sanctum_protocol::model::ModelSpec;
use sanctum_protocol::privacy::noise::SecureGaussian;
use tch::Device;

/// libtorch's intra-op threads for the step timings (the noise prefetch takes the other cores).
const TORCH_THREADS: i32 = 1;
/// Keystream words per Gaussian sample (see the module doc).
const U64_PER_SAMPLE: f64 = 4.0;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time(iters: usize, mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    t.elapsed().as_secs_f64() / iters as f64
}

/// Median u64/s of `fill` over `bytes` (11 repetitions after one warm-up).
fn keystream_rate(bytes: &mut [u8], mut fill: impl FnMut(&mut [u8])) -> f64 {
    fill(bytes);
    let rates: Vec<f64> = (0..11)
        .map(|_| {
            let t = time(1, || fill(black_box(&mut *bytes)));
            bytes.len() as f64 / 8.0 / t
        })
        .collect();
    median(rates)
}

/// One table row: what was measured, the result, the goal and whether it was met.
struct Row {
    what: String,
    result: String,
    goal: String,
    status: String,
}

fn status(value: f64, goal: f64) -> String {
    if value <= goal { "met".into() } else { format!("gap: {:.2}x over", value / goal) }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tch::set_num_threads(TORCH_THREADS);
    let device = Device::cuda_if_available();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "device: {device:?}, libtorch threads: {} (set to {TORCH_THREADS}), cores: {cores}",
        tch::get_num_threads()
    );
    let mut rows = Vec::new();

    // (a) Raw keystreams, one thread, 1 MiB at a time (cache-resident: the keystream's best).
    let mut bytes = vec![0u8; 1 << 20];
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    let mut rand_chacha = ChaCha20Rng::from_os_rng();
    let mut chacha = <chacha20::ChaCha20 as chacha20::cipher::KeyIvInit>::new(&key.into(), &[0u8; 12].into());
    let mut aes128 = ctr::Ctr64LE::<aes::Aes128>::new(&<[u8; 16]>::try_from(&key[..16])?.into(), &[0u8; 16].into());
    let mut aes256 = ctr::Ctr64LE::<aes::Aes256>::new(&key.into(), &[0u8; 16].into());
    let candidates = [
        ("rand_chacha ChaCha20", keystream_rate(&mut bytes, |b| rand_chacha.fill_bytes(b))),
        (
            "chacha20 (RustCrypto, AVX2) ChaCha20",
            keystream_rate(&mut bytes, |b| {
                b.fill(0);
                chacha20::cipher::StreamCipher::apply_keystream(&mut chacha, b)
            }),
        ),
        (
            "AES-128-CTR (aes + ctr, AES-NI)",
            keystream_rate(&mut bytes, |b| {
                b.fill(0);
                aes128.apply_keystream(b)
            }),
        ),
        (
            "AES-256-CTR (aes + ctr, AES-NI): SecureGaussian's",
            keystream_rate(&mut bytes, |b| {
                b.fill(0);
                aes256.apply_keystream(b)
            }),
        ),
    ];
    for (name, rate) in &candidates {
        println!("keystream {name}: {:.0} M u64/s = {:.2} GB/s (1 thread)", rate / 1e6, rate * 8.0 / 1e9);
        rows.push(Row {
            what: format!("keystream {name}, 1 thread"),
            result: format!("{:.0} M u64/s ({:.2} GB/s)", rate / 1e6, rate * 8.0 / 1e9),
            goal: "-".into(),
            status: "-".into(),
        });
    }
    let chacha_best = candidates[0].1.max(candidates[1].1);
    let aes_rate = candidates[3].1;
    println!("keystream winner: AES-256-CTR, {:.1}x the faster ChaCha20", aes_rate / chacha_best);

    // (b) SecureGaussian::fill against its keystream's bound, one thread; and on every core.
    let n = 1 << 20;
    let mut out = vec![0f32; n];
    let mut gauss = SecureGaussian::from_os();
    let bound = aes_rate / U64_PER_SAMPLE;
    let (mut one, mut all, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    gauss.fill(&mut out, 1.0);
    for _ in 0..11 {
        let t1 = time(1, || gauss.fill_on(black_box(&mut out), 1.0, 1));
        let k = time(1, || {
            bytes.fill(0);
            aes256.apply_keystream(black_box(&mut bytes))
        });
        let ta = time(1, || gauss.fill(black_box(&mut out), 1.0));
        one.push(n as f64 / t1);
        all.push(n as f64 / ta);
        // Keystream time for n samples (4n u64) over the fill's time.
        ratio.push(t1 / (k * (U64_PER_SAMPLE * n as f64 * 8.0 / bytes.len() as f64)));
    }
    let (one, all, ratio) = (median(one), median(all), median(ratio));
    println!(
        "secure Gaussian: {:.1} M samples/s on 1 thread, {:.1} M/s on {cores}; keystream bound {:.1} M samples/s (AES-256-CTR {:.0} M u64/s / {U64_PER_SAMPLE} u64 per sample); fill / bound {ratio:.2}x (goal <= 1.5x)",
        one / 1e6,
        all / 1e6,
        bound / 1e6,
        aes_rate / 1e6
    );
    rows.push(Row {
        what: "SecureGaussian::fill, 1 thread, vs its keystream's bound (AES-256-CTR u64/s / 4)".into(),
        result: format!(
            "{:.1} M samples/s vs {:.1} M/s bound: {ratio:.2}x; {:.1} M/s on {cores} threads",
            one / 1e6,
            bound / 1e6,
            all / 1e6
        ),
        goal: "<= 1.5x".into(),
        status: status(ratio, 1.5),
    });

    // (c) DP-SGD step against the plain step.
    let mut step_goals = Vec::new();
    for (name, spec) in [
        ("MLP 784-256-10", ModelSpec::Mlp { inputs: 784, hidden: vec![256], outputs: 10 }),
        ("MLP 13-256-256-1", ModelSpec::Mlp { inputs: 13, hidden: vec![256, 256], outputs: 1 }),
        ("MLP 13-1024-1024-1", ModelSpec::Mlp { inputs: 13, hidden: vec![1024, 1024], outputs: 1 }),
        (
            "CNN 1x16x16, conv 8-8 3x3",
            ModelSpec::Cnn { channels: 1, height: 16, width: 16, filters: vec![8, 8], kernel_size: 3, outputs: 1 },
        ),
    ] {
        for batch in [64, 256, 1024] {
            let mut bench = StepBench::new(&spec, batch, device)?;
            for _ in 0..5 {
                bench.plain_step()?;
                bench.dp_step(1.0, 1.0)?;
            }
            // About 40 ms per timed run, at least 3 steps.
            let est = time(3, || bench.dp_step(1.0, 1.0).unwrap_or(()));
            let iters = ((0.04 / est) as usize).clamp(3, 50);
            let (mut plain, mut dp, mut ratio, mut clip_ratio) = (vec![], vec![], vec![], vec![]);
            for _ in 0..11 {
                let p = time(iters, || bench.plain_step().unwrap_or(()));
                let d = time(iters, || bench.dp_step(1.0, 1.0).unwrap_or(()));
                let c = time(iters, || bench.clip_only(1.0).unwrap_or(()));
                plain.push(p);
                dp.push(d);
                ratio.push(d / p);
                clip_ratio.push(c / p);
            }
            let (p, d, r, c) = (median(plain), median(dp), median(ratio), median(clip_ratio));
            println!(
                "{name} ({} parameters), batch {batch}: plain step {:.3} ms, DP-SGD step {:.3} ms, DP/plain {r:.2}x; clipped sum alone {c:.2}x plain (median of 11 x {iters} steps)",
                spec.num_params(),
                p * 1e3,
                d * 1e3,
            );
            let goal = match batch {
                64 => Some(2.0),
                256 => Some(1.3),
                _ => None,
            };
            if let Some(g) = goal {
                step_goals.push((format!("{name}, batch {batch}"), r, g));
            }
            rows.push(Row {
                what: format!("{name} ({} params), batch {batch}: DP-SGD step / plain step", spec.num_params()),
                result: format!("{r:.2}x (plain {:.3} ms, DP {:.3} ms; clipped sum alone {c:.2}x)", p * 1e3, d * 1e3),
                goal: goal.map_or("-".into(), |g| format!("<= {g}x")),
                status: goal.map_or("-".into(), |g| status(r, g)),
            });
        }
    }

    println!("<!-- dpsgd:begin -->");
    println!(
        "DP-SGD bench: device {device:?}, libtorch threads {TORCH_THREADS}, {cores} cores; noise drawn ahead on the cores libtorch leaves free."
    );
    println!();
    println!("| measurement | result | goal | status |");
    println!("|---|---|---|---|");
    for r in &rows {
        println!("| {} | {} | {} | {} |", r.what, r.result, r.goal, r.status);
    }
    println!("<!-- dpsgd:end -->");
    println!("goal: secure Gaussian within 1.5x of its keystream: {ratio:.2}x, {}", status(ratio, 1.5));
    for (what, r, g) in step_goals {
        println!("goal: DP-SGD <= {g}x plain, {what}: {r:.2}x, {}", status(r, g));
    }
    Ok(())
}
