//! Gaussian noise for DP-SGD and DP-FedAvg from a cryptographically secure generator.
//!
//! - The generator is AES-256 in counter mode keyed from the operating system (`getrandom`),
//!   never libtorch's generator or a seeded PRNG: whoever knows a key can subtract the noise.
//!   AES-NI makes it the fastest CSPRNG measured here (`cargo bench -p sanctum-node --bench
//!   dpsgd` prints it beside rand_chacha's and RustCrypto's ChaCha20: about 4.5× their rate).
//!   Each thread of a large [`SecureGaussian::fill`] has its own key, drawn from this stream.
//! - Floating-point attacks (Mironov 2012 on Laplace; Jin et al. 2022 on Gaussian samplers) read
//!   the noise's value back from gaps in the set of representable outputs. Following Holohan and
//!   Braghin ("Secure Random Sampling in Differential Privacy", ESORICS 2021, §5.1 with n = 2), as
//!   Opacus's secure mode does (`_generate_noise`: four `torch.normal` calls of the whole shape,
//!   summed and halved), each sample is the sum of **four independent draws from four different
//!   Box–Muller pairs**, divided by two: the same N(0, σ²), with the output lattice filled in so
//!   that no single draw can be recovered. An attacker must invert 2n − 1 = 3 independent draws
//!   at 53 bits each (about 2¹⁵⁹ work, Opacus's figure) rather than one.
//! - A Box–Muller pair (r·cos θ, r·sin θ) is two independent normals as random variables, but
//!   both are functions of the same two uniforms: a + b = √2·r·sin(θ + π/4) is *one* draw. So the
//!   two halves of a pair never go into the same sample. Samples are made two at a time from four
//!   pairs: the cosines sum into the first, the sines into the second (torch does the same: a
//!   pair's halves land in elements i and i + 8 of each `torch.normal` call). Four uniforms per
//!   sample (4 u64 of keystream); a lone sample keeps the other four halves for the next call.
//! - The uniforms carry the full 53 bits of an f64 mantissa; the first one of a pair is in
//!   (0, 1] so its logarithm is finite (the smallest is 2⁻⁵³).
//! - The transform is batched: [`SecureGaussian::fill`] takes 4 KiB of keystream at a time (256
//!   pairs, 128 samples) and runs each step — uniforms, r = √(−2 ln u₁), (cos, sin)(2πu₂), the
//!   sums — as a loop over arrays, branch-free, which LLVM vectorises; on CPUs with AVX2 and FMA
//!   the loops run in that instruction set (pulp's runtime dispatch, safe code), elsewhere in the
//!   baseline one. ln and (cos, sin) are fdlibm's algorithms (its minimax polynomials, errors
//!   below 2⁻⁵⁸) in f64: ln within 1 ulp (2⁻⁵² relative) of `f64::ln` on every uniform from
//!   2⁻⁵³ to 1, cos and sin within 1e-15 of std's (tested over 4·10⁶ points, fused and unfused).
//!   Only the final cast to f32 rounds further. `sample` uses the same arithmetic as `fill`.
//! - DP-SGD draws each step's noise during the step before it, on a background thread
//!   (`sanctum_node::noise_pool`).

use aes::cipher::{KeyIvInit, StreamCipher};
use rand::{RngCore, TryRngCore};

/// AES-256 in counter mode: the keystream, with AES-NI where the CPU has it (`aes` detects it at
/// run time). A fresh random key per generator and a zero counter: 2⁶⁴ blocks per key.
type Cipher = ctr::Ctr64LE<aes::Aes256>;

/// Samples made per block of the batch transform: 2·`BLOCK` Box–Muller pairs, 4·`BLOCK` u64 words
/// (4 KiB) of keystream, all of it in L1.
const BLOCK: usize = 128;
const PAIRS: usize = 2 * BLOCK;
/// Words kept for the one-at-a-time draws ([`SecureGaussian::sample`], [`SecureGaussian::uniform`]).
const SPARE_WORDS: usize = 32;

