//! DP-SGD's noise, drawn one step ahead on a background thread.
//!
//! A DP step needs one N(0, σ²) sample per parameter, from [`SecureGaussian`]. After a step takes
//! its buffer, [`NoisePool::take`] starts drawing the next one (same length, same σ) on a worker
//! thread, so the draw overlaps the next step's forward, backward and clipping. Each buffer is
//! moved out to its step and the pool keeps nothing of it: a buffer is handed out once and never
//! again (reused noise would let an observer of two updates cancel it). A buffer drawn for another
//! length or σ than the one asked for is dropped, never returned; the generator never runs on
//! two threads at once, so no keystream is used twice.

use std::thread::JoinHandle;

use sanctum_protocol::privacy::noise::SecureGaussian;

/// The worker that drew the next buffer panicked (its generator is gone; the pool has a new one).
#[derive(Debug, thiserror::Error)]
#[error("the noise worker thread panicked")]
pub struct NoiseWorkerPanicked;

/// The next buffer, being drawn.
struct Pending {
    len: usize,
    std_bits: u64,
    worker: JoinHandle<(SecureGaussian, Vec<f32>)>,
}

/// Noise buffers for DP-SGD steps, each drawn ahead on a worker thread while the step before it
/// computes.
pub struct NoisePool {
    /// The generator between draws (`None` while a worker holds it).
    generator: Option<SecureGaussian>,
    pending: Option<Pending>,
    /// Threads each draw runs on ([`SecureGaussian::fill_on`]).
    threads: usize,
}

impl NoisePool {
    /// A pool with its own generator, keyed from the operating system, drawing on `threads`
    /// threads (at least one).
    pub fn new(threads: usize) -> Self {
        Self { generator: Some(SecureGaussian::from_os()), pending: None, threads: threads.max(1) }
    }

    /// The threads a DP round's pool should draw on: every core when the model runs on a GPU,
    /// else the cores libtorch's intra-op threads leave free (at least one).
    pub fn threads_beside_torch(device: tch::Device) -> usize {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if device.is_cuda() { cores } else { cores.saturating_sub(tch::get_num_threads().max(1) as usize).max(1) }
    }

    /// `len` fresh N(0, `std`²) samples, never handed out before: the buffer drawn ahead if it
    /// matches, else one drawn now. With `prefetch_next`, starts drawing the next buffer of the
    /// same length and σ before returning.
    pub fn take(&mut self, len: usize, std: f64, prefetch_next: bool) -> Result<Vec<f32>, NoiseWorkerPanicked> {
        let (mut generator, ready) = match self.pending.take() {
            Some(p) => {
                let (generator, buffer) = p.worker.join().map_err(|_| {
                    self.generator = Some(SecureGaussian::from_os());
                    NoiseWorkerPanicked
                })?;
                // A buffer for another shape or σ is dropped here, unused.
                let fits = p.len == len && p.std_bits == std.to_bits();
                (generator, fits.then_some(buffer))
            }
            None => (self.generator.take().unwrap_or_else(SecureGaussian::from_os), None),
        };
        let buffer = ready.unwrap_or_else(|| {
            let mut buffer = vec![0f32; len];
            generator.fill_on(&mut buffer, std, self.threads);
            buffer
        });
        if prefetch_next {
            let threads = self.threads;
            let worker = std::thread::spawn(move || {
                let mut next = vec![0f32; len];
                generator.fill_on(&mut next, std, threads);
                (generator, next)
            });
            self.pending = Some(Pending { len, std_bits: std.to_bits(), worker });
        } else {
            self.generator = Some(generator);
        }
        Ok(buffer)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn key(b: &[f32]) -> Vec<u32> {
        b.iter().map(|x| x.to_bits()).collect()
    }

    /// Consecutive steps get different noise, and no buffer (by content, or by allocation while
    /// the one before is still held) is handed out twice, whether it was prefetched or drawn on
    /// the spot.
    #[test]
    fn every_buffer_is_fresh_and_handed_out_once() {
        let mut pool = NoisePool::new(2);
        let mut seen = HashSet::new();
        let mut held: Vec<Vec<f32>> = Vec::new();
        for step in 0..40 {
            // Mostly one shape with prefetch, as a DP round is; a change of σ or length and a
            // step without prefetch in between.
            let (len, std, more) = match step {
                10 => (1000, 2.0, true),
                20 => (77, 1.0, false),
                _ => (1000, 1.0, step != 39),
            };
            let b = pool.take(len, std, more).unwrap_or_default();
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|x| x.is_finite()) && b.iter().any(|x| *x != 0.0), "step {step} got no noise");
            assert!(seen.insert(key(&b)), "step {step} got a buffer that was handed out before");
            assert!(held.iter().all(|h| h.as_ptr() != b.as_ptr()), "step {step} shares memory with a held buffer");
            held.push(b);
        }
        assert!(pool.pending.is_none(), "the last step asked for no prefetch");
    }

    #[test]
    fn two_consecutive_steps_get_different_noise_and_two_pools_differ() {
        let (mut a, mut b) = (NoisePool::new(1), NoisePool::new(1));
        let first = a.take(4096, 1.0, true).unwrap_or_default();
        let second = a.take(4096, 1.0, true).unwrap_or_default();
        assert_ne!(first, second, "two consecutive steps got the same noise");
        let other = b.take(4096, 1.0, true).unwrap_or_default();
        assert_ne!(first, other, "two pools (two OS-keyed generators) drew the same noise");
        // The prefetched buffer has the requested σ: sample variance of 4096 N(0, 1) draws.
        let var = second.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>() / 4096.0;
        assert!((var - 1.0).abs() < 0.15, "variance {var}");
    }
}
