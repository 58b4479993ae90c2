//! Pairwise and self masks of Bonawitz et al. (CCS 2017), on updates quantised to integers
//! mod 2³².
//!
//! Node i with id uᵢ adds, for every other node j, +PRG(sᵢⱼ) if uᵢ < uⱼ and −PRG(sᵢⱼ) otherwise,
//! where sᵢⱼ comes from X25519 between i's static secret and j's public key (so both ends derive
//! the same seed) through HKDF-SHA256 bound to the round; plus its own self mask PRG(bᵢ). Over any
//! set of survivors the pairwise masks between survivors cancel; the coordinator removes the
//! survivors' self masks (bᵢ reconstructed from shares) and the masks towards dropped nodes
//! (their X25519 secrets reconstructed from shares). The PRG is the ChaCha20 keystream.

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use ring::hkdf;
use x25519_dalek::{PublicKey, StaticSecret};

/// A 32-byte PRG seed.
pub type Seed = [u8; 32];

struct SeedLen;

impl hkdf::KeyType for SeedLen {
    fn len(&self) -> usize {
        32
    }
}

/// The pairwise seed between `mine` and `theirs` for one round: X25519, then HKDF-SHA256 with the
/// round context as salt (so a seed is never reused across plans or rounds).
pub fn pairwise_seed(mine: &StaticSecret, theirs: &PublicKey, round_context: &[u8]) -> Seed {
    let shared = mine.diffie_hellman(theirs);
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, round_context).extract(shared.as_bytes());
    let mut out = [0u8; 32];
    // Expanding 32 bytes from a fresh PRK cannot fail (the limit is 255·32 bytes).
    if let Ok(okm) = prk.expand(&[b"sanctum secagg pairwise mask"], SeedLen) {
        let _ = okm.fill(&mut out);
    }
    out
}

/// `len` words of the ChaCha20 keystream under `seed`.
pub fn expand(seed: &Seed, len: usize) -> Vec<u32> {
    let mut out = vec![0u32; len];
    apply(&mut out, &[(*seed, Sign::Add)]);
    out
}

/// Whether a mask is added to or subtracted from the accumulator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sign {
    Add,
    Sub,
}

/// Adds or subtracts PRG(seed) for every `(seed, sign)` in `terms` to `acc` (mod 2³²), on every
/// core: each thread owns a slice of coordinates and jumps each keystream to its start, so the
/// result is the same whatever the number of threads.
pub fn apply(acc: &mut [u32], terms: &[(Seed, Sign)]) {
    const PER_THREAD_MIN: usize = 1 << 16;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(acc.len() / PER_THREAD_MIN).max(1);
    if threads == 1 {
        apply_range(acc, 0, terms);
        return;
    }
    let chunk = acc.len().div_ceil(threads);
    std::thread::scope(|scope| {
        for (i, part) in acc.chunks_mut(chunk).enumerate() {
            scope.spawn(move || apply_range(part, (i * chunk) as u128, terms));
        }
    });
}

fn apply_range(acc: &mut [u32], start_word: u128, terms: &[(Seed, Sign)]) {
    const BLOCK: usize = 4096;
    let mut buf = [0u32; BLOCK];
    for (seed, sign) in terms {
        let mut rng = ChaCha20Rng::from_seed(*seed);
        rng.set_word_pos(start_word);
        for part in acc.chunks_mut(BLOCK) {
            let words = &mut buf[..part.len()];
            rng.fill(words);
            match sign {
                Sign::Add => part.iter_mut().zip(words.iter()).for_each(|(a, m)| *a = a.wrapping_add(*m)),
                Sign::Sub => part.iter_mut().zip(words.iter()).for_each(|(a, m)| *a = a.wrapping_sub(*m)),
            }
        }
    }
}

/// The sign with which node `me` adds its mask towards `peer`: + if `me < peer`, − otherwise.
pub fn pair_sign(me: u32, peer: u32) -> Sign {
    if me < peer { Sign::Add } else { Sign::Sub }
}

/// Node `me`'s masked input: x + PRG(b) + Σ_{j > me} PRG(s_j) − Σ_{j < me} PRG(s_j) (mod 2³²).
pub fn mask(input: &[u32], me: u32, self_seed: &Seed, pairs: &[(u32, Seed)]) -> Vec<u32> {
    let mut y = input.to_vec();
    let terms: Vec<(Seed, Sign)> = std::iter::once((*self_seed, Sign::Add))
        .chain(pairs.iter().map(|(peer, seed)| (*seed, pair_sign(me, *peer))))
        .collect();
    apply(&mut y, &terms);
    y
}

/// The coordinator's unmasking of the survivors' summed masked inputs: subtract each survivor's
/// self mask and cancel each survivor's mask towards each dropped node.
///
/// `survivor_self_seeds`: (id, bᵢ) for every survivor; `dropped_pairs`: (survivor id, dropped id,
/// sᵢⱼ) for every survivor and dropped node, recomputed from the dropped node's reconstructed key.
pub fn unmask(masked_sum: &[u32], survivor_self_seeds: &[(u32, Seed)], dropped_pairs: &[(u32, u32, Seed)]) -> Vec<u32> {
    let mut z = masked_sum.to_vec();
    // The survivor added +m if its id was smaller, −m otherwise: undo that.
    let terms: Vec<(Seed, Sign)> = survivor_self_seeds
        .iter()
        .map(|(_, b)| (*b, Sign::Sub))
        .chain(dropped_pairs.iter().map(|(survivor, dropped, seed)| {
            (*seed, if pair_sign(*survivor, *dropped) == Sign::Add { Sign::Sub } else { Sign::Add })
        }))
        .collect();
    apply(&mut z, &terms);
    z
}