/// The keystream, in bulk or word by word. Every byte is used once: bulk reads skip what is
/// buffered for single words, and nothing is ever rewound.
struct Stream {
    cipher: Cipher,
    words: [u64; SPARE_WORDS],
    next: usize,
}

impl Stream {
    fn new(key: [u8; 32]) -> Self {
        let cipher = Cipher::new(&key.into(), &[0u8; 16].into());
        Self { cipher, words: [0; SPARE_WORDS], next: SPARE_WORDS }
    }

    /// Overwrites `bytes` with the next keystream bytes.
    fn bytes(&mut self, bytes: &mut [u8]) {
        bytes.fill(0);
        self.cipher.apply_keystream(bytes);
    }

    fn next_u64(&mut self) -> u64 {
        if self.next == SPARE_WORDS {
            let mut bytes = [0u8; 8 * SPARE_WORDS];
            self.bytes(&mut bytes);
            for (w, b) in self.words.iter_mut().zip(bytes.chunks_exact(8)) {
                *w = word(b);
            }
            self.next = 0;
        }
        self.next += 1;
        self.words[self.next - 1]
    }

    /// A key for another generator, from this stream.
    fn child_key(&mut self) -> [u8; 32] {
        let mut key = [0u8; 32];
        self.bytes(&mut key);
        key
    }
}

/// Eight little-endian bytes as a u64 (`b` has at least eight).
#[inline(always)]
fn word(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[..8]);
    u64::from_le_bytes(w)
}

/// A source of N(0, σ²) noise that cannot be predicted or replayed.
pub struct SecureGaussian {
    stream: Stream,
    /// The sine halves of the four pairs whose cosine halves made the previous lone sample: a
    /// sum of four draws from four different pairs, ready to be the next one (`None` when spent).
    spare: Option<f64>,
}

impl SecureGaussian {
    /// Keys AES-256-CTR from the operating system (`getrandom`; panics, as `rand` does, if the
    /// operating system has no randomness to give).
    pub fn from_os() -> Self {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.unwrap_err().fill_bytes(&mut key);
        Self::keyed(key)
    }

    fn keyed(key: [u8; 32]) -> Self {
        Self { stream: Stream::new(key), spare: None }
    }

    /// Two independent standard normals, each half the sum of four draws from four different
    /// Box–Muller pairs (the first takes each pair's cosine, the second its sine), from the next
    /// eight words of the stream: the same arithmetic as [`Self::fill`]'s, lane by lane.
    fn standard_two(&mut self) -> (f64, f64) {
        let w: [u64; 8] = std::array::from_fn(|_| self.stream.next_u64());
        if fused() { two_from_words::<Fused>(&w) } else { two_from_words::<Unfused>(&w) }
    }

    /// One N(0, `std`²) sample: four draws from four different pairs, summed and halved.
    pub fn sample(&mut self, std: f64) -> f64 {
        let z = match self.spare.take() {
            Some(z) => z,
            None => {
                let (z, next) = self.standard_two();
                self.spare = Some(next);
                z
            }
        };
        z * std
    }

    /// Fills `out` with independent N(0, `std`²) samples on every core for large buffers: each
    /// thread draws from its own AES-256-CTR stream keyed from this one's output.
    pub fn fill(&mut self, out: &mut [f32], std: f64) {
        self.fill_on(out, std, std::thread::available_parallelism().map_or(1, |n| n.get()));
    }

    /// [`Self::fill`] on at most `threads` threads (one when `out` is short: fewer than 2¹⁵ samples
    /// a thread do not pay for the spawn).
    pub fn fill_on(&mut self, out: &mut [f32], std: f64, threads: usize) {
        const PER_THREAD_MIN: usize = 1 << 15;
        let threads = threads.min(out.len() / PER_THREAD_MIN).max(1);
        if threads == 1 {
            self.fill_here(out, std);
            return;
        }
        // Whole blocks per chunk, so that only the last one can end on a lone sample.
        let chunk = out.len().div_ceil(threads).next_multiple_of(BLOCK);
        let mut workers: Vec<SecureGaussian> = (0..threads).map(|_| Self::keyed(self.stream.child_key())).collect();
        std::thread::scope(|scope| {
            for (part, worker) in out.chunks_mut(chunk).zip(workers.iter_mut()) {
                scope.spawn(move || worker.fill_here(part, std));
            }
        });
    }

