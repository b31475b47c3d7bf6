#!/usr/bin/env python3
"""PyTorch + diffusers reference for `duo-bench perf --compare`: the same measurements on the same
config, random weights. Not run in CI; needs torch and diffusers
(docs/reference-stack.md).

Prints nothing but errors; writes a JSON object with unet_forward_ms, unet_forward_backward_ms,
peak_rss_mib (CPU), sampling_images_per_s, unet_parameters. With --duo-step (needs peft): the time
of one DUO training step as the authors' train/unlearn-sd.py runs it (duo_step_ms)."""
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


def peak_rss_mib():
    """This process's peak resident memory. VmHWM belongs to the process image, so unlike
    getrusage's ru_maxrss it does not inherit the peak of the (Rust) process that spawned us."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


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
    p.add_argument("--duo-step", action="store_true")
    p.add_argument("--gradient-checkpointing", action="store_true")
    a = p.parse_args()
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    torch.manual_seed(0)

    config = UNet2DConditionModel.load_config(f"{a.model}/unet")
    unet = UNet2DConditionModel.from_config(config).to(a.device, dtype)
    n_params = sum(p.numel() for p in unet.parameters())
    if a.duo_step:
        return duo_step(a, unet, n_params, dtype)
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
        peak = peak_rss_mib()

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


def duo_step(a, unet, n_params, dtype):
    """One DUO step (docs/duo-algorithm.md §2): LoRA r32/α32 on the self-attention projections, b pairs
    → a UNet batch [x⁻ ; x⁺ ; ε] through the policy and, adapters disabled and without grad, the
    reference; the loss; backward; global clipping; AdamW."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=32,
            lora_alpha=32,
            init_lora_weights="gaussian",
            target_modules=["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"],
        )
    )
    if a.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # LoRA trains in fp32, as the authors'
    n_lora = sum(p.numel() for p in params)
    beta, lr, lam = 500.0, 3e-4 * 100 / 500.0, 1e6 * 500.0 / 100
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    b, s = a.batch, a.latent_size
    c, d = unet.config.in_channels, unet.config.cross_attention_dim
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    def step():
        x = torch.randn(3 * b, c, s, s, device=a.device, dtype=dtype)
        t = torch.tensor([250.0, 500.0, 999.0] * b, device=a.device)
        ctx = torch.randn(3 * b, 77, d, device=a.device, dtype=dtype)
        loser = torch.randn(b, c, s, s, device=a.device)
        winner = torch.randn(b, c, s, s, device=a.device)
        with torch.no_grad():
            unet.disable_adapters()
            ref = unet(x, t, ctx).sample.float()
            unet.enable_adapters()
        pred = unet(x, t, ctx).sample.float()
        mse = lambda p, y: (p - y).pow(2).mean(dim=(1, 2, 3))
        loser_gap = mse(pred[:b], loser) - mse(ref[:b], loser)
        winner_gap = mse(pred[b : 2 * b], winner) - mse(ref[b : 2 * b], winner)
        dpo = -torch.nn.functional.logsigmoid(-beta * (winner_gap - loser_gap)).mean()
        prior = (pred[2 * b :] - ref[2 * b :]).pow(2).mean()
        (dpo + lam * prior).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    ms = timed(step, a.iters, a.device)
    result = {
        "implementation": f"PyTorch {torch.__version__} + diffusers + peft",
        "unet_parameters": n_params,
        "lora_parameters": n_lora,
        "duo_step_ms": ms,
    }
    if a.device.startswith("cuda"):
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_rss_mib"] = peak_rss_mib()
    with open(a.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
