//! The linear algebra of the closed-form editors, in f64 on the host (UCE, Gandikota et al. 2024;
//! RECE, Gong et al. 2024). Matrices are in PyTorch's layout: a projection `W` is [out, in] and maps
//! a token embedding `c` [in] to `W·c`.
//!
//! One edit solves, for one projection,
//!
//! ```text
//! W' = argmin  es·Σᵢ ‖W'cᵢ − vᵢ‖²  +  ps·Σⱼ ‖W'pⱼ − W pⱼ‖²  +  λ‖W' − W‖²
//!    = (es·Σ vᵢcᵢᵀ + ps·Σ W pⱼpⱼᵀ + λW) · (es·Σ cᵢcᵢᵀ + ps·Σ pⱼpⱼᵀ + λI)⁻¹
//! ```
//!
//! (`cᵢ → vᵢ` the edited keys and their targets, `pⱼ` the preserved keys, `W` the anchor). Its
//! change `W' − W = es·(V − W·C)·Cᵀ·M⁻¹` has rank at most the number of edited keys, so it is kept as
//! two factors and saved as a LoRA of that rank: exact, small, and loaded by every LoRA reader.

use nalgebra::DMatrix;

use duo_core::{DuoError, Result};

/// The weights of one closed-form edit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EditScales {
    /// `es`: the weight of the edited keys.
    pub erase: f64,
    /// `ps`: the weight of the preserved keys.
    pub preserve: f64,
    /// `λ`: the pull towards the anchor weight.
    pub lambda: f64,
}

/// A change `ΔW = up · down` of one projection [out, in], with `up` [out, r] and `down` [r, in].
#[derive(Debug, Clone)]
pub struct LowRank {
    pub up: DMatrix<f64>,
    pub down: DMatrix<f64>,
}

impl LowRank {
    pub fn rank(&self) -> usize {
        self.up.ncols()
    }

    pub fn full(&self) -> DMatrix<f64> {
        &self.up * &self.down
    }

    /// `self` then `other`: the factors side by side, `[U₁ U₂]·[D₁; D₂] = U₁D₁ + U₂D₂`, or the full
    /// matrix when that is smaller.
    pub fn then(self, other: LowRank) -> LowRank {
        let (out, inp) = (self.up.nrows(), self.down.ncols());
        let rank = self.rank() + other.rank();
        if rank >= out.min(inp) {
            return exact(self.full() + other.full());
        }
        let up = DMatrix::from_fn(out, rank, |i, j| match j < self.rank() {
            true => self.up[(i, j)],
            false => other.up[(i, j - self.rank())],
        });
        let down = DMatrix::from_fn(rank, inp, |i, j| match i < self.rank() {
            true => self.down[(i, j)],
            false => other.down[(i - self.rank(), j)],
        });
        LowRank { up, down }
    }
}

/// A full change [out, in] as factors of rank min(out, in) (one of them the identity).
pub fn exact(delta: DMatrix<f64>) -> LowRank {
    let (out, inp) = delta.shape();
    match out <= inp {
        true => LowRank { up: DMatrix::identity(out, out), down: delta },
        false => LowRank { up: delta, down: DMatrix::identity(inp, inp) },
    }
}

/// The edit of `w` [out, in] mapping each column of `keys` [in, n] to the same column of `values`
/// [out, n], preserving the columns of `preserved` [in, m], anchored at `w` (see the module's
/// formula); returns `W' − W`. `what` names the projection in errors.
pub fn edit(
    w: &DMatrix<f64>,
    keys: &DMatrix<f64>,
    values: &DMatrix<f64>,
    preserved: &DMatrix<f64>,
    scales: EditScales,
    what: &str,
) -> Result<LowRank> {
    let (out, inp) = w.shape();
    if keys.nrows() != inp
        || preserved.nrows() != inp
        || values.nrows() != out
        || values.ncols() != keys.ncols()
    {
        return Err(DuoError::Invalid(format!(
            "{what}: a closed-form edit of a [{out}, {inp}] weight got keys {:?}, values {:?} and preserved keys {:?}",
            keys.shape(),
            values.shape(),
            preserved.shape()
        )));
    }
    let mut m = keys * keys.transpose() * scales.erase + preserved * preserved.transpose() * scales.preserve;
    for i in 0..inp {
        m[(i, i)] += scales.lambda;
    }
    // M is symmetric and, with λ > 0, positive definite
    let m_inv = m.cholesky().ok_or_else(|| {
        DuoError::Invalid(format!("{what}: the edit's key matrix is not positive definite (is λ > 0?)"))
    })?;
    let residual = (values - w * keys) * scales.erase; // [out, n]
    let down = m_inv.solve(keys).transpose(); // (M⁻¹C)ᵀ = CᵀM⁻¹: [n, in]
    let delta = LowRank { up: residual, down };
    Ok(match delta.rank() >= out.min(inp) {
        true => exact(delta.full()),
        false => delta,
    })
}