    /// [`Self::fill`] on the calling thread: whole blocks by the batch transform (AVX2 and FMA
    /// where the CPU has them), then a lone sample if `out` is odd.
    fn fill_here(&mut self, out: &mut [f32], std: f64) {
        let even = out.len() & !1;
        let (pairs, rest) = out.split_at_mut(even);
        let batch = Batch { stream: &mut self.stream, out: pairs, std };
        #[cfg(target_arch = "x86_64")]
        if let Some(simd) = pulp::x86::V3::try_new() {
            pulp::Simd::vectorize(simd, batch);
            for v in rest {
                *v = self.sample(std) as f32;
            }
            return;
        }
        batch.run::<Unfused>();
        for v in rest {
            *v = self.sample(std) as f32;
        }
    }

    /// A uniform in [0, 1) for Poisson sampling, from the same secure stream.
    pub fn uniform(&mut self) -> f64 {
        (self.stream.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Whether [`SecureGaussian::fill`] takes the AVX2+FMA path on this CPU: the lone samples use the
/// same arithmetic (fused or not), so that `sample` and `fill` agree bit for bit.
fn fused() -> bool {
    #[cfg(target_arch = "x86_64")]
    if pulp::x86::V3::try_new().is_some() {
        return true;
    }
    false
}

/// a·b + c, fused (one rounding, `vfmadd` inside the AVX2+FMA frame) or not (two roundings, the
/// path for CPUs without FMA, where a fused multiply-add would be a slow library call).
trait MulAdd {
    fn mul_add(a: f64, b: f64, c: f64) -> f64;
}
struct Fused;
struct Unfused;
impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f64, b: f64, c: f64) -> f64 {
        a.mul_add(b, c)
    }
}
impl MulAdd for Unfused {
    #[inline(always)]
    fn mul_add(a: f64, b: f64, c: f64) -> f64 {
        a * b + c
    }
}

/// One block of the batch transform at a time over `out` (whose length is even).
struct Batch<'a> {
    stream: &'a mut Stream,
    out: &'a mut [f32],
    std: f64,
}

impl pulp::WithSimd for Batch<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        self.run::<Fused>();
    }
}

impl Batch<'_> {
    /// Keystream for a block, then each step over whole arrays, in loops that LLVM vectorises.
    #[inline(always)]
    fn run<M: MulAdd>(self) {
        let mut bytes = [0u8; 16 * PAIRS];
        let (mut radius, mut turn) = ([0f64; PAIRS], [0f64; PAIRS]);
        for chunk in self.out.chunks_mut(BLOCK) {
            // A short last chunk still draws a whole block: the unused keystream is discarded.
            self.stream.bytes(&mut bytes);
            for ((pair, r), t) in bytes.chunks_exact(16).zip(&mut radius).zip(&mut turn) {
                *r = uniform_open0(word(&pair[..8]));
                *t = uniform_open0(word(&pair[8..]));
            }
            for r in &mut radius {
                *r = (-2.0 * ln::<M>(*r)).sqrt();
            }
            // radius, turn ← r·cos θ, r·sin θ.
            for (r, t) in radius.iter_mut().zip(&mut turn) {
                let (c, s) = cos_sin_turn::<M>(*t);
                *t = *r * s;
                *r *= c;
            }
            for ((two, c), s) in chunk.chunks_exact_mut(2).zip(radius.chunks_exact(4)).zip(turn.chunks_exact(4)) {
                two[0] = (half_sum(c) * self.std) as f32;
                two[1] = (half_sum(s) * self.std) as f32;
            }
        }
    }
}

/// (a + b + c + d)/2, the hardening's sum of four draws.
#[inline(always)]
fn half_sum(x: &[f64]) -> f64 {
    (x[0] + x[1] + x[2] + x[3]) * 0.5
}

