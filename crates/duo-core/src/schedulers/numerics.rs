//! Bit-level mirrors of the few numpy and torch (CPU) routines diffusers uses to build its schedules.
//!
//! Parity with diffusers means matching its rounding, not just its formulas: timesteps are compared
//! exactly, and `alphas_cumprod` is a float32 product of float32 betas. Each function names the
//! routine it mirrors and the detail that matters.

/// `np.linspace(start, stop, num)` (endpoint included), in f64.
///
/// numpy computes `arange(num) * step + start` and then overwrites the last element with `stop`.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    match num {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let div = (num - 1) as f64;
            let step = (stop - start) / div;
            let mut y: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
            y[num - 1] = stop;
            y
        }
    }
}

/// `np.arange(start, stop, step)` for float arguments.
///
/// numpy takes the length as `ceil((stop - start) / step)`, stores `start` and `start + step`, and fills
/// the rest as `start + i * delta` with `delta = (start + step) - start`.
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if !len.is_finite() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let second = start + step;
    let delta = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.round` / `ndarray.round()`: round half to even.
pub(crate) fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.interp(x, np.arange(len(fp)), fp)` for one `x`.
pub(crate) fn np_interp_unit_grid(x: f64, fp: &[f64]) -> f64 {
    let n = fp.len();
    if x.is_nan() || n == 0 {
        return f64::NAN;
    }
    if x < 0.0 {
        return fp[0];
    }
    let last = (n - 1) as f64;
    if x >= last {
        return fp[n - 1];
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return fp[j];
    }
    let slope = (fp[j + 1] - fp[j]) / 1.0;
    slope * (x - j as f64) + fp[j]
}

/// `torch.linspace(start, end, steps, dtype=torch.float32)` on the CPU.
///
/// The kernel is scalar: the first half is `start + step * i`, the second `end - step * (steps - i - 1)`,
/// both compiled to a fused multiply-add (checked against torch 2.x on x86-64: without the fusion
/// 20-70% of the betas differ in the last bit).
pub(crate) fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let start = start as f32;
    let end = end as f32;
    match steps {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (end - start) / (steps - 1) as f32;
            let halfway = steps / 2;
            (0..steps)
                .map(|i| {
                    if i < halfway {
                        step.mul_add(i as f32, start)
                    } else {
                        (-step).mul_add((steps - i - 1) as f32, end)
                    }
                })
                .collect()
        }
    }
}

/// `torch.cumprod` of a float32 vector on the CPU: the running product is kept in f64 (the CPU
/// accumulation type of float) and each output is rounded to f32.
pub(crate) fn torch_cumprod_f32(values: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    values
        .iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_numpy_endpoints_and_spacing() {
        let y = np_linspace(0.0, 999.0, 10);
        assert_eq!(y.len(), 10);
        assert_eq!(y[0], 0.0);
        assert_eq!(y[9], 999.0);
        assert_eq!(y[1], 111.0);
        assert_eq!(np_linspace(3.0, 7.0, 1), vec![3.0]);
        assert!(np_linspace(3.0, 7.0, 0).is_empty());
    }

    #[test]
    fn arange_length_and_values() {
        // np.arange(1000, 0, -100.0) -> 1000, 900, ..., 100
        let y = np_arange(1000.0, 0.0, -100.0);
        assert_eq!(y.len(), 10);
        assert_eq!(y[0], 1000.0);
        assert_eq!(y[9], 100.0);
        // np.arange(1000, 0, -1000/3) -> 1000, 666.67, 333.33
        let y = np_arange(1000.0, 0.0, -1000.0 / 3.0);
        assert_eq!(y.len(), 3);
        assert!(np_arange(0.0, 10.0, -1.0).is_empty());
    }

    #[test]
    fn round_is_half_to_even() {
        assert_eq!(np_round(0.5), 0.0);
        assert_eq!(np_round(1.5), 2.0);
        assert_eq!(np_round(2.5), 2.0);
        assert_eq!(np_round(-2.5), -2.0);
        assert_eq!(np_round(2.4999), 2.0);
    }

    #[test]
    fn interp_on_unit_grid() {
        let fp = [0.0, 10.0, 30.0];
        assert_eq!(np_interp_unit_grid(0.0, &fp), 0.0);
        assert_eq!(np_interp_unit_grid(1.0, &fp), 10.0);
        assert_eq!(np_interp_unit_grid(1.5, &fp), 20.0);
        assert_eq!(np_interp_unit_grid(2.0, &fp), 30.0);
        assert_eq!(np_interp_unit_grid(5.0, &fp), 30.0);
        assert_eq!(np_interp_unit_grid(-1.0, &fp), 0.0);
    }

    #[test]
    fn torch_linspace_is_exact_at_both_ends() {
        let y = torch_linspace_f32(0.0001, 0.02, 1000);
        assert_eq!(y.len(), 1000);
        assert_eq!(y[0], 0.0001f32);
        assert_eq!(y[999], 0.02f32);
        assert!(y.windows(2).all(|w| w[1] > w[0]));
    }

    #[test]
    fn cumprod_accumulates_in_f64() {
        // 1 - 2^-24 is exact in f32; its f32 running product would stall at 1 - 2^-24 · k only
        // while rounding allows, whereas the f64 product keeps shrinking.
        let v = vec![1.0f32 - 2f32.powi(-24); 4];
        let c = torch_cumprod_f32(&v);
        let expected = ((1.0f64 - 2f64.powi(-24)).powi(4)) as f32;
        assert_eq!(c[3], expected);
    }
}
