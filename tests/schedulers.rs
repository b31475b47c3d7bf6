//! Scheduler parity with diffusers (fixtures in tests/fixtures/schedulers, spec in
//! tests/fixtures/README.md) and the errors of unsupported configs.

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};
use duo_core::schedulers::{NoiseSchedule, Scheduler, SchedulerConfig, SchedulerKind, parse_python_json};
use duo_core::tensor_file::TensorFile;

type B = Flex;

/// Relative max error of the spec: ‖a−b‖∞ / max(‖b‖∞, 1e-6).
const TOLERANCE: f64 = 1e-5;

/// The committed fixtures, or another folder of the same format named by `DUO_SCHEDULER_FIXTURES`
/// (e.g. fixtures regenerated on another machine or diffusers version).
fn fixtures_dir() -> PathBuf {
    match std::env::var_os("DUO_SCHEDULER_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/schedulers"),
    }
}

fn tensor(file: &TensorFile, name: &str) -> Tensor<B, 4> {
    let data = file.get_f32(name, 4).unwrap_or_else(|e| panic!("{e}"));
    Tensor::from_data(data, &Default::default())
}

fn values(t: Tensor<B, 4>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max);
    let scale = b.iter().map(|y| (*y as f64).abs()).fold(0.0, f64::max).max(1e-6);
    diff / scale
}

fn rel_err_f64(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ: {a:?} vs {b:?}");
    let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0, f64::max).max(1e-6);
    diff / scale
}

/// One fixture case: everything the spec lists, checked; the worst errors are returned for the
/// summary and every failure is collected (not just the first).
struct CaseReport {
    name: String,
    worst_step: f64,
    worst_scale: f64,
    worst_sigma: f64,
    chained: f64,
    add_noise: f64,
    velocity: Option<f64>,
    failures: Vec<String>,
}

