"""The VAE and the text encoders, loaded from hub ids or local folders, and the batched encode step.

A hub id and a local folder take the same path (`from_pretrained` / open_clip's schemas), so the
tests' tiny local models exercise exactly what a user's `stabilityai/...` id does.
Tokenizers are separate picklable callables because they run in DataLoader workers, while the
encoders run on the device in the main process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TEXT_KINDS = ("openclip", "hf-clip", "t5")


class ModelLoadError(ValueError):
    """A model id or folder the user gave cannot be loaded; the message says what to do."""


def _from_pretrained(cls, name: str, subfolder: str | None, **kwargs):
    """Load `cls` from `name/subfolder` (SD-style repos) or, failing that, from `name` itself.

    Trying the subfolder first lets one flag accept both a pipeline repo such as
    stabilityai/stable-diffusion-xl-base-1.0 and a bare model repo or folder.
    """
    if os.path.isdir(name):  # a local folder shows its layout; a hub id has to be tried
        subs: list[str | None] = [subfolder] if subfolder and os.path.isdir(os.path.join(name, subfolder)) else [None]
    else:
        subs = ([subfolder] if subfolder else []) + [None]
    errors = []
    for sub in subs:
        try:
            return cls.from_pretrained(name, **({"subfolder": sub} if sub else {}), **kwargs)
        except (OSError, ValueError) as e:
            errors.append(f"{'/'.join(p for p in (name, sub) if p)}: {e}")
    hint = (
        "the folder has no model files"
        if os.path.isdir(name)
        else "check the id, log in with HF_TOKEN for gated repos, or unset HF_HUB_OFFLINE"
    )
    raise ModelLoadError(f"cannot load {cls.__name__} from {name!r} ({hint}):\n  " + "\n  ".join(errors))


# --------------------------------------------------------------------------- VAE


def load_vae(name: str, subfolder: str | None = None):
    """diffusers AutoencoderKL from a hub id or folder; `subfolder=None` tries `vae/` then the root."""
    from diffusers import AutoencoderKL

    if subfolder:
        try:
            vae = AutoencoderKL.from_pretrained(name, subfolder=subfolder, low_cpu_mem_usage=False)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load the VAE from {name!r} subfolder {subfolder!r}: {e}") from e
    else:
        vae = _from_pretrained(AutoencoderKL, name, "vae", low_cpu_mem_usage=False)  # no accelerate needed
    return vae.eval().requires_grad_(False)


def latent_shape(vae, resolution: int) -> tuple[int, int, int]:
    """[C, H, W] of one latent: the encoder halves the size once per extra block."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution % factor:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE's downsampling {factor}")
    return (vae.config.latent_channels, resolution // factor, resolution // factor)


# --------------------------------------------------------------------------- text encoders


@dataclass(frozen=True)
class TextSpec:
    """`--text-encoder KIND:NAME`, e.g. `openclip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378`."""

    kind: str
    name: str

    @classmethod
    def parse(cls, value: str) -> "TextSpec":
        kind, sep, name = value.partition(":")
        if not sep or kind not in TEXT_KINDS or not name:
            raise ValueError(f"--text-encoder {value!r}: expected one of {', '.join(k + ':<id or path>' for k in TEXT_KINDS)}")
        return cls(kind, name)

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"


class Tokenize:
    """Caption → (token ids [L], attention mask [L]); picklable so DataLoader workers can run it."""

    def __init__(self, tokenizer, max_length: int, open_clip_style: bool):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.open_clip_style = open_clip_style

    def __call__(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.open_clip_style:  # SimpleTokenizer pads with 0 and always fills context_length
            ids = self.tokenizer([caption])[0].long()
            return ids, (ids != 0).long()
        enc = self.tokenizer(caption, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt")
        return enc.input_ids[0].long(), enc.attention_mask[0].long()


class OpenClipText(nn.Module):
    """Per-token features of an open_clip text transformer after its final LayerNorm ([L, width]).

    This is `CLIP.encode_text` without the pooling and projection, i.e. what diffusion models
    condition on; the vision tower is dropped to save memory.
    """

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)  # type: ignore[arg-type]

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # open_clip's submodules are untyped to mypy (attributes of an nn.Module)
        x = self.token_embedding(ids) + self.positional_embedding  # type: ignore[operator]
        return self.ln_final(self.transformer(x, attn_mask=self.attn_mask))  # type: ignore[operator]


class HFText(nn.Module):
    """Last hidden state of a transformers text encoder (CLIPTextModel without mask, as SD does;
    T5EncoderModel with the attention mask, as PixArt/DeepFloyd do)."""

    def __init__(self, model: nn.Module, use_mask: bool):
        super().__init__()
        self.model = model
        self.use_mask = use_mask

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask if self.use_mask else None).last_hidden_state


@dataclass
class TextEncoder:
    """An encoder module, its worker-side tokenizer and the shape of one caption's features."""

    module: nn.Module
    tokenize: Tokenize
    seq_len: int
    dim: int


def _open_clip_name(name: str) -> tuple[str, str | None]:
    """(model name, pretrained tag) for open_clip.

    `hf-hub:<repo>` and `local-dir:<folder>` carry their weights; a plain folder means
    `local-dir:`; a built-in architecture needs `@<tag>` (e.g. `ViT-H-14-378-quickgelu@dfn5b`),
    because without one open_clip silently builds random weights.
    """
    if os.path.isdir(name):
        return f"local-dir:{os.path.abspath(name)}", None
    if name.startswith(("hf-hub:", "local-dir:")):
        return name, None
    arch, sep, tag = name.partition("@")
    if not sep or not tag:
        raise ModelLoadError(
            f"openclip:{name}: give weights as hf-hub:<repo>, a folder, or <architecture>@<tag> "
            "(open_clip.list_pretrained() lists the tags)"
        )
    return arch, tag


def load_text_encoder(spec: TextSpec, max_length: int, dtype: torch.dtype) -> TextEncoder:
    """Load the text encoder named by `spec`; weights are kept in `dtype` (`--text-dtype`: fp32 by
    default, as the micro-budget precompute runs it; bf16 halves a T5-XXL's 19 GB)."""
    if spec.kind == "openclip":
        import open_clip

        name, tag = _open_clip_name(spec.name)
        try:
            clip = open_clip.create_model(name, pretrained=tag, precision="fp32")
            tokenizer = open_clip.get_tokenizer(name)
        except (OSError, RuntimeError, ValueError) as e:
            raise ModelLoadError(
                f"cannot load open_clip model {spec.name!r}: {e}\n  use hf-hub:<repo>, <architecture>@<tag>,"
                " or a folder with open_clip_config.json and open_clip_model.safetensors"
            ) from e
        if not hasattr(clip, "token_embedding"):
            raise ModelLoadError(f"{spec.name!r} has a Hugging Face text tower; use hf-clip: or t5: for it")
        module: nn.Module = OpenClipText(clip)
        seq_len, dim = int(clip.positional_embedding.shape[0]), int(clip.transformer.width)
        tokenize = Tokenize(tokenizer, seq_len, open_clip_style=True)
    else:
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        is_t5 = spec.kind == "t5"
        tokenizer = _from_pretrained(AutoTokenizer, spec.name, "tokenizer")
        model = _from_pretrained(T5EncoderModel if is_t5 else CLIPTextModel, spec.name, "text_encoder")
        module = HFText(model, use_mask=is_t5)
        # CLIP's position embeddings fix the length; T5 takes --max-length.
        seq_len = max_length if is_t5 else int(model.config.max_position_embeddings)
        dim = int(model.config.d_model if is_t5 else model.config.hidden_size)
        tokenize = Tokenize(tokenizer, seq_len, open_clip_style=False)
    module = module.to(dtype).eval().requires_grad_(False)
    return TextEncoder(module, tokenize, seq_len, dim)


# --------------------------------------------------------------------------- encode step


class Encoder:
    """One batch on the device: VAE latents per resolution and caption features, as float16.

    The VAE runs under autocast in `dtype`, the text encoder under its own `text_dtype` (no
    autocast for fp32: the micro-budget precompute's text encoder overrides the outer bf16
    autocast with its own fp32 one, so fp32 is what reproduces its embeddings).
    Batches are padded to a fixed size so that a compiled graph (and cuDNN's autotuner) sees one
    shape; the padding rows are dropped again before returning.
    """

    def __init__(
        self,
        vae,
        text: TextEncoder,
        *,
        device: torch.device,
        dtype: torch.dtype,
        batch_size: int,
        latent_mode: str,
        compile: bool,
        channels_last: bool = True,
        text_dtype: torch.dtype = torch.float32,
    ):
        self.device, self.dtype, self.batch_size, self.latent_mode = device, dtype, batch_size, latent_mode
        self.text_dtype = text_dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.scaling = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.vae = vae.to(device, memory_format=self.memory_format)
        self.text = text.module.to(device)
        if compile:
            self.vae.encoder.compile()
            self.text.compile()

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        missing = self.batch_size - x.shape[0]
        return torch.cat([x, x[-1:].expand(missing, *x.shape[1:])]) if missing > 0 else x

    def _to_device(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        # Copy first (from pinned memory on CUDA), pad on the device: padding on the host would
        # make a pageable tensor and turn the copy synchronous.
        return self._pad(x.to(self.device, non_blocking=True, **kwargs))

    @torch.inference_mode()
    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        """Device tensors: `latents_<res>` [B,C,h,w] fp16, `caption_latents` [B,L,D] fp16, `finite` [B]."""
        n = len(batch["key"])
        out: dict[str, torch.Tensor] = {}
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            for res, images in batch["images"].items():
                x = self._to_device(images, memory_format=self.memory_format)
                x = x.to(torch.float32).div_(127.5).sub_(1.0)  # uint8 travels, [-1, 1] is made here
                dist = self.vae.encode(x).latent_dist
                z = dist.mean.float()
                if self.latent_mode == "sample":
                    z = z + dist.std.float() * self._to_device(batch["noise"][res])
                out[f"latents_{res}"] = ((z - self.shift) * self.scaling)[:n].to(torch.float16)
        feats = encode_text(self.text, self._to_device(batch["ids"]), self._to_device(batch["mask"]), self.text_dtype)
        out["caption_latents"] = feats[:n]
        out["finite"] = torch.stack([torch.isfinite(t).flatten(1).all(1) for t in out.values()]).all(0)
        return out


def encode_text(module: nn.Module, ids: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Caption features as stored (float16), computed under autocast in `dtype` (none for fp32);
    the module's weights are expected in `dtype` already (`load_text_encoder`)."""
    with torch.inference_mode(), torch.autocast(ids.device.type, dtype=dtype, enabled=dtype != torch.float32):
        return module(ids, mask).to(torch.float16)


def describe(vae, vae_name: str, text: TextEncoder, spec: TextSpec, text_dtype: str) -> dict:
    """Model facts for the sidecar JSON, so that a loader never guesses shapes or scaling (and
    never mixes embeddings of one text encoder run at different precisions)."""
    return {
        "vae": vae_name,
        "vae_class": type(vae).__name__,
        "scaling_factor": float(vae.config.scaling_factor),
        "shift_factor": getattr(vae.config, "shift_factor", None),
        "text_encoder": str(spec),
        "text_dtype": text_dtype,
        "caption_latents_shape": [text.seq_len, text.dim],
    }
