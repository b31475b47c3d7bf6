#!/usr/bin/env python3
"""Checks that an exported toy model folder (`duo-train pretrain`, e.g. models/toy) is a working
diffusers pipeline: `StableDiffusionPipeline.from_pretrained` loads it and generates, and our UNet
(`duo-bench forward`) gives diffusers' output on the same inputs. Not run in CI (needs torch and
diffusers: docs/reference-stack.md).

    python tests/toy/check_diffusers.py models/toy [path/to/duo-bench]
"""
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file, save_file


def main():
    folder = sys.argv[1]
    bench = sys.argv[2] if len(sys.argv) > 2 else "target/debug/duo-bench"
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    image = pipe(
        "a red cross", num_inference_steps=5, guidance_scale=7.5, generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    print(f"diffusers loaded {folder} and generated {image.shape}")

    torch.manual_seed(0)
    unet = pipe.unet
    x = torch.randn(2, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    t = torch.tensor([10.0, 700.0])
    ids = pipe.tokenizer(["a red cross", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        context = pipe.text_encoder(ids).last_hidden_state
        expected = unet(x, t, context).sample
    with tempfile.TemporaryDirectory() as tmp:
        inputs, out = Path(tmp, "in.safetensors"), Path(tmp, "out.safetensors")
        save_file({"sample": x, "timestep": t, "encoder_hidden_states": context.contiguous()}, str(inputs))
        subprocess.run(
            [bench, "forward", "--model", folder, "--component", "unet", "--inputs", str(inputs), "--out", str(out)],
            check=True,
        )
        ours = load_file(str(out))["out"]
    err = ((ours - expected).abs().max() / expected.abs().max()).item()
    print(f"UNet: relative max error of ours vs diffusers {err:.2e}")
    if err > 1e-5:
        raise SystemExit("mismatch")


if __name__ == "__main__":
    main()
