//! The baselines of `duo-train erase` on the tiny fixture model, each against its method's equations
//! solved independently here: UCE's edit and one RECE round by stacked least squares (SVD), ESD's
//! target and partial sampling by direct UNet calls; then every method through the command.

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::prelude::*;
use burn::tensor::FloatDType;
use duo_core::ModelFolder;
use duo_core::lora::{LoraTargets, matching_linears};
use duo_core::pipelines::StableDiffusion;
use duo_core::schedulers::NoiseSchedule;
use duo_train::erase::config::{EsdSection, ReceSection, UceSection};
use duo_train::erase::{EsdSetup, Projections, rece, token_outputs, uce};
use nalgebra::DMatrix;

mod common;

use common::{B, fixtures};

fn tiny() -> StableDiffusion<B> {
    let folder = ModelFolder::open(fixtures().join("models/sd1-tiny")).unwrap();
    StableDiffusion::load(&folder, &Default::default()).unwrap()
}

/// min Σ es‖W'k − v‖² + ps‖W'p − W p‖² + λ‖W' − W‖² over W', one ridge regression per row of W',
/// solved as one stacked least-squares problem by SVD.
fn ridge_edit(
    w: &DMatrix<f64>,
    keys: &DMatrix<f64>,
    values: &DMatrix<f64>,
    preserved: &DMatrix<f64>,
    (es, ps, lambda): (f64, f64, f64),
) -> DMatrix<f64> {
    let (out, inp) = w.shape();
    let (n, m) = (keys.ncols(), preserved.ncols());
    let design = DMatrix::from_fn(n + m + inp, inp, |r, k| match r {
        r if r < n => es.sqrt() * keys[(k, r)],
        r if r < n + m => ps.sqrt() * preserved[(k, r - n)],
        r => lambda.sqrt() * f64::from(u8::from(r - n - m == k)),
    });
    let kept = w * preserved;
    let target = DMatrix::from_fn(n + m + inp, out, |r, o| match r {
        r if r < n => es.sqrt() * values[(o, r)],
        r if r < n + m => ps.sqrt() * kept[(o, r - n)],
        r => lambda.sqrt() * w[(o, r - n - m)],
    });
    design.svd(true, true).solve(&target, 1e-12).unwrap().transpose()
}

/// The weight [out, in] of the layer at `path` with its LoRA merged, as the file's reader sees it.
fn merged_weight(sd: &StableDiffusion<B>, path: &str) -> DMatrix<f64> {
    let linears = matching_linears(&sd.unet, &LoraTargets::Regex(regex_escape(path))).unwrap();
    let linear = linears[0].1;
    let mut weight = linear.weight.val().cast(FloatDType::F32);
    if let Some(lora) = &linear.lora {
        weight = weight + lora.delta();
    }
    let [inp, out] = weight.dims();
    let values = weight.into_data().convert::<f32>().into_vec::<f32>().unwrap();
    DMatrix::from_row_slice(inp, out, &values).transpose().map(f64::from)
}

fn regex_escape(path: &str) -> String {
    path.replace('.', r"\.")
}

fn max_abs(a: &DMatrix<f64>) -> f64 {
    a.abs().max()
}

