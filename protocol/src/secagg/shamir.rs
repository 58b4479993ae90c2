//! Shamir t-of-n secret sharing of 32-byte secrets over the prime field GF(2⁶¹ − 1).
//!
//! A secret is split into eight 32-bit limbs; each limb is the constant term of its own random
//! polynomial of degree t − 1, evaluated at the same points x = 1…n. Any t shares give every limb
//! back by Lagrange interpolation at 0; t − 1 shares are consistent with every possible secret.
//! A reconstructed limb that does not fit 32 bits means the shares disagree, and is refused.

use rand::RngCore;

/// The Mersenne prime 2⁶¹ − 1.
const P: u64 = (1 << 61) - 1;
const LIMBS: usize = 8;

fn reduce(x: u128) -> u64 {
    // x = hi·2⁶¹ + lo ≡ hi + lo (mod 2⁶¹ − 1), twice to fold the carry.
    let r = (x & u128::from(P)) + (x >> 61);
    let r = (r & u128::from(P)) + (r >> 61);
    let r = r as u64;
    if r >= P { r - P } else { r }
}

fn add(a: u64, b: u64) -> u64 {
    let s = a + b;
    if s >= P { s - P } else { s }
}

fn sub(a: u64, b: u64) -> u64 {
    if a >= b { a - b } else { a + P - b }
}

fn mul(a: u64, b: u64) -> u64 {
    reduce(u128::from(a) * u128::from(b))
}

fn pow(mut a: u64, mut e: u64) -> u64 {
    let mut r = 1;
    while e > 0 {
        if e & 1 == 1 {
            r = mul(r, a);
        }
        a = mul(a, a);
        e >>= 1;
    }
    r
}

fn inv(a: u64) -> u64 {
    pow(a, P - 2)
}

/// A uniform field element (rejection sampling keeps it unbiased).
fn random_element(rng: &mut impl RngCore) -> u64 {
    loop {
        let v = rng.next_u64() >> 3;
        if v < P {
            return v;
        }
    }
}

/// One share: the evaluation point and the eight limbs' values there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Share {
    pub x: u64,
    pub y: [u64; LIMBS],
}

/// Why shares cannot be turned back into a secret.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShamirError {
    #[error("threshold {t} and share count {n} must satisfy 1 ≤ t ≤ n < 2^61")]
    Parameters { t: usize, n: usize },
    #[error("{got} shares given, the threshold is {t}")]
    TooFew { got: usize, t: usize },
    #[error("shares have a repeated or zero evaluation point")]
    BadPoints,
    #[error("the shares are inconsistent (a limb reconstructs outside 32 bits)")]
    Inconsistent,
}

/// Splits `secret` into `n` shares, any `t` of which reconstruct it.
pub fn split(secret: &[u8; 32], t: usize, n: usize, rng: &mut impl RngCore) -> Result<Vec<Share>, ShamirError> {
    if t == 0 || t > n || n as u64 >= P {
        return Err(ShamirError::Parameters { t, n });
    }
    // One polynomial per limb: constant term = the limb, t − 1 uniform coefficients.
    let polys: Vec<Vec<u64>> = (0..LIMBS)
        .map(|l| {
            let limb = u32::from_le_bytes([secret[4 * l], secret[4 * l + 1], secret[4 * l + 2], secret[4 * l + 3]]);
            std::iter::once(u64::from(limb)).chain((1..t).map(|_| random_element(rng))).collect()
        })
        .collect();
    Ok((1..=n as u64)
        .map(|x| {
            let mut y = [0u64; LIMBS];
            for (l, poly) in polys.iter().enumerate() {
                // Horner's rule.
                y[l] = poly.iter().rev().fold(0, |acc, &c| add(mul(acc, x), c));
            }
            Share { x, y }
        })
        .collect())
}

/// Reconstructs the secret from at least `t` shares (the first `t` are used).
pub fn reconstruct(shares: &[Share], t: usize) -> Result<[u8; 32], ShamirError> {
    if t == 0 {
        return Err(ShamirError::Parameters { t, n: shares.len() });
    }
    if shares.len() < t {
        return Err(ShamirError::TooFew { got: shares.len(), t });
    }
    let used = &shares[..t];
    for (i, a) in used.iter().enumerate() {
        if a.x == 0 || a.x >= P || used[..i].iter().any(|b| b.x == a.x) {
            return Err(ShamirError::BadPoints);
        }
    }
    // Lagrange basis at 0: λᵢ = Π_{j≠i} xⱼ / (xⱼ − xᵢ).
    let lambdas: Vec<u64> = used
        .iter()
        .map(|si| used.iter().filter(|sj| sj.x != si.x).fold(1, |acc, sj| mul(acc, mul(sj.x, inv(sub(sj.x, si.x))))))
        .collect();
    let mut secret = [0u8; 32];
    for l in 0..LIMBS {
        let v = used.iter().zip(&lambdas).fold(0, |acc, (s, &lam)| add(acc, mul(s.y[l], lam)));
        let limb = u32::try_from(v).map_err(|_| ShamirError::Inconsistent)?;
        secret[4 * l..4 * l + 4].copy_from_slice(&limb.to_le_bytes());
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    use super::*;

    #[test]
    fn field_arithmetic() {
        assert_eq!(mul(P - 1, P - 1), 1, "(−1)² = 1");
        assert_eq!(mul(inv(12345), 12345), 1);
        assert_eq!(add(P - 1, 1), 0);
        assert_eq!(sub(0, 1), P - 1);
    }

    proptest! {
        #[test]
        fn any_t_shares_reconstruct_and_t_minus_1_do_not(
            secret in prop::array::uniform32(any::<u8>()),
            n in 1usize..10,
            t_frac in 0.0f64..1.0,
            seed in any::<u64>(),
            pick in any::<u64>(),
        ) {
            let t = 1 + ((n - 1) as f64 * t_frac) as usize;
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let shares = split(&secret, t, n, &mut rng).unwrap();
            // A pseudo-random subset of exactly t shares, in a shuffled order.
            let mut idx: Vec<usize> = (0..n).collect();
            let mut prng = ChaCha20Rng::seed_from_u64(pick);
            rand::seq::SliceRandom::shuffle(idx.as_mut_slice(), &mut prng);
            let chosen: Vec<Share> = idx[..t].iter().map(|&i| shares[i].clone()).collect();
            prop_assert_eq!(reconstruct(&chosen, t).unwrap(), secret);
            if t >= 2 {
                // t − 1 shares fit a polynomial through any secret at all: interpolating them
                // with the point (0, s′) for a different s′ gives a valid-looking set, so they
                // carry no information. Concretely, treating t − 1 shares as a (t − 1)-threshold
                // sharing never yields the secret (except with negligible probability).
                let fewer = &chosen[..t - 1];
                prop_assert!(reconstruct(fewer, t).is_err());
                prop_assert_ne!(reconstruct(fewer, t - 1).ok(), Some(secret));
            }
        }
    }

    #[test]
    fn bad_inputs_are_refused() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        assert!(split(&[0; 32], 0, 3, &mut rng).is_err());
        assert!(split(&[0; 32], 4, 3, &mut rng).is_err());
        let shares = split(&[7; 32], 2, 3, &mut rng).unwrap();
        let dup = vec![shares[0].clone(), shares[0].clone()];
        assert_eq!(reconstruct(&dup, 2), Err(ShamirError::BadPoints));
        let mut tampered = shares[..2].to_vec();
        tampered[1].y[0] = add(tampered[1].y[0], 1);
        assert!(reconstruct(&tampered, 2) != Ok([7; 32]));
    }
}
