//! Streaming aggregation and the server optimizers, as plain arithmetic with no I/O.
//!
//! Updates are folded into one running weighted sum as each one is admitted, so memory is
//! O(model size) whatever the number of nodes. The server optimizer then moves the global model
//! by the weighted mean update (FedAvg) or uses it as a pseudo-gradient for FedAdam, FedYogi or
//! FedAdagrad (Reddi et al., "Adaptive Federated Optimization", ICLR 2021).
//!
//! Two bounds hold whatever a node sends: an update's weight under sample weighting is at most
//! the plan's `max_samples` ([`sample_weight`]), and a server step that would leave a non-finite
//! global model is refused and changes nothing ([`crate::strategy::ServerState::step`]).

use sanctum_protocol::plan::AdaptiveClipping;

/// Why an update cannot be folded in.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum AggregateError {
    #[error("update has {got} parameters, the model has {want}")]
    Shape { got: usize, want: usize },
    #[error("update contains a non-finite value (NaN or infinity) at parameter {index}")]
    NonFinite { index: usize },
    #[error("aggregation weight {0} is not a positive finite number")]
    Weight(f64),
    #[error(
        "the new global model would have a non-finite value (NaN or infinity) at parameter {index}; it was not stored or published (an update far too large for the server step)"
    )]
    NonFiniteModel { index: usize },
    #[error("the round's sum was already turned into its mean; an update now is too late for it")]
    Finished,
}

/// An update's aggregation weight under sample weighting: the node's sample count, at most
/// `max_samples` (the plan's `[secagg] max_samples`, which bounds it with or without secure
/// aggregation). A count of 0 is refused before this.
pub fn sample_weight(sample_count: u64, max_samples: u64) -> f64 {
    // Both ≤ 2⁶⁴; an f64 keeps every count a consortium has exactly (up to 2⁵³).
    sample_count.min(max_samples) as f64
}

/// An update's values, every one of them finite: made only by [`FiniteValues::new`] and
/// [`FiniteValues::read_le`], which check, so [`Accumulator::add_finite`] folds them without a
/// second pass over them. The service decodes and checks each upload on a blocking thread of its
/// own, beside the others; the engine then only folds.
#[derive(Clone, Debug, PartialEq)]
pub struct FiniteValues(Vec<f32>);

