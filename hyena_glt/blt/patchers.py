"""Patchers: where patches start. Each returns (B, L) boundaries that depend only on the prefix.

* `StaticPatcher`: a patch every `patch_size` bytes (3 = codons).
* `EntropyPatcher`: a small causal byte LM's next-byte entropy H[j] (of byte j given bytes
  < j). A patch starts at j where H[j] > threshold (`threshold`), where H jumps,
  H[j] - H[j-1] > threshold (`monotonic`), or where H[j] is among the top k of the trailing
  `entropy_window` entropies, k = window / patch_size (`topk`; a trailing window, because a
  top-k over the whole sequence would look at the future). Trained jointly (its CE joins the
  training loss) or beforehand (`entropy_joint: false`: load weights into `.lm`). With joint
  training the entropies fall as the model learns, so a fixed threshold drifts:
  `entropy_adapt: true` moves it (EMA, after each training forward) toward the rate
  1 / patch_size; topk mode has a fixed rate by construction.
  `dual` (BLT's global + relative criteria): a patch starts where H[j] > threshold OR
  H[j] - H[j-1] > jump_threshold. `optimal`: the boundaries minimising a stated cost under
  the length bounds, by a receding-horizon dynamic programme whose decision at byte p sees
  bytes <= p + patch_lookahead (`optimal_boundaries`; the bridge then lets byte i read only
  patches closed `patch_lookahead` bytes before it, which keeps the LM causal).
  `patch_adapt`: a complexity-adaptive merge ratio, a per-byte target patch length from the
  trailing mean entropy (`target_patch_length`); `optimal` uses it in its cost, the
  candidate modes as per-byte length bounds.
* `AdaptiveTokenMerger` (`learned`): boundary logit = -s * cos(W_q h[j], W_k h[j-1]) (low
  neighbour similarity of the local encoder states starts a patch) + a causal genomic
  pattern convolution over the byte embeddings + bias; p = sigmoid(logit), boundary where
  p > 0.5. Gradient reaches p through the byte gate (straight-through: forward 1, backward
  d confidence; or `soft`: the confidence itself) and a compression term pulling the
  boundary rate to 1 / patch_size.

Every patcher then applies min/max patch lengths exactly (`segments.enforce_patch_lengths`).
`calibrate(input_ids)` sets the entropy threshold / the merger bias so that the boundary rate
on a sample batch is 1 / patch_size.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import params
from ..config import (
    PATCHING_ENTROPY,
    PATCHING_LEARNED,
    PATCHING_NONE,
    PATCHING_STATIC,
    HyenaGLTConfig,
)
from ..layers import Block, make_norm
from ..loss import default_loss_weights, weighted_cross_entropy
from ..spec import LOCAL, ModelSpec
from .segments import enforce_patch_lengths, scan_boundaries

_QUANTILE_MAX = 1 << 22  # torch.quantile's input limit is 2^24; sample below it


class PatcherOutput(NamedTuple):
    """A named tuple, not a dataclass: wrappers that hook a module's output tensors (DeepSpeed
    ZeRO-3 re-gathers parameters for backward from them) see through tuples only."""

    boundaries: torch.Tensor  # (B, L) bool
    probs: torch.Tensor | None = None  # (B, L) boundary probabilities (learned)
    gate: torch.Tensor | None = None  # (B, L) multiplier of the bytes' patch input (learned)
    scores: torch.Tensor | None = None  # (B, L) entropies or logits, for inspection
    aux_loss_sum: torch.Tensor | None = None  # token-weighted auxiliary loss (sum)
    lag: int = 0  # the boundary at byte p depends on bytes <= p + lag (the bridge reads accordingly)


def _quantile(x: torch.Tensor, q: float) -> float:
    x = x.detach().float().flatten()
    if x.numel() > _QUANTILE_MAX:
        x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:_QUANTILE_MAX]]
    return float(torch.quantile(x, q))


def sub_config(config: HyenaGLTConfig, pattern: str) -> HyenaGLTConfig:
    """The same model settings with another layer pattern (for the local and entropy models)."""
    return config.model_copy(update={"pattern": pattern, "patching": PATCHING_NONE})


def patcher_lag(config: HyenaGLTConfig) -> int:
    """Bytes after p that the boundary at p depends on (the bridge's read lag): the lookahead
    of `optimal` entropy patching, else 0. A function of the config alone, so a stage that
    does not hold the patcher knows it too."""
    return config.patch_lookahead if config.patching == PATCHING_ENTROPY and config.entropy_mode == "optimal" else 0


class StaticPatcher(nn.Module):
    reads_states = False  # boundaries from the ids alone: the byte states need not be gathered

    def __init__(self, config: HyenaGLTConfig):
        super().__init__()
        self.size, self.min_patch, self.max_patch = int(config.patch_size), config.min_patch, config.max_patch

    def forward(self, input_ids, embeddings=None, hidden=None, labels=None, loss_weights=None) -> PatcherOutput:
        B, L = input_ids.shape
        b = (torch.arange(L, device=input_ids.device) % self.size == 0).expand(B, L)
        return PatcherOutput(enforce_patch_lengths(b, self.min_patch, self.max_patch))


def entropy_config(config: HyenaGLTConfig) -> HyenaGLTConfig:
    """The entropy patcher's small byte LM: `entropy_pattern` at width `entropy_d_model`."""
    d = config.entropy_d_model
    return config.model_copy(update={"pattern": config.entropy_pattern, "patching": PATCHING_NONE, "d_model": d,
                                     "num_heads": max(1, d // 64)})


class EntropyModel(nn.Module):
    """A small causal byte LM (its own embedding, `entropy_pattern` blocks, tied output).
    Its blocks follow the spec; its embedding and output stay replicated (they are small)."""

    def __init__(self, config: HyenaGLTConfig, spec: ModelSpec = LOCAL):
        super().__init__()
        cfg = entropy_config(config)
        self.spec = spec
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        params.tag(self.embed.weight, params.normal(cfg.init_std))
        self.layers = nn.ModuleList(Block(c, cfg, i, spec) for i, c in enumerate(cfg.layers))
        self.norm = make_norm(cfg)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        positions = spec.split_context(torch.arange(input_ids.shape[1], device=input_ids.device)[None])
        x = spec.to_blocks(self.embed(input_ids))
        for layer in self.layers:
            x = layer(x, positions)
        return F.linear(self.norm(spec.from_blocks(x)), self.embed.weight)


def next_byte_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H[:, j] = entropy (nats) of byte j given bytes < j, from logits (position j-1 predicts j); H[:, 0] = 0."""
    return entropy_with_next(logits)[:, :-1]


def entropy_with_next(logits: torch.Tensor) -> torch.Tensor:
    """(B, L + 1): next_byte_entropy plus H[:, L], the entropy of the byte after the sequence
    (from the last position's logits, so from bytes < L: the lookahead patcher's last input)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return F.pad(-(logp.exp() * logp).sum(-1), (1, 0))


def trailing_mean_entropy(entropy: torch.Tensor, window: int) -> torch.Tensor:
    """c[:, t] = mean of H[:, max(1, t - window + 1) .. t] (H[0] is no prediction and is left
    out); NaN at t = 0. Only entropies up to t, so only bytes < t."""
    B, L = entropy.shape
    cs = F.pad(entropy[:, 1:].double().cumsum(1), (1, 0))  # cs[t] = H[1] + ... + H[t]
    lagged = F.pad(cs, (window, 0))[:, :L]  # cs[t - window], 0 before the start
    count = torch.arange(L, device=entropy.device).clamp(max=window)
    return ((cs - lagged) / count).to(entropy.dtype)


def target_patch_length(entropy: torch.Tensor, reference: float | torch.Tensor, patch_size: float, min_patch: int,
                        max_patch: int, window: int) -> torch.Tensor:
    """The complexity-adaptive merge ratio: a per-byte target patch length (B, L).

    s[t] = patch_size * reference / c[t], clamped to [min_patch, max_patch], where c[t] is the
    trailing mean entropy (`trailing_mean_entropy`) and `reference` the mean entropy at which
    the target is patch_size (calibrated). Each patch is then meant to carry about the same
    entropy, patch_size * reference nats: long patches over repeats and low-complexity
    sequence, short ones where the sequence is hard to predict. Causal: s[t] uses bytes < t.
    """
    c = trailing_mean_entropy(entropy, window)
    s = patch_size * reference / c.clamp_min(1e-6)
    s = torch.where(torch.isnan(c), torch.full_like(s, float(patch_size)), s)
    return s.clamp(min_patch, max_patch)


def adaptive_bounds(target: torch.Tensor, min_patch: int, max_patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-byte (min, max) patch lengths that follow the target length s: a candidate is
    accepted once the patch holds floor(s / 2) bytes, a boundary is forced at ceil(2 s), both
    within [min_patch, max_patch]."""
    lo = torch.floor(target / 2).long().clamp(min_patch, max_patch)
    hi = torch.ceil(target * 2).long().clamp(min_patch, max_patch)
    return lo, hi


def _dp_tables(alpha, target: torch.Tensor, min_patch: int, max_patch: int, weight: float):
    """Per-byte costs of the optimal patcher, (B, N, S) over the states "the open patch holds
    l = s + 1 bytes before byte q": closing it at q (a boundary at q) and, at the horizon,
    leaving it open. target: (B, N)."""
    B, N = target.shape
    S = max_patch
    dev, dt = target.device, torch.float64
    ell = torch.arange(1, S + 1, device=dev)
    start = (torch.arange(N, device=dev)[:, None] - ell).clamp_min(0)  # (N, S): first byte of the open patch
    s0 = torch.gather(target.to(dt), 1, start.reshape(1, -1).expand(B, -1)).view(B, N, S)
    dev2 = (ell.to(dt) - s0) ** 2 / s0
    alpha = torch.as_tensor(alpha, dtype=dt, device=dev)
    alpha = alpha.view(-1, 1, 1) if alpha.dim() else alpha
    close = alpha + weight * dev2
    terminal = weight * torch.where(ell.to(dt) > s0, dev2, torch.zeros_like(dev2))
    allow_close = (ell >= min_patch).expand(B, N, S)
    return close, terminal, allow_close


def optimal_boundaries(entropy: torch.Tensor, alpha, target: torch.Tensor, min_patch: int, max_patch: int,
                       horizon: int, weight: float) -> torch.Tensor:
    """Boundaries minimising, under min_patch <= length <= max_patch (the last patch may be shorter),

        cost = sum over patches of [ alpha + weight * (length - s_start)^2 / s_start ]
             + sum over bytes merged into a patch (not its first byte) of entropy[byte]

    (alpha: the price of one global-model position; entropy: what merging a byte hides from
    the global model; s_start: the target length at the patch's first byte; the last, open
    patch pays only its excess over the target). Without the length term and bounds the
    optimum is the threshold rule entropy > alpha.

    Decided causally by a receding-horizon DP: the decision at byte p is the first decision of
    the exact optimum over bytes p .. p + horizon - 1 given the committed state (the open
    patch's length), the patch still open after the window paying its certain part (excess
    over the target). Decisions at p therefore see entropy[<= p + horizon - 1] and target[<=
    p + horizon - 1]. The optimum over every start state is computed for all p at once
    (horizon backward steps over (B, N, S) tables), the committed run by the parallel prefix
    scan of `scan_boundaries`. A horizon reaching past the end gives the exact global optimum.
    entropy, target: (B, N); alpha: a float or (B,) per row. Returns (B, N) bool.
    """
    B, N = entropy.shape
    S = max_patch
    # One position past the end, where the last patch is left open (its terminal cost).
    close, terminal, allow_close = _dp_tables(alpha, torch.cat([target, target[:, -1:]], 1), min_patch, max_patch, weight)
    close, allow_close = close[:, :N], allow_close[:, :N]
    merge = entropy.to(close.dtype)[:, :, None].expand(B, N, S)
    inf = torch.tensor(float("inf"), dtype=close.dtype, device=close.device)
    # V[:, q, s]: optimal cost from byte q in state s over the decisions left in the window,
    # then the terminal cost; horizon backward steps. V has N + 1 positions; past the end
    # there is nothing left to decide (the horizon is cut at the end of the sequence).
    end = terminal[:, N:]
    V = terminal
    branch_close = branch_merge = None
    for _ in range(max(1, horizon)):
        nxt = V[:, 1:]  # V at q + 1
        branch_close = torch.where(allow_close, close + nxt[:, :, :1], inf)
        branch_merge = torch.cat([merge[:, :, :-1] + nxt[:, :, 1:], inf.expand(B, N, 1)], 2)  # l = S must close
        V = torch.cat([torch.minimum(branch_close, branch_merge), end], 1)
    # The decision at p compares the branches built on h - 1 further steps: the last pass's.
    boundary_if = allow_close & (branch_close <= branch_merge)
    return scan_boundaries(boundary_if)


DEFAULT_ENTROPY_REF = math.log(4)  # uniform over A, C, G, T: the reference until calibrated
_BISECT_STEPS = 20


class EntropyPatcher(nn.Module):
    reads_states = False

    def __init__(self, config: HyenaGLTConfig, spec: ModelSpec = LOCAL):
        super().__init__()
        self.mode, self.joint, self.adapt = config.entropy_mode, config.entropy_joint, config.entropy_adapt
        self.patch_size, self.min_patch, self.max_patch = config.patch_size, config.min_patch, config.max_patch
        self.window = config.entropy_window
        self.k = max(1, round(config.entropy_window / config.patch_size))
        self.lookahead = patcher_lag(config)
        self.length_weight = config.patch_length_weight
        self.adaptive, self.complexity_window = config.patch_adapt, config.complexity_window
        self.lm = EntropyModel(config, spec)
        self.register_buffer("threshold", torch.tensor(float(config.entropy_threshold)))
        # Only the modes that use them hold these buffers, so older checkpoints load unchanged.
        if self.mode == "dual":
            self.register_buffer("jump_threshold", torch.tensor(float(config.entropy_jump_threshold)))
        if self.adaptive:
            self.register_buffer("entropy_ref", torch.tensor(DEFAULT_ENTROPY_REF))

    @property
    def lag(self) -> int:
        """Bytes after p that the boundary at p depends on (the bridge's read lag)."""
        return self.lookahead

    def statistic(self, entropy: torch.Tensor) -> torch.Tensor:
        """What the threshold is compared with: H[j] (threshold) or H[j] - H[j-1] (monotonic)."""
        if self.mode == "monotonic":
            return F.pad(entropy[:, 1:] - entropy[:, :-1], (1, 0))
        return entropy

    @staticmethod
    def jump(entropy: torch.Tensor) -> torch.Tensor:
        """H[j] - H[j-1]; 0 at j < 2 (H[0] is no prediction, so a jump from it means nothing)."""
        return F.pad(entropy[:, 2:] - entropy[:, 1:-1], (2, 0))

    def candidates(self, entropy: torch.Tensor) -> torch.Tensor:
        if self.mode in ("threshold", "monotonic"):
            return self.statistic(entropy) > self.threshold
        if self.mode == "dual":
            return (entropy > self.threshold) | (self.jump(entropy) > self.jump_threshold)
        # topk: rank of H[j] among the trailing window H[j-W+1..j] (earlier ties rank higher).
        W = self.window
        padded = F.pad(entropy, (W - 1, 0), value=float("-inf"))
        win = padded.unfold(1, W, 1)  # (B, L, W), last column is H[j] itself
        h = entropy[..., None]
        earlier = torch.arange(W, device=entropy.device) < W - 1
        rank = ((win > h) | ((win == h) & earlier)).sum(-1)
        return rank < self.k

    def target(self, entropy: torch.Tensor, reference=None) -> torch.Tensor:
        """Per-byte target patch length: patch_size, or with patch_adapt the complexity-adaptive one."""
        if not self.adaptive:
            return torch.full_like(entropy, float(self.patch_size))
        ref = self.entropy_ref if reference is None else reference
        return target_patch_length(entropy, ref, self.patch_size, self.min_patch, self.max_patch, self.complexity_window)

    def boundaries(self, ext: torch.Tensor, alpha=None, reference=None) -> torch.Tensor:
        """(B, L) boundaries from the (B, L + 1) entropies of `entropy_with_next`."""
        L = ext.shape[1] - 1
        if self.mode == "optimal":
            a = self.threshold if alpha is None else alpha
            return optimal_boundaries(ext, a, self.target(ext, reference), self.min_patch, self.max_patch,
                                      self.lookahead + 2, self.length_weight)[:, :L]
        entropy = ext[:, :L]
        cand = self.candidates(entropy)
        if self.adaptive:
            lo, hi = adaptive_bounds(self.target(entropy, reference), self.min_patch, self.max_patch)
            return enforce_patch_lengths(cand, lo, hi, longest=self.max_patch)
        return enforce_patch_lengths(cand, self.min_patch, self.max_patch)

    def forward(self, input_ids, embeddings=None, hidden=None, labels=None, loss_weights=None) -> PatcherOutput:
        train_lm = self.joint and self.training and labels is not None
        with torch.set_grad_enabled(train_lm and torch.is_grad_enabled()):
            logits = self.lm(input_ids)
        with torch.no_grad():
            ext = entropy_with_next(logits)
            entropy = ext[:, :-1]
            b = self.boundaries(ext)
            if self.adapt and self.training and (self.mode != "topk" or self.adaptive):
                # After this batch's boundaries are fixed (so they stay prefix-only): EMA toward
                # the thresholds that would have given 1 / patch_size boundaries (candidates).
                self._set_thresholds(ext, ema=0.5)
        aux = weighted_cross_entropy(logits, labels, loss_weights)[0] if train_lm else None
        return PatcherOutput(b, scores=entropy, aux_loss_sum=aux, lag=self.lag)

    def _rate(self, b: torch.Tensor) -> float:
        return float(b[:, 2:].float().mean())

    def _set_thresholds(self, ext: torch.Tensor, ema: float = 0.0) -> None:
        """Move the buffers to (1 - ema) * their value for rate 1 / patch_size on this batch + ema * now."""
        r = 1 / self.patch_size
        entropy = ext[:, :-1]

        def put(buf: torch.Tensor, value: float) -> None:
            buf.mul_(ema).add_((1 - ema) * value)

        ref = None
        if self.adaptive:
            ref = float(entropy[:, 1:].double().mean())
            put(self.entropy_ref, ref)
        if self.mode in ("threshold", "monotonic"):
            put(self.threshold, _quantile(self.statistic(entropy)[:, 2:], 1 - r))
        elif self.mode == "dual":
            # Half the rate from the global criterion, the rest from jumps among the bytes it left.
            h, j = entropy[:, 2:].flatten().float(), self.jump(entropy)[:, 2:].flatten().float()
            tg = _quantile(h, 1 - r / 2)
            rest = j[h <= tg]
            need = r * h.numel() - (h > tg).sum().item()
            tj = _quantile(rest, min(1.0, max(0.0, 1 - need / max(rest.numel(), 1)))) if rest.numel() else tg
            put(self.threshold, tg)
            put(self.jump_threshold, tj)
        elif self.mode == "optimal":
            put(self.threshold, self._solve_alpha(ext, ref, float(self.threshold) if ema else None))

    def _solve_alpha(self, ext: torch.Tensor, reference=None, around: float | None = None) -> float:
        """Bisection on the patch cost alpha for a boundary rate of 1 / patch_size (the rate
        falls as alpha grows; ties leave it within one step of the target). `around`: search
        near the current cost only (the per-step training update, 10 DP runs, not 20)."""
        if around is None:
            spread, steps = float(self.length_weight) * self.max_patch ** 2 + 1.0, _BISECT_STEPS
            lo, hi = float(ext.min()) - spread, float(ext.max()) + spread
        else:
            spread, steps = 2.0 * (1.0 + float(self.length_weight)), _BISECT_STEPS // 2
            lo, hi = around - spread, around + spread
        want = 1 / self.patch_size
        edges = (lo, hi)
        for _ in range(steps):
            mid = 0.5 * (lo + hi)
            if self._rate(self.boundaries(ext, mid, reference)) > want:
                lo = mid
            else:
                hi = mid
        if around is not None and (lo == edges[0] or hi == edges[1]):
            return self._solve_alpha(ext, reference)  # far from the current cost: search everything
        return 0.5 * (lo + hi)

    @torch.no_grad()
    def calibrate(self, input_ids: torch.Tensor) -> float:
        """Set the thresholds so that 1 / patch_size of the bytes are candidates on this batch
        (optimal: boundaries), and the adaptive target's reference entropy to its mean."""
        if self.mode != "topk" or self.adaptive:
            self._set_thresholds(entropy_with_next(self.lm(input_ids)))
        return float(self.threshold)


class AdaptiveTokenMerger(nn.Module):
    reads_states = True  # boundaries from the byte embeddings and the local encoder's states

    def __init__(self, config: HyenaGLTConfig, conv_channels: int = 16):
        super().__init__()
        D, std, K = config.d_model, config.init_std, config.merge_kernel
        self.patch_size, self.min_patch, self.max_patch = config.patch_size, config.min_patch, config.max_patch
        self.relaxation, self.compression_weight = config.merge_relaxation, config.compression_loss_weight
        self.q_proj = params.linear(D, D, std)
        self.k_proj = params.linear(D, D, std)
        # Genomic pattern convolution: causal, over the byte embeddings (motif-like detectors).
        self.pattern_conv = params.new_param((conv_channels, D, K), params.fan_in_uniform(D * K), no_weight_decay=True)
        self.pattern_out = params.linear(conv_channels, 1, 1.0 / math.sqrt(conv_channels))
        self.sim_scale = params.new_param((1,), params.constant(4.0), no_weight_decay=True)
        self.bias = params.new_param((1,), params.constant(0.0), no_weight_decay=True)

    def logits(self, embeddings: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        q = F.normalize(self.q_proj(hidden[:, 1:]), dim=-1)
        k = F.normalize(self.k_proj(hidden[:, :-1]), dim=-1)
        cos = F.pad((q * k).sum(-1), (1, 0))  # (B, L); position 0 always starts a patch anyway
        K = self.pattern_conv.shape[-1]
        conv = F.conv1d(F.pad(embeddings.transpose(1, 2), (K - 1, 0)), self.pattern_conv.to(embeddings.dtype))
        pattern = self.pattern_out(F.silu(conv).transpose(1, 2)).squeeze(-1)
        return -self.sim_scale * cos + pattern + self.bias

    def forward(self, input_ids, embeddings, hidden, labels=None, loss_weights=None) -> PatcherOutput:
        logit = self.logits(embeddings, hidden)
        p = torch.sigmoid(logit)
        b = enforce_patch_lengths(logit.detach() > 0, self.min_patch, self.max_patch)
        conf = torch.where(b, p, 1 - p)
        gate = conf if self.relaxation == "soft" else conf - conf.detach() + 1
        # Compression: token-weighted ((rate - 1/N) * N)^2 per sequence, rate straight-through.
        if loss_weights is not None:
            w = loss_weights.to(p.dtype)
        elif labels is not None:
            w = default_loss_weights(labels).to(p.dtype)
        else:
            w = torch.ones_like(p)
        w = w[:, 1:]
        hard = b[:, 1:].to(p.dtype) + p[:, 1:] - p[:, 1:].detach()
        seq_w = w.sum(1)
        rate = (hard * w).sum(1) / seq_w.clamp_min(1e-8)
        aux = self.compression_weight * (seq_w * ((rate - 1 / self.patch_size) * self.patch_size) ** 2).sum()
        return PatcherOutput(b, probs=p, gate=gate, scores=logit, aux_loss_sum=aux)

    @torch.no_grad()
    def calibrate(self, embeddings: torch.Tensor, hidden: torch.Tensor) -> float:
        """Shift the bias so that 1 / patch_size of the bytes have p > 0.5 on this batch."""
        logit = self.logits(embeddings, hidden)[:, 1:]
        self.bias.sub_(_quantile(logit, 1 - 1 / self.patch_size))
        return float(self.bias)


def make_patcher(config: HyenaGLTConfig, spec: ModelSpec = LOCAL) -> nn.Module:
    if config.patching == PATCHING_STATIC:
        return StaticPatcher(config)
    if config.patching == PATCHING_ENTROPY:
        return EntropyPatcher(config, spec)
    if config.patching == PATCHING_LEARNED:
        return AdaptiveTokenMerger(config)
    raise ValueError(f"patching: no patcher for {config.patching!r} (the plain model has none)")
