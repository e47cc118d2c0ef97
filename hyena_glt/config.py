"""HyenaGLTConfig: the one typed, validated description of a model.

Validated once at construction (pydantic); every later module trusts it. An invalid value
or combination raises ValueError (pydantic's ValidationError is one) naming the field and
the rule.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .kinds import (
    STAGE_SEPARATOR,
    layer_kind,
    registered_codes,
    unknown_code_hint,
    unknown_codes,
)
from .tokenizer import BYTE_VOCAB_SIZE

# One character per layer, each a layer kind registered in hyena_glt.kinds (S, D, H, * built
# in, more from plug-ins). STAGE_SEPARATOR ('|') marks a pipeline-stage boundary, not a layer.

# Token merging (hyena_glt/blt): how bytes are grouped into patches for the global model.
# Compare a config's `patching` with these names, never with the literal.
PATCHING_NONE, PATCHING_STATIC, PATCHING_ENTROPY, PATCHING_LEARNED = "none", "static", "entropy", "learned"
# Entropy patching modes that may also be named as `patching` (shorthand for patching
# 'entropy' + that entropy_mode; the config stores the long form, so every consumer that
# handles entropy patching, e.g. the tensor-parallel layout check, handles these too).
PATCHING_ALIASES = ("dual", "optimal")
PATCHING = (PATCHING_NONE, PATCHING_STATIC, PATCHING_ENTROPY, PATCHING_LEARNED, *PATCHING_ALIASES)
ENTROPY_MODES = ("threshold", "monotonic", "topk", *PATCHING_ALIASES)
MERGE_RELAXATIONS = ("ste", "soft")
# The MLP activations by name; layers.ACTIVATIONS maps each to torch.nn.functional's function of
# that name ("identity": none), so adding one is adding its name here.
MLP_ACTIVATIONS = ("silu", "gelu", "identity")
NORM_EPS_PLACEMENTS = ("inside", "outside")
# Upper bounds of the sizes, far above any model trained (Evo 2 40B: d_model 8192, 1M context):
# a config beyond them is a typo or a damaged file, and its tensors could not even be described
# (element counts past int64), so it is refused here, naming the field, instead of failing
# wherever the model is built.
MAX_WIDTH = 2**24  # widths, head counts, vocabulary, filter taps and orders
MAX_LENGTH = 2**27  # context lengths, and windows and patch lengths measured in bytes
MAX_MLP_RATIO = 256.0


def _one_of(values) -> str:
    quoted = [repr(v) for v in values]
    return ", ".join(quoted[:-1]) + f" or {quoted[-1]}" if len(quoted) > 1 else quoted[0]


class HyenaGLTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)

    pattern: str = Field("SDH*", description="one layer-kind code per layer (hyena_glt.kinds: S, D, H, * and "
                         "plug-ins' codes); '|' = pipeline stage boundary")
    d_model: int = Field(256, gt=0, le=MAX_WIDTH, description="hidden size: the width of every layer's input and output")
    num_heads: int = Field(4, gt=0, le=MAX_WIDTH, description="attention heads of the '*' layers")
    vocab_size: int = Field(BYTE_VOCAB_SIZE, description="at least the byte tokenizer's 260 ids")
    max_seq_len: int = Field(8192, gt=0, le=MAX_LENGTH, description="longest context the model is meant to see")
    mlp_ratio: float = Field(8 / 3, gt=0, le=MAX_MLP_RATIO, description="gated-MLP hidden size = round(mlp_ratio * d_model)")
    mlp_multiple_of: int = Field(16, gt=0, le=MAX_WIDTH, description="MLP hidden size is rounded up to this multiple")
    # Hidden quirk made explicit: one trainer ran every MLP after layer 1 with an identity activation.
    mlp_activation: str = Field("silu", description="activation of the gated MLPs (layer 0: first_mlp_activation "
                                "when set)")
    short_filter_len: int = Field(7, gt=0, le=MAX_WIDTH, description="taps of the S layers' short causal filter")
    featurizer_len: int = Field(3, gt=0, le=MAX_WIDTH, description="taps of the short causal convolution on the q, k, v "
                                "projections of every Hyena (S, D, H) layer")
    medium_filter_len: int = Field(128, gt=0, le=MAX_WIDTH, description="taps of the D layers' medium causal filter")
    modal_order: int = Field(16, gt=0, le=MAX_WIDTH, description="decaying modes per channel of the H layers' long (modal) filter")
    num_filter_groups: int = Field(16, gt=0, le=MAX_WIDTH, description="channel groups sharing an S/D filter")
    medium_decay_min: float = Field(1e-2, gt=0, description="slowest per-channel decay rate of D filters")
    medium_decay_max: float = Field(1.0, gt=0, description="fastest per-channel decay rate of D filters")
    rope_base: float = Field(10000.0, gt=0, description="RoPE frequency base of the attention layers")
    norm_eps: float = Field(1e-6, gt=0, description="RMSNorm epsilon (where it is added: norm_eps_placement)")
    # Architecture options, each with this project's behaviour as the default; every Evo 2
    # model is expressible with them (docs/evo2.md).
    norm_eps_placement: str = Field(
        "inside", description="RMSNorm: 'inside' x*rsqrt(mean(x^2)+eps); 'outside' x/(sqrt(mean(x^2))+eps) (Evo 2)")
    mixer_out_bias: bool = Field(False, description="a bias on the Hyena operator's and attention's output projection")
    first_mlp_activation: str | None = Field(
        None, description="layer 0's MLP activation (None: mlp_activation); Evo 2: gelu, then identity")
    medium_decay: bool = Field(True, description="D filters: taps times a fixed per-channel decay (False: raw taps)")
    short_filter_skip: bool = Field(True, description="S filters: add the per-channel skip term skip[c] * z")
    mlp_hidden_size: int | None = Field(None, gt=0, le=MAX_WIDTH, description="gated-MLP width (None: from mlp_ratio)")
    rope_position_scale: float = Field(
        1.0, gt=0, description="RoPE positions are divided by this (position interpolation for longer context)")
    bos_token: bool = Field(
        True, description="inference starts every sequence with BOS (False: Evo 2 models, trained on raw bytes)")
    init_std: float = Field(0.02, gt=0, description="std of the normal initialisation of the embeddings and projections "
                            "(the blocks' output projections: init_std / sqrt(2 * layers))")
    tie_embeddings: bool = Field(True, description="the output layer reuses the input embedding matrix "
                                 "(False: a separate lm_head)")
    soft_mask_weight: float = Field(0.1, ge=0, le=1, description="loss weight of lower-case (soft-masked) bases")
    # Genomic adaptations, each off by default.
    seq_type_embedding: bool = Field(False, description="add a learned DNA/RNA/protein/mixed embedding")
    motif_branch: bool = Field(False, description="causal multi-width motif convolution on the embeddings")
    motif_kernel_sizes: list[int] = Field(default_factory=lambda: [6, 10, 16],
                                          description="widths of the motif branch's convolutions (motif_branch)")
    conservation: bool = Field(False, description="per-position conservation scores weight the operator output")
    seed: int = Field(0, ge=0, description="seed of the weight initialisation (each parameter is drawn from "
                      "the seed and its name)")
    # Token merging (BLT U-shape, hyena_glt/blt). 'none' = the plain byte-level model.
    patching: str = Field(
        PATCHING_NONE, description=f"one of {', '.join(PATCHING)}; "
        f"{' / '.join(PATCHING_ALIASES)} = '{PATCHING_ENTROPY}' with that entropy_mode")
    patch_size: float = Field(4.0, ge=1, description="target mean patch length in bytes (static: the fixed length)")
    min_patch: int = Field(1, ge=1, le=MAX_LENGTH, description="shortest complete patch (bytes)")
    max_patch: int = Field(16, ge=1, le=MAX_LENGTH, description="longest patch (bytes); a boundary is forced after this many")
    patch_budget: float = Field(
        0.0, ge=0, le=1,
        description="patch slots per sequence as a fraction of its byte length, P = ceil(L * patch_budget); "
        "0 = ceil(L / patch_size) for static, ceil(L / min_patch) otherwise (never overflows)",
    )
    local_encoder_pattern: str = Field("S", description="layers of the byte-level local encoder (layer-kind codes)")
    local_decoder_pattern: str = Field("S", description="layers of the byte-level local decoder (layer-kind codes)")
    bridge_window: int = Field(4, ge=1, le=MAX_LENGTH, description="earlier complete patches each byte attends to")
    position_periods: list[int] = Field(
        default_factory=list, description="genomic periodic position features of the token-merging model "
        "(the plain model ignores them), e.g. [3, 8, 10, 21, 147]; [] = off; data parallelism only"
    )
    entropy_mode: str = Field(
        "threshold", description="entropy patcher: 'threshold', 'monotonic', 'topk', 'dual' (H > t or H jump > "
        "entropy_jump_threshold) or 'optimal' (receding-horizon DP, docs/token-merging.md)")
    entropy_threshold: float = Field(
        1.0, description="entropy (nats) or entropy jump above which a patch starts; 'optimal': the cost of a patch (nats)")
    entropy_jump_threshold: float = Field(1.0, description="dual mode: entropy jump H[j] - H[j-1] (nats) above which a patch starts")
    patch_lookahead: int = Field(
        2, ge=0, le=MAX_LENGTH, description="optimal mode: the boundary at byte p is decided from bytes <= p + patch_lookahead; "
        "bytes then read only patches closed at least that many bytes before them")
    patch_length_weight: float = Field(
        0.1, ge=0, description="optimal mode: weight of a patch's squared length deviation from its target length")
    patch_adapt: bool = Field(
        False, description="complexity-adaptive merge ratio: the target patch length follows the trailing mean "
        "entropy (entropy patching only; min/max_patch still bound it)")
    complexity_window: int = Field(64, ge=2, le=MAX_LENGTH, description="patch_adapt: trailing window (bytes) of the mean entropy")
    entropy_window: int = Field(32, ge=2, le=MAX_LENGTH, description="topk mode: trailing window in which the top entropies start patches")
    entropy_pattern: str = Field("SS", description="layers of the small causal byte LM of the entropy patcher")
    entropy_joint: bool = Field(True, description="train the entropy model jointly (its CE joins the training loss)")
    entropy_d_model: int = Field(64, gt=0, le=MAX_WIDTH, description="width of the entropy patcher's small byte LM")
    entropy_adapt: bool = Field(
        False, description="in training, move the threshold toward a boundary rate of 1/patch_size (EMA; "
        "all-reduce the buffer across data-parallel ranks)"
    )
    merge_relaxation: str = Field("ste", description="learned patcher gradient: 'ste' (straight-through) or 'soft'")
    merge_kernel: int = Field(9, ge=1, le=MAX_LENGTH, description="width of the learned patcher's genomic pattern convolution")
    compression_loss_weight: float = Field(1.0, ge=0, description="learned patcher: weight of the compression-ratio term")

    # ---- validation: each rule names its field ----
    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        bad = unknown_codes(v)
        if bad:
            raise ValueError(f"pattern: unknown layer code(s) {bad}; registered: {registered_codes()}, and "
                             f"{STAGE_SEPARATOR!r} for stage boundaries ({unknown_code_hint()})")
        stages = v.split(STAGE_SEPARATOR)
        if not v.replace(STAGE_SEPARATOR, ""):
            raise ValueError("pattern: must contain at least one layer")
        if STAGE_SEPARATOR in v and any(not s for s in stages):
            raise ValueError(f"pattern: every pipeline stage between '|' needs at least one layer, got {v!r}")
        return v

    @field_validator("mlp_activation", "first_mlp_activation")
    @classmethod
    def _activation(cls, v: str | None, info) -> str | None:
        if v is not None and v not in MLP_ACTIVATIONS:
            raise ValueError(f"{info.field_name}: must be {_one_of(MLP_ACTIVATIONS)}, got {v!r}")
        return v

    @field_validator("norm_eps_placement")
    @classmethod
    def _eps_placement(cls, v: str) -> str:
        if v not in NORM_EPS_PLACEMENTS:
            raise ValueError(f"norm_eps_placement: must be {_one_of(NORM_EPS_PLACEMENTS)}, got {v!r}")
        return v

    @field_validator("motif_kernel_sizes")
    @classmethod
    def _motif(cls, v: list[int]) -> list[int]:
        if not v or any(not 1 <= k <= MAX_LENGTH for k in v):
            raise ValueError(f"motif_kernel_sizes: need one or more sizes in [1, {MAX_LENGTH}], got {v}")
        return v

    @field_validator("patching")
    @classmethod
    def _patching(cls, v: str) -> str:
        if v not in PATCHING:
            raise ValueError(f"patching: must be one of {', '.join(PATCHING)}, got {v!r}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _patching_alias(cls, data):
        # Rewritten before field validation so the stored config is always the long form.
        if isinstance(data, dict) and data.get("patching") in PATCHING_ALIASES:
            mode = data["patching"]
            given = data.get("entropy_mode", mode)
            # An assignment (cfg.patching = 'dual') arrives with every field filled in: the
            # alias then replaces the old mode; only an explicit contradiction is an error.
            assignment = set(cls.model_fields) <= set(data)
            if given != mode and not assignment:
                raise ValueError(f"patching: {mode!r} means entropy patching with entropy_mode {mode!r}, "
                                 f"but entropy_mode is {given!r}")
            data = {**data, "patching": PATCHING_ENTROPY, "entropy_mode": mode}
        return data

    @field_validator("entropy_mode")
    @classmethod
    def _entropy_mode(cls, v: str) -> str:
        if v not in ENTROPY_MODES:
            raise ValueError(f"entropy_mode: must be one of {', '.join(ENTROPY_MODES)}, got {v!r}")
        return v

    @field_validator("merge_relaxation")
    @classmethod
    def _relaxation(cls, v: str) -> str:
        if v not in MERGE_RELAXATIONS:
            raise ValueError(f"merge_relaxation: must be {_one_of(MERGE_RELAXATIONS)}, got {v!r}")
        return v

    @field_validator("local_encoder_pattern", "local_decoder_pattern", "entropy_pattern")
    @classmethod
    def _local_pattern(cls, v: str, info) -> str:
        bad = unknown_codes(v) + ([STAGE_SEPARATOR] if STAGE_SEPARATOR in v else [])
        if not v or bad:
            raise ValueError(f"{info.field_name}: need one or more layer codes from {registered_codes()} "
                             f"(no {STAGE_SEPARATOR!r}), got {v!r}")
        return v

    @field_validator("position_periods")
    @classmethod
    def _periods(cls, v: list[int]) -> list[int]:
        if any(not 2 <= p <= MAX_LENGTH for p in v):
            raise ValueError(f"position_periods: every period must be in [2, {MAX_LENGTH}], got {v}")
        return v

    @model_validator(mode="after")
    def _patching_combinations(self) -> "HyenaGLTConfig":
        if self.patching in PATCHING_ALIASES:  # an assignment keeps the alias: store the long form
            self.__dict__.update(patching=PATCHING_ENTROPY, entropy_mode=self.patching)
        if self.patching == PATCHING_NONE:
            return self
        if self.min_patch > self.max_patch:
            raise ValueError(f"min_patch: {self.min_patch} must be <= max_patch={self.max_patch}")
        if not self.min_patch <= self.patch_size <= self.max_patch:
            raise ValueError(
                f"patch_size: {self.patch_size} must lie in [min_patch, max_patch] = [{self.min_patch}, {self.max_patch}]"
            )
        if self.patching == PATCHING_STATIC and self.patch_size != int(self.patch_size):
            raise ValueError(f"patch_size: static patching needs a whole number of bytes, got {self.patch_size}")
        if self.patch_budget and self.patch_budget * self.max_patch < 1:
            raise ValueError(
                f"patch_budget: {self.patch_budget} leaves fewer slots than even max_patch={self.max_patch}-byte "
                f"patches need; use >= {1 / self.max_patch:.4g} (or 0 for automatic)"
            )
        if self.patch_adapt and self.patching != PATCHING_ENTROPY:
            raise ValueError(f"patch_adapt: needs entropy patching (the complexity estimate is the entropy model's "
                             f"trailing mean entropy), got patching={self.patching!r}")
        if self.patching == PATCHING_ENTROPY and self.entropy_d_model % self.num_filter_groups:
            raise ValueError(
                f"entropy_d_model: {self.entropy_d_model} must be divisible by num_filter_groups={self.num_filter_groups}"
            )
        return self

    @model_validator(mode="after")
    def _combinations(self) -> "HyenaGLTConfig":
        if not BYTE_VOCAB_SIZE <= self.vocab_size <= MAX_WIDTH:
            raise ValueError(f"vocab_size: must be >= {BYTE_VOCAB_SIZE} (4 specials + 256 bytes) and <= {MAX_WIDTH}, "
                             f"got {self.vocab_size}")
        if self.d_model % self.num_heads:
            raise ValueError(f"num_heads: d_model={self.d_model} must be divisible by num_heads={self.num_heads}")
        if (self.d_model // self.num_heads) % 2:
            raise ValueError(f"num_heads: head dim d_model/num_heads={self.d_model // self.num_heads} must be even for RoPE")
        if self.d_model % self.num_filter_groups:
            raise ValueError(
                f"num_filter_groups: d_model={self.d_model} must be divisible by num_filter_groups={self.num_filter_groups}"
            )
        if self.medium_decay_min > self.medium_decay_max:
            raise ValueError(
                f"medium_decay_min: {self.medium_decay_min} must be <= medium_decay_max={self.medium_decay_max}"
            )
        return self

    # ---- derived views ----
    @property
    def layers(self) -> str:
        """The pattern without stage separators: one character per layer."""
        return self.pattern.replace(STAGE_SEPARATOR, "")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def stage_layer_counts(self) -> list[int] | None:
        """Layers per pipeline stage as given by '|' in the pattern, or None if not given."""
        if STAGE_SEPARATOR not in self.pattern:
            return None
        return [len(s) for s in self.pattern.split(STAGE_SEPARATOR)]

    def short_conv_halo(self) -> int:
        """Positions before its own that any short causal convolution of the model reads
        (taps - 1): what a context-parallel chunk must cover. Each layer kind declares its
        own (`LayerKind.halo`); the featurizer's is the floor for every model, the rule the
        striped models have always been checked with."""
        patterns = [self.layers]
        if self.patching != PATCHING_NONE:
            patterns += [self.local_encoder_pattern, self.local_decoder_pattern]
            if self.patching == PATCHING_ENTROPY:
                patterns.append(self.entropy_pattern)
        halos = [self.featurizer_len - 1] + [layer_kind(c).halo(self) for c in sorted(set("".join(patterns)))]
        if self.motif_branch:
            halos += [k - 1 for k in self.motif_kernel_sizes]
        return max(halos)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def group_size(self) -> int:
        return self.d_model // self.num_filter_groups

    @property
    def mlp_hidden(self) -> int:
        if self.mlp_hidden_size is not None:
            return self.mlp_hidden_size
        h = int(round(self.mlp_ratio * self.d_model))
        return -(-h // self.mlp_multiple_of) * self.mlp_multiple_of

    def patch_slots(self, seq_len: int) -> int:
        """The fixed number of patch slots for sequences of `seq_len` bytes (static shapes)."""
        if self.patch_budget:
            return max(1, math.ceil(seq_len * self.patch_budget))
        if self.patching == PATCHING_STATIC:
            return max(1, math.ceil(seq_len / int(self.patch_size)))
        return max(1, math.ceil(seq_len / self.min_patch))

    # ---- serialization ----
    def to_dict(self) -> dict:
        return self.model_dump()

    @classmethod
    def from_dict(cls, d: dict) -> "HyenaGLTConfig":
        return cls.model_validate(d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "HyenaGLTConfig":
        with open(path) as f:
            data = yaml.safe_load(f)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config fields, got a {type(data).__name__}")
        if "model" in data and isinstance(data["model"], dict):  # a full training config
            data = data["model"]
        return cls._validated(data, path)

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "HyenaGLTConfig":
        return cls._validated(json.loads(Path(path).read_text()), path)

    @classmethod
    def _validated(cls, data, path) -> "HyenaGLTConfig":
        """from_dict, with a ValueError that names the file and the first bad field."""
        from pydantic import ValidationError

        try:
            return cls.from_dict(data)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"]) or "(top level)"
            raise ValueError(f"{path}: {where}: {err['msg']}") from None
