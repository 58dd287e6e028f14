"""Encode side of fastfetch: image MDS → precomputed VAE latents + text embeddings (MDS).

`encode/run.py` is the torchrun entry point; `encode.loader.build_streaming_latents_dataloader`
reads its output for training.
"""

__version__ = "0.1.0"
