"""Text from a trained checkpoint: ``python -m chunkmem.train sample --ckpt PATH --prompt "def "``.

The prompt is encoded as UTF-8 bytes (the models are byte-level), the continuation is drawn with
:meth:`chunkmem.nn.ChunkMemLM.generate` (memory carried across segments) and decoded back
(invalid UTF-8 shown as U+FFFD)."""
from __future__ import annotations

import torch

from chunkmem.nn import ChunkMemLM
from chunkmem.training.checkpoint import CheckpointError, load_model_state, read_checkpoint
from chunkmem.training.config import build_model, config_from_dict

__all__ = ["load_for_sampling", "sample_text"]


def load_for_sampling(path: str, device: str = "cpu") -> ChunkMemLM:
    """The ChunkMemLM of a training checkpoint (file or sharded directory), in eval mode."""
    ckpt, _ = read_checkpoint(path)
    cfg = config_from_dict(ckpt["config"])
    if cfg.model == "transformer":
        raise CheckpointError(f"{path!r} holds the SDPA transformer baseline, which has no generate(); "
                              "sample from a 'memory' or 'nomem' checkpoint")
    model = build_model(cfg)
    load_model_state(model, path)
    return model.to(device).eval()


@torch.no_grad()
def sample_text(model: ChunkMemLM, prompt: str, max_new_tokens: int, *, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None, seed: int | None = None) -> str:
    """The continuation of ``prompt`` (bytes decoded as UTF-8) sampled with ``model.generate``."""
    if not prompt:
        raise ValueError("the prompt must not be empty (the model needs at least one byte of context)")
    device = next(model.parameters()).device
    tokens = torch.tensor([list(prompt.encode("utf-8"))], dtype=torch.long, device=device)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
    new, _ = model.generate(tokens, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            generator=gen)
    return bytes(new[0].tolist()).decode("utf-8", errors="replace")