fn check_case(json_path: &Path) -> CaseReport {
    let name = json_path.file_stem().unwrap().to_string_lossy().to_string();
    let text = std::fs::read_to_string(json_path).unwrap();
    let case = parse_python_json(&text, json_path).unwrap();
    let class = case["class"].as_str().expect("class");
    let kind =
        SchedulerKind::from_class_name(class).unwrap_or_else(|| panic!("{name}: unknown class {class}"));
    let config = SchedulerConfig::from_value(case["config"].clone(), json_path).unwrap();
    let n = case["num_inference_steps"].as_u64().expect("num_inference_steps") as usize;
    let eta = case.get("eta").and_then(|v| v.as_f64()).unwrap_or(0.0);
    let steps = case["steps"].as_u64().expect("steps") as usize;
    let file = TensorFile::read(&json_path.with_extension("safetensors")).unwrap();
    let names: Vec<String> = file.names().map(str::to_string).collect();
    let has = |n: &str| names.iter().any(|x| x == n);

    let mut failures = Vec::new();
    let scheduler = Scheduler::new(kind, &config, n).and_then(|s| s.with_eta(eta));
    let scheduler = match scheduler {
        Ok(s) => s,
        Err(e) => {
            return CaseReport {
                name,
                worst_step: f64::NAN,
                worst_scale: f64::NAN,
                worst_sigma: f64::NAN,
                chained: f64::NAN,
                add_noise: f64::NAN,
                velocity: None,
                failures: vec![format!("Scheduler::new: {e}")],
            };
        }
    };

    // 1. Timesteps, exactly; also for 50 steps when recorded.
    let expected = file.get_f64_vec("timesteps").unwrap();
    if scheduler.timesteps() != expected.as_slice() {
        failures.push(format!("timesteps {:?} != diffusers {:?}", scheduler.timesteps(), expected));
    }
    let mut worst_sigma = 0.0;
    if has("timesteps_50") {
        let expected = file.get_f64_vec("timesteps_50").unwrap();
        let s50 = Scheduler::new(kind, &config, 50).unwrap();
        if s50.timesteps() != expected.as_slice() {
            failures.push(format!("timesteps_50 {:?} != diffusers {:?}", s50.timesteps(), expected));
        }
        if has("sigmas_50") {
            let expected = file.get_f64_vec("sigmas_50").unwrap();
            let e = rel_err_f64(s50.sigmas().unwrap_or_default(), &expected);
            worst_sigma = e;
            if e > 1e-6 {
                failures.push(format!("sigmas_50 rel err {e:.3e}"));
            }
        }
    }

    // 2. Sigmas and init_noise_sigma. (torch's float32 sqrt on the CPU goes through MKL's vsSqrt,
    //    which is not correctly rounded: σ may differ from ours in the last bit.)
    if has("sigmas") {
        let expected = file.get_f64_vec("sigmas").unwrap();
        match scheduler.sigmas() {
            Some(sigmas) if sigmas.len() == expected.len() => {
                let e = rel_err_f64(sigmas, &expected);
                worst_sigma = f64::max(worst_sigma, e);
                if e > 1e-6 {
                    failures.push(format!("sigmas rel err {e:.3e}: {sigmas:?} vs {expected:?}"));
                }
            }
            other => failures.push(format!("sigmas {other:?} vs diffusers {expected:?}")),
        }
    }
    let init = file.get_f64_vec("init_noise_sigma").unwrap()[0];
    if (scheduler.init_noise_sigma() - init).abs() > 1e-6 * init.abs().max(1.0) {
        failures.push(format!("init_noise_sigma {} != diffusers {init}", scheduler.init_noise_sigma()));
    }

    // 3. The recorded steps, each from diffusers' own input sample, with our history.
    let mut state = scheduler.initial_state::<B>();
    let (mut worst_step, mut worst_scale) = (0.0f64, 0.0f64);
    for k in 0..steps {
        let sample = tensor(&file, &format!("sample_{k}"));
        let scaled = scheduler.scale_model_input(sample.clone(), k);
        let e = rel_err(&values(scaled), &values(tensor(&file, &format!("scaled_sample_{k}"))));
        worst_scale = worst_scale.max(e);
        if e > TOLERANCE {
            failures.push(format!("scale_model_input at step {k}: rel err {e:.3e}"));
        }
        let noise_name = format!("variance_noise_{k}");
        let noise = has(&noise_name).then(|| tensor(&file, &noise_name));
        if noise.is_some() != scheduler.needs_noise_at(k) {
            failures.push(format!(
                "step {k}: diffusers drew noise: {}, needs_noise_at: {}",
                noise.is_some(),
                scheduler.needs_noise_at(k)
            ));
        }
        let model_output = tensor(&file, &format!("model_output_{k}"));
        match scheduler.step(model_output, k, sample, state.clone(), noise) {
            Ok((prev, next)) => {
                state = next;
                let e = rel_err(&values(prev), &values(tensor(&file, &format!("sample_{}", k + 1))));
                worst_step = worst_step.max(e);
                if e > TOLERANCE {
                    failures.push(format!("step {k} (t={}): rel err {e:.3e}", scheduler.timesteps()[k]));
                }
            }
            Err(e) => {
                failures.push(format!("step {k}: {e}"));
                break;
            }
        }
    }

    // 4. The whole trajectory from sample_0 on our own outputs (errors may compound a little).
    let mut chained = 0.0;
    if failures.is_empty() {
        let mut state = scheduler.initial_state::<B>();
        let mut sample = tensor(&file, "sample_0");
        for k in 0..steps {
            let noise_name = format!("variance_noise_{k}");
            let noise = has(&noise_name).then(|| tensor(&file, &noise_name));
            let model_output = tensor(&file, &format!("model_output_{k}"));
            let (prev, next) = scheduler.step(model_output, k, sample, state, noise).unwrap();
            (sample, state) = (prev, next);
        }
        chained = rel_err(&values(sample), &values(tensor(&file, &format!("sample_{steps}"))));
        if chained > TOLERANCE {
            failures.push(format!("chained trajectory: final rel err {chained:.3e}"));
        }
    }

    // 5. add_noise, and DDPM's velocity.
    let original = tensor(&file, "add_noise_original");
    let noise = tensor(&file, "add_noise_noise");
    let timesteps = file.get_f64_vec("add_noise_timesteps").unwrap();
    let add_noise = match scheduler.add_noise_at_timesteps(original.clone(), noise.clone(), &timesteps) {
        Ok(noisy) => {
            let e = rel_err(&values(noisy), &values(tensor(&file, "add_noise_noisy")));
            if e > TOLERANCE {
                failures.push(format!("add_noise rel err {e:.3e}"));
            }
            e
        }
        Err(e) => {
            failures.push(format!("add_noise: {e}"));
            f64::NAN
        }
    };
    let velocity = has("velocity").then(|| {
        let schedule = NoiseSchedule::from_config(&config).unwrap();
        let ts: Vec<usize> = timesteps.iter().map(|&t| t as usize).collect();
        let v = schedule.velocity(original.clone(), noise.clone(), &ts);
        let e = rel_err(&values(v), &values(tensor(&file, "velocity")));
        if e > TOLERANCE {
            failures.push(format!("velocity rel err {e:.3e}"));
        }
        e
    });

    CaseReport { name, worst_step, worst_scale, worst_sigma, chained, add_noise, velocity, failures }
}

