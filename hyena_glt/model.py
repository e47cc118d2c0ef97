"""HyenaGLTModel (backbone) and HyenaGLTForCausalLM: the single-device model.

Reading order: embeddings (+ optional genomic adaptations) -> striped blocks, one per
pattern character -> final norm -> output layer (tied to the embedding by default).
Parallel layouts (megatron_adapters) wrap these same modules from outside.
"""

from __future__ import annotations


from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import params
from .config import HyenaGLTConfig
from .genomic import MotifBranch, SeqTypeEmbedding
from .layers import Block, RMSNorm
from .loss import weighted_cross_entropy

WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"
FORMAT_METADATA = {"format": "pt", "producer": "hyena-glt", "layout": "single-device", "version": "1"}


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None  # sum of weighted per-token CE (for cross-rank reduction)
    weight_sum: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None


class ByteInputEmbedding:
    """Mixin for a backbone module: the byte embedding plus the optional genomic input features
    (sequence-type embedding, motif branch). The plain model and the U-shape share it; the
    attribute names (embed, seq_type_embed, motif) are part of the canonical parameter names."""

    def build_input_embeddings(self, config: HyenaGLTConfig) -> None:
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        params.tag(self.embed.weight, params.normal(config.init_std))
        if config.seq_type_embedding:
            self.seq_type_embed = SeqTypeEmbedding(config.d_model, config.init_std)
        if config.motif_branch:
            self.motif = MotifBranch(config.d_model, config.motif_kernel_sizes, config.init_std)

    def embed_tokens(self, input_ids: torch.Tensor, seq_type: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(input_ids)
        if seq_type is not None and hasattr(self, "seq_type_embed"):
            x = x + self.seq_type_embed(seq_type)
        if hasattr(self, "motif"):
            x = x + self.motif(x)
        return x


class HyenaGLTModel(ByteInputEmbedding, nn.Module):
    def __init__(self, config: HyenaGLTConfig):
        super().__init__()
        self.config = config
        self.build_input_embeddings(config)
        self.layers = nn.ModuleList(Block(code, config, i) for i, code in enumerate(config.layers))
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)


    def forward(
        self,
        input_ids: torch.Tensor,
        seq_type: torch.Tensor | None = None,
        conservation: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids, seq_type)
        for layer in self.layers:
            x = layer(x, position_ids, conservation)
        return self.final_norm(x)


class HyenaGLTForCausalLM(nn.Module):
    """Next-byte language model. `labels[b, i]` is the target of position i (already shifted:
    the data loader builds input_ids = [BOS] + window[:-1], labels = window)."""

    def __init__(self, config: HyenaGLTConfig, initialize: bool = True):
        super().__init__()
        self.config = config
        self.model = HyenaGLTModel(config)
        if not config.tie_embeddings:
            self.lm_head = params.linear(config.d_model, config.vocab_size, config.init_std)
        if initialize:
            params.initialize(self, config.seed)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.embed.weight if self.config.tie_embeddings else self.lm_head.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        loss_weights: torch.Tensor | None = None,
        seq_type: torch.Tensor | None = None,
        conservation: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        hidden = self.model(input_ids, seq_type, conservation, position_ids)
        logits = F.linear(hidden, self.output_weight)
        out = CausalLMOutput(logits=logits, hidden_states=hidden)
        if labels is not None:
            out.loss_sum, out.weight_sum = weighted_cross_entropy(logits, labels, loss_weights)
            out.loss = out.loss_sum / out.weight_sum.clamp_min(1e-8)
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- single-device checkpoint format: config.json + model.safetensors ----
    def save_pretrained(self, directory: str | Path) -> Path:
        return write_pretrained(self, directory)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, config: HyenaGLTConfig | None = None, map_location: str | torch.device = "cpu"
    ) -> "HyenaGLTForCausalLM":
        from safetensors.torch import load_file

        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory}: no {name}; expected a directory written by save_pretrained/convert")
        saved = HyenaGLTConfig.from_json(directory / CONFIG_NAME)
        if config is not None and config != saved:
            diffs = [
                f"{k}: saved {getattr(saved, k)!r}, given {getattr(config, k)!r}"
                for k in saved.model_fields
                if getattr(saved, k) != getattr(config, k)
            ]
            raise ValueError(f"{directory}: config does not match the saved model ({'; '.join(diffs)})")
        model = cls(saved, initialize=False)
        state = load_file(str(directory / WEIGHTS_NAME), device=str(map_location))
        check_state_dict(model, state, str(directory / WEIGHTS_NAME))
        model.load_state_dict(state, strict=True)
        return model

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        seq_type: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sample continuations of (B, L) prompts. Recomputes the full prefix each step
        (no recurrent state cache), so cost grows with the square of the output length."""
        from .tokenizer import NUM_SPECIAL

        ids = input_ids
        for _ in range(max_new_tokens):
            logits = self(ids, seq_type=seq_type).logits[:, -1].float()
            logits[:, :NUM_SPECIAL] = float("-inf")  # sample bytes only
            logits[:, NUM_SPECIAL + 256 :] = float("-inf")  # padded vocab rows are never real tokens
            if temperature <= 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            ids = torch.cat([ids, nxt], dim=1)
        return ids


def write_pretrained(model: nn.Module, directory: str | Path, sidecars: dict[str, dict] | None = None,
                     metadata: dict[str, str] | None = None) -> Path:
    """config.json + model.safetensors (+ JSON sidecar files, e.g. a head's head.json) of any
    model of this package (it has `.config`)."""
    import json

    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.to_json(directory / CONFIG_NAME)
    for name, content in (sidecars or {}).items():
        (directory / name).write_text(json.dumps(content, indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = directory / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={**FORMAT_METADATA, **(metadata or {})})
    tmp.replace(directory / WEIGHTS_NAME)  # never leave a half-written weights file
    return directory


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Every key present with the right shape, nothing extra: one clear error listing what is wrong."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if shapes:
        problems.append(f"shape mismatch {shapes[:5]}")
    if problems:
        raise ValueError(f"{source}: weights do not match the config: {'; '.join(problems)}")




# ---- patching-aware factories (token merging lives in hyena_glt.blt) ----
def build_causal_lm(config: HyenaGLTConfig, initialize: bool = True) -> nn.Module:
    """HyenaGLTForCausalLM for `patching: none`, else the U-shaped BLTForCausalLM (same forward/output)."""
    if config.patching == "none":
        return HyenaGLTForCausalLM(config, initialize=initialize)
    from .blt.ushape import BLTForCausalLM

    return BLTForCausalLM(config, initialize=initialize)


def build_backbone(config: HyenaGLTConfig) -> nn.Module:
    """The backbone (input_ids -> (B, L, D) hidden states) for either model family."""
    if config.patching == "none":
        return HyenaGLTModel(config)
    from .blt.ushape import BLTModel

    return BLTModel(config)


def load_causal_lm(directory: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a saved causal LM of either family, chosen by the saved config's `patching`."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}; expected a directory written by save_pretrained/convert")
    if HyenaGLTConfig.from_json(path).patching == "none":
        return HyenaGLTForCausalLM.from_pretrained(directory, map_location=map_location)
    from .blt.ushape import BLTForCausalLM

    return BLTForCausalLM.from_pretrained(directory, map_location=map_location)
