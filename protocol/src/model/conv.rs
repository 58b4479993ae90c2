//! One convolution of a [`super::ModelSpec::Convnet`]: its geometry, checked so a plan cannot
//! ask a node for a layer that does not fit or for gigabytes of unfolded patches.

use serde::{Deserialize, Serialize};

fn is_zero(v: &usize) -> bool {
    *v == 0
}

/// One convolution of a [`ModelSpec::Convnet`], with its optional max-pooling.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConvLayer {
    /// Output channels.
    pub filters: usize,
    /// The square kernel's side.
    pub kernel: usize,
    #[serde(default = "super::one", skip_serializing_if = "super::is_one")]
    pub stride: usize,
    /// Zero padding on each side, at most `kernel / 2` (PyTorch's own limit).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub padding: usize,
    /// The max-pool window's side after the ReLU; 0 for no pooling.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pool: usize,
    #[serde(default = "super::one", skip_serializing_if = "super::is_one")]
    pub pool_stride: usize,
}

impl ConvLayer {
    /// The side of this layer's output (after pooling) for an input side `n`: `None` when the
    /// kernel, stride or pool window is 0 or larger than the side it reads (which also keeps every
    /// figure a node hands libtorch within `i64`, since sides are bounded by the checked input
    /// size), or the padding exceeds kernel/2.
    pub(super) fn out_side(&self, n: usize) -> Option<usize> {
        let fits = |v: usize, side: usize| v >= 1 && v <= side;
        if !fits(self.kernel, n) || !fits(self.stride, n) || self.padding > self.kernel / 2 {
            return None;
        }
        let conv = (n + 2 * self.padding - self.kernel) / self.stride + 1;
        if self.pool == 0 {
            return Some(conv);
        }
        if !fits(self.pool, conv) || !fits(self.pool_stride, conv) {
            return None;
        }
        Some((conv - self.pool) / self.pool_stride + 1)
    }

    /// The unfolded input (`im2col`) ghost clipping forms for one example: `in_channels`·k²
    /// values per output position of the convolution (before pooling), in checked arithmetic.
    pub(super) fn unfolded(&self, in_channels: usize, h: usize, w: usize) -> Option<usize> {
        let side = |n: usize| (n + 2 * self.padding - self.kernel) / self.stride + 1;
        in_channels.checked_mul(self.kernel)?.checked_mul(self.kernel)?.checked_mul(side(h))?.checked_mul(side(w))
    }
}

/// Most values one convolution of a [`super::ModelSpec::Convnet`] may unfold per example
/// (in_channels·k²·output positions: 16 MiB of `f32`); Opacus's MNIST network unfolds 6,400.
pub const MAX_UNFOLDED_PER_EXAMPLE: usize = 1 << 22;

/// How a node runs one convolution: the geometry the weight's shape does not say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    pub stride: usize,
    pub padding: usize,
    /// `(window, stride)` of the max-pool after the ReLU.
    pub pool: Option<(usize, usize)>,
}
