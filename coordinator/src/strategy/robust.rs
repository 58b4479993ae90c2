//! The robust aggregators' common part. A [`RobustRule`] (coordinate-wise median
//! ([`super::median`]), trimmed mean ([`super::trimmed_mean`]), Multi-Krum ([`super::multi_krum`]))
//! makes a round's Δ from every update on its own instead of from their running sum, so the
//! round's updates are kept until it closes: in a [`RoundBuffer`] (on disk in the coordinator,
//! `crate::robust_spool`, one file per update; in memory for tests, [`MemoryBuffer`]). A rule
//! reads them back through an [`UpdateSource`] one coordinate block at a time, so what it holds
//! is n × block f32s of updates, Δ (one f64 per model coordinate) and, for Multi-Krum, n² f64
//! distances: O(n × block + model) memory whatever the model's size. The FedAvg step then moves
//! the model by Δ.
//!
//! Plain arithmetic: the buffer is a trait object the caller injects, and its I/O errors come
//! back as values ([`RobustError::Read`]), never panics.

use std::io;

use sanctum_protocol::plan::Strategy;

use super::{median::Median, multi_krum::MultiKrum, trimmed_mean::TrimmedMean};

/// Coordinates read per update at a time: 64 Ki f32s (256 KiB) × n updates in memory.
pub const BLOCK: usize = 64 * 1024;

/// A round's admitted updates, read back a coordinate block at a time. Every update has
/// [`UpdateSource::dim`] finite values (the engine checked them before keeping them).
pub trait UpdateSource {
    /// How many updates the round kept (slots `0..count`).
    fn count(&self) -> usize;
    /// Values per update: the model's parameter count.
    fn dim(&self) -> usize;
    /// Slot `slot`'s weight under the plan's weighting (1 when uniform); only Multi-Krum uses it.
    fn weight(&self, slot: usize) -> f64;
    /// Fills `out` with slot `slot`'s values `start..start + out.len()`.
    fn read_block(&self, slot: usize, start: usize, out: &mut [f32]) -> io::Result<()>;
}

/// Why a robust rule made no Δ; the round fails with this reason and the model is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum RobustError {
    #[error("no update was admitted")]
    NoUpdate,
    #[error(
        "multi_krum with byzantine = {byzantine} needs at least 2f + 3 = {need} updates, {got} were admitted: raise min_nodes or lower strategy.byzantine"
    )]
    TooFewForKrum { byzantine: usize, need: usize, got: usize },
    #[error(
        "reading back buffered update {slot} of {count}: {source}; the round's updates are kept under the coordinator's spool/robust directory: check its disk"
    )]
    Read { slot: usize, count: usize, source: io::Error },
    #[error(
        "the selected updates' weights sum to {0}, not a positive number: the plan's weighting gives them no weight"
    )]
    Weights(f64),
}

/// One robust aggregator: Δ from a round's updates read block by block.
pub trait RobustRule: Send + std::fmt::Debug {
    /// The rule's name in logs.
    fn name(&self) -> &'static str;
    /// The round's combined update Δ (`dim` values), reading `block` coordinates of every update
    /// at a time (`block` ≥ 1; the result does not depend on it).
    fn combine(&self, updates: &dyn UpdateSource, block: usize) -> Result<Vec<f64>, RobustError>;
}

/// The plan's robust rule, or `None` when its strategy averages a running sum.
pub fn rule(strategy: &Strategy) -> Option<Box<dyn RobustRule>> {
    match strategy {
        Strategy::Median => Some(Box::new(Median)),
        Strategy::TrimmedMean { trim } => Some(Box::new(TrimmedMean { trim: *trim })),
        Strategy::MultiKrum { byzantine, selected, .. } => {
            Some(Box::new(MultiKrum { byzantine: *byzantine, selected: *selected }))
        }
        _ => None,
    }
}

/// Reads coordinates `start..start + len` of every update into `buf`, slot-major
/// (`buf[slot * len + k]`).
pub(super) fn read_blocks(
    src: &dyn UpdateSource,
    start: usize,
    len: usize,
    buf: &mut Vec<f32>,
) -> Result<(), RobustError> {
    let count = src.count();
    buf.resize(count * len, 0.0);
    for (slot, chunk) in buf.chunks_exact_mut(len.max(1)).enumerate().take(count) {
        src.read_block(slot, start, chunk).map_err(|source| RobustError::Read { slot, count, source })?;
    }
    Ok(())
}

