//! DP-SGD's cost, measured side by side in one run (`cargo bench -p sanctum-node`):
//! - one DP-SGD step (ghost-clipped per-example sum + secure Gaussian noise + update) against one
//!   plain SGD step, MLPs and a small CNN at batch 64, interleaved so machine drift hits both alike;
//! - the secure Gaussian generator's samples per second against the raw ChaCha20 keystream it
//!   draws from.
//!
//! Prints medians of per-repetition ratios; targets are reported, never asserted (shared machines
//! are noisy).

use std::hint::black_box;
use std::time::Instant;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sanctum_node::train::StepBench;
use sanctum_protocol::model::ModelSpec;
use sanctum_protocol::privacy::noise::SecureGaussian;
use tch::Device;

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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tch::set_num_threads(1);
    let device = Device::cuda_if_available();
    println!("device: {device:?}, libtorch threads: 1");
    for (name, spec) in [
        ("MLP 13-256-256-1", ModelSpec::Mlp { inputs: 13, hidden: vec![256, 256], outputs: 1 }),
        ("MLP 13-1024-1024-1", ModelSpec::Mlp { inputs: 13, hidden: vec![1024, 1024], outputs: 1 }),
        (
            "CNN 1x16x16, conv 8-8 3x3",
            ModelSpec::Cnn { channels: 1, height: 16, width: 16, filters: vec![8, 8], kernel_size: 3, outputs: 1 },
        ),
    ] {
        let mut bench = StepBench::new(&spec, 64, device)?;
        for _ in 0..20 {
            bench.plain_step()?;
            bench.dp_step(1.0, 1.0)?;
        }
        let (mut plain, mut dp, mut clip, mut ratio, mut clip_ratio) = (vec![], vec![], vec![], vec![], vec![]);
        for _ in 0..15 {
            let p = time(20, || bench.plain_step().unwrap_or(()));
            let d = time(20, || bench.dp_step(1.0, 1.0).unwrap_or(()));
            let c = time(20, || bench.clip_only(1.0).unwrap_or(()));
            plain.push(p);
            dp.push(d);
            clip.push(c);
            ratio.push(d / p);
            clip_ratio.push(c / p);
        }
        println!(
            "{name} ({} parameters), batch 64: plain step {:.3} ms, DP-SGD step {:.3} ms, DP/plain {:.2}x (median of 15; goal <= 1.5x); clipped sum alone {:.3} ms = {:.2}x plain, the rest is secure noise",
            spec.num_params(),
            median(plain) * 1e3,
            median(dp) * 1e3,
            median(ratio),
            median(clip) * 1e3,
            median(clip_ratio)
        );
    }

    let n = 1 << 20;
    let mut out = vec![0f32; n];
    let mut gauss = SecureGaussian::from_os();
    let mut raw = ChaCha20Rng::from_os_rng();
    let mut bytes = vec![0u8; n * 8];
    let (mut g_rate, mut k_rate, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..9 {
        let g = time(1, || gauss.fill(black_box(&mut out), 1.0));
        let k = time(1, || raw.fill_bytes(black_box(&mut bytes)));
        // One u64 of keystream per f64 uniform: the keystream's "samples" are u64 words.
        g_rate.push(n as f64 / g);
        k_rate.push(n as f64 / k);
        ratio.push(k / g);
    }
    println!(
        "secure Gaussian: {:.1} M samples/s; raw ChaCha20 keystream: {:.1} M u64/s; Gaussian/keystream {:.3} (each sample sums four normal draws: 4 u64 of keystream, two Box-Muller transforms)",
        median(g_rate) / 1e6,
        median(k_rate) / 1e6,
        median(ratio)
    );
    Ok(())
}
