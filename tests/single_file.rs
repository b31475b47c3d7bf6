//! Single-file checkpoints in the original LDM layout: the tiny pipelines converted by
//! `tests/fixtures/generate_single_file.py` (diffusers' `from_single_file` loads each back to the
//! folder's weights bit for bit) load to the same weights here, and our export writes exactly the keys
//! and shapes diffusers reads.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::store::ModuleSnapshot;
use burn::tensor::{DType, TensorData};
use common::{B, fixtures};
use duo_core::ModelFolder;
use duo_core::single_file::save_single_file;
use duo_core::tensor_file::TensorFile;

fn single_file(name: &str) -> PathBuf {
    fixtures().join("single_file").join(name)
}

fn folder(name: &str) -> ModelFolder {
    ModelFolder::open(fixtures().join("models").join(name)).unwrap()
}

/// Every parameter of a module, by path, as f32.
fn params<M: Module<B> + ModuleSnapshot<B>>(module: &M) -> BTreeMap<String, TensorData> {
    module
        .collect(None, None, false)
        .into_iter()
        .map(|s| (s.full_path(), s.to_data().unwrap().convert::<f32>()))
        .collect()
}

/// The three networks of `file` (read with `model`'s configs) against the folder's, parameter by
/// parameter; `round` maps the folder's values first (f16 rounding for an f16 file).
fn assert_same_networks(file: &Path, model: &str, round: impl Fn(TensorData) -> TensorData) {
    let ours = ModelFolder::open_single_file(file, Some(&fixtures().join("models").join(model)))
        .unwrap_or_else(|e| panic!("{e}"));
    let theirs = folder(model);
    let device = Default::default();
    let pairs = [
        (params(&ours.unet::<B>(&device).unwrap()), params(&theirs.unet::<B>(&device).unwrap()), "unet"),
        (params(&ours.vae::<B>(&device).unwrap()), params(&theirs.vae::<B>(&device).unwrap()), "vae"),
        (
            params(&ours.text_encoder::<B>(&device).unwrap()),
            params(&theirs.text_encoder::<B>(&device).unwrap()),
            "text encoder",
        ),
    ];
    for (ours, theirs, network) in pairs {
        assert_eq!(ours.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>(), "{network}");
        for (path, value) in &ours {
            assert_eq!(value, &round(theirs[path].clone()), "{}: {network} `{path}`", file.display());
        }
        println!("{}: {network}, {} parameters equal", file.display(), ours.len());
    }
}

#[test]
fn sd1_checkpoints_load_to_the_folders_weights() {
    assert_same_networks(&single_file("sd1-tiny.safetensors"), "sd1-tiny", |d| d);
}

#[test]
fn sd2_checkpoints_load_to_the_folders_weights() {
    // OpenCLIP's fused q/k/v split, its layers past the config's count ignored
    assert_same_networks(&single_file("sd2-tiny.safetensors"), "sd2-tiny", |d| d);
    // a PyTorch pickle wrapped in `state_dict`, read without running pickled code
    assert_same_networks(&single_file("sd2-tiny.ckpt"), "sd2-tiny", |d| d);
    // f16 weights load as the f32 model asks, their values those of the f16 file
    let to_f16 = |d: TensorData| d.convert_dtype(DType::F16).convert::<f32>();
    assert_same_networks(&single_file("sd2-tiny-fp16.safetensors"), "sd2-tiny", to_f16);
    // EMA copies, schedule buffers, `text_projection`, `logit_scale` and a surplus block: ignored, as
    // diffusers ignores them
    assert_same_networks(&single_file("sd2-tiny-extras.safetensors"), "sd2-tiny", |d| d);
}

#[test]
fn checkpoints_that_do_not_fit_are_errors_naming_the_file() {
    // SD 2.x has no default configs
    let err = ModelFolder::open(single_file("sd2-tiny.safetensors")).unwrap_err().to_string();
    assert!(err.contains("sd2-tiny.safetensors") && err.contains("--config DIR"), "{err}");
    // configs of another size: the key that has no place is named
    let sd1_configs = fixtures().join("models/sd2-tiny");
    let folder =
        ModelFolder::open_single_file(&single_file("sd1-tiny.safetensors"), Some(&sd1_configs)).unwrap();
    let err = folder.unet::<B>(&Default::default()).unwrap_err().to_string();
    assert!(
        err.contains("sd1-tiny.safetensors") && err.contains("configs in") && err.contains("--config DIR"),
        "{err}"
    );
    // configs given with a folder
    let err =
        ModelFolder::open_single_file(&fixtures().join("models/sd1-tiny"), Some(&sd1_configs)).unwrap_err();
    assert!(err.to_string().contains("is a model folder"), "{err}");
    // not a checkpoint at all
    let err =
        ModelFolder::open(fixtures().join("lora/sd1-tiny/peft-meta.safetensors")).unwrap_err().to_string();
    assert!(
        err.contains("peft-meta.safetensors") && err.contains("not a Stable Diffusion single-file"),
        "{err}"
    );
}