/// The coordinate-wise rules' skeleton: `f` gets one coordinate's n values (in slot order, to
/// reorder as it likes) and gives that coordinate of Δ.
pub(super) fn coordinatewise(
    src: &dyn UpdateSource,
    block: usize,
    f: impl Fn(&mut [f32]) -> f64,
) -> Result<Vec<f64>, RobustError> {
    let (n, dim, block) = (src.count(), src.dim(), block.max(1));
    if n == 0 {
        return Err(RobustError::NoUpdate);
    }
    let mut out = Vec::with_capacity(dim);
    let (mut buf, mut column) = (Vec::new(), vec![0.0f32; n]);
    let mut start = 0;
    while start < dim {
        let len = block.min(dim - start);
        read_blocks(src, start, len, &mut buf)?;
        for k in 0..len {
            for (slot, v) in column.iter_mut().enumerate() {
                *v = buf[slot * len + k];
            }
            out.push(f(&mut column));
        }
        start += len;
    }
    Ok(out)
}

/// Where the engine keeps a robust round's admitted updates until the round closes.
///
/// Slots are numbered in the order of [`RoundBuffer::put`]. [`RoundBuffer::clear`] empties it:
/// at every round's opening, close and failure, and when the run ends.
pub trait RoundBuffer: Send {
    /// Keeps `node`'s update as the next slot.
    fn put(&mut self, node: &str, values: &[f32]) -> io::Result<()>;
    /// Updates kept since the last clear.
    fn count(&self) -> usize;
    /// Fills `out` with slot `slot`'s values `start..start + out.len()`.
    fn read_block(&self, slot: usize, start: usize, out: &mut [f32]) -> io::Result<()>;
    /// Forgets every kept update (and removes what held it).
    fn clear(&mut self) -> io::Result<()>;
}

/// Opens a run's [`RoundBuffer`]; the engine asks once per robust run.
pub trait RoundBuffers: Send {
    /// The buffer for run `run` (its id); empty.
    fn open(&self, run: &str) -> Box<dyn RoundBuffer>;
}

/// A [`RoundBuffer`] in memory: for engine tests (and an engine no executor gave a file-backed
/// one). O(n × model) memory.
#[derive(Debug, Default)]
pub struct MemoryBuffer {
    updates: Vec<Vec<f32>>,
}

impl RoundBuffer for MemoryBuffer {
    fn put(&mut self, _node: &str, values: &[f32]) -> io::Result<()> {
        self.updates.push(values.to_vec());
        Ok(())
    }

    fn count(&self) -> usize {
        self.updates.len()
    }

    fn read_block(&self, slot: usize, start: usize, out: &mut [f32]) -> io::Result<()> {
        let values =
            self.updates.get(slot).and_then(|u| u.get(start..start + out.len())).ok_or_else(|| {
                io::Error::new(io::ErrorKind::UnexpectedEof, "no such slot or range in the round buffer")
            })?;
        out.copy_from_slice(values);
        Ok(())
    }

    fn clear(&mut self) -> io::Result<()> {
        self.updates.clear();
        Ok(())
    }
}

/// Opens [`MemoryBuffer`]s.
#[derive(Debug, Default)]
pub struct MemoryBuffers;

impl RoundBuffers for MemoryBuffers {
    fn open(&self, _run: &str) -> Box<dyn RoundBuffer> {
        Box::new(MemoryBuffer::default())
    }
}

/// A robust run's rule and its open round's kept updates with their weights.
pub struct RobustRound {
    rule: Box<dyn RobustRule>,
    buffer: Box<dyn RoundBuffer>,
    /// Slot i's weight under the plan's weighting; as long as the buffer's slots.
    weights: Vec<f64>,
    /// Values per update.
    dim: usize,
}

impl RobustRound {
    pub fn new(rule: Box<dyn RobustRule>, buffer: Box<dyn RoundBuffer>, dim: usize) -> Self {
        Self { rule, buffer, weights: Vec::new(), dim }
    }

    /// The rule's name in logs.
    pub fn name(&self) -> &'static str {
        self.rule.name()
    }

    /// Keeps an admitted update (checked: `dim` finite values) with its weight.
    pub fn put(&mut self, node: &str, weight: f64, values: &[f32]) -> io::Result<()> {
        if values.len() != self.dim {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} values, the model has {}", values.len(), self.dim),
            ));
        }
        self.buffer.put(node, values)?;
        self.weights.push(weight);
        Ok(())
    }

    /// Updates kept this round (with a weight and in the buffer).
    pub fn count(&self) -> usize {
        UpdateSource::count(self)
    }

    /// The round's Δ by the rule, `block` coordinates at a time.
    pub fn combine(&self, block: usize) -> Result<Vec<f64>, RobustError> {
        self.rule.combine(self, block)
    }

    /// Forgets the round's updates; a failure to remove them is logged (a restart removes them).
    pub fn clear(&mut self) {
        self.weights.clear();
        if let Err(e) = self.buffer.clear() {
            tracing::warn!(
                "the robust aggregator's buffered updates were not removed: {e}; the next start removes them"
            );
        }
    }
}

