"""The single-device striped-Hyena causal LM, and what every causal LM of this package shares.

Reading order: byte embedding (+ optional genomic input features) -> one `Block` per
pattern character -> final norm -> output layer (tied to the embedding by default).

Every module takes a `ModelSpec` (spec.py) that supplies its linear layers, convolution
backends and attention kernel; `LOCAL` is plain PyTorch on one device. A parallel layout
builds the same classes with megatron_adapters' spec, and a pipeline stage builds only its
`Stage`: its blocks (keyed by global index, so parameter names are the same in every
layout), the embedding on the first stage and the norm + output on the last.

`CausalLM` is the base of both model families (this plain model and the token-merging
U-shape in blt/ushape.py): output type, output layer and loss, save/load, sampling.
hyena_glt.registry maps a config (or a saved directory) to its family.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import params
from .cache import InferenceCache
from .checksums import (  # noqa: F401  (new_file_mode: imported from here by launch/checkpoint/io.py)
    new_file_mode,
    verify_by_default,
    verify_pretrained,
    write_checksums,
    write_safetensors,
    write_text_atomic,
)
from .config import PATCHING_NONE, HyenaGLTConfig
from .genomic import MotifBranch, SeqTypeEmbedding
from .layers import Block, make_norm
from .loss import weighted_cross_entropy
from .spec import LOCAL, ModelSpec

WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"
FORMAT_METADATA = {"format": "pt", "producer": "hyena-glt", "layout": "single-device", "version": "1"}


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None  # sum of weighted per-token CE (for cross-rank reduction)
    weight_sum: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None


@dataclass(frozen=True)
class Stage:
    """The part of the model one pipeline stage holds: blocks by global index, the input
    embedding if first, the final norm and output layer if last."""

    layers: tuple[int, ...]
    first: bool = True
    last: bool = True

    @classmethod
    def whole(cls, num_layers: int) -> "Stage":
        return cls(tuple(range(num_layers)))


class LayerStack(nn.Module):
    """Blocks keyed by their global layer index, so a stage holding layers 4..7 names them
    `layers.4` .. `layers.7`, as the whole model does. Iterates over the blocks in order."""

    def __init__(self, blocks: dict[int, nn.Module]):
        super().__init__()
        for i, block in blocks.items():
            self.add_module(str(i), block)

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, index: int) -> nn.Module:
        return self._modules[str(index)]

    def __len__(self) -> int:
        return len(self._modules)


class ByteBackbone:
    """Mixin for a backbone module: the byte embedding and optional genomic input features
    (sequence-type embedding, motif branch), and running a block (with activation
    checkpointing when set). The plain model and the U-shape share it; the attribute names
    (embed, seq_type_embed, motif) are part of the canonical parameter names."""

    # Set by a trainer (train.activation_checkpointing): keep each block's input only and
    # recompute the block in backward. Blocks are pure functions of their inputs, so the
    # recomputation is exact, and every rank recomputes the same blocks, so collectives
    # inside them (TP, CP halos and all-to-alls) stay matched.
    activation_checkpointing = False

    def build_input_embeddings(self, config: HyenaGLTConfig, spec: ModelSpec, features: bool = True) -> None:
        self.embed = spec.embedding(config.vocab_size, config.d_model, config.init_std)
        if not features:  # a last pipeline stage's copy of the tied output weight
            return
        if config.seq_type_embedding:
            self.seq_type_embed = SeqTypeEmbedding(config.d_model, config.init_std)
        if config.motif_branch:
            self.motif = MotifBranch(config.d_model, config.motif_kernel_sizes, config.init_std, spec)

    def embed_tokens(self, input_ids: torch.Tensor, seq_type: torch.Tensor | None = None) -> torch.Tensor:
        spec = self.spec
        x = self.embed(input_ids.t() if spec.seq_first else input_ids)
        if seq_type is not None and hasattr(self, "seq_type_embed"):
            e = self.seq_type_embed(seq_type)  # (B, D), the same at every position
            x = x + (e[None] if spec.seq_first else e[:, None])
        if hasattr(self, "motif"):
            x = x + self.motif(x)
        return spec.enter_sequence_region(x)

    def run_block(self, layer, x, positions, conservation=None):
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(layer, x, positions, conservation, use_reentrant=False)
        return layer(x, positions, conservation)


class HyenaGLTModel(ByteBackbone, nn.Module):
    """Byte ids -> hidden states (B, L, D): embedding, striped blocks, final norm (or the
    part of that a pipeline `stage` holds: then `hidden` is the previous stage's output)."""

    def __init__(self, config: HyenaGLTConfig, spec: ModelSpec = LOCAL, stage: Stage | None = None):
        super().__init__()
        stage = stage or Stage.whole(config.num_layers)
        self.config, self.spec, self.stage = config, spec, stage
        if stage.first or (stage.last and config.tie_embeddings):
            self.build_input_embeddings(config, spec, features=stage.first)
        self.layers = LayerStack({i: Block(config.layers[i], config, i, spec) for i in stage.layers})
        if stage.last:
            self.final_norm = make_norm(config)
            spec.mark_sequence_split(self.final_norm)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        seq_type: torch.Tensor | None = None,
        conservation: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids, seq_type) if self.stage.first else hidden
        for layer in self.layers:
            x = self.run_block(layer, x, position_ids, conservation)
        return self.final_norm(x) if self.stage.last else x

    @torch.no_grad()
    def extend(self, input_ids: torch.Tensor, cache: InferenceCache, conservation: torch.Tensor | None = None,
               upto: int | None = None) -> torch.Tensor:
        """Inference: hidden states of the next positions `input_ids` (B, T) of the sequences in
        `cache`, which is updated in place. The same result as the forward over the whole
        sequence, at a cost that does not grow with what came before (but for attention's
        reads of its K/V cache). `upto`: stop after that many blocks and return their output
        (no final norm; later blocks' cache entries are then not advanced)."""
        if self.spec is not LOCAL or not (self.stage.first and self.stage.last):
            raise ValueError("cached inference runs the whole single-device model (spec LOCAL)")
        T = input_ids.shape[1]
        positions = cache.lengths[:, None] + torch.arange(T, device=input_ids.device)
        x = self.embed(input_ids)
        if cache.seq_type is not None and hasattr(self, "seq_type_embed"):
            x = x + self.seq_type_embed(cache.seq_type)[:, None]
        if hasattr(self, "motif"):
            m, cache.motif = self.motif.extend(x, cache.motif)
            x = x + m
        cache.lengths = cache.lengths + T
        for n, (i, layer) in enumerate(zip(self.stage.layers, self.layers)):
            if upto is not None and n == upto:
                return x
            x, cache.layers[i] = layer.extend(x, positions, cache.layers.get(i), conservation)
            cache.kinds[i] = layer.code  # how the entry stacks with another row's is its kind's
        return x if upto is not None else self.final_norm(x)


