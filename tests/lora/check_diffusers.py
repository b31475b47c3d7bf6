#!/usr/bin/env python3
"""Checks that diffusers reads our LoRA files as we do: loads a PEFT (and a Kohya) file written by
`duo-train train`/`export` with `load_lora_weights`, and compares the UNet's output with the merged
UNet that `duo-train export --format merged` wrote. Not run in CI (needs torch, diffusers, peft).

    python tests/lora/check_diffusers.py --model DIR --peft lora.safetensors --kohya lora-kohya.safetensors \
        --merged merged.safetensors
"""
import argparse

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--peft", required=True)
    p.add_argument("--kohya")
    p.add_argument("--merged", required=True)
    a = p.parse_args()
    torch.manual_seed(0)

    merged = UNet2DConditionModel.from_pretrained(f"{a.model}/unet")
    merged.load_state_dict(load_file(a.merged))
    c, s, d = merged.config.in_channels, merged.config.sample_size, merged.config.cross_attention_dim
    x = torch.randn(2, c, s, s)
    t = torch.tensor([10.0, 700.0])
    ctx = torch.randn(2, 77, d)
    with torch.no_grad():
        expected = merged(x, t, ctx).sample
        base = UNet2DConditionModel.from_pretrained(f"{a.model}/unet")(x, t, ctx).sample
    print(f"LoRA effect on the output (max |merged - base|): {(expected - base).abs().max():.3e}")

    worst = 0.0
    for name, path in [("peft", a.peft), ("kohya", a.kohya)]:
        if path is None:
            continue
        pipe = StableDiffusionPipeline.from_pretrained(a.model, safety_checker=None, requires_safety_checker=False)
        pipe.load_lora_weights(path)
        with torch.no_grad():
            got = pipe.unet(x, t, ctx).sample
        err = ((got - expected).abs().max() / expected.abs().max()).item()
        worst = max(worst, err)
        print(f"{name}: diffusers load_lora_weights vs our merged UNet, relative max error {err:.2e}")
    if worst > 1e-5:
        raise SystemExit(f"mismatch: {worst:.2e}")


if __name__ == "__main__":
    main()