impl UpdateSource for RobustRound {
    fn count(&self) -> usize {
        self.weights.len().min(self.buffer.count())
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn weight(&self, slot: usize) -> f64 {
        self.weights.get(slot).copied().unwrap_or(0.0)
    }

    fn read_block(&self, slot: usize, start: usize, out: &mut [f32]) -> io::Result<()> {
        self.buffer.read_block(slot, start, out)
    }
}

impl Drop for RobustRound {
    fn drop(&mut self) {
        // A run that ends (or leaves the engine) takes its buffered updates with it.
        self.clear();
    }
}

impl std::fmt::Debug for RobustRound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RobustRound").field("rule", &self.rule).field("kept", &self.weights.len()).finish()
    }
}

/// Updates held in memory as an [`UpdateSource`], for the rules' tests.
#[cfg(test)]
#[derive(Debug, Clone)]
pub(crate) struct InMemory {
    pub(crate) updates: Vec<Vec<f32>>,
    pub(crate) weights: Vec<f64>,
}

#[cfg(test)]
impl InMemory {
    pub(crate) fn uniform(updates: Vec<Vec<f32>>) -> Self {
        let weights = vec![1.0; updates.len()];
        Self { updates, weights }
    }
}

#[cfg(test)]
impl UpdateSource for InMemory {
    fn count(&self) -> usize {
        self.updates.len()
    }

    fn dim(&self) -> usize {
        self.updates.first().map_or(0, Vec::len)
    }

    fn weight(&self, slot: usize) -> f64 {
        self.weights[slot]
    }

    fn read_block(&self, slot: usize, start: usize, out: &mut [f32]) -> io::Result<()> {
        out.copy_from_slice(&self.updates[slot][start..start + out.len()]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::{
        BLOCK, InMemory, Median, MemoryBuffer, MultiKrum, RobustError, RobustRound, RobustRule, RoundBuffer,
        TrimmedMean, UpdateSource, rule,
    };

    fn rules(n: usize) -> Vec<(String, Box<dyn RobustRule>)> {
        let mut v: Vec<(String, Box<dyn RobustRule>)> = vec![
            ("median".into(), Box::new(Median)),
            ("trimmed 0".into(), Box::new(TrimmedMean { trim: 0.0 })),
            ("trimmed 0.25".into(), Box::new(TrimmedMean { trim: 0.25 })),
            ("trimmed 0.49".into(), Box::new(TrimmedMean { trim: 0.49 })),
        ];
        // Multi-Krum needs n ≥ 2f + 3.
        for f in (0..n).take_while(|f| n >= 2 * f + 3) {
            v.push((format!("krum f={f}"), Box::new(MultiKrum { byzantine: f, selected: None })));
        }
        v
    }

    /// n updates of `dim` finite values, and weights in (0, 10].
    fn round() -> impl prop::strategy::Strategy<Value = InMemory> {
        (1usize..8, 1usize..12).prop_flat_map(|(n, dim)| {
            (
                prop::collection::vec(prop::collection::vec(-1e3f32..1e3, dim), n),
                prop::collection::vec(0.01f64..10.0, n),
            )
                .prop_map(|(updates, weights)| InMemory { updates, weights })
        })
    }

    fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol * (1.0 + x.abs().max(y.abs())))
    }

