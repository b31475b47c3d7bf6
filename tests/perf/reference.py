#!/usr/bin/env python3
"""PyTorch + diffusers reference for `duo-bench perf --compare`: the same measurements on the same
config, random weights. Not run in CI; needs torch and diffusers (see shared docs: offline-assets).

Prints nothing but errors; writes a JSON object with unet_forward_ms, unet_forward_backward_ms,
peak_rss_mib (CPU), sampling_images_per_s, unet_parameters."""
import argparse
import json
import resource
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel


def timed(fn, iters, device):
    fn()  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(max(iters, 1)):
        fn()
    sync(device)
    return (time.perf_counter() - start) * 1000.0 / max(iters, 1)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--latent-size", type=int, default=8)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--sample-steps", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="f32")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    torch.manual_seed(0)

    config = UNet2DConditionModel.load_config(f"{a.model}/unet")
    unet = UNet2DConditionModel.from_config(config).to(a.device, dtype)
    n_params = sum(p.numel() for p in unet.parameters())
    b, s = a.batch, a.latent_size
    c, d = unet.config.in_channels, unet.config.cross_attention_dim

    def inputs():
        x = torch.randn(b, c, s, s, device=a.device, dtype=dtype)
        t = torch.full((b,), 500.0, device=a.device)
        ctx = torch.randn(b, 77, d, device=a.device, dtype=dtype)
        return x, t, ctx

    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    def forward():
        with torch.no_grad():
            unet(*inputs()).sample

    def forward_backward():
        unet(*inputs()).sample.square().mean().backward()
        unet.zero_grad(set_to_none=True)

    fwd = timed(forward, a.iters, a.device)
    fwd_bwd = timed(forward_backward, a.iters, a.device)
    if a.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    images_per_s = None
    if a.sample_steps > 0:
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(f"{a.model}/vae")).to(a.device, dtype)
        with torch.no_grad():
            ctx = torch.randn(2, 77, d, device=a.device, dtype=dtype)
            latents = torch.randn(1, c, s, s, device=a.device, dtype=dtype)
            sync(a.device)
            start = time.perf_counter()
            for i in range(a.sample_steps):
                t = torch.full((2,), 999.0 - i, device=a.device)
                pred = unet(torch.cat([latents, latents]), t, ctx).sample
                latents = latents - pred[:1] * 0.01
            vae.decode(latents).sample.cpu()
            sync(a.device)
            images_per_s = 1.0 / (time.perf_counter() - start)

    with open(a.out, "w") as f:
        json.dump(
            {
                "implementation": f"PyTorch {torch.__version__} + diffusers",
                "unet_parameters": n_params,
                "unet_forward_ms": fwd,
                "unet_forward_backward_ms": fwd_bwd,
                "peak_rss_mib" if not a.device.startswith("cuda") else "peak_gpu_mib": peak,
                "sampling_images_per_s": images_per_s,
            },
            f,
        )


if __name__ == "__main__":
    main()