/// Two standard normals from eight words, the same arithmetic as one lane of [`Batch::run`]: word
/// 2j is pair j's radius uniform, word 2j + 1 its angle.
fn two_from_words<M: MulAdd>(w: &[u64; 8]) -> (f64, f64) {
    let (mut c, mut s) = ([0f64; 4], [0f64; 4]);
    for j in 0..4 {
        let r = (-2.0 * ln::<M>(uniform_open0(w[2 * j]))).sqrt();
        let (cj, sj) = cos_sin_turn::<M>(uniform_open0(w[2 * j + 1]));
        (c[j], s[j]) = (r * cj, r * sj);
    }
    (half_sum(&c), half_sum(&s))
}

const TWO52: f64 = 4_503_599_627_370_496.0;
/// The bits of 2⁵²: OR-ing an integer below 2⁵² into the mantissa and subtracting 2⁵² converts
/// it exactly, in lanes (AVX2 has no u64 → f64 conversion).
const TWO52_BITS: u64 = 0x4330_0000_0000_0000;

/// A uniform in (0, 1] with 53 random bits: (⌊w/2¹¹⌋ + 1)·2⁻⁵³, converted exactly in two halves.
#[inline(always)]
fn uniform_open0(w: u64) -> f64 {
    let v = (w >> 11) + 1;
    let hi = f64::from_bits(TWO52_BITS | (v >> 26)) - TWO52;
    let lo = f64::from_bits(TWO52_BITS | (v & ((1 << 26) - 1))) - TWO52;
    (hi * (1u64 << 26) as f64 + lo) * (1.0 / (1u64 << 53) as f64)
}

/// ln u for u in [2⁻⁵³, 1] (every uniform [`uniform_open0`] makes), fdlibm's `__ieee754_log` without
/// its special cases: u = 2ᵏ·m with m in [√½, √2), f = m − 1, s = f/(2 + f), and
/// ln m = f − f²/2 + s·(f²/2 + R(s²)) with fdlibm's minimax R (error below 2⁻⁵⁸·⁴⁵); k·ln 2 in two
/// parts. Within 1 ulp of `f64::ln` over the whole range (tested).
// fdlibm's constants as it publishes them (each rounds to the intended f64).
#[allow(clippy::excessive_precision)]
#[inline(always)]
fn ln<M: MulAdd>(u: f64) -> f64 {
    const LN2_HI: f64 = 6.931_471_803_691_238_164_90e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_700_02e-10;
    const SQRT_HALF_BITS: u64 = 0x3fe6_a09e_667f_3bcd;
    const LG: [f64; 7] = [
        6.666_666_666_666_735_130e-1,
        3.999_999_999_940_941_908e-1,
        2.857_142_874_366_239_149e-1,
        2.222_219_843_214_978_396e-1,
        1.818_357_216_161_805_012e-1,
        1.531_383_769_920_937_332e-1,
        1.479_819_860_511_658_591e-1,
    ];
    let bits = u.to_bits();
    let shifted = bits.wrapping_sub(SQRT_HALF_BITS);
    // k + 64 in [11, 64] for u in [2⁻⁵³, 1], converted exactly through the mantissa.
    let k = (f64::from_bits(TWO52_BITS | (shifted.wrapping_add(64 << 52) >> 52)) - TWO52) - 64.0;
    let m = f64::from_bits(bits.wrapping_sub(shifted & (0xfff << 52)));
    let f = m - 1.0;
    let hfsq = 0.5 * f * f;
    let s = f / (2.0 + f);
    let z = s * s;
    let w = z * z;
    let t1 = w * M::mul_add(w, M::mul_add(w, LG[5], LG[3]), LG[1]);
    let t2 = z * M::mul_add(w, M::mul_add(w, M::mul_add(w, LG[6], LG[4]), LG[2]), LG[0]);
    let r = t2 + t1;
    k * LN2_HI - ((hfsq - M::mul_add(s, hfsq + r, k * LN2_LO)) - f)
}

