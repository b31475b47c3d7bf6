//! LoRA on the tiny SD 1.x UNet: a fresh adapter changes nothing, the switch restores the base
//! exactly, only adapters train, merging and both file formats reproduce the LoRA output, several
//! files add up, and bad targets or files are errors naming the culprit.

mod common;

use std::path::PathBuf;

use burn::backend::Autodiff;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::TensorData;
use common::{B, fixtures, load_unet_lora, relative_max_error, save_unet_lora};
use duo_core::ModelFolder;
use duo_core::lora::{
    LoraConfig, LoraFormat, LoraTargets, attach_lora, disable_lora, lora_adapters, lora_parameter_count,
    merge_lora, set_lora_enabled,
};
use duo_core::models::UNet2DConditionModel;
use duo_core::tensor_file::{TensorFile, write_tensor_file};

fn tiny_unet<Be: Backend>() -> UNet2DConditionModel<Be> {
    ModelFolder::open(fixtures().join("models/sd1-tiny")).unwrap().unet::<Be>(&Default::default()).unwrap()
}

/// Deterministic inputs for the tiny UNet (4 latent channels, cross_attention_dim 32).
fn forward<Be: Backend>(unet: &UNet2DConditionModel<Be>) -> TensorData {
    let device = Default::default();
    let values =
        |n: usize, phase: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * 0.37 + phase).sin()).collect() };
    let sample =
        Tensor::<Be, 4>::from_data(TensorData::new(values(2 * 4 * 8 * 8, 0.1), [2, 4, 8, 8]), &device);
    let context = Tensor::<Be, 3>::from_data(TensorData::new(values(2 * 7 * 32, 1.3), [2, 7, 32]), &device);
    let timesteps = Tensor::<Be, 1>::from_floats([10.0, 700.0], &device);
    unet.forward(sample, timesteps, context).into_data().convert::<f32>()
}

fn assert_identical(what: &str, actual: &TensorData, expected: &TensorData) {
    let a = actual.to_vec::<f32>().unwrap();
    let b = expected.to_vec::<f32>().unwrap();
    assert!(
        a == b,
        "{what}: outputs differ (relative max error {:.3e})",
        relative_max_error(actual, expected)
    );
}

/// Fills every `lora_b` (zero at init) with seeded non-zero values, so the adapters do something.
fn randomize_lora_b<Be: Backend>(unet: UNet2DConditionModel<Be>, seed: u64) -> UNet2DConditionModel<Be> {
    struct Randomize {
        fields: Vec<String>,
        seed: u64,
    }
    impl<Be: Backend> ModuleMapper<Be> for Randomize {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.fields.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.fields.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<Be, D>>) -> Param<Tensor<Be, D>> {
            if self.fields.last().map(String::as_str) != Some("lora_b") {
                return param;
            }
            self.seed += 1;
            let shape = param.lazy_shape();
            let phase = self.seed as f32;
            let values: Vec<f32> =
                (0..shape.num_elements()).map(|i| 0.05 * (i as f32 * 0.71 + phase).cos()).collect();
            let device = param.lazy_device();
            Param::initialized(param.id, Tensor::from_data(TensorData::new(values, shape), &device))
        }
    }
    unet.map(&mut Randomize { fields: Vec::new(), seed: seed * 1000 })
}

fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("duo-lora-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn small_config(rank: usize, alpha: f64, seed: u64) -> LoraConfig {
    LoraConfig { rank, alpha, targets: LoraTargets::SelfAttn, seed }
}

#[test]
fn fresh_adapters_leave_the_output_bit_identical() {
    let unet = tiny_unet::<B>();
    let base = forward(&unet);
    for targets in [LoraTargets::SelfAttn, LoraTargets::AllAttn] {
        let cfg = LoraConfig { targets: targets.clone(), ..Default::default() };
        let lora = attach_lora(unet.clone(), &cfg, &Default::default()).unwrap();
        assert!(lora_parameter_count(&lora) > 0);
        assert_identical(&format!("{targets} at init"), &forward(&lora), &base);
    }
}

