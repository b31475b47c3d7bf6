//! Full text-to-image and image-to-image runs against diffusers' pipelines on the tiny fixture model,
//! with the initial latents (and img2img's random draws) given.

mod common;

use burn::prelude::*;
use common::{B, assert_close, fixtures, relative_max_error};
use duo_core::ModelFolder;
use duo_core::pipelines::{Generation, NoiseSource, StableDiffusion, img2img_start_index};
use duo_core::schedulers::{Scheduler, SchedulerConfig, SchedulerKind};
use duo_core::tensor_file::TensorFile;
use serde_json::Value;

struct Case {
    name: String,
    json: Value,
    tensors: TensorFile,
}

fn cases(prefix: &str) -> Vec<Case> {
    let dir = fixtures().join("pipelines");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix) && n.ends_with(".json"))
        .map(|n| n.trim_end_matches(".json").to_string())
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no {prefix}* fixtures in {}", dir.display());
    names
        .into_iter()
        .map(|name| Case {
            json: read_python_json(&dir.join(format!("{name}.json"))),
            tensors: TensorFile::read(&dir.join(format!("{name}.safetensors"))).unwrap(),
            name,
        })
        .collect()
}

/// diffusers writes `-Infinity` into some scheduler configs (not valid JSON).
fn read_python_json(path: &std::path::Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    duo_core::schedulers::parse_python_json(&text, path).unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::Array(items) => items.iter().map(|s| s.as_str().unwrap().to_string()).collect(),
        Value::String(s) => vec![s.clone()],
        _ => vec![],
    }
}

fn setup(case: &Case) -> (StableDiffusion<B>, Scheduler, Generation) {
    let device = Default::default();
    let model = case.json["model"].as_str().unwrap_or("sd1-tiny");
    let folder = ModelFolder::open(fixtures().join("models").join(model)).unwrap();
    let sd = StableDiffusion::<B>::load(&folder, &device).unwrap_or_else(|e| panic!("{}: {e}", case.name));
    let kind: SchedulerKind = case.json["scheduler"].as_str().unwrap_or("pndm").parse().unwrap();
    let steps = case.json["steps"].as_u64().unwrap() as usize;
    // the scheduler exactly as the fixture script configured it (`XScheduler.from_config(...)`)
    let source = fixtures().join("pipelines").join(format!("{}.json", case.name));
    let config = SchedulerConfig::from_value(case.json["scheduler_config"].clone(), &source).unwrap();
    let scheduler = Scheduler::new(kind, &config, steps).unwrap();
    let generation = Generation {
        prompts: strings(&case.json["prompts"]),
        negative_prompts: strings(&case.json["negative_prompts"]),
        guidance_scale: case.json["guidance"].as_f64().unwrap(),
    };
    (sd, scheduler, generation)
}

fn tensor(case: &Case, key: &str) -> Tensor<B, 4> {
    Tensor::from_data(case.tensors.get_f32(key, 4).unwrap(), &Default::default())
}

/// The reference is diffusers run in float64 (`image_f64`); the bound scales with diffusers' own
/// float32 error on the same case (`f32_rel_err`, 4e-7 to 2e-6 on these models): ten times it, at
/// least 1e-5. A pass means parity; a failure is a bug, not rounding.
fn check_against_float64(case: &Case, image: Tensor<B, 4>) -> String {
    let f32_err =
        case.json["f32_rel_err"].as_f64().unwrap_or_else(|| panic!("{}: no f32_rel_err", case.name));
    let tolerance = (10.0 * f32_err).max(1e-5);
    let expected = case.tensors.get("image_f64").unwrap().clone();
    let err = relative_max_error(&image.into_data(), &expected);
    let line = format!(
        "{}: {err:.2e} from diffusers' float64 image ({:.1}× its own float32 error)",
        case.name,
        err / f32_err
    );
    assert!(err <= tolerance, "{line}: above the bound {tolerance:.1e}");
    line
}

#[test]
fn txt2img_matches_diffusers_for_every_scheduler() {
    let mut saved = Vec::new();
    for case in cases("txt2img-") {
        let (sd, scheduler, generation) = setup(&case);
        let latents = tensor(&case, "latents");
        // DDPM's step noise: diffusers' own draws, by loop index
        let step_noise = |i: usize, _| -> duo_core::Result<Tensor<B, 4>> {
            let key = format!("variance_noise_{i}");
            Ok(Tensor::from_data(case.tensors.get_f32(&key, 4)?, &Default::default()))
        };
        let image =
            sd.txt2img_with_step_noise(&generation, &scheduler, latents, step_noise, |_, _| {}).unwrap();
        println!("{}", check_against_float64(&case, image));
        saved.extend(case.name.strip_prefix("txt2img-saved-").map(str::to_string));
    }
    // one case per scheduler on the folder diffusers' save_pretrained wrote
    saved.sort();
    assert_eq!(saved, ["ddim", "ddpm", "dpm-solver", "euler", "pndm"]);
}

#[test]
fn img2img_matches_diffusers_for_several_strengths() {
    for case in cases("img2img-") {
        let (sd, scheduler, generation) = setup(&case);
        let strength = case.json["strength"].as_f64().unwrap();
        let start = img2img_start_index(&scheduler, strength).unwrap();
        assert_eq!(start as u64, case.json["t_start_index"].as_u64().unwrap(), "{}: start index", case.name);
        let start_t = case.json["start_timestep"].as_f64().unwrap();
        assert_eq!(scheduler.timesteps()[start], start_t, "{}: start timestep", case.name);
        let draws = Some((tensor(&case, "vae_noise"), tensor(&case, "noise")));
        let image = tensor(&case, "init_image");
        let mut noise = NoiseSource::new(0);
        let (latents, _) =
            sd.img2img_latents(&scheduler, image.clone(), strength, draws.clone(), &mut noise).unwrap();
        let expected = case.tensors.get("start_latents").unwrap().clone();
        assert_close(&format!("{}/start_latents", case.name), &latents.into_data(), &expected, 1e-4);
        let out = sd.img2img(&generation, &scheduler, image, strength, draws, &mut noise, |_, _| {}).unwrap();
        println!("{}", check_against_float64(&case, out));
    }
}