/// (cos 2πu, sin 2πu) for u in [0, 1]: u = q/4 + r exactly with q = round(4u) and |r| ≤ 1/8, then
/// fdlibm's `__kernel_cos`/`__kernel_sin` minimax polynomials on x = 2πr in [−π/4, π/4] (errors
/// below 2⁻⁵⁸), rotated by the quadrant q. Within 1e-15 of `(2πu).cos()`, `.sin()` (tested): the
/// std functions' own argument 2π·u is rounded before they start.
#[allow(clippy::excessive_precision)]
#[inline(always)]
fn cos_sin_turn<M: MulAdd>(u: f64) -> (f64, f64) {
    const S: [f64; 6] = [
        -1.666_666_666_666_663_243_48e-1,
        8.333_333_333_322_489_461_24e-3,
        -1.984_126_982_985_794_931_34e-4,
        2.755_731_370_707_006_767_89e-6,
        -2.505_076_025_340_686_341_95e-8,
        1.589_690_995_211_550_102_21e-10,
    ];
    const C: [f64; 6] = [
        4.166_666_666_666_660_190_37e-2,
        -1.388_888_888_887_410_957_49e-3,
        2.480_158_728_947_672_941_78e-5,
        -2.755_731_435_139_066_330_35e-7,
        2.087_572_321_298_174_827_90e-9,
        -1.135_964_755_778_819_482_65e-11,
    ];
    // Adding 1.5·2⁵² rounds 4u to an integer (to even) in the low mantissa bits.
    const ROUND: f64 = 6_755_399_441_055_744.0;
    let t = u * 4.0 + ROUND;
    let q = t.to_bits();
    let x = (u - (t - ROUND) * 0.25) * std::f64::consts::TAU;
    let z = x * x;
    let rs = M::mul_add(z, M::mul_add(z, M::mul_add(z, M::mul_add(z, S[5], S[4]), S[3]), S[2]), S[1]);
    let sin = M::mul_add(z * x, M::mul_add(z, rs, S[0]), x);
    let rc =
        M::mul_add(z, M::mul_add(z, M::mul_add(z, M::mul_add(z, M::mul_add(z, C[5], C[4]), C[3]), C[2]), C[1]), C[0]);
    let hz = 0.5 * z;
    let one_minus_hz = 1.0 - hz;
    let cos = one_minus_hz + (((1.0 - one_minus_hz) - hz) + z * z * rc);
    // Quadrant q: (cos, sin)(x + qπ/2) = (c, s), (−s, c), (−c, −s), (s, −c).
    let (a, b) = if q & 1 == 1 { (sin, cos) } else { (cos, sin) };
    let cos_sign = (q.wrapping_add(1) & 2) << 62;
    let sin_sign = (q & 2) << 62;
    (f64::from_bits(a.to_bits() ^ cos_sign), f64::from_bits(b.to_bits() ^ sin_sign))
}

#[cfg(test)]
mod tests {
    use super::*;

    impl SecureGaussian {
        /// A generator with a known key, so a test can replay its stream (never in production).
        fn seeded(seed: u8) -> Self {
            Self::keyed([seed; 32])
        }

        /// One Box–Muller pair from the next two words, as the batch transform makes it.
        fn standard_pair(&mut self) -> (f64, f64) {
            let (w0, w1) = (self.stream.next_u64(), self.stream.next_u64());
            let pair = |r: f64, (c, s): (f64, f64)| (r * c, r * s);
            if fused() {
                pair((-2.0 * ln::<Fused>(uniform_open0(w0))).sqrt(), cos_sin_turn::<Fused>(uniform_open0(w1)))
            } else {
                pair((-2.0 * ln::<Unfused>(uniform_open0(w0))).sqrt(), cos_sin_turn::<Unfused>(uniform_open0(w1)))
            }
        }
    }

    /// Φ, the standard normal CDF.
    fn phi(x: f64) -> f64 {
        0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
    }

