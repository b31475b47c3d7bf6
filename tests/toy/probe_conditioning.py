"""How much a toy model's prompt changes its noise prediction: a cheap early sign of prompt following
while pretraining, long before `duo-bench quality` can pass anything. Not run in CI.

    python tests/toy/probe_conditioning.py MODEL_DIR

MODEL_DIR is a diffusers folder, e.g. one exported by `duo-train pretrain --resume RUN --snapshot`.
Prints the mean abs difference between the text embeddings of two prompts, and, at four timesteps,
between the UNet's ε for "a red cross" and "a blue circle" and between "a red cross" and "" (all on
the same noisy latents), next to the mean |ε|. A model that ignores its prompt gives ≈ 0.
"""

import sys

import torch
from diffusers import StableDiffusionPipeline


def main(folder):
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, torch_dtype=torch.float32)
    prompts = ["a red cross", "a blue circle", ""]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    size = pipe.unet.config.sample_size
    with torch.no_grad():
        text = pipe.text_encoder(ids.input_ids)[0]
        print(f"text embeddings: cross vs circle {(text[0] - text[1]).abs().mean():.4f}, "
              f"cross vs empty {(text[0] - text[2]).abs().mean():.4f}")
        torch.manual_seed(0)
        latents = torch.randn(1, pipe.unet.config.in_channels, size, size).repeat(3, 1, 1, 1)
        for t in [999, 700, 400, 100]:
            eps = pipe.unet(latents, torch.tensor([t] * 3), encoder_hidden_states=text).sample
            print(f"t={t:4d}: ε cross vs circle {(eps[0] - eps[1]).abs().mean():.4f}, "
                  f"cross vs empty {(eps[0] - eps[2]).abs().mean():.4f}, |ε| {eps.abs().mean():.3f}")


if __name__ == "__main__":
    main(sys.argv[1])