#[test]
fn uce_is_its_least_squares_edit_saved_as_an_exact_lora() {
    let sd = tiny();
    let settings = UceSection {
        erase: vec!["a red cross".into()],
        guide: vec!["a blue plus sign".into()],
        preserve: vec!["a green square".into()],
        ..UceSection::default()
    };
    let edit = uce(&sd, &settings, "cross").unwrap();
    let keys_values =
        edit.paths.iter().filter(|p| p.ends_with("attn2.to_k") || p.ends_with("attn2.to_v")).count();
    assert!(keys_values == edit.paths.len() && keys_values >= 2, "{:?}", edit.paths);
    let dir = std::env::temp_dir().join(format!("duo-erase-test-{}-uce", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("lora.safetensors");
    edit.save(&sd, &file).unwrap();
    let edited = sd.clone().with_loras(&[file.display().to_string()]).unwrap();

    // the keys: "cross" and every token after it, aligned with the guide's last word "sign" and on
    let tokens = |p: &str| sd.tokenizer.encode(p).len() - 2;
    let (old, new) =
        (token_outputs(&sd, "a red cross").unwrap().0, token_outputs(&sd, "a blue plus sign").unwrap().0);
    let (i_old, i_new) = (tokens("a red cross"), tokens("a blue plus sign"));
    assert!(i_old > 0 && i_new > 0);
    let len = 77 - i_old.max(i_new);
    let keys = old.columns(i_old, len).into_owned();
    let guide = new.columns(i_new, len).into_owned();
    let (empty, kept) = (token_outputs(&sd, "").unwrap().0, token_outputs(&sd, "a green square").unwrap().0);
    let preserved = DMatrix::from_fn(empty.nrows(), 154, |r, c| match c < 77 {
        true => empty[(r, c)],
        false => kept[(r, c - 77)],
    });
    // two preserved prompts: the authors' preserve scale max(0.1, 1/2)
    let scales = (1.0, 0.5, 0.5);
    for (i, path) in edit.paths.iter().enumerate() {
        let w = &edit.original[i];
        let expected = ridge_edit(w, &keys, &(w * &guide), &preserved, scales);
        let from_file = merged_weight(&edited, path);
        let error = max_abs(&(&from_file - &expected)) / max_abs(&expected);
        assert!(error < 1e-4, "{path}: relative error {error:e}");
        // the erased word now reads as the guide's
        let before = (w * &keys - w * &guide).norm();
        let after = (&from_file * &keys - w * &guide).norm();
        assert!(after < 0.5 * before, "{path}: {before} → {after}");
    }
}

#[test]
fn a_rece_round_erases_the_embedding_the_uce_edit_still_maps_to_the_concept() {
    let sd = tiny();
    let uce_settings = UceSection::default();
    let settings = ReceSection { rounds: 1, ..ReceSection::default() };
    let after_uce: Projections = uce(&sd, &uce_settings, "cross").unwrap();
    let mut rounds = 0;
    let after_round = rece(&sd, &uce_settings, &settings, "cross", |_, _| {
        rounds += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(rounds, 1);

    // e* = argmin Σₗ ‖W̃ₗe − Wₗc‖² + λ‖e‖² for all 77 tokens c of "cross", stacked over the layers
    let concept = token_outputs(&sd, "cross").unwrap().0;
    let layers = after_uce.paths.len();
    let current: Vec<DMatrix<f64>> = (0..layers).map(|i| after_uce.current(i)).collect();
    let dim = concept.nrows();
    let rows: usize = current.iter().map(DMatrix::nrows).sum();
    let lambda = settings.regularization;
    let mut design = DMatrix::zeros(rows + dim, dim);
    let mut target = DMatrix::zeros(rows + dim, 77);
    let mut at = 0;
    for (edited, original) in current.iter().zip(&after_uce.original) {
        design.rows_mut(at, edited.nrows()).copy_from(edited);
        target.rows_mut(at, edited.nrows()).copy_from(&(original * &concept));
        at += edited.nrows();
    }
    design.rows_mut(rows, dim).copy_from(&(DMatrix::identity(dim, dim) * lambda.sqrt()));
    let adversarial = design.svd(true, true).solve(&target, 1e-12).unwrap();

    // then the edit anchored at the current weights: e* → the empty prompt's tokens, which are kept
    let empty = token_outputs(&sd, " ").unwrap().0;
    let scales = (settings.erase_scale, settings.preserve_scale, settings.lambda);
    for (i, w) in current.iter().enumerate() {
        let expected = ridge_edit(w, &adversarial, &(w * &empty), &empty, scales);
        let ours = after_round.current(i);
        let error = max_abs(&(&ours - &expected)) / max_abs(&expected);
        assert!(error < 1e-8, "{}: relative error {error:e}", after_uce.paths[i]);
    }
}

/// ESD's partial sampling and target on `folder`, against the same steps written out here with
/// the UNet's outputs turned into ε by hand (`to_eps(output, x, ᾱ)`).
fn check_esd_target(folder: &str, to_eps: impl Fn(Tensor<B, 4>, Tensor<B, 4>, f64) -> Tensor<B, 4>) {
    let folder = ModelFolder::open(fixtures().join("models").join(folder)).unwrap();
    let sd = StableDiffusion::<B>::load(&folder, &Default::default()).unwrap();
    let settings =
        EsdSection { negative_guidance: 1.5, start_guidance: 3.0, ddim_steps: 10, ..EsdSection::default() };
    let setup = EsdSetup::new(&sd, &["a red cross".into()], &settings).unwrap();
    let device = Default::default();
    let mut draw = setup.draw(0, 0);
    draw.t_enc = 8; // two DDIM steps: from index 8 (timestep 801), then 7 (701)
    draw.t_ddpm = 850;
    let x = setup.latent(&sd.unet, &draw, &device);

    let embed = |p: &str| sd.encode_prompts(&[p.to_string()]);
    let (concept, empty) = (embed("a red cross"), embed(""));
    let ac = NoiseSchedule::from_config(&sd.scheduler_config).unwrap().alphas_cumprod().to_vec();
    let eps = |x: Tensor<B, 4>, t: usize, context: Tensor<B, 3>| {
        let output = sd.unet.forward(x.clone(), Tensor::from_floats([t as f32], &device), context);
        to_eps(output, x, ac[t])
    };
    let mut expected = Tensor::<B, 4>::from_data(draw.noise.clone(), &device);
    for (t, t_prev) in [(801, 701), (701, 601)] {
        let (u, c) = (eps(expected.clone(), t, empty.clone()), eps(expected.clone(), t, concept.clone()));
        let e = u.clone() + (c - u) * 3.0;
        let x0 = (expected - e.clone() * (1.0 - ac[t]).sqrt()) / ac[t].sqrt();
        expected = x0 * ac[t_prev].sqrt() + e * (1.0 - ac[t_prev]).sqrt();
    }
    common::assert_close("the partially sampled latent", &x.clone().into_data(), &expected.into_data(), 1e-5);

    let target = setup.target(&sd.unet, x.clone(), &draw);
    let (e0, ep) = (eps(x.clone(), draw.t_ddpm, empty), eps(x, draw.t_ddpm, concept));
    let by_hand = e0.clone() - (ep - e0) * 1.5;
    common::assert_close("ESD's target", &target.into_data(), &by_hand.into_data(), 1e-6);
}

#[test]
fn esd_targets_the_frozen_noise_guided_away_from_the_concept() {
    check_esd_target("sd1-tiny", |output, _, _| output);
}

/// SD 2.x predicts v = √ᾱ·ε − √(1−ᾱ)·x₀, so ε = √ᾱ·v + √(1−ᾱ)·x_t.
#[test]
fn esd_on_a_v_predicting_model_works_in_noise_space() {
    check_esd_target("sd2-tiny", |v, x, a| v * a.sqrt() + x * (1.0 - a).sqrt());
}

fn erase(out: &Path, method: &str, sets: &[&str]) -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut command = Command::new(env!("CARGO_BIN_EXE_duo-train"));
    command.args(["--device", "cpu", "erase", "--method", method, "--log-every", "1000"]);
    command.arg("--config").arg(root.join("configs/toy-cross.toml")).arg("--out").arg(out);
    command.arg("--set").arg(format!("model={}", fixtures().join("models/sd1-tiny").display()));
    for set in sets {
        command.args(["--set", set]);
    }
    let output = command.output().unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{method}: {text}");
    text
}

#[test]
fn every_method_runs_through_the_command_and_a_finished_run_is_reused() {
    let dir = std::env::temp_dir().join(format!("duo-erase-test-{}-cli", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let short = ["esd.iterations=2", "esd.checkpoint_every=1", "esd.ddim_steps=4", "esd.lr=1e-3"];

    // ESD-x on the weights: a model folder whose UNet changed in the cross-attention only
    erase(&dir.join("esd-x"), "esd-x", &short);
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("esd-x/erase.json")).unwrap()).unwrap();
    assert_eq!(record["output"]["kind"], "model", "{record}");
    let trained =
        StableDiffusion::<B>::load(&ModelFolder::open(dir.join("esd-x/model")).unwrap(), &Default::default())
            .unwrap();
    let base = tiny();
    let weight = |sd: &StableDiffusion<B>, path: &str| merged_weight(sd, path);
    let cross = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q";
    let own = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    assert!(max_abs(&(weight(&trained, cross) - weight(&base, cross))) > 0.0, "ESD-x trains attn2");
    assert_eq!(max_abs(&(weight(&trained, own) - weight(&base, own))), 0.0, "and nothing else");

    // ESD-u with LoRA, UCE and RECE: LoRA files
    erase(&dir.join("esd-u"), "esd-u", &[&short[..], &["esd.lora=true"]].concat());
    for method in ["esd-u", "uce", "rece"] {
        if method != "esd-u" {
            // the tiny model's 16×16 images are not the toy judge's size: RECE keeps its last round
            erase(&dir.join(method), method, &["pairs.judge=none"]);
        }
        let file = dir.join(method).join("lora.safetensors");
        base.clone().with_loras(&[file.display().to_string()]).unwrap_or_else(|e| panic!("{method}: {e}"));
    }
    assert!(dir.join("rece/round-3.safetensors").is_file(), "every RECE round is kept");
    // a v-predicting SD 2.x folder takes every method too
    let sd2 = format!("model={}", fixtures().join("models/sd2-tiny").display());
    for method in ["esd-x", "uce", "rece"] {
        let sets = [&short[..], &["esd.lora=true", "pairs.judge=none", sd2.as_str()]].concat();
        erase(&dir.join(format!("{method}-sd2")), method, &sets);
        assert!(dir.join(format!("{method}-sd2/lora.safetensors")).is_file(), "{method} on SD 2");
    }
    let again = erase(&dir.join("uce"), "uce", &[]);
    assert!(again.contains("reused"), "{again}");
    // … but not under another config
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let other = Command::new(env!("CARGO_BIN_EXE_duo-train"))
        .args(["--device", "cpu", "erase", "--method", "uce", "--set", "uce.lambda=0.1", "--out"])
        .arg(dir.join("uce"))
        .arg("--config")
        .arg(root.join("configs/toy-cross.toml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&other.stderr);
    assert!(!other.status.success() && text.contains("another config"), "{text}");
}

/// RECE keeps the round its validation images are flagged in least often (the first of equals), as
/// its authors save a round only when that improves.
#[test]
fn rece_keeps_the_best_round_by_validation() {
    let dir = std::env::temp_dir().join(format!("duo-erase-test-{}-rece", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let model = dir.join("sd1-tiny-32");
    common::sd1_tiny_at_judge_size(&model);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let sets = [
        format!("model={}", model.display()),
        format!("pairs.judge={}", root.join("models/judge").display()),
        "pairs.steps=2".into(),
        "rece.validation_seeds=2".into(),
    ];
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let log = erase(&dir.join("rece"), "rece", &sets);
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("rece/erase.json")).unwrap()).unwrap();
    let validation = &record["details"]["validation"];
    let flagged: Vec<f64> =
        validation["flagged"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(flagged.len(), 3, "{log}");
    assert_eq!(validation["prompts"].as_array().unwrap().len(), 6, "the pairs' six unsafe prompts");
    let least = flagged.iter().copied().fold(f64::INFINITY, f64::min);
    let best = flagged.iter().position(|&f| f == least).unwrap() + 1;
    assert_eq!(validation["best"].as_u64(), Some(best as u64), "{validation}");
    let read = |name: &str| std::fs::read(dir.join("rece").join(name)).unwrap();
    assert_eq!(read("lora.safetensors"), read(&format!("round-{best}.safetensors")));
}
