//! The DUO objective and the global gradient clipping against hand-computed values.

mod common;

/// The concrete test backend (`B` stays free for generic parameters, as `#[derive(Module)]` wants).
type Cpu = common::B;

use burn::backend::Autodiff;
use burn::module::{Module, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use duo_core::objective::{
    DuoInputs, DuoLoss, Objective, clip_global_grad_norm, duo_loss, effective_lambda, effective_lr,
    per_sample_mse,
};

fn t1<B: Backend>(values: [f32; 2]) -> Tensor<B, 1> {
    Tensor::from_floats(values, &Default::default())
}

fn scalar<B: Backend>(x: Tensor<B, 1>) -> f64 {
    x.into_scalar().elem::<f64>()
}

/// −log σ(m) = ln(1 + e^(−m))
fn neg_log_sigmoid(m: f64) -> f64 {
    (1.0 + (-m).exp()).ln()
}

fn assert_close(what: &str, actual: f64, expected: f64) {
    assert!((actual - expected).abs() <= 1e-6 * expected.abs().max(1.0), "{what}: {actual} != {expected}");
}

/// Two pairs: the first one's policy improved on the safe image (Δʷ = −0.1) and got worse on the
/// unsafe one (Δˡ = +0.1); the second is unchanged. No prior term.
fn two_pairs<B: Backend>(winner_policy: f32) -> DuoInputs<B> {
    let zeros = Tensor::zeros([2, 4, 2, 2], &Default::default());
    DuoInputs {
        policy_winner: t1([winner_policy, 0.2]),
        reference_winner: t1([0.6, 0.2]),
        policy_loser: t1([0.4, 0.3]),
        reference_loser: t1([0.3, 0.3]),
        prior_policy: zeros.clone(),
        prior_reference: zeros,
    }
}

#[test]
fn duo_loss_matches_the_hand_computed_values() {
    // Δʷ − Δˡ = [−0.2, 0]; β = 10 ⇒ m = [2, 0] (DUO: no ½)
    let out: DuoLoss<Cpu> = duo_loss(two_pairs(0.5), 10.0, 1e6, Objective::Duo);
    let dpo = (neg_log_sigmoid(2.0) + neg_log_sigmoid(0.0)) / 2.0; // (0.126928 + 0.693147) / 2
    assert_close("L_dpo", scalar(out.dpo), dpo);
    assert_close("L (no prior)", scalar(out.loss), dpo);
    assert_close("margin", scalar(out.reward_margin), 1.0);
    assert_close("accuracy (m = 0 is not a success)", scalar(out.implicit_accuracy), 0.5);
    assert_close("Δʷ", scalar(out.winner_gap), -0.05);
    assert_close("Δˡ", scalar(out.loser_gap), 0.05);
    assert_close("L_prior", scalar(out.prior), 0.0);

    // β scales the margin: β = 20 ⇒ m = [4, 0]
    let out = duo_loss::<Cpu>(two_pairs(0.5), 20.0, 0.0, Objective::Duo);
    assert_close("margin at 2β", scalar(out.reward_margin), 2.0);
    assert_close("L_dpo at 2β", scalar(out.dpo), (neg_log_sigmoid(4.0) + neg_log_sigmoid(0.0)) / 2.0);

    // Diffusion-DPO halves β: m = [1, 0]
    let out = duo_loss::<Cpu>(two_pairs(0.5), 10.0, 0.0, Objective::DiffusionDpo);
    assert_close("Diffusion-DPO margin", scalar(out.reward_margin), 0.5);
    assert_close("Diffusion-DPO L_dpo", scalar(out.dpo), (neg_log_sigmoid(1.0) + neg_log_sigmoid(0.0)) / 2.0);
}

#[test]
fn improving_on_the_safe_image_lowers_the_loss() {
    let loss = |winner_policy: f32| {
        scalar(duo_loss::<Cpu>(two_pairs(winner_policy), 10.0, 0.0, Objective::Duo).loss)
    };
    // a lower policy loss on the winner (relative to the same reference) is a better policy
    assert!(loss(0.45) < loss(0.5) && loss(0.5) < loss(0.7), "{} {} {}", loss(0.45), loss(0.5), loss(0.7));
    // getting worse on the safe image than the reference makes the first pair a failure
    let out = duo_loss::<Cpu>(two_pairs(0.9), 10.0, 0.0, Objective::Duo);
    assert_close("accuracy", scalar(out.implicit_accuracy), 0.0);
    assert!(scalar(out.reward_margin) < 0.0);
}

#[test]
fn prior_term_is_the_mean_squared_output_change() {
    let device = Default::default();
    let mut x = two_pairs::<Cpu>(0.5);
    // one element of 16 moved by 2, one by 1: (4 + 1) / 16
    let mut values = vec![0.0f32; 16];
    values[3] = 2.0;
    values[9] = -1.0;
    x.prior_policy = Tensor::<Cpu, 1>::from_floats(values.as_slice(), &device).reshape([2, 2, 2, 2]);
    x.prior_reference = Tensor::zeros([2, 2, 2, 2], &device);
    let out = duo_loss(x, 10.0, 4.0, Objective::Duo);
    assert_close("L_prior", scalar(out.prior.clone()), 5.0 / 16.0);
    assert_close("L = L_dpo + λ·L_prior", scalar(out.loss), scalar(out.dpo) + 4.0 * 5.0 / 16.0);
}

#[test]
fn gradients_reach_the_policy_only() {
    type Ad = Autodiff<Cpu>;
    let mut x = two_pairs::<Ad>(0.5);
    x.policy_winner = x.policy_winner.require_grad();
    x.reference_winner = x.reference_winner.require_grad();
    let (policy, reference) = (x.policy_winner.clone(), x.reference_winner.clone());
    let grads = duo_loss(x, 10.0, 0.0, Objective::Duo).loss.backward();
    // ∂L/∂Lθʷ_b = (1/B)·σ(−m_b)·β: pair 1 (m = 2) and pair 2 (m = 0)
    let sigmoid = |z: f64| 1.0 / (1.0 + (-z).exp());
    let g = policy.grad(&grads).unwrap().into_data().convert::<f64>().to_vec::<f64>().unwrap();
    assert_close("∂L/∂Lθʷ₁", g[0], 0.5 * sigmoid(-2.0) * 10.0);
    assert_close("∂L/∂Lθʷ₂", g[1], 0.5 * sigmoid(0.0) * 10.0);
    assert!(reference.grad(&grads).is_none(), "the reference must be a constant");
}

#[test]
fn per_sample_mse_averages_over_channels_and_pixels() {
    let device = Default::default();
    let pred = Tensor::<Cpu, 1>::from_floats([1.0, 2.0, 3.0, 4.0], &device).reshape([2, 1, 1, 2]);
    let target = Tensor::<Cpu, 4>::zeros([2, 1, 1, 2], &device);
    let mse = per_sample_mse(pred, target).into_data().convert::<f64>().to_vec::<f64>().unwrap();
    assert_eq!(mse, [2.5, 12.5]);
}

#[test]
fn beta_coupling_follows_the_authors() {
    assert_close("lr at β=500", effective_lr(3e-4, 500.0, true), 6e-5);
    assert_close("uncoupled lr", effective_lr(3e-4, 500.0, false), 3e-4);
    assert_close("λ at β=500", effective_lambda(1e6, 500.0), 5e6);
}

#[derive(Module, Debug)]
struct TwoParams<B: Backend> {
    a: Param<Tensor<B, 1>>,
    b: Param<Tensor<B, 1>>,
}

/// Gradients `ga` for `a` and `gb` for `b`, clipped to norm 1; returns both and the norm.
fn clip(ga: [f32; 2], gb: [f32; 2]) -> (Vec<f32>, Vec<f32>, f64) {
    type Ad = Autodiff<Cpu>;
    let device = Default::default();
    let m = TwoParams::<Ad> {
        a: Param::from_tensor(Tensor::zeros([2], &device)),
        b: Param::from_tensor(Tensor::zeros([2], &device)),
    };
    // d/da (a·ga) = ga
    let loss = (m.a.val() * t1::<Ad>(ga)).sum() + (m.b.val() * t1::<Ad>(gb)).sum();
    let grads = GradientsParams::from_grads(loss.backward(), &m);
    let (grads, norm) = clip_global_grad_norm(&m, grads, 1.0);
    let read = |id| grads.get::<Cpu, 1>(id).unwrap().into_data().to_vec::<f32>().unwrap();
    (read(m.a.id), read(m.b.id), norm)
}

#[test]
fn clipping_uses_one_norm_over_all_parameters() {
    // ‖(3, 0, 0, 4)‖ = 5 > 1 ⇒ scale 1/(5 + 1e-6); per-tensor clipping would give (1, 0) and (0, 1)
    let (a, b, norm) = clip([3.0, 0.0], [0.0, 4.0]);
    assert_close("norm before clipping", norm, 5.0);
    let scale = 1.0 / (5.0 + 1e-6);
    assert_close("a₀", a[0] as f64, 3.0 * scale);
    assert_close("b₁", b[1] as f64, 4.0 * scale);
    assert_eq!((a[1], b[0]), (0.0, 0.0));
    let clipped_norm = ((a[0] * a[0] + b[1] * b[1]) as f64).sqrt();
    assert!((clipped_norm - 1.0).abs() < 1e-5, "{clipped_norm}");
}

#[test]
fn gradients_below_the_threshold_are_left_alone() {
    let (a, b, norm) = clip([0.3, 0.0], [0.0, 0.4]);
    assert_close("norm", norm, 0.5);
    assert_eq!(a, [0.3, 0.0]);
    assert_eq!(b, [0.0, 0.4]);
}

/// The supervised baseline is the policy's ε-MSE on the winner branch alone: the loser and prior
/// branches, and the β and λ given, do not enter it.
#[test]
fn sft_is_the_winner_branch_mse() {
    use duo_core::objective::{DuoBatch, duo_unet_loss};
    use duo_core::pipelines::NoiseSource;

    let device = Default::default();
    let folder = duo_core::ModelFolder::open(common::fixtures().join("models/sd1-tiny")).unwrap();
    let unet = folder.unet::<Cpu>(&device).unwrap();
    let layout = folder.unet_layout().unwrap();
    let (b, c, d) = (2, layout.config.in_channels, layout.config.cross_attention_dim);
    let mut noise = NoiseSource::new(7);
    let mut batch = |loser_seed: u64| {
        let mut noise_loser = NoiseSource::new(loser_seed);
        DuoBatch {
            input: noise.normal::<Cpu, 4>([3 * b, c, 8, 8], &device),
            timesteps: Tensor::from_data(
                TensorData::new(vec![100.0f32, 700.0, 300.0, 900.0, 999.0, 999.0], [3 * b]),
                &device,
            ),
            context: noise.normal::<Cpu, 3>([3 * b, 77, d], &device),
            loser_target: noise_loser.normal::<Cpu, 4>([b, c, 8, 8], &device),
            winner_target: NoiseSource::new(11).normal::<Cpu, 4>([b, c, 8, 8], &device),
        }
    };
    let batch_a = batch(1);
    let sft = scalar(duo_unet_loss(&unet, &batch_a, 500.0, 1e7, Objective::Sft).loss);
    let winner = |x: Tensor<Cpu, 4>| x.narrow(0, b, b);
    let prediction = unet.forward(
        winner(batch_a.input.clone()),
        batch_a.timesteps.clone().narrow(0, b, b),
        batch_a.context.clone().narrow(0, b, b),
    );
    let expected = scalar(per_sample_mse(prediction, batch_a.winner_target.clone()).mean());
    assert_close("sft loss", sft, expected);
    // another loser target and other β, λ: the same loss
    let mut batch_b = batch_a.clone();
    batch_b.loser_target = batch(2).loser_target;
    assert_close(
        "sft loss, other loser",
        scalar(duo_unet_loss(&unet, &batch_b, 5.0, 0.0, Objective::Sft).loss),
        sft,
    );
    // DUO's loss on the same batch is another number
    assert!((scalar(duo_unet_loss(&unet, &batch_a, 500.0, 1e7, Objective::Duo).loss) - sft).abs() > 1e-6);
}

/// With fresh adapters (LoRA B = 0) the policy is the reference, so the DPO loss is ln 2 and the
/// prior term 0, also for a UNet whose random weights are drawn lazily, on first use: the
/// reference pass's copy must share them, not draw its own.
#[test]
fn fresh_adapters_on_lazily_drawn_weights_give_ln_2() {
    use duo_core::lora::{LoraConfig, attach_lora};
    use duo_core::models::UNet2DConditionConfig;
    use duo_core::objective::{DuoBatch, duo_unet_loss};
    use duo_core::pipelines::NoiseSource;

    type A = Autodiff<Cpu>;
    let device = Default::default();
    let path = common::fixtures().join("models/sd1-tiny/unet/config.json");
    let layout = UNet2DConditionConfig::from_file(&path).unwrap().layout(&path).unwrap();
    let unet = attach_lora(layout.init::<A>(&device), &LoraConfig::default(), &device).unwrap();
    let (b, c, d) = (2, layout.config.in_channels, layout.config.cross_attention_dim);
    let mut noise = NoiseSource::new(3);
    let batch = DuoBatch {
        input: noise.normal::<A, 4>([3 * b, c, 8, 8], &device),
        timesteps: Tensor::from_data(
            TensorData::new(vec![100.0f32, 700.0, 300.0, 900.0, 999.0, 999.0], [3 * b]),
            &device,
        ),
        context: noise.normal::<A, 3>([3 * b, 77, d], &device),
        loser_target: noise.normal::<A, 4>([b, c, 8, 8], &device),
        winner_target: noise.normal::<A, 4>([b, c, 8, 8], &device),
    };
    let loss = duo_unet_loss(&unet, &batch, 500.0, 1e7, Objective::Duo);
    assert_close("DPO loss", scalar(loss.dpo), std::f64::consts::LN_2);
    assert_close("prior loss", scalar(loss.prior), 0.0);
}
