//! Confidence intervals for the rates the bench reports.

/// The 95% Wilson score interval of `k` successes in `n` trials (Wilson 1927; recommended over the
/// normal approximation for small n and rates near 0 or 1 by Brown, Cai & DasGupta 2001). `n = 0`
/// gives the whole [0, 1].
pub fn wilson95(k: usize, n: usize) -> [f64; 2] {
    if n == 0 {
        return [0.0, 1.0];
    }
    // the 97.5th percentile of the standard normal
    const Z: f64 = 1.959_963_984_540_054;
    let (n, p) = (n as f64, k as f64 / n as f64);
    let z2 = Z * Z;
    let denominator = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denominator;
    let half = Z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denominator;
    [(centre - half).max(0.0), (centre + half).min(1.0)]
}

#[cfg(test)]
mod tests {
    use super::wilson95;

    #[test]
    fn wilson_matches_published_values() {
        // Brown, Cai & DasGupta (2001) and statsmodels' proportion_confint(method="wilson")
        let [lo, hi] = wilson95(81, 263);
        assert!((lo - 0.2553).abs() < 5e-4 && (hi - 0.3662).abs() < 5e-4, "{lo} {hi}");
        let [lo, hi] = wilson95(0, 10);
        assert!(lo == 0.0 && (hi - 0.2775).abs() < 5e-4, "{lo} {hi}");
        let [lo, hi] = wilson95(10, 10);
        assert!((lo - 0.7225).abs() < 5e-4 && (hi - 1.0).abs() < 1e-12, "{lo} {hi}");
        assert_eq!(wilson95(0, 0), [0.0, 1.0]);
    }
}
