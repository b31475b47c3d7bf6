#!/usr/bin/env python3
"""Checks that diffusers reads our single-file (original LDM layout) export as we meant it: loads the file
written by our exporter with `StableDiffusionPipeline.from_single_file(FILE, config=FOLDER, local_files_only=True)`
and compares the UNet's, the text encoder's and the VAE's outputs on fixed seeded inputs with the diffusers
folder FOLDER loaded by `from_pretrained` (or, with --merged, with FOLDER's UNet carrying the weights of a
merged diffusers UNet file, as `duo-train export --format merged` writes when a LoRA is folded in).
Prints relative max errors (max |got - want| / max |want|) and exits 1 above --tol (default 1e-5).
Not run in CI (needs torch, diffusers, transformers, safetensors). Runs offline on the CPU in float32.

    python tests/single_file/check_diffusers.py --file export.safetensors --config tests/fixtures/models/sd1-tiny
    python tests/single_file/check_diffusers.py --file export.safetensors --config DIR --merged merged-unet.safetensors

FOLDER must be the diffusers pipeline folder the export was made from (or one with the same configs and, for
the reference, the same weights): diffusers builds the models from its configs, its scheduler and tokenizer.
A .ckpt export works too (diffusers loads it with torch.load(weights_only=True)). An f16 export gives errors
around 1e-3: pass e.g. --tol 1e-2.
"""
import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.utils import logging as dlogging  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import CLIPTextModel  # noqa: E402
from transformers.utils import logging as tlogging  # noqa: E402


def rel_err(got, want):
    den = want.abs().max().item()
    return (got - want).abs().max().item() / (den if den > 0 else 1.0)


def file_keys(path):
    if str(path).endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            return list(f.keys())
    sd = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    return list(sd)


def param_report(name, got, want, limit=5):
    """Worst parameters (after casting to f32) between the loaded and the reference model, for diagnosis."""
    g, w = got.state_dict(), want.state_dict()
    if set(g) != set(w):
        print(f"  {name}: parameter names differ: only loaded {sorted(set(g) - set(w))[:limit]}, "
              f"only reference {sorted(set(w) - set(g))[:limit]}")
    diffs = sorted(((rel_err(g[k].float(), w[k].float()), k) for k in set(g) & set(w)
                    if g[k].shape == w[k].shape), reverse=True)
    bad = [(e, k) for e, k in diffs if e > 0]
    print(f"  {name}: {len(bad)} of {len(w)} parameters differ" +
          (f"; worst: {', '.join(f'{k} {e:.2e}' for e, k in bad[:limit])}" if bad else ""))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--file", required=True, help="our single-file export (.safetensors or .ckpt)")
    p.add_argument("--config", required=True, help="the diffusers pipeline folder the export was made from")
    p.add_argument("--merged", "--lora-merged-unet", dest="merged",
                   help="a merged UNet in diffusers names (duo-train export --format merged): the UNet reference")
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--latent-size", type=int, help="UNet input height/width (default: min(sample_size, 32))")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    dlogging.disable_progress_bar()
    tlogging.disable_progress_bar()
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    f32 = torch.float32

    try:
        pipe = StableDiffusionPipeline.from_single_file(a.file, config=a.config, local_files_only=True, torch_dtype=f32)
    except Exception as e:  # noqa: BLE001
        hints = []
        keys = file_keys(a.file)
        for prefix, what in (("model.diffusion_model.", "UNet"), ("first_stage_model.", "VAE"),
                             ("cond_stage_model.", "text encoder")):
            if not any(k.startswith(prefix) for k in keys):
                hints.append(f"the file has no {what} ({prefix}*); diffusers needs all three networks in it")
        if "meta tensor" in str(e):
            hints.append("'meta tensor' means a parameter got no value: a model.diffusion_model.* key is missing")
        raise SystemExit(f"diffusers could not load {a.file} with config={a.config}: {type(e).__name__}: {e}" +
                         "".join(f"\nhint: {h}" for h in hints))
    unet = UNet2DConditionModel.from_pretrained(a.config, subfolder="unet", torch_dtype=f32, local_files_only=True)
    vae = AutoencoderKL.from_pretrained(a.config, subfolder="vae", torch_dtype=f32, local_files_only=True)
    text = CLIPTextModel.from_pretrained(a.config, subfolder="text_encoder", torch_dtype=f32, local_files_only=True)
    base_unet = None
    if a.merged:
        base_unet = unet
        unet = UNet2DConditionModel.from_pretrained(a.config, subfolder="unet", torch_dtype=f32, local_files_only=True)
        unet.load_state_dict(load_file(a.merged), strict=True)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder, unet, vae, text):
        m.eval()
    print(f"loaded {a.file}: unet {pipe.unet.dtype}, vae {pipe.vae.dtype}, text_encoder {pipe.text_encoder.dtype}, "
          f"scheduler {type(pipe.scheduler).__name__}")

    g = torch.Generator().manual_seed(a.seed)
    uc = unet.config
    s = a.latent_size or min(uc.sample_size, 32)
    x = torch.randn((2, uc.in_channels, s, s), generator=g)
    t = torch.tensor([10.0, 700.0])
    ctx = torch.randn((2, 77, uc.cross_attention_dim), generator=g)
    tc = text.config
    ids = torch.randint(0, tc.vocab_size, (2, tc.max_position_embeddings), generator=g)
    vc = vae.config
    z = torch.randn((1, vc.latent_channels, 8, 8), generator=g)
    h = 8 * 2 ** (len(vc.block_out_channels) - 1)  # an image whose latent is 8x8
    img = torch.rand((1, vc.in_channels, h, h), generator=g) * 2 - 1

    results = []
    with torch.no_grad():
        want = unet(x, t, ctx).sample
        if base_unet is not None:
            base = base_unet(x, t, ctx).sample
            print(f"LoRA effect on the UNet output (relative max |merged - base|): {rel_err(want, base):.3e}")
        results.append(("unet output", rel_err(pipe.unet(x, t, ctx).sample, want), "unet", pipe.unet, unet))
        got, ref = pipe.text_encoder(ids), text(ids)
        results.append(("text_encoder last_hidden_state", rel_err(got.last_hidden_state, ref.last_hidden_state),
                        "text_encoder", pipe.text_encoder, text))
        results.append(("text_encoder pooler_output", rel_err(got.pooler_output, ref.pooler_output),
                        "text_encoder", pipe.text_encoder, text))
        results.append(("vae decode", rel_err(pipe.vae.decode(z).sample, vae.decode(z).sample), "vae", pipe.vae, vae))
        results.append(("vae encode (latent mean)", rel_err(pipe.vae.encode(img).latent_dist.mean,
                                                            vae.encode(img).latent_dist.mean), "vae", pipe.vae, vae))
    worst = 0.0
    reported = set()
    ref_name = f"merged UNet {a.merged}" if a.merged else f"{a.config}"
    for name, err, comp, got_m, want_m in results:
        print(f"{name}: from_single_file vs {ref_name if comp == 'unet' else a.config}, relative max error {err:.2e}")
        worst = max(worst, err)
        if err > a.tol and comp not in reported:
            reported.add(comp)
            param_report(comp, got_m, want_m)
    if worst > a.tol:
        raise SystemExit(f"mismatch: {worst:.2e} > {a.tol:.0e}")
    print(f"ok: worst relative max error {worst:.2e} <= {a.tol:.0e}")


if __name__ == "__main__":
    sys.exit(main())
