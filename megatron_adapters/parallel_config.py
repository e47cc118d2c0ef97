"""One parallel configuration, its validation, and the rank <-> coordinates map.

`ParallelConfig` names the model-parallel sizes (tp, cp, pp, virtual stages), whether
sequence parallelism is on and the ZeRO stage; data parallelism is whatever remains of the
world size. `check_layout` checks every constraint the parallel model relies on *before* any
process group exists, and raises one `ParallelConfigError` whose single line names the
numbers. It is the one home of the layout rules: the training config (TrainConfig), `train
--dry-run`, the parallel builder and every step ask it, none re-checks a rule itself.

Rank order is megatron-core's default "tp-cp-ep-dp-pp" (tp fastest, pp slowest):
    rank = tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank))
`rank_coords` reproduces it without process groups, so a converter can shard a checkpoint
offline; `groups.initialize_parallel` asserts it agrees with megatron's groups.
"""

from __future__ import annotations

from dataclasses import dataclass

from hyena_glt.config import PATCHING_ENTROPY, PATCHING_NONE, HyenaGLTConfig
from hyena_glt.kinds import CP_LONG_CONV_PATHS, CP_LONG_CONV_STATE  # how D/H convolutions cross CP ranks

# ZeRO stage 3 partitions the parameters themselves (deepspeed_zero.py).
ZERO_PARAMETER_STAGE = 3


class ParallelConfigError(ValueError):
    """A layout that cannot work for this model / world size / sequence length."""


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1  # tensor parallel
    cp: int = 1  # context parallel (zigzag)
    pp: int = 1  # pipeline stages (physical)
    sp: bool = False  # sequence parallel inside each TP group (needs tp > 1)
    vpp: int | None = None  # virtual stages per pipeline rank (interleaved 1F1B); None = plain 1F1B
    cp_long_conv: str = CP_LONG_CONV_STATE  # D/H convolutions under CP: halo + modal state, or all-to-all
    zero_stage: int = 0  # DeepSpeed ZeRO stage of the run (0: none); stage 3 partitions the parameters

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.cp * self.pp

    @property
    def num_stages(self) -> int:
        """Total (virtual) pipeline stages the layers are split into."""
        return self.pp * (self.vpp or 1)

    def dp(self, world_size: int) -> int:
        return world_size // self.model_parallel_size

    def describe(self, world_size: int | None = None) -> str:
        dp = f" dp={self.dp(world_size)}" if world_size else ""
        vpp = f" vpp={self.vpp}" if self.vpp else ""
        path = f" cp_long_conv={self.cp_long_conv}" if self.cp > 1 else ""
        return f"tp={self.tp} cp={self.cp}{path} pp={self.pp}{vpp} sp={'on' if self.sp else 'off'}{dp}"


@dataclass(frozen=True)
class RankCoords:
    tp: int
    cp: int
    dp: int
    pp: int


@dataclass(frozen=True)
class Layout:
    """A validated (parallel config, model config, world size): everything needed to know
    what any rank holds, with or without process groups."""

    parallel: ParallelConfig
    model: HyenaGLTConfig
    world_size: int

    @property
    def dp(self) -> int:
        return self.parallel.dp(self.world_size)

    def coords(self, rank: int) -> RankCoords:
        return rank_coords(rank, self.parallel, self.world_size)

    def stage_layers(self) -> list[list[int]]:
        return stage_layers(self.model, self.parallel.num_stages)

    def chunk_stages(self, pp_rank: int) -> list[int]:
        """Virtual stage index of each model chunk held by pipeline rank `pp_rank` (megatron's
        interleaving: chunk v of rank r is stage v * pp + r)."""
        return [v * self.parallel.pp + pp_rank for v in range(self.parallel.vpp or 1)]