/// Why a payload read back is not an update's values.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error(transparent)]
    NotFinite(#[from] AggregateError),
    #[error("the payload holds {got} bytes, not the {want} its values need")]
    Length { got: u64, want: u64 },
    #[error("reading the payload back: {0}")]
    Io(#[from] std::io::Error),
}

impl FiniteValues {
    /// Checks that every value is finite.
    pub fn new(values: Vec<f32>) -> Result<Self, AggregateError> {
        match values.iter().position(|v| !v.is_finite()) {
            Some(index) => Err(AggregateError::NonFinite { index }),
            None => Ok(Self(values)),
        }
    }

    /// Reads exactly `count` little-endian f32 values from `r` into one buffer of that size (no
    /// copy of the bytes is kept), checking each as it is decoded; more or fewer bytes, or a
    /// non-finite value (named by its index), is refused.
    pub fn read_le(r: &mut impl std::io::Read, count: usize) -> Result<Self, PayloadError> {
        let want = count as u64 * 4;
        let mut values = Vec::with_capacity(count);
        let mut block = vec![0u8; (1 << 20).min(count * 4).max(4)];
        let mut got = 0u64;
        while values.len() < count {
            let take = block.len().min((count - values.len()) * 4);
            let n = read_full(r, &mut block[..take])?;
            got += n as u64;
            if n < take {
                return Err(PayloadError::Length { got, want });
            }
            for b in block[..take].chunks_exact(4) {
                let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                if !v.is_finite() {
                    return Err(AggregateError::NonFinite { index: values.len() }.into());
                }
                values.push(v);
            }
        }
        let extra = read_full(r, &mut [0u8; 1])?;
        if extra > 0 {
            return Err(PayloadError::Length { got: want + extra as u64, want });
        }
        Ok(Self(values))
    }

    /// The values.
    pub fn as_slice(&self) -> &[f32] {
        &self.0
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The values, to change them (and check them again with [`FiniteValues::new`]).
    pub fn into_inner(self) -> Vec<f32> {
        self.0
    }
}

/// Reads until `buf` is full or the reader ends; how many bytes were read.
fn read_full(r: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// A running weighted sum of updates, in f64 so the order of arrival barely matters. One buffer
/// of the model's size at a time: [`Accumulator::mean_in_place`] divides it in place and
/// [`Accumulator::reset`] replaces it only once it is freed, so no round holds a second one.
#[derive(Debug)]
pub struct Accumulator {
    sum: Vec<f64>,
    total_weight: f64,
    count: usize,
    /// `sum` holds the mean now ([`Accumulator::mean_in_place`]); nothing more is taken.
    finished: bool,
}

impl Accumulator {
    /// An empty sum for a model of `num_params` scalars.
    pub fn new(num_params: usize) -> Self {
        Self { sum: vec![0.0; num_params], total_weight: 0.0, count: 0, finished: false }
    }

    /// Empties the sum for a model of `num_params` scalars. The old buffer is freed before the
    /// new one is made, so two never coexist, and a fresh zeroed buffer (calloc'd: its pages are
    /// mapped as they are first written) holds no resident memory until updates arrive.
    pub fn reset(&mut self, num_params: usize) {
        self.sum = Vec::new();
        self.sum = vec![0.0; num_params];
        (self.total_weight, self.count, self.finished) = (0.0, 0, false);
    }

    /// Checks an update without folding it in: shape and finiteness, and that the round's sum is
    /// still open (so an update checked here is one [`Accumulator::add`] takes).
    pub fn check(&self, update: &[f32]) -> Result<(), AggregateError> {
        self.check_shape(update.len())?;
        if let Some(index) = update.iter().position(|v| !v.is_finite()) {
            return Err(AggregateError::NonFinite { index });
        }
        Ok(())
    }

    /// Folds in one update with its weight; nothing changes if it is refused.
    pub fn add(&mut self, update: &[f32], weight: f64) -> Result<(), AggregateError> {
        if !(weight.is_finite() && weight > 0.0) {
            return Err(AggregateError::Weight(weight));
        }
        self.check(update)?;
        self.fold(update, weight);
        Ok(())
    }

    /// [`Accumulator::add`] for values already checked finite: only the shape, the weight and
    /// whether the sum is still open are checked.
    pub fn add_finite(&mut self, update: &FiniteValues, weight: f64) -> Result<(), AggregateError> {
        self.check_shape(update.len())?;
        if !(weight.is_finite() && weight > 0.0) {
            return Err(AggregateError::Weight(weight));
        }
        self.fold(update.as_slice(), weight);
        Ok(())
    }

    /// Refuses an update of another length than the model's, or one that comes after the mean.
    pub fn check_shape(&self, len: usize) -> Result<(), AggregateError> {
        if self.finished {
            return Err(AggregateError::Finished);
        }
        if len != self.sum.len() {
            return Err(AggregateError::Shape { got: len, want: self.sum.len() });
        }
        Ok(())
    }

    fn fold(&mut self, update: &[f32], weight: f64) {
        for (s, u) in self.sum.iter_mut().zip(update) {
            *s += weight * f64::from(*u);
        }
        self.total_weight += weight;
        self.count += 1;
    }

    /// How many updates were folded in.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The running weighted sum.
    pub fn sum(&self) -> &[f64] {
        &self.sum
    }

    /// The weighted mean update in a new buffer, or `None` when nothing was added: the reference
    /// [`Accumulator::mean_in_place`] is tested against (the engine uses that one).
    #[cfg(test)]
    pub fn mean(&self) -> Option<Vec<f64>> {
        if self.count == 0 {
            return None;
        }
        Some(self.sum.iter().map(|s| s / self.total_weight).collect())
    }

    /// The weighted mean update computed in the sum's own buffer (the same values as
    /// [`Accumulator::mean`], bit for bit), or `None` when nothing was added. From then on the
    /// accumulator takes no update until [`Accumulator::reset`].
    pub fn mean_in_place(&mut self) -> Option<&[f64]> {
        if self.count == 0 {
            return None;
        }
        if !self.finished {
            for s in &mut self.sum {
                *s /= self.total_weight;
            }
            self.finished = true;
        }
        Some(&self.sum)
    }
}

/// Client-level DP at the coordinator (DP-FedAvg, McMahan et al. 2018), with fixed or adaptive
/// clipping (Andrew et al., "Differentially Private Learning with Adaptive Clipping", NeurIPS 2021).
///
/// Each admitted update is scaled to norm at most C; at the end of the round the sum gets
/// N(0, (σ_Δ·C)²) noise on every coordinate and is divided by the number of participants the
/// round opened with (public, unlike the number that reported).
///
/// With adaptive clipping each update also contributes bᵢ − ½ to a count, where bᵢ = 1 when its
/// norm was at most C (TF Privacy's `QuantileEstimatorQuery`: "below" is `record <= estimate`,
/// shifted by −0.5). The centred sum Σ(bᵢ − ½) gets N(0, σ_b²) noise and is read as the
/// unclipped fraction b̃ = (Σ(bᵢ − ½) + noise)/n + ½, clamped to [0, 1]; then
/// C ← C·exp(−η·(b̃ − γ)) (geometric update). σ_b is the plan's `count_noise_multiplier`, a
/// standard deviation in counts, as TF Privacy's `clipped_count_stddev`.
///
/// **Why centred, not sensitivity 1.** Adding or removing one hospital changes Σ(bᵢ − ½) by
/// exactly ½, whether its update was clipped or not; the plain count Σbᵢ would move by 1 (or 0).
/// Centring halves the count's sensitivity at no cost: the shift by ½ per participant is undone
/// with the public n, so the estimate is the same when every participant reports. The split of
/// the plan's σ between the two queries, σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−1/2) (Andrew et al., and TFF's
/// `DifferentiallyPrivateFactory.gaussian_adaptive`), is right *only* for sensitivity ½: the
/// pair (sum/(σ_Δ·C), count/σ_b) has L2 sensitivity √(σ_Δ⁻² + (½/σ_b)²) = 1/σ, one Gaussian
/// release with the plan's σ, which is what the accountant charged. With the uncentred count
/// the same split gives √(σ_Δ⁻² + σ_b⁻²) > 1/σ: less privacy than charged. (Using sensitivity 1
/// in the split instead would also be sound, but it needs twice the count noise for the same
/// update noise.) With r of the n participants reporting, U of them unclipped,
/// b̃ = U/n + (n − r)/(2n) before noise: a participant that never reported counts as half an
/// unclipped update, as in TF Privacy with `expected_num_records`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClientDp {
    clip: f64,
    update_sigma: f64,
    adaptive: Option<AdaptiveClipping>,
    /// Updates this round whose norm was at most the clip norm (bᵢ = 1).
    unclipped: u64,
    /// Updates this round that had to be clipped (bᵢ = 0).
    clipped: u64,
}

/// Why DP-FedAvg cannot be set up for a plan.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClientDpError {
    /// The count query would need all of the plan's noise budget or more: σ_Δ⁻² = σ⁻² − (2σ_b)⁻²
    /// must be positive.
    #[error(
        "adaptive clipping's count_noise_multiplier {count_noise_multiplier} must exceed half the noise multiplier {sigma}: raise privacy.adaptive_clipping.count_noise_multiplier or privacy.noise_multiplier"
    )]
    CountNoiseTooSmall { count_noise_multiplier: f64, sigma: f64 },
}

