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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import params
from ..config import HyenaGLTConfig
from ..layers import Block, make_norm
from ..loss import default_loss_weights, weighted_cross_entropy
from ..spec import LOCAL, ModelSpec
from .segments import enforce_patch_lengths

_QUANTILE_MAX = 1 << 22  # torch.quantile's input limit is 2^24; sample below it


@dataclass
class PatcherOutput:
    boundaries: torch.Tensor  # (B, L) bool
    probs: torch.Tensor | None = None  # (B, L) boundary probabilities (learned)
    gate: torch.Tensor | None = None  # (B, L) multiplier of the bytes' patch input (learned)
    scores: torch.Tensor | None = None  # (B, L) entropies or logits, for inspection
    aux_loss_sum: torch.Tensor | None = None  # token-weighted auxiliary loss (sum)


def _quantile(x: torch.Tensor, q: float) -> float:
    x = x.detach().float().flatten()
    if x.numel() > _QUANTILE_MAX:
        x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:_QUANTILE_MAX]]
    return float(torch.quantile(x, q))


def sub_config(config: HyenaGLTConfig, pattern: str) -> HyenaGLTConfig:
    """The same model settings with another layer pattern (for the local and entropy models)."""
    return config.model_copy(update={"pattern": pattern, "patching": "none"})


class StaticPatcher(nn.Module):
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
    return config.model_copy(update={"pattern": config.entropy_pattern, "patching": "none", "d_model": d,
                                     "num_heads": max(1, d // 64)})


class EntropyModel(nn.Module):
    """A small causal byte LM (its own embedding, `entropy_pattern` blocks, tied output).
    Its blocks follow the spec; its embedding and output stay replicated (they are small)."""

    def __init__(self, config: HyenaGLTConfig, spec: ModelSpec = LOCAL):
        super().__init__()
        cfg = entropy_config(config)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        params.tag(self.embed.weight, params.normal(cfg.init_std))
        self.layers = nn.ModuleList(Block(c, cfg, i, spec) for i, c in enumerate(cfg.layers))
        self.norm = make_norm(cfg)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return F.linear(self.norm(x), self.embed.weight)


def next_byte_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H[:, j] = entropy (nats) of byte j given bytes < j, from logits (position j-1 predicts j); H[:, 0] = 0."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    h = -(logp.exp() * logp).sum(-1)
    return F.pad(h[:, :-1], (1, 0))


class EntropyPatcher(nn.Module):
    def __init__(self, config: HyenaGLTConfig, spec: ModelSpec = LOCAL):
        super().__init__()
        self.mode, self.joint, self.adapt = config.entropy_mode, config.entropy_joint, config.entropy_adapt
        self.patch_size, self.min_patch, self.max_patch = config.patch_size, config.min_patch, config.max_patch
        self.window = config.entropy_window
        self.k = max(1, round(config.entropy_window / config.patch_size))
        self.lm = EntropyModel(config, spec)
        self.register_buffer("threshold", torch.tensor(float(config.entropy_threshold)))

    def statistic(self, entropy: torch.Tensor) -> torch.Tensor:
        """What the threshold is compared with: H[j] (threshold) or H[j] - H[j-1] (monotonic)."""
        if self.mode == "monotonic":
            return F.pad(entropy[:, 1:] - entropy[:, :-1], (1, 0))
        return entropy

    def candidates(self, entropy: torch.Tensor) -> torch.Tensor:
        if self.mode in ("threshold", "monotonic"):
            return self.statistic(entropy) > self.threshold
        # topk: rank of H[j] among the trailing window H[j-W+1..j] (earlier ties rank higher).
        W = self.window
        padded = F.pad(entropy, (W - 1, 0), value=float("-inf"))
        win = padded.unfold(1, W, 1)  # (B, L, W), last column is H[j] itself
        h = entropy[..., None]
        earlier = torch.arange(W, device=entropy.device) < W - 1
        rank = ((win > h) | ((win == h) & earlier)).sum(-1)
        return rank < self.k

    def forward(self, input_ids, embeddings=None, hidden=None, labels=None, loss_weights=None) -> PatcherOutput:
        train_lm = self.joint and self.training and labels is not None
        with torch.set_grad_enabled(train_lm and torch.is_grad_enabled()):
            logits = self.lm(input_ids)
        with torch.no_grad():
            entropy = next_byte_entropy(logits)
            b = enforce_patch_lengths(self.candidates(entropy), self.min_patch, self.max_patch)
            if self.adapt and self.training and self.mode != "topk":
                # After this batch's boundaries are fixed (so they stay prefix-only): EMA toward
                # the threshold that would have given 1 / patch_size candidates.
                target = _quantile(self.statistic(entropy)[:, 2:], 1 - 1 / self.patch_size)
                self.threshold.mul_(0.5).add_(0.5 * target)
        aux = weighted_cross_entropy(logits, labels, loss_weights)[0] if train_lm else None
        return PatcherOutput(b, scores=entropy, aux_loss_sum=aux)

    @torch.no_grad()
    def calibrate(self, input_ids: torch.Tensor) -> float:
        """Set the threshold so that 1 / patch_size of the bytes are candidates on this batch."""
        stat = self.statistic(next_byte_entropy(self.lm(input_ids)))[:, 2:]
        if self.mode != "topk":
            self.threshold.fill_(_quantile(stat, 1 - 1 / self.patch_size))
        return float(self.threshold)


class AdaptiveTokenMerger(nn.Module):
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
    if config.patching == "static":
        return StaticPatcher(config)
    if config.patching == "entropy":
        return EntropyPatcher(config, spec)
    if config.patching == "learned":
        return AdaptiveTokenMerger(config)
    raise ValueError(f"patching: no patcher for {config.patching!r} (the plain model has none)")