/// A fresh static X25519 key pair from the OS.
pub fn key_pair() -> (StaticSecret, PublicKey) {
    let mut bytes = [0u8; 32];
    ChaCha20Rng::from_os_rng().fill_bytes(&mut bytes);
    let secret = StaticSecret::from(bytes);
    let public = PublicKey::from(&secret);
    (secret, public)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand::RngCore;

    use super::super::shamir;
    use super::*;

    fn add_assign(acc: &mut [u32], v: &[u32]) {
        for (a, m) in acc.iter_mut().zip(v) {
            *a = a.wrapping_add(*m);
        }
    }

    #[test]
    fn threaded_keystream_equals_the_sequential_one() {
        // Long enough to be split across threads; the reference reads the stream word by word.
        let seed = [7u8; 32];
        let n = (1 << 18) + 12_345;
        let mut rng = ChaCha20Rng::from_seed(seed);
        let want: Vec<u32> = (0..n).map(|_| rng.next_u32()).collect();
        assert_eq!(expand(&seed, n), want);
        let mut acc = want.clone();
        apply(&mut acc, &[(seed, Sign::Sub)]);
        assert!(acc.iter().all(|&w| w == 0));
    }

    struct Node {
        id: u32,
        key: StaticSecret,
        public: PublicKey,
        self_seed: Seed,
        input: Vec<u32>,
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// For every survivor set, with dropped nodes' keys and survivors' self seeds recovered
        /// from t-of-n Shamir shares, the unmasked sum is exactly the survivors' inputs' sum.
        #[test]
        fn masks_cancel_for_every_survivor_set(n in 2usize..7, survivors_bits in any::<u32>(), seed in any::<u64>(), len in 1usize..50) {
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let nodes: Vec<Node> = (0..n)
                .map(|i| {
                    let mut k = [0u8; 32];
                    rng.fill_bytes(&mut k);
                    let key = StaticSecret::from(k);
                    let public = PublicKey::from(&key);
                    let mut self_seed = [0u8; 32];
                    rng.fill_bytes(&mut self_seed);
                    let input = (0..len).map(|_| rng.next_u32()).collect();
                    Node { id: (i as u32) * 3 + 1, key, public, self_seed, input }
                })
                .collect();
            let context = b"plan-x round-1";
            let t = n / 2 + 1;
            // Everyone's key and self seed are shared t-of-n.
            let key_shares: Vec<Vec<shamir::Share>> = nodes.iter().map(|nd| shamir::split(&nd.key.to_bytes(), t, n, &mut rng).unwrap()).collect();
            let seed_shares: Vec<Vec<shamir::Share>> = nodes.iter().map(|nd| shamir::split(&nd.self_seed, t, n, &mut rng).unwrap()).collect();
            let mut survivors: Vec<usize> = (0..n).filter(|i| survivors_bits & (1 << i) != 0).collect();
            if survivors.len() < t {
                survivors = (0..t).collect();
            }
            let dropped: Vec<usize> = (0..n).filter(|i| !survivors.contains(i)).collect();
            let mut sum = vec![0u32; len];
            let mut want = vec![0u32; len];
            for &i in &survivors {
                let me = &nodes[i];
                let pairs: Vec<(u32, Seed)> = nodes.iter().filter(|o| o.id != me.id).map(|o| (o.id, pairwise_seed(&me.key, &o.public, context))).collect();
                add_assign(&mut sum, &mask(&me.input, me.id, &me.self_seed, &pairs));
                add_assign(&mut want, &me.input);
            }
            // The coordinator asks the survivors for shares: self seeds of survivors, keys of the dropped.
            let from_survivors = |shares: &Vec<shamir::Share>| -> Vec<shamir::Share> { survivors.iter().map(|&s| shares[s].clone()).collect() };
            let self_seeds: Vec<(u32, Seed)> = survivors.iter().map(|&i| (nodes[i].id, shamir::reconstruct(&from_survivors(&seed_shares[i]), t).unwrap())).collect();
            let mut dropped_pairs = Vec::new();
            for &d in &dropped {
                let key = StaticSecret::from(shamir::reconstruct(&from_survivors(&key_shares[d]), t).unwrap());
                for &s in &survivors {
                    dropped_pairs.push((nodes[s].id, nodes[d].id, pairwise_seed(&key, &nodes[s].public, context)));
                }
            }
            prop_assert_eq!(unmask(&sum, &self_seeds, &dropped_pairs), want);
        }
    }

    #[test]
    fn both_ends_derive_the_same_seed_and_contexts_separate_rounds() {
        let (a, pa) = key_pair();
        let (b, pb) = key_pair();
        assert_eq!(pairwise_seed(&a, &pb, b"r1"), pairwise_seed(&b, &pa, b"r1"));
        assert_ne!(pairwise_seed(&a, &pb, b"r1"), pairwise_seed(&a, &pb, b"r2"));
        // A single masked input reveals nothing obvious: it differs from the input everywhere
        // except with probability 2⁻³² per word.
        let x = vec![5u32; 64];
        let y = mask(&x, 1, &[9; 32], &[(2, pairwise_seed(&a, &pb, b"r1"))]);
        assert!(x.iter().zip(&y).filter(|(a, b)| a == b).count() <= 1);
    }
}