/// RECE's adversarial map: `e* = (λI + Σₗ W̃ₗᵀW̃ₗ)⁻¹ (Σₗ W̃ₗᵀWₗ) · c` for every token `c`, the
/// embedding that the edited projections `W̃ₗ` send closest to where the original ones `Wₗ` sent `c`
/// (a ridge solve over every edited projection at once). Returns the [in, in] matrix.
pub fn adversarial_map(
    pairs: &[(&DMatrix<f64>, &DMatrix<f64>)],
    regularization: f64,
    inp: usize,
) -> Result<DMatrix<f64>> {
    let mut lhs = DMatrix::<f64>::identity(inp, inp) * regularization;
    let mut rhs = DMatrix::<f64>::zeros(inp, inp);
    for (edited, original) in pairs {
        lhs += edited.transpose() * *edited;
        rhs += edited.transpose() * *original;
    }
    let lhs = lhs.cholesky().ok_or_else(|| {
        DuoError::Invalid(format!(
            "RECE: the adversarial embedding's system is not positive definite (regularization {regularization})"
        ))
    })?;
    Ok(lhs.solve(&rhs))
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, Normal};

    use super::*;

    fn random(rows: usize, cols: usize, rng: &mut ChaCha8Rng) -> DMatrix<f64> {
        let normal = Normal::new(0.0, 1.0).unwrap();
        DMatrix::from_fn(rows, cols, |_, _| normal.sample(rng))
    }

    /// The edit minimises its objective: solved here as one stacked least-squares problem over the
    /// rows of W' (each row an independent ridge regression), by SVD, not by the normal equations.
    fn least_squares(
        w: &DMatrix<f64>,
        keys: &DMatrix<f64>,
        values: &DMatrix<f64>,
        preserved: &DMatrix<f64>,
        s: EditScales,
    ) -> DMatrix<f64> {
        let (out, inp) = w.shape();
        let (n, m) = (keys.ncols(), preserved.ncols());
        // rows of the design: √es·cᵢᵀ, √ps·pⱼᵀ, √λ·eₖᵀ; targets: √es·vᵢ, √ps·W pⱼ, √λ·W eₖ
        let design = DMatrix::from_fn(n + m + inp, inp, |r, k| match r {
            r if r < n => s.erase.sqrt() * keys[(k, r)],
            r if r < n + m => s.preserve.sqrt() * preserved[(k, r - n)],
            r => s.lambda.sqrt() * f64::from(u8::from(r - n - m == k)),
        });
        let kept = w * preserved;
        let target = DMatrix::from_fn(n + m + inp, out, |r, o| match r {
            r if r < n => s.erase.sqrt() * values[(o, r)],
            r if r < n + m => s.preserve.sqrt() * kept[(o, r - n)],
            r => s.lambda.sqrt() * w[(o, r - n - m)],
        });
        design.svd(true, true).solve(&target, 1e-12).unwrap().transpose()
    }

    #[test]
    fn the_edit_is_the_least_squares_solution() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let scales = EditScales { erase: 1.0, preserve: 0.7, lambda: 0.5 };
        // fewer edited keys than dimensions (a low-rank change) and more (a full one)
        for (out, inp, n, m) in [(12, 9, 3, 5), (6, 8, 11, 4)] {
            let w = random(out, inp, &mut rng);
            let (keys, values, preserved) =
                (random(inp, n, &mut rng), random(out, n, &mut rng), random(inp, m, &mut rng));
            let delta = edit(&w, &keys, &values, &preserved, scales, "test").unwrap();
            assert!(delta.rank() <= n.min(out).min(inp));
            let ours = &w + delta.full();
            let reference = least_squares(&w, &keys, &values, &preserved, scales);
            let error = (&ours - &reference).abs().max();
            assert!(error < 1e-9, "({out}, {inp}, {n}, {m}): max |Δ| = {error:e}");
            // the edit moved the keys towards their targets
            let before = (&w * &keys - &values).norm();
            assert!((&ours * &keys - &values).norm() < before);
        }
    }

    #[test]
    fn chained_edits_add_up_and_stay_low_rank_while_they_can() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (a, b) = (random(10, 2, &mut rng), random(2, 7, &mut rng));
        let (c, d) = (random(10, 3, &mut rng), random(3, 7, &mut rng));
        let sum = &a * &b + &c * &d;
        let chained = LowRank { up: a.clone(), down: b.clone() }.then(LowRank { up: c, down: d });
        assert_eq!(chained.rank(), 5);
        assert!((chained.full() - &sum).abs().max() < 1e-12);
        let wide = LowRank { up: a, down: b }.then(exact(sum.clone()));
        assert_eq!(wide.rank(), 7, "past min(out, in) the change is kept whole");
    }

    #[test]
    fn the_adversarial_embedding_minimises_its_ridge_objective() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let inp = 6;
        let originals: Vec<DMatrix<f64>> = (0..3).map(|_| random(5, inp, &mut rng)).collect();
        let edited: Vec<DMatrix<f64>> =
            originals.iter().map(|w| w + random(5, inp, &mut rng) * 0.3).collect();
        let pairs: Vec<_> = edited.iter().zip(&originals).collect();
        let map = adversarial_map(&pairs, 0.1, inp).unwrap();
        let c = random(inp, 1, &mut rng);
        let e = &map * &c;
        let objective = |e: &DMatrix<f64>| -> f64 {
            pairs.iter().map(|(we, wo)| (*we * e - *wo * &c).norm_squared()).sum::<f64>()
                + 0.1 * e.norm_squared()
        };
        // the gradient vanishes there: every small step in any direction costs more
        let best = objective(&e);
        for k in 0..inp {
            for sign in [-1.0, 1.0] {
                let mut moved = e.clone();
                moved[(k, 0)] += sign * 1e-4;
                assert!(objective(&moved) > best);
            }
        }
    }
}
