//! Stage 2: the text encoder and the UNet, trained together from scratch on the frozen VAE's latents
//! (ε-prediction, SD's scaled_linear schedule, caption dropout for classifier-free guidance), with an
//! exponential moving average of their weights, which is what ships.

use std::sync::Arc;

use burn::data::dataloader::DataLoaderBuilder;
use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::train::{InferenceStep, TrainOutput, TrainStep};
use duo_core::models::{AutoencoderKL, ClipTextModel, UNet2DConditionModel};
use duo_core::schedulers::NoiseSchedule;
use duo_core::tokenizer::ClipTokenizer;
use duo_core::{DuoError, Result};

use super::Run;
use super::data::{DiffusionBatch, DiffusionBatcher, TrainBatcher, WorldDataset};
use crate::learning::{AtomicRecorder, EpochLoader, Stage, StepOutput, latest_checkpoint};

/// The EMA of the trained weights. Its params have their own ids and never require a gradient, so
/// the optimizer leaves them alone; they are in the model's record, so checkpoints keep them.
#[derive(Module, Debug)]
pub struct EmaWeights<B: Backend> {
    pub text_encoder: ClipTextModel<B>,
    pub unet: UNet2DConditionModel<B>,
    /// Updates so far, [1] (a tensor so the decay warm-up needs no host sync).
    pub updates: Param<Tensor<B, 1>>,
    pub decay: f64,
}

/// The text encoder and the UNet, trained jointly, and their EMA.
#[derive(Module, Debug)]
pub struct DiffusionModel<B: Backend> {
    pub text_encoder: ClipTextModel<B>,
    pub unet: UNet2DConditionModel<B>,
    pub ema: EmaWeights<B>,
}

/// E‖ε_θ(x_t, t, c) − ε‖²: the denoising loss, [1].
fn denoising_loss<B: Backend>(
    text_encoder: &ClipTextModel<B>,
    unet: &UNet2DConditionModel<B>,
    batch: DiffusionBatch<B>,
) -> Tensor<B, 1> {
    let context = text_encoder.forward(batch.input_ids).last_hidden_state;
    let prediction = unet.forward(batch.noisy_latents, batch.timesteps, context);
    let per_sample = (prediction - batch.target).square().flatten::<2>(1, 3).mean_dim(1).squeeze_dim(1);
    (per_sample * batch.loss_weights).mean()
}

/// Keeps every param but makes it initialised: lazy params would otherwise draw their values at first
/// use, separately in each copy of a cloned module.
struct Materialize;

impl<B: Backend> ModuleMapper<B> for Materialize {}

/// New ids and no gradient: a copy the optimizer never sees.
struct Detached;

impl<B: Backend> ModuleMapper<B> for Detached {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (_, tensor, mapper) = param.consume();
        Param::from_mapped_value(ParamId::new(), tensor.detach().set_require_grad(false), mapper)
    }
}

impl<B: Backend> DiffusionModel<B> {
    /// The model with its EMA starting at the current weights.
    pub fn new(text_encoder: ClipTextModel<B>, unet: UNet2DConditionModel<B>, decay: f64) -> Self {
        let text_encoder = text_encoder.map(&mut Materialize);
        let unet = unet.map(&mut Materialize);
        let device = unet.devices()[0].clone();
        let ema = EmaWeights {
            text_encoder: text_encoder.clone().map(&mut Detached),
            unet: unet.clone().map(&mut Detached),
            updates: Param::initialized(ParamId::new(), Tensor::zeros([1], &device)),
            decay,
        };
        Self { text_encoder, unet, ema }
    }
}

/// Collects the trained params, flattened, in visiting order.
struct Collect<I: Backend>(Vec<Tensor<I, 1>>);

impl<B: AutodiffBackend> ModuleVisitor<B> for Collect<B::InnerBackend> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let value = param.val().inner();
        let n = value.shape().num_elements();
        self.0.push(value.reshape([n]));
    }
}

/// ema ← d·ema + (1 − d)·online for each param, in the same visiting order as [`Collect`].
struct Blend<I: Backend> {
    online: std::vec::IntoIter<Tensor<I, 1>>,
    /// d, [1].
    decay: Tensor<I, 1>,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Blend<B::InnerBackend> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let ema = tensor.inner();
        let online = self.online.next().expect("the EMA copy has the trained modules' structure");
        let d = self.decay.clone().reshape([1; D]);
        let blended = ema.clone() * d.clone() + online.reshape(ema.shape()) * (d.neg() + 1.0);
        Param::from_mapped_value(id, Tensor::from_inner(blended), mapper)
    }
}

