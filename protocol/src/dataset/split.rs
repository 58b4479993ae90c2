//! The deterministic train/test split rule (`[split] rule = "hash"`): every hospital, and anyone
//! re-running a study, assigns the same row to the same split from the schema alone, and the
//! assignment depends on nothing but the row's key, so it reveals nothing about other rows.
//!
//! A row is test iff `u < test_fraction` where `u = x / 2^64` and `x` is the first 8 bytes of
//! `SHA-256(seed as 8 little-endian bytes || key)` read as a big-endian unsigned integer (the
//! digest's first 16 hex characters). The comparison is exact (`x < test_fraction · 2^64` over
//! the rationals), not rounded through `f64`, so it agrees with Python's exact int/float
//! comparison bit for bit. The key is the patient-id cell's text when the schema has an id
//! column, else the 1-based data row number as decimal text (the loader's choice, documented in
//! the schema).

use ring::digest;

/// Which part of the data a row belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Test,
}

/// The 64-bit draw `x` of the hash rule for `key` under `seed`.
pub fn split_draw(seed: u64, key: &[u8]) -> u64 {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(&seed.to_le_bytes());
    ctx.update(key);
    let d = ctx.finish();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d.as_ref()[..8]);
    u64::from_be_bytes(first)
}

/// The split of the row with `key` under the hash rule. `test_fraction` is in (0, 1) in a
/// validated schema; outside it every row is train (≤ 0) or test (≥ 1).
pub fn split_of(seed: u64, key: &[u8], test_fraction: f64) -> Split {
    if is_test(split_draw(seed, key), test_fraction) { Split::Test } else { Split::Train }
}

/// `x / 2^64 < f`, exactly. `f · 2^64` is exact in f64 (a power-of-two scale), and for f < 1 it
/// is below 2^64, so its ceiling fits a u128 and `x < t ⇔ x < ⌈t⌉` for an integer x.
fn is_test(x: u64, f: f64) -> bool {
    if f.is_nan() || f <= 0.0 {
        return false;
    }
    if f >= 1.0 {
        return true;
    }
    let t = (f * 18_446_744_073_709_551_616.0).ceil();
    u128::from(x) < t as u128
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Reference draws, computed independently of this code with Python's hashlib:
    /// python3 -c "import hashlib,struct; [print(s,k,int.from_bytes(hashlib.sha256(struct.pack('<Q',s)+k).digest()[:8],'big')) for s in (0,7) for k in [b'1',b'2',b'6',b'P-0042',b'']]"
    #[test]
    fn draws_match_python_hashlib() {
        let cases: &[(u64, &[u8], u64)] = &[
            (0, b"1", 10487365921634520957),
            (0, b"2", 10436735894136735826),
            (0, b"6", 5908442349319373878),
            (0, b"P-0042", 272304978675547921),
            (0, b"", 12634128529936681850),
            (7, b"1", 14461448841948932212),
            (7, b"2", 3861788936737892587),
            (7, b"6", 3920150314032165031),
            (7, b"P-0042", 10337601508179892353),
            (7, b"", 12315268832057764185),
        ];
        for &(seed, key, x) in cases {
            assert_eq!(split_draw(seed, key), x, "seed {seed} key {key:?}");
        }
        assert_eq!(split_of(0, b"P-0042", 0.25), Split::Test);
        assert_eq!(split_of(7, b"P-0042", 0.25), Split::Train);
        assert_eq!(split_of(7, b"2", 0.25), Split::Test);
        assert_eq!(split_of(0, b"1", 0.25), Split::Train);
    }

    /// Row numbers 1..=40 as keys at test_fraction 0.6 ('T' = test), from Python:
    /// python3 -c "import hashlib,struct; [print(s,''.join('T' if int.from_bytes(hashlib.sha256(struct.pack('<Q',s)+str(i).encode()).digest()[:8],'big') < 0.6*2**64 else '.' for i in range(1,41))) for s in (0,7)]"
    #[test]
    fn row_number_keys_match_python() {
        for (seed, expected) in
            [(0, "TTT..TT..T...TT.T.TT.TTT..T.T...TTT.T.TT"), (7, ".T...T..TTT.T.T.T.TTTTTTT..TT....T..TT.T")]
        {
            let got: String = (1..=40)
                .map(|i: u32| match split_of(seed, i.to_string().as_bytes(), 0.6) {
                    Split::Test => 'T',
                    Split::Train => '.',
                })
                .collect();
            assert_eq!(got, expected, "seed {seed}");
        }
    }

    /// The exact comparison at the edges, where rounding `x` to f64 would decide wrongly.
    #[test]
    fn comparison_is_exact_at_the_boundary() {
        // 0.5 · 2^64 = 2^63: x = 2^63 − 1 is test, 2^63 is not.
        assert!(is_test((1u64 << 63) - 1, 0.5));
        assert!(!is_test(1u64 << 63, 0.5));
        // u64::MAX as f64 rounds to 2^64 = 1.0 · 2^64; the largest f64 below 1 still makes it
        // train, exactly.
        let below_one = f64::from_bits(1.0f64.to_bits() - 1);
        assert!(!is_test(u64::MAX, below_one));
        assert!(is_test(u64::MAX - 4096, below_one));
        assert!(!is_test(0, 0.0));
        assert!(is_test(u64::MAX, 1.0));
    }

    proptest! {
        /// Against a u128 oracle: x < f · 2^64 with f = k / 2^20 exactly representable.
        #[test]
        fn matches_integer_oracle(x in any::<u64>(), k in 1u32..(1 << 20)) {
            let f = f64::from(k) / f64::from(1u32 << 20);
            let oracle = u128::from(x) < (u128::from(k) << 44);
            prop_assert_eq!(is_test(x, f), oracle);
        }

        /// Over many keys the test share is close to test_fraction.
        #[test]
        fn test_share_tracks_the_fraction(seed in any::<u64>(), f in 0.05f64..0.95) {
            let n = 4000;
            let tests = (0..n).filter(|i: &u32| split_of(seed, i.to_string().as_bytes(), f) == Split::Test).count();
            let share = tests as f64 / f64::from(n);
            // 5 standard deviations of a binomial share at n = 4000 is at most 0.04.
            prop_assert!((share - f).abs() < 0.04, "share {} for fraction {}", share, f);
        }
    }
}