#[test]
fn parity_with_diffusers_fixtures() {
    let dir = fixtures_dir();
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    cases.sort();
    assert!(!cases.is_empty(), "no scheduler fixtures in {}", dir.display());

    let mut failed = Vec::new();
    for path in &cases {
        let r = check_case(path);
        println!(
            "{:<32} step {:.2e}  chained {:.2e}  scale {:.2e}  sigmas {:.2e}  add_noise {:.2e}{}{}",
            r.name,
            r.worst_step,
            r.chained,
            r.worst_scale,
            r.worst_sigma,
            r.add_noise,
            r.velocity.map(|v| format!("  velocity {v:.2e}")).unwrap_or_default(),
            if r.failures.is_empty() { "" } else { "  FAILED" }
        );
        for f in &r.failures {
            failed.push(format!("{}: {f}", r.name));
        }
    }
    assert!(failed.is_empty(), "{} failures:\n{}", failed.len(), failed.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Errors and properties (no fixtures)
// ---------------------------------------------------------------------------------------------

fn config(json: &str) -> SchedulerConfig {
    let path = Path::new("scheduler_config.json");
    SchedulerConfig::from_value(parse_python_json(json, path).unwrap(), path).unwrap()
}

fn sd_config() -> SchedulerConfig {
    config(
        r#"{"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "clip_sample": false, "num_train_timesteps": 1000,
            "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null}"#,
    )
}

fn error_of(kind: SchedulerKind, json: &str) -> String {
    match Scheduler::new(kind, &config(json), 10) {
        Ok(_) => panic!("{kind} accepted {json}"),
        Err(e) => e.to_string(),
    }
}

fn latent(seed: f32) -> Tensor<B, 4> {
    let data: Vec<f32> = (0..2 * 4 * 8 * 8).map(|i| (i as f32 * 0.37 + seed).sin()).collect();
    Tensor::from_data(TensorData::new(data, [2, 4, 8, 8]), &Default::default())
}

#[test]
fn unknown_kind_is_named() {
    let err = "heun".parse::<SchedulerKind>().unwrap_err().to_string();
    assert!(err.contains("\"heun\""), "{err}");
    assert!(err.contains("ddim") && err.contains("dpm-solver"), "{err}");
    assert_eq!("dpm-solver".parse::<SchedulerKind>().unwrap(), SchedulerKind::DpmSolver);
    assert_eq!("EulerDiscreteScheduler".parse::<SchedulerKind>().unwrap(), SchedulerKind::Euler);
}

#[test]
fn unsupported_config_values_are_named() {
    let cases: [(SchedulerKind, &str, &str); 9] = [
        (SchedulerKind::Euler, r#"{"use_karras_sigmas": true}"#, "use_karras_sigmas=true"),
        (SchedulerKind::DpmSolver, r#"{"use_karras_sigmas": true}"#, "use_karras_sigmas=true"),
        (SchedulerKind::Ddim, r#"{"timestep_spacing": "bogus"}"#, "timestep_spacing=\"bogus\""),
        (SchedulerKind::Euler, r#"{"timestep_spacing": "bogus"}"#, "timestep_spacing=\"bogus\""),
        (SchedulerKind::Pndm, r#"{"skip_prk_steps": false}"#, "skip_prk_steps=false"),
        (SchedulerKind::Pndm, r#"{}"#, "skip_prk_steps=false"),
        (
            SchedulerKind::DpmSolver,
            r#"{"algorithm_type": "sde-dpmsolver++"}"#,
            "algorithm_type=\"sde-dpmsolver++\"",
        ),
        (SchedulerKind::Ddpm, r#"{"beta_schedule": "laplace"}"#, "beta_schedule=\"laplace\""),
        (
            SchedulerKind::Euler,
            r#"{"interpolation_type": "log_linear"}"#,
            "interpolation_type=\"log_linear\"",
        ),
    ];
    for (kind, json, expected) in cases {
        let err = error_of(kind, json);
        assert!(err.contains(expected), "{kind} {json}: {err}");
        assert!(err.contains("scheduler_config.json"), "{err}");
    }
    let err = error_of(SchedulerKind::DpmSolver, r#"{"solver_order": 4}"#);
    assert!(err.contains("solver_order=4"), "{err}");
    let err = error_of(SchedulerKind::Ddim, r#"{"thresholding": true}"#);
    assert!(err.contains("thresholding=true"), "{err}");
    let err = error_of(SchedulerKind::Ddim, r#"{"rescale_betas_zero_snr": true}"#);
    assert!(err.contains("rescale_betas_zero_snr=true"), "{err}");
    // Keys of other schedulers are ignored, as diffusers does.
    Scheduler::new(
        SchedulerKind::Ddim,
        &config(r#"{"use_karras_sigmas": true, "skip_prk_steps": false}"#),
        10,
    )
    .unwrap();
}

#[test]
fn stochastic_steps_require_noise() {
    let config = sd_config();
    let ddpm = Scheduler::new(SchedulerKind::Ddpm, &config, 10).unwrap();
    assert!(ddpm.needs_noise());
    let err = ddpm.step(latent(0.0), 0, latent(1.0), ddpm.initial_state(), None).unwrap_err().to_string();
    assert!(err.contains("noise"), "{err}");
    ddpm.step(latent(0.0), 0, latent(1.0), ddpm.initial_state(), Some(latent(2.0))).unwrap();

    let ddim = Scheduler::new(SchedulerKind::Ddim, &config, 10).unwrap();
    assert!(!ddim.needs_noise());
    ddim.step(latent(0.0), 0, latent(1.0), ddim.initial_state(), None).unwrap();
    let ddim = ddim.with_eta(0.5).unwrap();
    assert!(ddim.needs_noise());
    let err = ddim.step(latent(0.0), 0, latent(1.0), ddim.initial_state(), None).unwrap_err().to_string();
    assert!(err.contains("eta=0.5") && err.contains("noise"), "{err}");
    ddim.step(latent(0.0), 0, latent(1.0), ddim.initial_state(), Some(latent(2.0))).unwrap();
    assert!(Scheduler::new(SchedulerKind::Ddim, &config, 10).unwrap().with_eta(-1.0).is_err());
}

#[test]
fn pndm_plms_list_repeats_the_second_timestep() {
    let s = Scheduler::new(SchedulerKind::Pndm, &sd_config(), 10).unwrap();
    let expected = [901.0, 801.0, 801.0, 701.0, 601.0, 501.0, 401.0, 301.0, 201.0, 101.0, 1.0];
    assert_eq!(s.timesteps(), expected);
    assert_eq!(s.index_for_timestep(801.0), Some(2));
    assert_eq!(s.index_for_timestep(1.0), Some(10));
    assert_eq!(s.index_for_timestep(5.0), None);
}

#[test]
fn step_index_and_shapes_are_checked() {
    let s = Scheduler::new(SchedulerKind::Euler, &sd_config(), 4).unwrap();
    let err = s.step(latent(0.0), 4, latent(1.0), s.initial_state(), None).unwrap_err().to_string();
    assert!(err.contains("step index 4"), "{err}");
    let small = Tensor::<B, 4>::zeros([1, 4, 8, 8], &Default::default());
    let err = s.step(small, 0, latent(1.0), s.initial_state(), None).unwrap_err().to_string();
    assert!(err.contains("shape"), "{err}");
}

#[test]
fn multistep_history_is_a_value() {
    // Running the same step twice from the same state gives the same result: no hidden state.
    let s = Scheduler::new(SchedulerKind::DpmSolver, &sd_config(), 5).unwrap();
    let (x1, st1) = s.step(latent(0.0), 0, latent(1.0), s.initial_state(), None).unwrap();
    let (a, st_a) = s.step(latent(2.0), 1, x1.clone(), st1.clone(), None).unwrap();
    let (b, _) = s.step(latent(2.0), 1, x1, st1, None).unwrap();
    assert_eq!(values(a), values(b));
    assert_eq!(st_a.model_outputs.len(), 2);
    assert_eq!(st_a.lower_order_nums, 2);
}

#[test]
fn training_noise_schedule() {
    let schedule = NoiseSchedule::from_config(&sd_config()).unwrap();
    let (x0, eps) = (latent(0.0), latent(1.0));
    let ts = [0usize, 999];
    let xt = values(schedule.add_noise(x0.clone(), eps.clone(), &ts));
    let v = values(schedule.velocity(x0.clone(), eps.clone(), &ts));
    let (x0v, epsv) = (values(x0.clone()), values(eps.clone()));
    let half = xt.len() / 2;
    for (i, &t) in ts.iter().enumerate() {
        let a = schedule.alphas_cumprod()[t];
        for j in i * half..(i + 1) * half {
            let expect_xt = a.sqrt() * x0v[j] as f64 + (1.0 - a).sqrt() * epsv[j] as f64;
            let expect_v = a.sqrt() * epsv[j] as f64 - (1.0 - a).sqrt() * x0v[j] as f64;
            assert!((xt[j] as f64 - expect_xt).abs() < 1e-5);
            assert!((v[j] as f64 - expect_v).abs() < 1e-5);
        }
    }
    // epsilon config → the target is the noise; v_prediction → the velocity.
    assert_eq!(values(schedule.training_target(x0.clone(), eps.clone(), &ts)), epsv);
    let v_config = config(r#"{"prediction_type": "v_prediction", "beta_schedule": "scaled_linear"}"#);
    let v_schedule = NoiseSchedule::from_config(&v_config).unwrap();
    assert_eq!(
        values(v_schedule.training_target(x0.clone(), eps.clone(), &ts)),
        values(v_schedule.velocity(x0, eps, &ts))
    );
}

#[test]
fn img2img_add_noise_uses_the_step_noise_level() {
    let config = sd_config();
    let (x0, eps) = (latent(0.0), latent(1.0));
    for kind in SchedulerKind::ALL {
        let s = Scheduler::new(kind, &config, 10).unwrap();
        let i = 3;
        let noisy = values(s.add_noise(x0.clone(), eps.clone(), i).unwrap());
        let t = s.timesteps()[i];
        let by_t = values(s.add_noise_at_timesteps(x0.clone(), eps.clone(), &[t, t]).unwrap());
        assert_eq!(noisy, by_t, "{kind}");
        // a step index past the last step is an error naming it, not a panic
        let last = s.timesteps().len();
        let err = s.add_noise(x0.clone(), eps.clone(), last).unwrap_err().to_string();
        assert!(
            err.contains(&format!("step index {last} is past the last of {last} steps")),
            "{kind}: {err}"
        );
    }
}

#[test]
#[should_panic(expected = "1 timesteps for a batch of 2")]
fn noise_schedule_wants_one_timestep_per_sample() {
    let schedule = NoiseSchedule::from_config(&sd_config()).unwrap();
    schedule.add_noise(latent(0.0), latent(1.0), &[10]);
}