impl<B: AutodiffBackend> DiffusionModel<B> {
    /// One EMA update. The decay warms up as diffusers' `EMAModel.get_decay` (without
    /// `use_ema_warmup`): min(decay, (1 + n) / (10 + n)) after n updates, so early weights fade fast.
    fn update_ema(self) -> Self {
        let mut online = Collect(Vec::new());
        self.text_encoder.visit(&mut online);
        self.unet.visit(&mut online);
        let Self { text_encoder, unet, ema } = self;
        let (updates_id, updates, updates_mapper) = ema.updates.consume();
        let n = updates.inner();
        let decay = ((n.clone() + 1.0) / (n.clone() + 10.0)).clamp_max(ema.decay);
        let mut blend = Blend { online: online.0.into_iter(), decay };
        let ema = EmaWeights {
            text_encoder: ema.text_encoder.map(&mut blend),
            unet: ema.unet.map(&mut blend),
            updates: Param::from_mapped_value(updates_id, Tensor::from_inner(n + 1.0), updates_mapper),
            decay: ema.decay,
        };
        Self { text_encoder, unet, ema }
    }
}

impl<B: AutodiffBackend> TrainStep for DiffusionModel<B> {
    type Input = DiffusionBatch<B>;
    type Output = StepOutput<B>;

    fn step(&self, batch: DiffusionBatch<B>) -> TrainOutput<StepOutput<B>> {
        let batch_size = batch.timesteps.dims()[0];
        let loss = denoising_loss(&self.text_encoder, &self.unet, batch);
        let grads = loss.backward();
        TrainOutput::new(self, grads, StepOutput { batch_size, scalars: vec![("loss", loss.detach())] })
    }

    /// The optimizer's step, then the EMA's.
    fn optimize<AB, O>(self, optim: &mut O, lr: f64, grads: GradientsParams) -> Self
    where
        AB: AutodiffBackend,
        O: Optimizer<Self, AB>,
        Self: AutodiffModule<AB>,
    {
        optim.step(lr, self, grads).update_ema()
    }
}

impl<B: Backend> InferenceStep for DiffusionModel<B> {
    type Input = DiffusionBatch<B>;
    type Output = StepOutput<B>;

    /// The loss of the trained weights and of their EMA (the ones that ship) on the same batch.
    fn step(&self, batch: DiffusionBatch<B>) -> StepOutput<B> {
        let batch_size = batch.timesteps.dims()[0];
        let loss = denoising_loss(&self.text_encoder, &self.unet, batch.clone());
        let ema_loss = denoising_loss(&self.ema.text_encoder, &self.ema.unet, batch);
        StepOutput { batch_size, scalars: vec![("loss", loss), ("ema loss", ema_loss)] }
    }
}

/// Trains (or resumes, or loads) the text encoder and the UNet on `vae`'s latents. Returns their EMA
/// weights (what ships); None when the run stopped before the last step.
pub fn train<B: AutodiffBackend>(
    run: &Run<B::InnerBackend>,
    vae: AutoencoderKL<B::InnerBackend>,
) -> Result<Option<EmaWeights<B::InnerBackend>>> {
    let c = &run.config.diffusion_training;
    let schedule = c.schedule();
    let dir = run.dir.join("diffusion");
    let [channels, side] = [run.configs.vae.latent_channels, run.configs.latent_size(&run.config)];
    let batcher = DiffusionBatcher {
        world: run.world.clone(),
        vae,
        vae_device: run.device.clone(),
        tokenizer: Arc::new(ClipTokenizer::from_folder(&run.config.tokenizer)?),
        schedule: NoiseSchedule::from_config(&run.configs.scheduler)?,
        noise_seed: c.seed,
        caption_dropout: c.caption_dropout,
        min_snr_gamma: c.min_snr_gamma,
        latent_shape: [channels, side, side],
    };

    B::seed(&run.device, c.seed);
    let model = DiffusionModel::<B>::new(
        run.configs.text_encoder.init(&run.device),
        run.configs.unet.init(&run.device),
        c.ema_decay,
    );
    let resume = latest_checkpoint::<B>(&dir).unwrap_or(0);
    let valid_set =
        WorldDataset::valid(run.world.clone(), c.seed, schedule.valid_batches * schedule.batch_size);
    let valid = DataLoaderBuilder::<B::InnerBackend, _, _>::new(batcher.clone())
        .batch_size(schedule.batch_size)
        .set_device(run.device.clone())
        .build(valid_set);
    let train = Arc::new(EpochLoader::<B, _>::from_dataset(
        WorldDataset::train(run.world.clone(), c.seed),
        TrainBatcher::<B>(batcher),
        schedule.batch_size,
        schedule.checkpoint_every,
        resume,
        run.device.clone(),
    ));

    let stage = Stage {
        name: "diffusion",
        dir,
        schedule,
        log_every: run.log_every,
        control: &run.control,
        train_scalars: &["loss"],
        valid_scalars: &["loss", "ema loss"],
    };
    let result = stage.run(model, train, valid)?;
    if !result.complete {
        return Ok(None);
    }
    Ok(Some(result.model.ema))
}