    proptest! {
        #[test]
        fn coordinatewise_rules_are_permutation_invariant_and_within_min_and_max(u in round(), seed in any::<u64>()) {
            let mut shuffled = u.clone();
            // A deterministic permutation from the seed (Fisher–Yates with a xorshift).
            let mut x = seed | 1;
            for i in (1..shuffled.updates.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                let j = (x % (i as u64 + 1)) as usize;
                shuffled.updates.swap(i, j);
                shuffled.weights.swap(i, j);
            }
            for rule in [&Median as &dyn RobustRule, &TrimmedMean { trim: 0.0 }, &TrimmedMean { trim: 0.3 }] {
                let a = rule.combine(&u, 3).unwrap();
                let b = rule.combine(&shuffled, 3).unwrap();
                // Exactly: the values are sorted before they are combined.
                prop_assert_eq!(&a, &b, "{}", rule.name());
                for (k, v) in a.iter().enumerate() {
                    let column = u.updates.iter().map(|x| f64::from(x[k]));
                    let (lo, hi) = column.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), c| (l.min(c), h.max(c)));
                    prop_assert!(lo - 1e-9 <= *v && *v <= hi + 1e-9, "{}: {v} outside [{lo}, {hi}]", rule.name());
                }
            }
        }

        #[test]
        fn trimmed_mean_with_beta_0_is_the_mean_and_multi_krum_with_f_0_and_m_n_the_weighted_mean(u in round()) {
            let n = u.updates.len();
            let dim = u.dim();
            let mean: Vec<f64> = (0..dim).map(|k| u.updates.iter().map(|x| f64::from(x[k])).sum::<f64>() / n as f64).collect();
            let trimmed = TrimmedMean { trim: 0.0 }.combine(&u, 4).unwrap();
            prop_assert!(close(&trimmed, &mean, 1e-12), "{:?} vs {:?}", trimmed, mean);
            if n >= 3 {
                let total: f64 = u.weights.iter().sum();
                let weighted: Vec<f64> = (0..dim)
                    .map(|k| u.updates.iter().zip(&u.weights).map(|(x, w)| w * f64::from(x[k])).sum::<f64>() / total)
                    .collect();
                let krum = MultiKrum { byzantine: 0, selected: Some(n) }.combine(&u, 4).unwrap();
                prop_assert!(close(&krum, &weighted, 1e-12), "{krum:?} vs {weighted:?}");
            }
        }

        #[test]
        fn the_result_read_block_by_block_equals_the_whole_vector_result(u in round()) {
            let n = u.updates.len();
            let dim = u.dim();
            for (name, rule) in rules(n) {
                let whole = rule.combine(&u, dim).unwrap();
                for block in [1, 3, n, BLOCK] {
                    // Exactly equal: the coordinate order of every sum is the same whatever the block.
                    prop_assert_eq!(&rule.combine(&u, block).unwrap(), &whole, "{} with block {}", name, block);
                }
            }
        }

        #[test]
        fn a_round_kept_in_a_memory_buffer_combines_as_the_updates_themselves(u in round()) {
            let dim = u.dim();
            let mut r = RobustRound::new(Box::new(Median), Box::new(MemoryBuffer::default()), dim);
            for (i, (x, w)) in u.updates.iter().zip(&u.weights).enumerate() {
                r.put(&format!("n{i}"), *w, x).unwrap();
            }
            prop_assert_eq!(r.count(), u.updates.len());
            prop_assert_eq!(r.combine(2).unwrap(), Median.combine(&u, 2).unwrap());
            prop_assert!(r.put("wrong", 1.0, &vec![0.0; dim + 1]).is_err(), "a wrong length is not kept");
            r.clear();
            prop_assert_eq!(r.count(), 0);
            prop_assert!(matches!(r.combine(2), Err(RobustError::NoUpdate)));
        }
    }

    #[test]
    fn a_buffered_update_that_does_not_read_back_is_an_error_naming_its_slot() {
        // One value kept where the model has two (as a file cut short).
        let mut short = MemoryBuffer::default();
        short.put("a", &[1.0]).unwrap();
        let mut r = RobustRound::new(Box::new(Median), Box::new(short), 2);
        r.weights.push(1.0);
        let e = r.combine(2).unwrap_err();
        assert!(matches!(e, RobustError::Read { slot: 0, count: 1, .. }), "{e:?}");
        assert!(e.to_string().contains("spool/robust"), "{e}");
        // A weight with no update behind it does not count.
        r.weights.push(1.0);
        assert_eq!(r.count(), 1);
    }

    #[test]
    fn the_plan_names_the_rule() {
        use sanctum_protocol::plan::{Strategy, Weighting};
        assert_eq!(rule(&Strategy::Median).map(|r| r.name()), Some("median"));
        assert_eq!(rule(&Strategy::TrimmedMean { trim: 0.1 }).map(|r| r.name()), Some("trimmed_mean"));
        let krum = Strategy::MultiKrum { byzantine: 1, selected: None, weighting: Weighting::Samples };
        assert_eq!(rule(&krum).map(|r| r.name()), Some("multi_krum"));
        assert!(rule(&Strategy::Fedavg { weighting: Weighting::Samples }).is_none());
    }
}
