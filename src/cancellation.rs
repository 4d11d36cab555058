//! When the penalty's sum cancels: P = Σ Ω·D² is bounded by Σ |Ω|·D², which equals P for
//! Ω ≥ 0 (the default clamp) but can exceed it by orders of magnitude when signs mix. Every
//! path (CPU, CUDA, tch) decides from these when to sum again with float64 maths.

/// P = Σ Ω·D² as summed by the kernel, and Σ |Ω|·D² beside it. Each term carries the rounding
/// of D in the compute precision, so P's error is bounded relative to the magnitude, which is
/// P itself when Ω ≥ 0 (the default clamp) but can exceed it by orders of magnitude when signs
/// mix and the terms cancel: then float32 maths would miss the contract's 1e-5, and the value
/// is summed again with float64 maths.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sums {
    pub p: f64,
    pub magnitude: f64,
}

impl Sums {
    /// Whether the terms cancelled more than float32 maths can afford.
    pub fn cancelled(&self) -> bool {
        self.magnitude > CANCELLATION_LIMIT * self.p.abs()
    }

    pub fn add(&mut self, other: Sums) {
        self.p += other.p;
        self.magnitude += other.magnitude;
    }
}

/// A sum whose magnitude exceeds |P| by this factor is summed again in float64: float32 terms
/// err by a few 1e-7 each, so P's relative error stays near 1e-6, a tenth of the contract's.
const CANCELLATION_LIMIT: f64 = 4.0;

/// Whether `weights` has both signs.
pub fn mixed_signs(weights: &[f64]) -> bool {
    weights.iter().any(|&w| w > 0.0) && weights.iter().any(|&w| w < 0.0)
}
