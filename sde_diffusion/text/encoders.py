r"""Text encoders behind one interface: ``encoder.encode(prompts) -> (context [B, L, d], mask [B, L])``.

* :class:`TinyTextEncoder` (``conditioning.text.encoder=tiny``, the default): token and position
  embeddings, a few pre-norm transformer layers (padding masked out of the attention) and a final
  LayerNorm; trained jointly with the score network from scratch. Its tokenizer
  (:mod:`.tokenizers`) needs no download, and its weights live in the checkpoint.
* :class:`HFTextEncoder` (``conditioning.text.encoder=hf``): a frozen pretrained ``CLIPTextModel`` or
  ``T5EncoderModel`` with its tokenizer, from the transformers library (the ``.[text]`` extra),
  loaded with ``local_files_only`` from a directory or the Hugging Face cache, as Stable Diffusion
  does. Its weights stay outside the checkpoint, which records their digest.

``context`` rows at padded positions are zero and carry ``mask = False``; consumers (the U-Net's
cross-attention) must ignore them.
"""
from __future__ import annotations

import hashlib
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .tokenizers import Tokenizer, tokenizer_from_state

ENCODERS = ("tiny", "hf")


class TinyTextEncoder(nn.Module):
    """``ids [B, L], mask [B, L] -> context [B, L, dim]``; :meth:`encode` takes prompts (strings)."""

    kind = "tiny"

    def __init__(self, tokenizer: Tokenizer, dim: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"conditioning.text.dim={dim} must be divisible by conditioning.text.heads={heads}")
        self.tokenizer = tokenizer
        self.dim = int(dim)
        self.token = nn.Embedding(tokenizer.vocab_size, dim)
        self.position = nn.Parameter(torch.zeros(tokenizer.max_length, dim))
        nn.init.normal_(self.token.weight, std=0.02)
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        h = self.token(ids) + self.position[: ids.shape[1]]
        h = self.norm(self.layers(h, src_key_padding_mask=~mask))
        return h * mask[..., None].to(h.dtype)

    def encode(self, prompts: Sequence[str]) -> Tuple[Tensor, Tensor]:
        ids, mask = self.tokenizer.encode(prompts)
        dev = self.position.device
        ids, mask = ids.to(dev), mask.to(dev)
        return self(ids, mask), mask

    def record(self) -> Dict[str, Any]:
        """What a checkpoint stores about this encoder (its weights are in the state dict)."""
        return {"encoder": "tiny", "tokenizer": self.tokenizer.state(), "dim": self.dim}


class HFTextEncoder(nn.Module):
    """A frozen ``CLIPTextModel`` / ``T5EncoderModel`` and its tokenizer from a local directory (no download)."""

    kind = "hf"

    def __init__(self, name_or_path: str, max_length: Optional[int] = None) -> None:
        super().__init__()
        try:
            import transformers
        except ImportError as err:
            raise ImportError("conditioning.text.encoder=hf needs the transformers library: pip install -e '.[text]'") from err
        try:
            config = transformers.AutoConfig.from_pretrained(name_or_path, local_files_only=True)
            self.tok = transformers.AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
            kind = getattr(config, "model_type", "")
            if kind in ("clip", "clip_text_model"):
                model = transformers.CLIPTextModel.from_pretrained(name_or_path, local_files_only=True)
            elif kind in ("t5", "mt5", "umt5"):
                model = transformers.T5EncoderModel.from_pretrained(name_or_path, local_files_only=True)
            else:
                raise ValueError(f"{name_or_path} holds a {kind!r} model; conditioning.text.encoder=hf takes a CLIP text "
                                 "model or a T5 encoder")
        except OSError as err:
            raise FileNotFoundError(
                f"no local text encoder at {name_or_path!r} ({err}). Nothing is downloaded here: fetch it once on a "
                f"machine with network access, e.g. `huggingface-cli download {name_or_path}` (it lands in the Hugging "
                "Face cache, ~/.cache/huggingface) or `transformers.CLIPTextModel.from_pretrained(...).save_pretrained"
                "(<dir>)` with its tokenizer, and give conditioning.text.name=<that directory or the cached name>") from None
        self.model = model.eval().requires_grad_(False)
        self.name_or_path = str(name_or_path)
        self.model_type = kind
        self.dim = int(getattr(model.config, "hidden_size", getattr(model.config, "d_model", 0)))
        limit = int(getattr(self.tok, "model_max_length", 77) or 77)
        self.max_length = min(limit, int(max_length)) if max_length else min(limit, 512)
        h = hashlib.sha256()
        for k, v in sorted(model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().float().numpy().tobytes())
        self.digest = h.hexdigest()

    def train(self, mode: bool = True) -> "HFTextEncoder":  # frozen: always in eval mode
        return super().train(False)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Tuple[Tensor, Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        long = [p for p in prompts if len(self.tok(p)["input_ids"]) > self.max_length]
        if long:
            import warnings

            warnings.warn(f"{len(long)} prompt(s) longer than {self.max_length} tokens were cut to fit (e.g. {long[0]!r})",
                          stacklevel=2)
        batch = self.tok(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                         return_tensors="pt")
        dev = next(self.model.parameters()).device
        ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev).bool()
        out = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return out * mask[..., None].to(out.dtype), mask

    def record(self) -> Dict[str, Any]:
        return {"encoder": "hf", "name": self.name_or_path, "model_type": self.model_type, "weights_sha256": self.digest,
                "dim": self.dim, "max_length": self.max_length}


def build_text_encoder(kind: str, *, tokenizer: Optional[Tokenizer] = None, tokenizer_state: Optional[Dict] = None,
                       dim: int = 64, layers: int = 2, heads: int = 4, name: Optional[str] = None,
                       max_length: Optional[int] = None) -> nn.Module:
    """The encoder ``conditioning.text.encoder`` names."""
    if kind == "tiny":
        tok = tokenizer if tokenizer is not None else tokenizer_from_state(tokenizer_state or {})
        return TinyTextEncoder(tok, dim, layers, heads)
    if kind == "hf":
        if not name:
            raise ValueError("conditioning.text.encoder=hf needs conditioning.text.name=<local directory or cached model "
                             "name> (e.g. openai/clip-vit-base-patch32 once it is in the Hugging Face cache)")
        return HFTextEncoder(name, max_length)
    raise ValueError(f"unknown conditioning.text.encoder {kind!r}; choose one of: {', '.join(ENCODERS)}")


__all__ = ["ENCODERS", "TinyTextEncoder", "HFTextEncoder", "build_text_encoder"]