#[test]
fn switching_adapters_off_restores_the_base_exactly() {
    let unet = tiny_unet::<B>();
    let base = forward(&unet);
    let lora = randomize_lora_b(attach_lora(unet, &small_config(4, 8.0, 1), &Default::default()).unwrap(), 1);
    let with_lora = forward(&lora);
    let change = relative_max_error(&with_lora, &base);
    println!("non-zero B changes the output by {change:.3e} (relative max)");
    assert!(change > 1e-3, "the adapters should change the output");

    set_lora_enabled(&lora, false);
    assert_identical("disabled", &forward(&lora), &base);
    set_lora_enabled(&lora, true);
    assert_identical("re-enabled", &forward(&lora), &with_lora);

    {
        let _off = disable_lora(&lora);
        assert_identical("inside the guard", &forward(&lora), &base);
    }
    assert_identical("after the guard", &forward(&lora), &with_lora);

    // A clone has its own switch: turning it off leaves the original on.
    let copy = lora.clone();
    set_lora_enabled(&copy, false);
    assert_identical("original after switching a clone off", &forward(&lora), &with_lora);
    assert_identical("clone switched off", &forward(&copy), &base);
}

#[test]
fn only_lora_parameters_train() {
    type Ad = Autodiff<B>;
    let lora = attach_lora(tiny_unet::<Ad>(), &small_config(4, 4.0, 2), &Default::default()).unwrap();
    let adapters = lora_adapters(&lora).len();
    // tiny UNet: 2 + 2 down, 1 mid, 3 + 3 up transformer blocks, 4 self-attention targets each
    assert_eq!(adapters, 11 * 4);

    struct Trainable {
        tensors: usize,
        params: usize,
        frozen: usize,
    }
    impl ModuleVisitor<Ad> for Trainable {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<Ad, D>>) {
            if param.is_require_grad() {
                self.tensors += 1;
                self.params += param.shape().num_elements();
            } else {
                self.frozen += param.shape().num_elements();
            }
        }
    }
    let mut count = Trainable { tensors: 0, params: 0, frozen: 0 };
    lora.visit(&mut count);
    println!(
        "tiny UNet self-attn rank 4: {} trainable parameters in {} tensors, {} frozen",
        count.params, count.tensors, count.frozen
    );
    assert_eq!(count.tensors, 2 * adapters);
    assert_eq!(count.params, lora_parameter_count(&lora));
    assert!(count.frozen > 0);

    // A backward pass yields gradients for the adapters and nothing else.
    let device = Default::default();
    let sample = Tensor::<Ad, 4>::ones([1, 4, 8, 8], &device);
    let context = Tensor::<Ad, 3>::ones([1, 7, 32], &device);
    let out = lora.forward(sample, Tensor::from_floats([500.0], &device), context);
    let grads = GradientsParams::from_grads(out.square().mean().backward(), &lora);
    assert_eq!(grads.len(), 2 * adapters);
}