    /// Mean, variance, kurtosis and the Kolmogorov–Smirnov distance to N(0, σ²), with bounds that
    /// a correct sampler exceeds with probability below 10⁻⁸ each (so the test never flakes).
    fn check_normal(values: &[f64], sigma: f64) {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        let kurt = values.iter().map(|x| (x - mean).powi(4)).sum::<f64>() / n / (var * var);
        // Six standard errors: σ/√n for the mean, σ²·√(2/n) for the variance, √(24/n) for the
        // kurtosis (P ≈ 2·10⁻⁹ each under normality).
        assert!(mean.abs() < 6.0 * sigma / n.sqrt(), "mean {mean}");
        assert!((var / (sigma * sigma) - 1.0).abs() < 6.0 * (2.0 / n).sqrt(), "variance {var}, want {}", sigma * sigma);
        assert!((kurt - 3.0).abs() < 6.0 * (24.0 / n).sqrt(), "kurtosis {kurt}");
        // Kolmogorov: P(√n·D > x) ≤ 2·exp(−2x²) (Massart's constant), so x = 3.3 fails a correct
        // sampler with probability below 10⁻⁹.
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let d = sorted
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let f = phi(x / sigma);
                (((i + 1) as f64 / n) - f).max(f - i as f64 / n)
            })
            .fold(0.0, f64::max);
        assert!(d * n.sqrt() < 3.3, "Kolmogorov–Smirnov distance {d} (√n·D = {})", d * n.sqrt());
    }

    #[test]
    fn samples_follow_the_normal_distribution_by_moments_and_kolmogorov_smirnov() {
        // `fill` on a buffer large enough for every core, and lone `sample` calls (which alternate
        // fresh draws and kept halves).
        let mut g = SecureGaussian::from_os();
        let mut v = vec![0f32; 200_000];
        g.fill(&mut v, 3.0);
        check_normal(&v.iter().map(|x| f64::from(*x)).collect::<Vec<_>>(), 3.0);
        let lone: Vec<f64> = (0..100_001).map(|_| g.sample(0.5)).collect();
        check_normal(&lone, 0.5);
        let mut w = vec![0f32; 16];
        SecureGaussian::from_os().fill(&mut w, 1.0);
        assert_ne!(&v[..16], &w[..], "two generators seeded from the OS produced the same noise");
    }

    /// The hardening is four draws from four *different* Box–Muller pairs: the two halves of one
    /// pair are one draw in disguise (a + b = √2·r·sin(θ + π/4)), so they must never meet in one
    /// sample. Replays the same AES-256-CTR stream pair by pair (word 2j: pair j's radius, word
    /// 2j + 1: its angle) and checks which halves were summed, across block boundaries and for the
    /// lone last sample of an odd buffer (drawn after the blocks' keystream).
    #[test]
    fn each_sample_sums_one_half_of_four_different_pairs() {
        let four = |r: &mut SecureGaussian| {
            let p: Vec<(f64, f64)> = (0..4).map(|_| r.standard_pair()).collect();
            ((p[0].0 + p[1].0 + p[2].0 + p[3].0) * 0.5, (p[0].1 + p[1].1 + p[2].1 + p[3].1) * 0.5)
        };
        let (first, second) = four(&mut SecureGaussian::seeded(7));
        let mut g = SecureGaussian::seeded(7);
        assert_eq!(g.sample(3.0), first * 3.0, "a lone sample is the cosines of four pairs");
        assert_eq!(g.sample(3.0), second * 3.0, "the next lone sample is their sines");

        let n = 2 * BLOCK + 3;
        let mut out = vec![0f32; n];
        SecureGaussian::seeded(8).fill(&mut out, 2.0);
        let mut replay = SecureGaussian::seeded(8);
        let mut want = Vec::with_capacity(n);
        for _ in 0..(n - 1) / 2 {
            let (a, b) = four(&mut replay);
            want.extend([(a * 2.0) as f32, (b * 2.0) as f32]);
        }
        // The blocks drew 3 blocks of 4·BLOCK words; the lone sample reads the words after them.
        for _ in 0..3 * 4 * BLOCK - 4 * (n - 1) {
            replay.stream.next_u64();
        }
        want.push((four(&mut replay).0 * 2.0) as f32);
        assert_eq!(out, want, "fill pairs samples the same way, block after block");
    }

    /// The transform's ln and (cos, sin) against std's over 4·10⁶ points: the 10⁴ smallest
    /// uniforms (from 2⁻⁵³, the (0, 1] edge), the 10⁴ largest (up to 1), the quadrant boundaries
    /// and random ones, fused and unfused. Bounds: ln within 2⁻⁵² relative (1 ulp; 0 at u = 1
    /// exactly), cos and sin within 1e-15 absolute of std's on 2π·u (which rounds its argument by
    /// up to 4.4e-16 before it starts).
    #[test]
    fn vectorised_ln_and_sincos_match_std() {
        fn check<M: MulAdd>() -> (f64, f64) {
            let mut state = 0x9e37_79b9_7f4a_7c15u64;
            let (mut ln_err, mut trig_err) = (0f64, 0f64);
            for i in 0..4_000_000u64 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let w = match i {
                    0..10_000 => i << 11,
                    10_000..20_000 => (u64::MAX >> 11).wrapping_sub(i - 10_000) << 11,
                    20_000..30_000 => (((i - 20_000) % 9) << 51).wrapping_add((i % 7) << 11).wrapping_sub(3 << 11),
                    _ => state,
                };
                let u = uniform_open0(w);
                assert!(u > 0.0 && u <= 1.0);
                let (got, want) = (ln::<M>(u), u.ln());
                if u == 1.0 {
                    assert_eq!(got, 0.0);
                } else {
                    ln_err = ln_err.max((got - want).abs() / want.abs());
                }
                let (c, s) = cos_sin_turn::<M>(u);
                let theta = std::f64::consts::TAU * u;
                trig_err = trig_err.max((c - theta.cos()).abs()).max((s - theta.sin()).abs());
            }
            assert_eq!(uniform_open0(0), (1.0f64 / (1u64 << 53) as f64), "the smallest uniform is 2⁻⁵³");
            assert_eq!(uniform_open0(u64::MAX), 1.0, "the largest is 1");
            assert_eq!(ln::<M>(uniform_open0(0)), -53.0 * std::f64::consts::LN_2);
            (ln_err, trig_err)
        }
        for (name, (ln_err, trig_err)) in [("fused", check::<Fused>()), ("unfused", check::<Unfused>())] {
            assert!(ln_err <= f64::EPSILON, "{name}: ln's relative error {ln_err:e}");
            assert!(trig_err <= 1e-15, "{name}: cos/sin error {trig_err:e}");
        }
    }

    /// Each thread of a parallel fill draws from its own key, taken from the parent's stream: a
    /// replay with the same parent key rebuilds every chunk from four distinct child keys, and no
    /// two 128-sample blocks of the output are equal (identical keys would repeat whole chunks).
    #[test]
    fn parallel_fills_draw_each_chunk_from_its_own_key() {
        const THREADS: usize = 4;
        let n = THREADS << 15;
        let mut out = vec![0f32; n];
        SecureGaussian::seeded(9).fill_on(&mut out, 1.0, THREADS);
        let mut parent = SecureGaussian::seeded(9);
        let keys: Vec<[u8; 32]> = (0..THREADS).map(|_| parent.stream.child_key()).collect();
        let distinct: std::collections::BTreeSet<[u8; 32]> = keys.iter().copied().collect();
        assert_eq!(distinct.len(), THREADS, "child keys repeat");
        let chunk = n.div_ceil(THREADS).next_multiple_of(BLOCK);
        for (i, (part, key)) in out.chunks(chunk).zip(&keys).enumerate() {
            let mut want = vec![0f32; part.len()];
            SecureGaussian::keyed(*key).fill_here(&mut want, 1.0);
            assert_eq!(part, &want[..], "chunk {i} is not its own key's stream");
        }
        let blocks: std::collections::BTreeSet<Vec<u32>> =
            out.chunks(128).map(|b| b.iter().map(|v| v.to_bits()).collect()).collect();
        assert_eq!(blocks.len(), n / 128, "a 128-sample block repeats");
    }
}