/// The EMA weights of the latest diffusion checkpoint, without training.
pub fn latest_ema<B: AutodiffBackend>(run: &Run<B::InnerBackend>) -> Result<EmaWeights<B::InnerBackend>> {
    let dir = run.dir.join("diffusion");
    let Some(epoch) = latest_checkpoint::<B>(&dir) else {
        return Err(DuoError::Invalid(format!("{}: no diffusion checkpoint yet", dir.display())));
    };
    let c = &run.config.diffusion_training;
    let model = DiffusionModel::<B::InnerBackend>::new(
        run.configs.text_encoder.init(&run.device),
        run.configs.unet.init(&run.device),
        c.ema_decay,
    );
    let path = dir.join("checkpoint").join(format!("model-{epoch}"));
    let model = model
        .load_file(&path, &AtomicRecorder, &run.device)
        .map_err(|e| DuoError::Invalid(format!("{}.mpk: {e}", path.display())))?;
    println!("[diffusion] snapshot of checkpoint {epoch} (step {})", epoch * c.checkpoint_every);
    Ok(model.ema)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use burn::backend::{Autodiff, Flex};
    use burn::module::ModuleMapper;
    use duo_core::ModelFolder;

    use super::*;

    type B = Autodiff<Flex>;

    /// Adds 1 to every param, as a stand-in for an optimizer step.
    struct AddOne;

    impl<B: Backend> ModuleMapper<B> for AddOne {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            param.map(|t| t + 1.0)
        }
    }

    fn tiny() -> DiffusionModel<B> {
        let folder = ModelFolder::open(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/sd1-tiny"),
        )
        .unwrap();
        let device = Default::default();
        let unet = folder.unet_layout().unwrap().init(&device);
        DiffusionModel::new(folder.text_encoder_config().unwrap().init(&device), unet, 0.999)
    }

    fn first_value<M: Module<B>>(module: &M) -> f32 {
        let mut all = Collect(Vec::new());
        module.visit(&mut all);
        all.0[0].clone().into_data().to_vec::<f32>().unwrap()[0]
    }

    #[test]
    fn the_ema_starts_at_the_weights_with_its_own_ids_and_blends_with_the_warmed_up_decay() {
        let model = tiny();
        let trained = model.text_encoder.num_params() + model.unet.num_params();
        assert_eq!(model.num_params(), 2 * trained + 1, "online, EMA and the update counter");
        let start = first_value(&model.unet);
        assert_eq!(first_value(&model.ema.unet), start);
        let (mut online_ids, mut ids) = (Vec::new(), Vec::new());
        model.text_encoder.visit(&mut IdCollector(&mut online_ids));
        model.unet.visit(&mut IdCollector(&mut online_ids));
        model.visit(&mut IdCollector(&mut ids));
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 2 * online_ids.len() + 1, "no param id is shared");

        // After n = 0 updates the decay is min(0.999, 1/10): ema = 0.1·ema + 0.9·online.
        let DiffusionModel { text_encoder, unet, ema } = model;
        let model = DiffusionModel { text_encoder, unet: unet.map(&mut AddOne), ema }.update_ema();
        assert!((first_value(&model.ema.unet) - (start + 0.9)).abs() < 1e-5);
        assert_eq!(model.ema.updates.val().into_data().to_vec::<f32>().unwrap(), vec![1.0]);
        // n = 1: d = 2/11.
        let online = first_value(&model.unet);
        let before = first_value(&model.ema.unet);
        let model = model.update_ema();
        let expected = before * 2.0 / 11.0 + online * 9.0 / 11.0;
        assert!((first_value(&model.ema.unet) - expected).abs() < 1e-5);
    }

    struct IdCollector<'a>(&'a mut Vec<ParamId>);

    impl<B: Backend> ModuleVisitor<B> for IdCollector<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.push(param.id);
        }
    }
}
