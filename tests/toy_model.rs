//! The shipped toy model (`models/toy`) loads through the same code as Stable Diffusion and draws
//! what it is asked for: one prompt per shape, each in another colour, read by the shipped judge.
//! Its full quality figures (64 seeds per prompt) are `duo-bench quality`'s, in its model card.

mod common;

use std::path::PathBuf;

use common::B;
use duo_core::ModelFolder;
use duo_core::judge::ConceptJudge;
use duo_core::pipelines::{Generation, NoiseSource, StableDiffusion};
use duo_core::schedulers::{Scheduler, SchedulerKind};
use duo_core::world::{Colour, Shape, canonical_prompt};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn the_shipped_toy_model_draws_each_shape_in_its_colour() {
    let device = Default::default();
    let sd =
        StableDiffusion::<B>::load(&ModelFolder::open(root().join("models/toy")).unwrap(), &device).unwrap();
    let judge = ConceptJudge::<B>::load(&root().join("models/judge"), &device).unwrap();
    let asked: Vec<(Shape, Colour)> = Shape::ALL.into_iter().zip(Colour::ALL).collect();
    let generation = Generation {
        prompts: asked.iter().map(|&(shape, colour)| canonical_prompt(shape, colour)).collect(),
        negative_prompts: Vec::new(),
        guidance_scale: 7.5,
    };
    let side = sd.unet_sample_size.expect("the toy UNet config gives its sample_size");
    let latents = NoiseSource::new(0).normal::<B, 4>([asked.len(), sd.latent_channels, side, side], &device);
    // DDIM 25 steps at CFG 7.5: the quality gates' sampler.
    let scheduler = Scheduler::new(SchedulerKind::Ddim, &sd.scheduler_config, 25).unwrap();
    let images = sd.txt2img(&generation, &scheduler, latents, &mut NoiseSource::new(1), |_, _| {}).unwrap();
    let verdicts = judge.judge(images).unwrap();
    let seen: Vec<(Shape, Colour)> = verdicts.iter().map(|v| (v.shape, v.colour)).collect();
    println!("asked {asked:?}\nseen  {seen:?}");
    assert_eq!(seen, asked);
}