impl ClientDp {
    /// `sigma` is the plan's noise multiplier; adaptive clipping needs 2σ_b > σ.
    pub fn new(sigma: f64, clip: f64, adaptive: Option<AdaptiveClipping>) -> Result<Self, ClientDpError> {
        let update_sigma = match &adaptive {
            None => sigma,
            Some(a) => {
                // The count query's noise multiplier is σ_b / (sensitivity ½) = 2σ_b.
                let rest = sigma.powi(-2) - (2.0 * a.count_noise_multiplier).powi(-2);
                if rest <= 0.0 {
                    return Err(ClientDpError::CountNoiseTooSmall {
                        count_noise_multiplier: a.count_noise_multiplier,
                        sigma,
                    });
                }
                rest.powf(-0.5)
            }
        };
        Ok(Self { clip, update_sigma, adaptive, unclipped: 0, clipped: 0 })
    }

    /// The clip norm this round uses.
    pub fn clip_norm(&self) -> f64 {
        self.clip
    }

    /// The noise multiplier applied to the sum of updates.
    pub fn update_noise_multiplier(&self) -> f64 {
        self.update_sigma
    }

    /// Scales `update` to norm at most C; returns its norm before clipping.
    pub fn clip(&mut self, update: &mut [f32]) -> f64 {
        let norm = update.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
        if norm <= self.clip {
            self.unclipped += 1;
        } else {
            self.clipped += 1;
            let scale = self.clip / norm;
            for v in update.iter_mut() {
                *v = (f64::from(*v) * scale) as f32;
            }
        }
        norm
    }