class CausalLM(nn.Module):
    """Base of the causal LMs: `self.model` (a backbone with `embed`), the output layer (tied
    to the embedding or its own `lm_head`), the loss, save/load and sampling.

    forward(input_ids, labels=None, loss_weights=None, seq_type=None, conservation=None,
    position_ids=None) -> CausalLMOutput. `labels[b, i]` is the target of position i (already
    shifted: the data loader builds input_ids = [BOS] + window[:-1], labels = window).
    """

    family: str = ""  # the registry name (hyena_glt.registry)

    @staticmethod
    def accepts(config: HyenaGLTConfig) -> bool:
        """Whether `config` describes a model of this family."""
        raise NotImplementedError

    @classmethod
    def check_config(cls, config: HyenaGLTConfig) -> None:
        if not cls.accepts(config):
            raise ValueError(
                f"patching: {config.patching!r} is not a config of {cls.__name__} (family {cls.family!r}); "
                "build models with hyena_glt.build_causal_lm / load them with hyena_glt.load_causal_lm, "
                "which pick the family from the config"
            )

    def build_output(self, config: HyenaGLTConfig, spec: ModelSpec) -> None:
        self.output_layer = spec.output_layer(config.d_model, config.vocab_size)
        if not config.tie_embeddings:
            self.lm_head = spec.column_linear(config.d_model, config.vocab_size, config.init_std)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.embed.weight if self.config.tie_embeddings else self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output_layer(hidden, self.output_weight)

    def lm_loss(self, logits, labels, loss_weights) -> tuple[torch.Tensor, torch.Tensor]:
        return weighted_cross_entropy(logits, labels, loss_weights, self.spec.cross_entropy)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- single-device checkpoint format: config.json + model.safetensors ----
    def save_pretrained(self, directory: str | Path) -> Path:
        return write_pretrained(self, directory)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, config: HyenaGLTConfig | None = None, map_location: str | torch.device = "cpu",
        verify: bool | None = None,
    ):
        """`verify`: check the files against the directory's checksums.json first (None: on
        unless HYENA_GLT_VERIFY_MODEL=0; see read_config)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        saved = read_config(directory, need_weights=True, verify=verify)
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

    # Whether prefill / step keep an inference cache; without one, generation recomputes the prefix.
    supports_cache = False

    def generate(self, prompts, max_new_tokens: int, **sampling):
        """Sample continuations; see hyena_glt.inference.generate (prompts: a (B, L) tensor or
        a list of 1-D id tensors of different lengths)."""
        from .inference import generate

        return generate(self, prompts, max_new_tokens, **sampling)


class HyenaGLTForCausalLM(CausalLM):
    """Next-byte language model over the striped blocks (`patching: none`)."""

    family = "plain"

    @staticmethod
    def accepts(config: HyenaGLTConfig) -> bool:
        return config.patching == PATCHING_NONE

    def __init__(self, config: HyenaGLTConfig, initialize: bool = True, spec: ModelSpec = LOCAL,
                 stage: Stage | None = None):
        super().__init__()
        self.check_config(config)
        self.config, self.spec = config, spec
        self.model = HyenaGLTModel(config, spec, stage)
        self.stage = self.model.stage
        if self.stage.last:
            self.build_output(config, spec)
        if initialize:
            params.initialize(self, config.seed)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_weights: torch.Tensor | None = None,
        seq_type: torch.Tensor | None = None,
        conservation: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """`hidden`: a later pipeline stage's input (the previous stage's output). A stage
        that is not last returns its output hidden states as `hidden_states` (logits None)."""
        hidden = self.model(input_ids, seq_type, conservation, position_ids, hidden)
        if not self.stage.last:
            return CausalLMOutput(logits=None, hidden_states=hidden)
        logits = self.logits(hidden)
        out = CausalLMOutput(logits=logits, hidden_states=hidden)
        if labels is not None:
            out.loss_sum, out.weight_sum = self.lm_loss(logits, labels, loss_weights)
            out.loss = out.loss_sum / out.weight_sum.clamp_min(1e-8)
        return out

    # ---- inference with a cache (hyena_glt/cache.py): prefill once, then O(1) steps ----
    supports_cache = True

    def new_cache(self, batch_size: int, seq_type: torch.Tensor | None = None) -> InferenceCache:
        return InferenceCache.empty(batch_size, seq_type, device=self.output_weight.device)

    @torch.no_grad()
    def extend(self, input_ids: torch.Tensor, cache: InferenceCache, conservation=None) -> torch.Tensor:
        """Logits (B, T, V) of the next positions; `cache` advances by T."""
        return self.logits(self.model.extend(input_ids, cache, conservation))

    def prefill(self, input_ids: torch.Tensor, seq_type: torch.Tensor | None = None) -> tuple[torch.Tensor, InferenceCache]:
        """Run the prompt (B, L) through the normal (FFT) path; returns its logits and the cache."""
        cache = self.new_cache(input_ids.shape[0], seq_type)
        return self.extend(input_ids, cache), cache

    def step(self, tokens: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        """Logits (B, V) after one more token per row (B,); O(1) per Hyena layer."""
        return self.extend(tokens.reshape(-1, 1), cache)[:, -1]


def read_config(directory: str | Path, need_weights: bool = False, verify: bool | None = None) -> HyenaGLTConfig:
    """The model config of a saved directory, with one clear error for a wrong path. With
    `need_weights` (the directory is about to be loaded) every file its checksums.json records
    is verified first (hyena_glt/checksums.py; `verify`: None = on unless
    HYENA_GLT_VERIFY_MODEL=0): a damaged file is refused in one line naming it."""
    directory = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME) if need_weights else (CONFIG_NAME,):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: no {name}; expected a directory written by save_pretrained/convert")
    if need_weights and (verify_by_default() if verify is None else verify):
        verify_pretrained(directory)
    return HyenaGLTConfig.from_json(directory / CONFIG_NAME)


def write_pretrained(model: nn.Module, directory: str | Path, sidecars: dict[str, dict] | None = None,
                     metadata: dict[str, str] | None = None) -> Path:
    """config.json + model.safetensors (+ JSON sidecar files, e.g. a head's head.json) of any
    model of this package (it has `.config`), then checksums.json: the size and sha256 of each
    file written (hyena_glt/checksums.py; checked when the directory is loaded). checksums.json
    is first written as a placeholder, so a save into an existing directory that does not
    finish leaves a directory that is refused, never one that loads half old, half new. Every
    file is written through a temporary sibling renamed into place; a failed write (a full
    disk) raises an OSError naming the file. Writes into `directory` as it is: the commands
    that publish a model directory (convert, import-evo2, finetune) write into a fresh
    temporary directory and rename it into place when complete (launch/checkpoint/publish.py)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_checksums(directory, None)  # a placeholder first: an unfinished save never loads
    written = {CONFIG_NAME: write_text_atomic(directory / CONFIG_NAME, json.dumps(model.config.to_dict(), indent=2) + "\n")}
    for name, content in (sidecars or {}).items():
        written[name] = write_text_atomic(directory / name, json.dumps(content, indent=2) + "\n")
    state = model.state_dict()
    written[WEIGHTS_NAME] = write_safetensors(directory / WEIGHTS_NAME, state, {**FORMAT_METADATA, **(metadata or {})})
    write_checksums(directory, written)
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