def rank_coords(rank: int, pcfg: ParallelConfig, world_size: int) -> RankCoords:
    dp = pcfg.dp(world_size)
    tp_r = rank % pcfg.tp
    rest = rank // pcfg.tp
    cp_r = rest % pcfg.cp
    rest //= pcfg.cp
    dp_r = rest % dp
    pp_r = rest // dp
    return RankCoords(tp=tp_r, cp=cp_r, dp=dp_r, pp=pp_r)


def stage_layers(cfg: HyenaGLTConfig, num_stages: int) -> list[list[int]]:
    """Global layer indices of each pipeline stage: from '|' in the pattern if given,
    otherwise as even as possible (the first num_layers % num_stages stages get one more)."""
    counts = cfg.stage_layer_counts
    if counts is None:
        base, extra = divmod(cfg.num_layers, num_stages)
        counts = [base + (1 if s < extra else 0) for s in range(num_stages)]
    out, start = [], 0
    for c in counts:
        out.append(list(range(start, start + c)))
        start += c
    return out


def zigzag_chunks(cp: int) -> int:
    """Chunks a sequence is cut into under context parallelism: two per CP rank (zigzag, so
    every rank gets an equal share of the causal work). A sequence length must be a multiple
    of it; `zigzag_splits` is that rule, asked by check_layout and by the training curriculum
    (whose lengths are all multiples of its `multiple_of`)."""
    return 2 * cp


def zigzag_splits(seq_length: int, cp: int) -> bool:
    """Whether a sequence of `seq_length` splits into the zigzag chunks of `cp` ranks."""
    return seq_length % zigzag_chunks(cp) == 0


# Model features the model-parallel modules do not implement (yet): config field -> the only
# value they accept under tp/cp/pp > 1. A config using one is rejected instead of silently
# computing another model; with tp = cp = pp = 1 the single-device model is replicated over
# data parallel (replicated.py) and any config runs.
_SINGLE_DEVICE_ONLY = {"position_periods": []}


def _token_merging_errors(pcfg: ParallelConfig, cfg: HyenaGLTConfig) -> list[str]:
    """Token merging (merging.py) runs in every layout; its entropy patcher's byte LM is
    sharded over TP like the other blocks."""
    errors = []
    if cfg.patching == PATCHING_ENTROPY and pcfg.tp * pcfg.cp > 1:
        from hyena_glt.blt import entropy_config

        ent, tp, tc = entropy_config(cfg), pcfg.tp, pcfg.tp * pcfg.cp
        sizes = {"d_model (entropy_d_model)": (ent.d_model, tc, "tp*cp"),
                 "num_filter_groups": (ent.num_filter_groups, tc, "tp*cp"),
                 "mlp hidden size": (ent.mlp_hidden, tp, "tp")}
        if "*" in ent.pattern:
            sizes["attention heads (entropy_d_model // 64)"] = (ent.num_heads, tp, "tp")
        errors += [f"the entropy patcher's byte LM {k}={n} is not divisible by {by}={d}"
                   for k, (n, d, by) in sizes.items() if n % d]
    return errors