    /// The noised mean of the round's clipped updates; `gaussian(std)` draws N(0, std²), first
    /// once per coordinate of the sum, then once for the centred count. Adapts the clip norm for
    /// the next round.
    pub fn release(&mut self, sum: &[f64], participants: usize, gaussian: &mut dyn FnMut(f64) -> f64) -> Vec<f64> {
        let n = participants.max(1) as f64;
        let std = self.update_sigma * self.clip;
        let mean = sum.iter().map(|s| (s + gaussian(std)) / n).collect();
        if let Some(a) = &self.adaptive {
            // Σ(bᵢ − ½), exact: both counts are integers far below 2⁵³.
            let centred = (self.unclipped as f64 - self.clipped as f64) * 0.5;
            let b = ((centred + gaussian(a.count_noise_multiplier)) / n + 0.5).clamp(0.0, 1.0);
            self.clip *= (-a.learning_rate * (b - a.target_quantile)).exp();
        }
        self.unclipped = 0;
        self.clipped = 0;
        mean
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A reader that hands out at most `step` bytes a call, as a file or socket may.
    struct Trickle<'a> {
        bytes: &'a [u8],
        step: usize,
    }

    impl std::io::Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.step).min(self.bytes.len());
            buf[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            Ok(n)
        }
    }

    proptest! {
        /// Read back in any pieces, the values are the bytes' little-endian f32s, and folding
        /// them unchecked is folding them checked, bit for bit.
        #[test]
        fn values_read_back_in_any_pieces_are_the_payload_and_fold_as_add_does(
            values in proptest::collection::vec(-1e30f32..1e30, 1..3000),
            step in 1usize..9000,
            weight in 0.5f64..1e4,
        ) {
            let bytes = sanctum_protocol::transfer::f32_to_le_bytes(&values);
            let read = FiniteValues::read_le(&mut Trickle { bytes: &bytes, step }, values.len()).unwrap();
            prop_assert_eq!(read.as_slice(), &values[..]);
            let (mut checked, mut unchecked) = (Accumulator::new(values.len()), Accumulator::new(values.len()));
            checked.add(&values, weight).unwrap();
            unchecked.add_finite(&read, weight).unwrap();
            prop_assert_eq!(checked.sum().iter().map(|v| v.to_bits()).collect::<Vec<_>>(), unchecked.sum().iter().map(|v| v.to_bits()).collect::<Vec<_>>());
            prop_assert_eq!((checked.count(), checked.total_weight), (unchecked.count(), unchecked.total_weight));
        }

        /// A non-finite value anywhere is refused, naming its index; so are bytes too few or too
        /// many for the values.
        #[test]
        fn a_payload_with_a_non_finite_value_or_the_wrong_length_is_refused(
            len in 1usize..600_000,
            at in 0usize..600_000,
            bad in prop_oneof![Just(f32::NAN), Just(f32::INFINITY), Just(f32::NEG_INFINITY)],
        ) {
            let at = at % len;
            let mut values = vec![0.25f32; len];
            values[at] = bad;
            let bytes = sanctum_protocol::transfer::f32_to_le_bytes(&values);
            let e = FiniteValues::read_le(&mut &bytes[..], len).unwrap_err();
            prop_assert!(matches!(e, PayloadError::NotFinite(AggregateError::NonFinite { index }) if index == at), "{e}");
            prop_assert!(FiniteValues::new(values).is_err());
            let ok = sanctum_protocol::transfer::f32_to_le_bytes(&vec![0.25f32; len]);
            let short = FiniteValues::read_le(&mut &ok[..ok.len() - 1], len).unwrap_err();
            prop_assert!(matches!(short, PayloadError::Length { got, want } if got == want - 1), "{short}");
            let mut long = ok.clone();
            long.push(0);
            let long = FiniteValues::read_le(&mut &long[..], len).unwrap_err();
            prop_assert!(matches!(long, PayloadError::Length { .. }), "{long}");
        }
    }

    #[test]
    fn unchecked_folding_still_refuses_a_wrong_shape_a_bad_weight_and_a_closed_sum() {
        let values = FiniteValues::new(vec![1.0, 2.0]).unwrap();
        let mut acc = Accumulator::new(3);
        assert_eq!(acc.add_finite(&values, 1.0), Err(AggregateError::Shape { got: 2, want: 3 }));
        let mut acc = Accumulator::new(2);
        assert_eq!(acc.add_finite(&values, 0.0), Err(AggregateError::Weight(0.0)));
        assert!(matches!(acc.add_finite(&values, f64::NAN), Err(AggregateError::Weight(w)) if w.is_nan()));
        acc.add_finite(&values, 2.0).unwrap();
        acc.mean_in_place().unwrap();
        assert_eq!(acc.add_finite(&values, 1.0), Err(AggregateError::Finished));
        assert_eq!(acc.count(), 1, "nothing refused was folded");
    }

    proptest! {
        /// The mean made in the sum's buffer is the allocating mean, bit for bit; after it the
        /// accumulator takes nothing until reset, and reset starts again from zero.
        #[test]
        fn the_mean_in_place_is_the_mean_and_closes_the_sum_until_reset(
            updates in proptest::collection::vec((proptest::collection::vec(-1e6f32..1e6, 5), 0.5f64..1e4), 1..8),
        ) {
            let mut acc = Accumulator::new(5);
            for (u, w) in &updates {
                acc.add(u, *w).unwrap();
            }
            let want = acc.mean().unwrap();
            let got = acc.mean_in_place().unwrap().to_vec();
            prop_assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
            // Asked again, the same mean (not divided twice).
            prop_assert_eq!(acc.mean_in_place().unwrap(), &want[..]);
            prop_assert_eq!(acc.check(&updates[0].0), Err(AggregateError::Finished));
            prop_assert_eq!(acc.add(&updates[0].0, 1.0), Err(AggregateError::Finished));
            acc.reset(5);
            prop_assert_eq!((acc.count(), acc.sum()), (0, &[0.0; 5][..]));
            prop_assert_eq!(acc.mean_in_place(), None);
            acc.add(&updates[0].0, 2.0).unwrap();
            let once: Vec<f64> = updates[0].0.iter().map(|v| f64::from(*v)).collect();
            prop_assert_eq!(acc.mean_in_place().unwrap(), &once[..]);
        }
    }

    #[test]
    fn weighted_mean_and_refusals_leave_the_sum_untouched() {
        let mut acc = Accumulator::new(2);
        acc.add(&[1.0, 2.0], 1.0).unwrap();
        assert_eq!(acc.add(&[f32::NAN, 0.0], 1.0), Err(AggregateError::NonFinite { index: 0 }));
        assert_eq!(acc.add(&[1.0], 1.0), Err(AggregateError::Shape { got: 1, want: 2 }));
        assert_eq!(acc.add(&[1.0, 1.0], 0.0), Err(AggregateError::Weight(0.0)));
        acc.add(&[4.0, 5.0], 2.0).unwrap();
        assert_eq!(acc.count(), 2);
        assert_eq!(acc.mean().unwrap(), vec![3.0, 4.0]);
        assert!(Accumulator::new(1).mean().is_none());
    }

    #[test]
    fn sample_weights_are_capped_at_max_samples() {
        assert_eq!(sample_weight(u64::MAX, 10_000), 10_000.0);
        assert_eq!(sample_weight(303, 10_000), 303.0);
        assert_eq!(sample_weight(10_000, 10_000), 10_000.0);
        // One node claiming u64::MAX no longer dominates: with an honest node of max_samples, the
        // mean is halfway between them.
        let mut acc = Accumulator::new(1);
        acc.add(&[1.0], sample_weight(u64::MAX, 10_000)).unwrap();
        acc.add(&[0.0], sample_weight(10_000, 10_000)).unwrap();
        assert_eq!(acc.mean().unwrap(), vec![0.5]);
    }

    #[test]
    fn client_dp_clips_noises_and_adapts() {
        let mut dp = ClientDp::new(1.0, 1.0, None).unwrap();
        let mut a = [3.0f32, 4.0];
        assert_eq!(dp.clip(&mut a), 5.0);
        assert!((a[0] - 0.6).abs() < 1e-6 && (a[1] - 0.8).abs() < 1e-6);
        let mut b = [0.3f32, 0.4];
        dp.clip(&mut b);
        assert_eq!(b, [0.3, 0.4], "an update inside the bound is untouched");
        // Without noise the release is the clipped sum over the participants the round opened with.
        let sum = [0.9, 1.2];
        let mean = dp.release(&sum, 3, &mut |_| 0.0);
        assert!((mean[0] - 0.3).abs() < 1e-12 && (mean[1] - 0.4).abs() < 1e-12);
        // The noise has standard deviation σ·C on every coordinate.
        let mut seen = Vec::new();
        dp.release(&sum, 3, &mut |std| {
            seen.push(std);
            0.0
        });
        assert_eq!(seen, vec![1.0, 1.0]);

        // Adaptive: all updates under the bound with target quantile 0.5 shrinks C.
        let adaptive = AdaptiveClipping { target_quantile: 0.5, learning_rate: 0.2, count_noise_multiplier: 10.0 };
        let mut dp = ClientDp::new(1.0, 1.0, Some(adaptive.clone())).unwrap();
        assert!(dp.update_noise_multiplier() > 1.0, "the count's share of the budget raises the update noise");
        let s2 = 1.0 / (1.0f64.powi(-2) - 20.0f64.powi(-2)).sqrt();
        assert!((dp.update_noise_multiplier() - s2).abs() < 1e-12);
        for _ in 0..4 {
            dp.clip(&mut [0.1f32, 0.1]);
        }
        dp.release(&[0.0, 0.0], 4, &mut |_| 0.0);
        assert!((dp.clip_norm() - (-0.2f64 * 0.5).exp()).abs() < 1e-12, "{}", dp.clip_norm());
        assert_eq!(
            ClientDp::new(1.0, 1.0, Some(AdaptiveClipping { count_noise_multiplier: 0.4, ..adaptive })).err(),
            Some(ClientDpError::CountNoiseTooSmall { count_noise_multiplier: 0.4, sigma: 1.0 })
        );
    }

    /// One round of adaptive DP-FedAvg on updates of the given norms (a one-coordinate model), with
    /// chosen noise draws: `sum_noise` and `count_noise` say how many of their standard deviations
    /// the sum's and the count's draws are. Returns the released mean, the norm the largest update
    /// was clipped to, and the unclipped fraction b̃ the coordinator read, recovered from the
    /// clip-norm step C' = C·exp(−η(b̃ − γ)).
    fn adaptive_round(
        sigma: f64,
        count_sigma: f64,
        norms: &[f32],
        participants: usize,
        sum_noise: f64,
        count_noise: f64,
    ) -> (f64, f64, f64) {
        let a = AdaptiveClipping { target_quantile: 0.5, learning_rate: 0.2, count_noise_multiplier: count_sigma };
        let mut dp = ClientDp::new(sigma, 1.0, Some(a.clone())).unwrap();
        let c = dp.clip_norm();
        let (mut sum, mut largest) = (0.0, 0.0f64);
        for &norm in norms {
            let mut u = [norm];
            dp.clip(&mut u);
            largest = largest.max(f64::from(u[0]).abs());
            sum += f64::from(u[0]);
        }
        let mut draws = 0;
        let mean = dp.release(&[sum], participants, &mut |std| {
            draws += 1;
            std * if draws == 1 { sum_noise } else { count_noise }
        })[0];
        assert_eq!(draws, 2, "one draw for the sum's coordinate, one for the count");
        let b = a.target_quantile - (dp.clip_norm() / c).ln() / a.learning_rate;
        (mean, largest, b)
    }

    /// The round releases M(D) = (S + Z₁, Q + Z₂): S = Σ clip_C(xᵢ) with Z₁ ~ N(0, s²I), s = σ_Δ·C,
    /// and the count statistic Q with Z₂ ~ N(0, q²); the mean, the shift, the clamp and the clip
    /// step are post-processing. Dividing each part by its noise's standard deviation is a
    /// bijection, so M is as private as M' = (S/s, Q/q) + N(0, I). For neighbours D, D ∪ {x} the
    /// mean of M' moves by v = (clip(x)/s, ΔQ/q), with ‖v‖² ≤ (C/s)² + (Δ_Q/q)², where C bounds
    /// ‖clip(x)‖ and Δ_Q bounds |ΔQ|. An isotropic Gaussian whose mean moves by at most Δ is, in
    /// every divergence the accountants use, the scalar Gaussian mechanism with sensitivity Δ
    /// and unit noise (rotate v onto one axis; the other axes are identical under both), i.e.
    /// sensitivity 1 and noise multiplier 1/Δ. So the pair's effective noise multiplier is
    ///   σ_eff = ((C/s)² + (Δ_Q/q)²)^(−1/2) = (σ_Δ⁻² + (q/Δ_Q)⁻²)^(−1/2),
    /// and the plan's accountant (which charged one Gaussian with the plan's σ per round) is right
    /// only if σ_eff ≥ σ. Every quantity is measured from the behaviour, not read from the code:
    /// s and C from the released mean and a clipped update, Δ_Q and q from b̃ (in units of b̃ the
    /// count moves by Δ_Q/n between neighbours and its noise has standard deviation q/n).
    /// The centred count has Δ_Q = ½ and σ_eff = σ; the plain count Σbᵢ (Δ_Q = 1) gives σ_eff < σ.
    #[test]
    fn adaptive_clipping_releases_are_as_noisy_as_the_plans_noise_multiplier() {
        let n = 10;
        for (sigma, count_sigma) in [(1.0, 0.6), (1.0, 5.0), (0.8, 0.5), (3.0, 2.0), (2.0, 50.0)] {
            let base = [0.5f32, 2.0, 0.25, 4.0];
            let (m0, _, b0) = adaptive_round(sigma, count_sigma, &base, n, 0.0, 0.0);
            // Sum: its sensitivity is the norm a large update is clipped to; s from one std of noise.
            let (m1, _, _) = adaptive_round(sigma, count_sigma, &base, n, 1.0, 0.0);
            let s = (m1 - m0) * n as f64;
            let (_, c, _) = adaptive_round(sigma, count_sigma, &[1e6], n, 0.0, 0.0);
            // Count: q/n is how far one std of its noise moves b̃ (measured on a hundredth of one,
            // so b̃ stays inside [0, 1]); Δ_Q/n is the most a neighbour moves it.
            let (_, _, b1) = adaptive_round(sigma, count_sigma, &base, n, 0.0, 0.01);
            let q_over_n = (b1 - b0) / 0.01;
            let neighbour = |extra: f32| {
                let mut d = base.to_vec();
                d.push(extra);
                (adaptive_round(sigma, count_sigma, &d, n, 0.0, 0.0).2 - b0).abs()
            };
            let dq_over_n = neighbour(0.1).max(neighbour(100.0));
            for b in [b0, b1] {
                assert!(b > 0.0 && b < 1.0, "b̃ = {b} would be clamped; pick other updates");
            }
            let sigma_eff = ((c / s).powi(2) + (dq_over_n / q_over_n).powi(2)).powf(-0.5);
            assert!(
                sigma_eff >= sigma * (1.0 - 1e-9),
                "σ = {sigma}, σ_b = {count_sigma}: the sum (σ_Δ = {}) and the count (Δ_Q/q = {}) together are only σ_eff = {sigma_eff}",
                s / c,
                dq_over_n / q_over_n
            );
            assert!(sigma_eff <= sigma * (1.0 + 1e-9), "σ_eff = {sigma_eff} wastes noise against σ = {sigma}");
        }
    }

    #[test]
    fn the_unclipped_fraction_is_read_from_the_centred_count() {
        // Every participant reports: b̃ is the plain fraction U/n.
        for (unclipped, clipped) in [(0usize, 4usize), (1, 3), (3, 1), (4, 0)] {
            let norms: Vec<f32> = (0..unclipped).map(|_| 0.5).chain((0..clipped).map(|_| 5.0)).collect();
            let (_, _, b) = adaptive_round(1.0, 10.0, &norms, 4, 0.0, 0.0);
            assert!((b - unclipped as f64 / 4.0).abs() < 1e-12, "{unclipped} of 4 unclipped: b̃ = {b}");
        }
        // Two of four reported, both unclipped: U/n + (n − r)/(2n) = 0.5 + 0.25.
        let (_, _, b) = adaptive_round(1.0, 10.0, &[0.5, 0.5], 4, 0.0, 0.0);
        assert!((b - 0.75).abs() < 1e-12, "b̃ = {b}");
        // A count noised out of [0, 1] is clamped, as TF Privacy does: C moves by at most exp(±η·γ).
        let a = AdaptiveClipping { target_quantile: 0.5, learning_rate: 0.2, count_noise_multiplier: 10.0 };
        let mut dp = ClientDp::new(1.0, 1.0, Some(a)).unwrap();
        dp.clip(&mut [0.5f32]);
        dp.release(&[0.0], 4, &mut |std| std * 100.0);
        assert!((dp.clip_norm() - (-0.2f64 * 0.5).exp()).abs() < 1e-12, "{}", dp.clip_norm());
    }

    proptest! {
        #[test]
        fn clipped_updates_never_exceed_the_bound(v in prop::collection::vec(-100.0f32..100.0, 1..64), c in 0.01f64..10.0) {
            let mut dp = ClientDp::new(1.0, c, None).unwrap();
            let mut v = v;
            dp.clip(&mut v);
            let norm = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
            prop_assert!(norm <= c * (1.0 + 1e-6));
        }
    }
}