/// Our export writes exactly the LDM keys and shapes of the fixture's key table (the layout
/// diffusers' `from_single_file` reads), and reads back to the same weights.
#[test]
fn export_writes_the_layout_diffusers_reads() {
    for (model, table) in [("sd1-tiny", "keys-sd1.json"), ("sd2-tiny", "keys-sd2.json")] {
        let f = folder(model);
        let device = Default::default();
        let out =
            std::env::temp_dir().join(format!("duo-single-file-{}-{model}.safetensors", std::process::id()));
        save_single_file(
            &out,
            &f.unet::<B>(&device).unwrap(),
            &f.vae::<B>(&device).unwrap(),
            &f.text_encoder::<B>(&device).unwrap(),
            &f.unet_layout().unwrap(),
            &f.vae_config().unwrap(),
            &f.text_encoder_config().unwrap(),
            DType::F32,
        )
        .unwrap();
        let written = TensorFile::read(&out).unwrap();
        let rows: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(single_file(table)).unwrap()).unwrap();
        // the position ids are a transformers buffer, not a weight: diffusers does not need them
        let expected: BTreeMap<String, Vec<usize>> = rows
            .iter()
            .filter(|row| !row[0].as_str().unwrap().ends_with("position_ids"))
            .map(|row| {
                let shape = row[3].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
                (row[0].as_str().unwrap().to_string(), shape)
            })
            .collect();
        let ours: BTreeMap<String, Vec<usize>> =
            written.names().map(|k| (k.to_string(), written.get(k).unwrap().shape.to_vec())).collect();
        assert_eq!(ours, expected, "{model}: keys and shapes of the export");
        assert_same_networks(&out, model, |d| d);
    }
}

/// Every float parameter's path (our field path) and shape, read lazily: nothing is allocated, so
/// SD 1.4's networks are walked without their weights.
fn lazy_params<M: Module<B>>(module: &M) -> BTreeMap<String, Vec<usize>> {
    struct Paths {
        stack: Vec<String>,
        out: BTreeMap<String, Vec<usize>>,
    }
    impl burn::module::ModuleVisitor<B> for Paths {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.stack.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<burn::tensor::Tensor<B, D>>) {
            self.out.insert(self.stack.join("."), param.lazy_shape().dims::<D>().to_vec());
        }
    }
    let mut paths = Paths { stack: Vec::new(), out: BTreeMap::new() };
    module.visit(&mut paths);
    paths.out
}

/// A real SD 1.x checkpoint's key set (names and shapes: `single_file/sd15-ldm-keys.txt`) converts
/// completely with SD 1.4's configs: every key lands on a parameter of the shape it has (the VAE
/// attention's 1×1 convs as linear weights, PyTorch's [out, in] as our [in, out]), and every
/// parameter is filled.
#[test]
fn a_real_sd1_checkpoint_key_set_converts_completely() {
    use duo_core::single_file::{
        CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, is_vae_attention_weight, unet_table, vae_table,
    };
    let configs =
        ModelFolder::open(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/sd-v1-4-configs"))
            .unwrap();
    let device = Default::default();
    let layout = configs.unet_layout().unwrap();
    let vae_config = configs.vae_config().unwrap();
    let networks = [
        ("unet", lazy_params(&layout.init::<B>(&device))),
        ("vae", lazy_params(&vae_config.init::<B>(&device))),
        ("text_encoder", lazy_params(&configs.text_encoder_config().unwrap().init::<B>(&device))),
    ];
    // our field path of a diffusers key (the UNet's feed-forward is renamed; linear weights transposed)
    let field = |network: &str, key: &str| match network {
        "unet" => key.replace(".ff.net.0.proj.", ".ff.proj_in.").replace(".ff.net.2.", ".ff.proj_out."),
        _ => key.to_string(),
    };
    let (unet, vae) = (unet_table(&layout), vae_table(&vae_config));
    let mut filled: Vec<std::collections::BTreeSet<String>> = vec![Default::default(); 3];
    let text = std::fs::read_to_string(single_file("sd15-ldm-keys.txt")).unwrap();
    let rows: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(rows.len(), 686 + 248 + 197, "the file's key count");
    for row in rows {
        let (key, shape) = row.split_once(' ').unwrap();
        let shape: Vec<usize> = shape
            .trim_matches(['[', ']'])
            .split(',')
            .filter(|d| !d.is_empty())
            .map(|d| d.parse().unwrap())
            .collect();
        let (n, diffusers) = if let Some(k) = key.strip_prefix(UNET_PREFIX) {
            (0, unet.to_diffusers(k))
        } else if let Some(k) = key.strip_prefix(VAE_PREFIX) {
            (1, vae.to_diffusers(k))
        } else if let Some(k) = key.strip_prefix(CLIP_PREFIX) {
            if k.ends_with("position_ids") {
                continue;
            }
            (2, Some(k.to_string()))
        } else {
            panic!("{key}: no network");
        };
        let diffusers = diffusers.unwrap_or_else(|| panic!("`{key}` has no diffusers key"));
        let (name, params) = &networks[n];
        let path = field(name, &diffusers);
        let ours =
            params.get(&path).unwrap_or_else(|| panic!("`{key}` → `{diffusers}`: no such {name} parameter"));
        let mut expected = shape.clone();
        if n == 1 && is_vae_attention_weight(&diffusers) {
            expected.truncate(2);
        }
        if expected.len() == 2 && path.ends_with("weight") && !path.ends_with("embedding.weight") {
            expected.reverse(); // our Linear stores [in, out]
        }
        assert_eq!(ours, &expected, "`{key}` → {name} `{path}`");
        filled[n].insert(path);
    }
    for (n, (name, params)) in networks.iter().enumerate() {
        let missing: Vec<&String> = params.keys().filter(|p| !filled[n].contains(*p)).collect();
        assert!(missing.is_empty(), "{name} parameters no key fills: {missing:?}");
    }
}