def check_layout(
    pcfg: ParallelConfig,
    cfg: HyenaGLTConfig,
    world_size: int | None = None,
    seq_length: int | None = None,
) -> None:
    """Raise ParallelConfigError (one line, every violated rule with its numbers) if the layout
    cannot run this model. Pure function: call it before building any process group."""
    tp, cp, pp, vpp = pcfg.tp, pcfg.cp, pcfg.pp, pcfg.vpp
    errors: list[str] = []
    for name, v in (("tp", tp), ("cp", cp), ("pp", pp)):
        if not isinstance(v, int) or v < 1:
            errors.append(f"{name}={v} must be a positive integer")
    if errors:
        raise ParallelConfigError("invalid parallel layout: " + "; ".join(errors))
    if pcfg.cp_long_conv not in CP_LONG_CONV_PATHS:
        errors.append(f"cp_long_conv={pcfg.cp_long_conv!r} must be one of {CP_LONG_CONV_PATHS}")
    if vpp is not None and (vpp < 2 or pp < 2):
        errors.append(f"vpp={vpp} needs vpp >= 2 and pp >= 2 (got pp={pp}); use vpp=1 (parallel.vpp) for plain 1F1B")
    if pcfg.sp and tp < 2:
        errors.append(f"sequence parallel needs tp > 1, got tp={tp} (parallel.sp, parallel.tp)")
    if pcfg.zero_stage == ZERO_PARAMETER_STAGE and pp > 1:
        errors.append(f"zero.stage={ZERO_PARAMETER_STAGE} shards parameters and cannot run with pipeline parallelism "
                      f"(pp={pp}); use stage 1 or 2")
    if world_size is not None and world_size % (tp * cp * pp):
        errors.append(f"world size {world_size} is not divisible by tp*cp*pp = {tp}*{cp}*{pp} = {tp * cp * pp}")
    tc = tp * cp
    if cfg.d_model % tc:
        errors.append(f"d_model={cfg.d_model} is not divisible by tp*cp = {tp}*{cp} = {tc}")
    if cfg.num_heads % tc:
        errors.append(f"num_heads={cfg.num_heads} is not divisible by tp*cp = {tp}*{cp} = {tc}")
    if cfg.num_filter_groups % tc:
        errors.append(f"num_filter_groups={cfg.num_filter_groups} is not divisible by tp*cp = {tp}*{cp} = {tc}")
    if cfg.vocab_size % tp:
        errors.append(f"vocab_size={cfg.vocab_size} is not divisible by tp={tp} (vocab-parallel embedding)")
    if cfg.mlp_hidden % tp:
        errors.append(f"mlp hidden size {cfg.mlp_hidden} is not divisible by tp={tp}")
    for field, plain in _SINGLE_DEVICE_ONLY.items():
        value = getattr(cfg, field, plain)
        if value != plain and tp * cp * pp > 1:
            errors.append(f"{field}={value!r} is not supported by the parallel layouts (only {plain!r}); use data parallelism only (tp=cp=pp=1)")
    if cfg.patching != PATCHING_NONE:
        errors += _token_merging_errors(pcfg, cfg)
    stages = pcfg.num_stages
    counts = cfg.stage_layer_counts
    if counts is not None and len(counts) != stages:
        errors.append(
            f"pattern {cfg.pattern!r} gives {len(counts)} pipeline stages but pp*vpp = {pp}*{vpp or 1} = {stages}"
        )
    elif cfg.num_layers < stages:
        errors.append(f"{cfg.num_layers} layers cannot fill pp*vpp = {pp}*{vpp or 1} = {stages} pipeline stages")
    if seq_length is not None:
        if not zigzag_splits(seq_length, cp):
            errors.append(f"sequence length {seq_length} is not divisible by 2*cp = {zigzag_chunks(cp)} (zigzag chunks; "
                          "train.seq_len, parallel.cp)")
        elif pcfg.sp and (seq_length // cp) % tp:
            errors.append(f"sequence length per CP rank {seq_length // cp} is not divisible by tp={tp} (sequence parallel)")
        elif cp > 1:
            # A halo comes from the neighbouring chunk only, so a chunk must cover a full halo.
            chunk, need = seq_length // zigzag_chunks(cp), cfg.short_conv_halo()
            if chunk < need:
                errors.append(
                    f"zigzag chunk length {seq_length}/(2*cp) = {chunk} is shorter than the "
                    f"{need}-position halo of a {need + 1}-tap short convolution"
                )
    if errors:
        raise ParallelConfigError(f"invalid parallel layout ({pcfg.describe(world_size)}): " + "; ".join(errors))


def make_layout(
    pcfg: ParallelConfig, cfg: HyenaGLTConfig, world_size: int, seq_length: int | None = None
) -> Layout:
    check_layout(pcfg, cfg, world_size, seq_length)
    return Layout(pcfg, cfg, world_size)
