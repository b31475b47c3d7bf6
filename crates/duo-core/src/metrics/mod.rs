//! Image metrics that compare what two models draw: LPIPS, the perceptual distance the DUO paper
//! reports prior preservation with (1 − LPIPS between the base and the unlearned model's images of
//! the same prompt and seed).

mod lpips;

pub use lpips::{Lpips, LpipsNet, mean_std};