/// SD 1.4's real config, self-attention, rank 32: PEFT counts rank·(d_in + d_out) per target, i.e.
/// 8·32·d per transformer block of width d; the 16 blocks have Σd = 2·(320+640+1280) + 1280 +
/// 3·(1280+640+320) = 12 480, so 8·32·12 480 = 3 194 880.
#[test]
fn sd14_self_attention_rank_32_has_3_2m_parameters() {
    let folder =
        ModelFolder::open(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/sd-v1-4-configs"))
            .unwrap();
    let unet = folder.unet_layout().unwrap().init::<B>(&Default::default());
    let lora = attach_lora(unet, &LoraConfig::default(), &Default::default()).unwrap();
    let count = lora_parameter_count(&lora);
    println!("SD 1.4 self-attn rank 32: {count} LoRA parameters in {} adapters", lora_adapters(&lora).len());
    assert_eq!(lora_adapters(&lora).len(), 16 * 4);
    assert_eq!(count, 3_194_880);
    // Freezing kept the (unloaded) base lazy: nothing was allocated for it.
    assert!(!lora.conv_in.weight.is_initialized());

    // all-attn adds attn2, whose k/v read the 768-wide text states: 32·Σ(6d + 2·768) = 3 182 592 more.
    let unet = folder.unet_layout().unwrap().init::<B>(&Default::default());
    let cfg = LoraConfig { targets: LoraTargets::AllAttn, ..Default::default() };
    assert_eq!(lora_parameter_count(&attach_lora(unet, &cfg, &Default::default()).unwrap()), 6_377_472);
}

#[test]
fn merged_unet_matches_the_lora_output() {
    let lora = randomize_lora_b(
        attach_lora(tiny_unet::<B>(), &small_config(4, 8.0, 3), &Default::default()).unwrap(),
        3,
    );
    let with_lora = forward(&lora);
    let merged = merge_lora(lora, 1.0);
    assert_eq!(lora_parameter_count(&merged), 0, "merging removes the adapters");
    let err = relative_max_error(&forward(&merged), &with_lora);
    println!("merged vs LoRA: relative max error {err:.3e}");
    assert!(err <= 1e-5, "merged output differs by {err:.3e}");
}

#[test]
fn both_file_formats_round_trip() {
    let lora = randomize_lora_b(
        attach_lora(tiny_unet::<B>(), &small_config(4, 8.0, 4), &Default::default()).unwrap(),
        4,
    );
    let expected = forward(&lora);
    for (format, down_key, alpha_key) in [
        (
            LoraFormat::Peft,
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight",
            None,
        ),
        (
            LoraFormat::Kohya,
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight",
            Some("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha"),
        ),
    ] {
        let file = temp_path(&format!("round-trip-{format}.safetensors"));
        save_unet_lora(&lora, &file, format).unwrap();

        // PyTorch layout [rank, d_in]; the alpha (8, not the rank 4) is stored
        let stored = TensorFile::read(&file).unwrap();
        assert_eq!(stored.get(down_key).unwrap().shape.as_slice(), [4, 16], "{format}: {down_key}");
        match alpha_key {
            Some(key) => assert_eq!(stored.get_f64_vec(key).unwrap(), [8.0]),
            None => {
                let meta: serde_json::Value =
                    serde_json::from_str(stored.metadata("lora_adapter_metadata").unwrap()).unwrap();
                assert_eq!(meta["unet.lora_alpha"], 8.0);
                assert_eq!(meta["unet.r"], 4);
            }
        }

        let loaded = load_unet_lora(tiny_unet::<B>(), &file, 1.0).unwrap();
        assert_eq!(lora_parameter_count(&loaded), lora_parameter_count(&lora), "{format}");
        assert_identical(&format!("{format} round trip"), &forward(&loaded), &expected);
    }
}

/// A PEFT file may carry its alphas as `<module>.alpha` scalars instead of metadata (some training
/// scripts save them so): read as Kohya's are, per module.
#[test]
fn peft_alpha_keys_stand_for_the_metadata() {
    let lora = randomize_lora_b(
        attach_lora(tiny_unet::<B>(), &small_config(4, 8.0, 4), &Default::default()).unwrap(),
        4,
    );
    let expected = forward(&lora);
    let with_metadata = temp_path("alpha-keys-metadata.safetensors");
    save_unet_lora(&lora, &with_metadata, LoraFormat::Peft).unwrap();
    let stored = TensorFile::read(&with_metadata).unwrap();
    let mut tensors: Vec<(String, TensorData)> =
        stored.names().map(|k| (k.to_string(), stored.get(k).unwrap().clone())).collect();
    let modules: Vec<String> =
        stored.names().filter_map(|k| k.strip_suffix(".lora_A.weight")).map(str::to_string).collect();
    for module in modules {
        tensors.push((format!("{module}.alpha"), TensorData::new(vec![8.0f32], [0usize; 0])));
    }
    let with_keys = temp_path("alpha-keys.safetensors");
    let named: Vec<(&str, TensorData)> = tensors.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    write_tensor_file(&with_keys, &named).unwrap();
    assert!(TensorFile::read(&with_keys).unwrap().metadata("lora_adapter_metadata").is_none());
    let loaded = load_unet_lora(tiny_unet::<B>(), &with_keys, 1.0).unwrap();
    assert_identical("alpha keys", &forward(&loaded), &expected);
}

/// Violence: four LoRAs summed. Loading several files (with weights) equals merging them one
/// after the other.
#[test]
fn loading_several_loras_sums_their_deltas() {
    let first = temp_path("sum-first.safetensors");
    let second = temp_path("sum-second.safetensors");
    let a = randomize_lora_b(
        attach_lora(tiny_unet::<B>(), &small_config(4, 4.0, 5), &Default::default()).unwrap(),
        5,
    );
    save_unet_lora(&a, &first, LoraFormat::Peft).unwrap();
    let cfg = LoraConfig { targets: LoraTargets::AllAttn, ..small_config(8, 2.0, 6) };
    let b = randomize_lora_b(attach_lora(tiny_unet::<B>(), &cfg, &Default::default()).unwrap(), 6);
    save_unet_lora(&b, &second, LoraFormat::Kohya).unwrap();

    let summed =
        load_unet_lora(load_unet_lora(tiny_unet::<B>(), &first, 0.7).unwrap(), &second, 1.5).unwrap();
    // self-attention layers hold both adapters (rank 4 + 8), cross-attention only the second
    let ranks: Vec<usize> = lora_adapters(&summed).iter().map(|(_, lora)| lora.rank()).collect();
    assert!(ranks.contains(&12) && ranks.contains(&8), "{ranks:?}");

    let one_by_one = merge_lora(load_unet_lora(tiny_unet::<B>(), &first, 0.7).unwrap(), 1.0);
    let one_by_one = merge_lora(load_unet_lora(one_by_one, &second, 1.5).unwrap(), 1.0);
    let err = relative_max_error(&forward(&summed), &forward(&one_by_one));
    println!("two LoRAs loaded together vs merged one by one: relative max error {err:.3e}");
    assert!(err <= 1e-5, "{err:.3e}");
}

#[test]
fn targets_that_match_nothing_are_an_error() {
    let cfg = LoraConfig { targets: "mid_block.*attn3.*".parse().unwrap(), ..Default::default() };
    let err = attach_lora(tiny_unet::<B>(), &cfg, &Default::default()).unwrap_err().to_string();
    assert!(err.contains("mid_block.*attn3.*") && err.contains("match no linear layer"), "{err}");

    let err = "attn1.(to_q".parse::<LoraTargets>().unwrap_err().to_string();
    assert!(err.contains("bad regex"), "{err}");
    assert_eq!("self-attn".parse::<LoraTargets>().unwrap(), LoraTargets::SelfAttn);
    assert_eq!("all-attn".parse::<LoraTargets>().unwrap(), LoraTargets::AllAttn);
    assert_eq!("kohya".parse::<LoraFormat>().unwrap(), LoraFormat::Kohya);
    assert!("lycoris".parse::<LoraFormat>().is_err());
}

#[test]
fn lora_files_that_do_not_fit_the_unet_are_errors_naming_the_key() {
    let lora = attach_lora(tiny_unet::<B>(), &small_config(4, 4.0, 7), &Default::default()).unwrap();
    let file = temp_path("misfit.safetensors");
    save_unet_lora(&lora, &file, LoraFormat::Peft).unwrap();
    let stored = TensorFile::read(&file).unwrap();
    let rewrite = |edit: &dyn Fn(&str, TensorData) -> (String, TensorData)| {
        let tensors: Vec<(String, TensorData)> =
            stored.names().map(|name| edit(name, stored.get(name).unwrap().clone())).collect();
        let named: Vec<(&str, TensorData)> = tensors.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        write_tensor_file(&file, &named).unwrap();
        match load_unet_lora(tiny_unet::<B>(), &file, 1.0) {
            Ok(_) => panic!("loading should fail"),
            Err(e) => e.to_string(),
        }
    };

    // a down weight one column too wide
    let key = "unet.up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_k.lora_A.weight";
    let err = rewrite(&|name, data| {
        if name == key {
            (name.to_string(), TensorData::zeros::<f32, _>([4, 17]))
        } else {
            (name.to_string(), data)
        }
    });
    assert!(err.contains(key) && err.contains("[4, 17]"), "{err}");

    // a layer the UNet does not have
    let err = rewrite(&|name, data| (name.replace("up_blocks.1.", "up_blocks.7."), data));
    assert!(err.contains("up_blocks.7.") && err.contains("no linear or convolution layer"), "{err}");

    // text-encoder entries, with no text encoder loaded
    let err = rewrite(&|name, data| (name.replacen("unet.", "text_encoder.", 1), data));
    assert!(
        err.contains("text_encoder.") && err.contains("text encoder, which this command does not load"),
        "{err}"
    );

    // an entry of no layout diffusers reads (DoRA's magnitude vector) is named, not skipped
    let err = rewrite(&|name, data| (name.replace("lora_B.weight", "lora_magnitude_vector"), data));
    assert!(err.contains("lora_magnitude_vector") && err.contains("unexpected key"), "{err}");

    // a down weight without its up weight
    let err = rewrite(&|name, data| (name.replace("lora_B.weight", "lora_B.weigh"), data));
    assert!(err.contains("unexpected key") && err.contains("lora_B.weigh`"), "{err}");
}

/// Kohya names are matched against the UNet's own layers; one that matches none is an error naming
/// it, and a convolution's LoRA (merged into the weights as it loads) cannot go into a UNet whose
/// base weights were never loaded (the LoRA export), where merging would mean nothing.
#[test]
fn kohya_names_of_no_layer_and_conv_entries_without_weights_are_errors() {
    let file = temp_path("kohya-errors.safetensors");
    let write = |name: &str, down: TensorData, up: TensorData| {
        let down_key = format!("{name}.lora_down.weight");
        let up_key = format!("{name}.lora_up.weight");
        write_tensor_file(&file, &[(down_key.as_str(), down), (up_key.as_str(), up)]).unwrap();
    };
    write(
        "lora_unet_down_blocks_9_attentions_0_proj_in",
        TensorData::zeros::<f32, _>([2, 16]),
        TensorData::zeros::<f32, _>([16, 2]),
    );
    let err = load_unet_lora(tiny_unet::<B>(), &file, 1.0).unwrap_err().to_string();
    assert!(
        err.contains("lora_unet_down_blocks_9_attentions_0_proj_in") && err.contains("matches no"),
        "{err}"
    );

    // conv_in of the tiny UNet: [c_out, 4, 3, 3]
    let unet = tiny_unet::<B>();
    let [c_out, c_in, kh, kw] = unet.conv_in.weight.shape().dims();
    write(
        "lora_unet_conv_in",
        TensorData::zeros::<f32, _>([2, c_in, kh, kw]),
        TensorData::zeros::<f32, _>([c_out, 2, 1, 1]),
    );
    assert!(load_unet_lora(unet, &file, 1.0).is_ok(), "a loaded UNet takes the conv's delta");
    let path = fixtures().join("models/sd1-tiny/unet/config.json");
    let layout = duo_core::models::UNet2DConditionConfig::from_file(&path).unwrap().layout(&path).unwrap();
    let unloaded = layout.init::<B>(&Default::default());
    let err = load_unet_lora(unloaded, &file, 1.0).unwrap_err().to_string();
    assert!(err.contains("lora_unet_conv_in") && err.contains("--format merged"), "{err}");
}
