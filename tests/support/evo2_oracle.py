"""Vortex (the Evo 2 inference engine, PyPI `vtx`) as a CPU fp32 test oracle for
`hyena-glt import-evo2` / `export-vortex`. A helper module for tests/interop/test_evo2.py, not a test
file.

What it does, per docs/evo2.md and the measured notes on running Vortex on CPU:

* imports `vortex` with a plain-torch stand-in for its Triton rotary kernel
  (`vortex.ops.embedding.rotary.apply_rotary`, registered in sys.modules first), in a
  temporary working directory (the import opens ./activations_debug.log), and puts the root
  logger back as it was (the import calls logging.basicConfig);
* runs every Vortex call inside `vortex_env()`: `torch.cuda.device` answers a null context for
  a non-CUDA device (Vortex enters it in every Hyena forward; torch raises for a CPU device),
  and `torch.cuda.is_available()` says False so Vortex stays on the CPU in fp32 even on a GPU
  machine (no TF32 convolutions);
* shrinks a published config to a tiny model (`tiny_config`), draws weights for it in the
  release file's layout (`random_release_state`), writes the release format (`save_release`:
  one `torch.save` file, or `.partN` pieces), loads them with Vortex's own
  `custom_load_state_dict` (which reorders the attention rows as it does for the real files),
  and runs Vortex's forward (`vortex_logits`) and its cached generation (`vortex_generate`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
import sys
import tempfile
import types
import warnings
from pathlib import Path

import torch
import yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "interop" / "evo2_configs"
CONFIG_NAMES = [
    "evo2-1b-8k", "evo2-7b-8k", "evo2-7b-262k", "evo2-7b-1m", "evo2-20b-1m", "evo2-40b-8k", "evo2-40b-1m",
]

# Runtime settings for CPU fp32 (not model fields: import-evo2 never sees them).
CPU_OVERRIDES = {
    "use_fp8_input_projections": False,  # needs Transformer Engine
    "use_flash_attn": False,  # the SDPA path
    "attn_block_dtype": torch.float32,
    "hyena_block_dtype": torch.float32,
    "mlp_dtype": torch.float32,
    "use_hcs_kernel": False,
    "use_hcm_kernel": False,
    "use_hcl_kernel": False,
}


# ---------------------------------------------------------------------------- importing Vortex


def _apply_rotary(x, cos, sin, seqlen_offsets=0, cu_seqlens=None, max_seqlen=None, interleaved=False,
                  inplace=False, conjugate=False):
    """Plain-torch stand-in for Vortex's Triton `apply_rotary` (same signature and semantics:
    x (batch, seqlen, heads, headdim); cos/sin (seqlen_ro, rotary_dim / 2); rotates the first
    rotary_dim channels, NeoX half rotation unless interleaved)."""
    if cu_seqlens is not None:
        raise NotImplementedError("the rotary stand-in has no variable-length path")
    B, L = x.shape[:2]
    ro = cos.shape[-1] * 2
    pos = torch.arange(L, device=x.device)
    if isinstance(seqlen_offsets, int):
        c, s = cos[pos + seqlen_offsets][None, :, None], sin[pos + seqlen_offsets][None, :, None]
    else:  # one offset per sequence
        idx = seqlen_offsets.to(x.device)[:, None] + pos[None]
        c, s = cos[idx][:, :, None], sin[idx][:, :, None]
    if conjugate:
        s = -s
    xr = x[..., :ro]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., : ro // 2], xr[..., ro // 2 :]
        out = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)
    out = out.to(x.dtype)
    if inplace:
        x[..., :ro] = out
        return x
    return torch.cat([out, x[..., ro:]], dim=-1)


_VORTEX: types.SimpleNamespace | None = None
_WORKDIR: str | None = None


def load_vortex() -> types.SimpleNamespace:
    """The Vortex modules the oracle uses (imported once per process). ImportError if `vtx`
    (or one of its dependencies) is not installed."""
    global _VORTEX, _WORKDIR
    if _VORTEX is not None:
        return _VORTEX
    name = "vortex.ops.embedding.rotary"
    if name not in sys.modules:
        stand_in = types.ModuleType(name)
        stand_in.apply_rotary = _apply_rotary
        sys.modules[name] = stand_in
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    _WORKDIR = _WORKDIR or tempfile.mkdtemp(prefix="vortex-oracle-")
    cwd = os.getcwd()
    os.chdir(_WORKDIR)  # importing vortex opens ./activations_debug.log
    try:
        import vortex.model.generation as generation
        import vortex.model.model as model
        import vortex.model.utils as utils
        from vortex.model.tokenizer import CharLevelTokenizer
    finally:
        os.chdir(cwd)
        root.handlers[:], root.level = saved[0], saved[1]
    _VORTEX = types.SimpleNamespace(model=model, generation=generation, utils=utils,
                                    CharLevelTokenizer=CharLevelTokenizer)
    return _VORTEX


def vortex_unavailable_reason() -> str | None:
    """None if Vortex imports, else why not (for pytest.skip)."""
    try:
        load_vortex()
    except ImportError as e:
        return f"Vortex (PyPI vtx==1.1.0) cannot be imported: {e}; `make test` installs it"
    return None


@contextlib.contextmanager
def vortex_env():
    """Run Vortex on the CPU: torch.cuda.device(cpu) is a null context and CUDA looks absent."""
    real_device, real_available = torch.cuda.device, torch.cuda.is_available

    def device(d):
        if isinstance(d, (str, torch.device)) and torch.device(d).type != "cuda":
            return contextlib.nullcontext()
        return real_device(d)

    torch.cuda.device, torch.cuda.is_available = device, (lambda: False)
    try:
        with warnings.catch_warnings():  # Vortex on the CPU: its CUDA autocast and complex-state casts
            warnings.filterwarnings("ignore", message="CUDA is not available")
            warnings.filterwarnings("ignore", message="Casting complex values to real")
            yield
    finally:
        torch.cuda.device, torch.cuda.is_available = real_device, real_available


# ---------------------------------------------------------------------------- configs


def published_config(name: str) -> dict:
    with open(CONFIG_DIR / f"{name}.yml") as f:
        return yaml.safe_load(f)


def tiny_config(name: str, hidden: int = 64, layers: int = 8, head_dim: int = 16, **changes) -> dict:
    """A published config shrunk to CPU size, in the published format (a dict to write as YAML
    and give to import-evo2): `hidden` channels, the first `layers` blocks in the config's own
    order, heads of `head_dim`, filter groups of the published group size where it divides
    `hidden` (else 8 groups), the MLP width scaled by hidden / hidden_size. Every other field is
    kept as published; `changes` then overrides fields."""
    cfg = published_config(name)
    D = cfg["hidden_size"]
    kinds = {}
    for field in ("hcs_layer_idxs", "hcm_layer_idxs", "hcl_layer_idxs", "attn_layer_idxs"):
        for i in cfg[field]:
            kinds[i] = field
    for field in ("hcs_layer_idxs", "hcm_layer_idxs", "hcl_layer_idxs", "attn_layer_idxs"):
        cfg[field] = [i for i in range(layers) if kinds[i] == field]
    group_size = D // cfg["hcs_filter_groups"]
    groups = hidden // group_size if hidden % group_size == 0 else 8
    cfg.update(
        hidden_size=hidden, num_filters=hidden, num_layers=layers, num_attention_heads=hidden // head_dim,
        hcl_filter_groups=hidden, hcs_filter_groups=groups, hcm_filter_groups=groups,
        inner_mlp_size=int(round(cfg["inner_mlp_size"] * hidden / D)),
    )
    cfg.update(changes)
    return cfg


def write_config(cfg: dict, path: str | Path) -> Path:
    Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return Path(path)


def runtime_config(cfg: dict):
    """The dotdict Vortex is built from: the published-format `cfg` plus CPU_OVERRIDES."""
    vx = load_vortex()
    return vx.utils.dotdict({**copy.deepcopy(cfg), **CPU_OVERRIDES})


# ---------------------------------------------------------------------------- models


def new_vortex(cfg: dict):
    """An fp32 StripedHyena of `cfg` on the CPU with Vortex's own (random) initialisation."""
    vx = load_vortex()
    with vortex_env():
        model = vx.model.StripedHyena(runtime_config(cfg))
    return model.float().eval()


def random_release_state(cfg: dict, seed: int = 0, extra_state: bool = True) -> dict[str, torch.Tensor]:
    """Weights for `cfg` in the release file's layout (attention rows (head, q|k|v, head_dim)),
    drawn so that a tiny model's forward is well conditioned: poles lambda = -exp(U(log 1e-3,
    0)) (stable, up to ~1000-position time constants), embedding RMS 0.05, linear layers about
    1/sqrt(fan_in), biases and skips nonzero (so every mapping is exercised). With
    `extra_state`, each Hyena input projection also carries a `_extra_state` entry (as Transformer
    Engine fp8 checkpoints do), which loaders drop."""
    g = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        return torch.randn(shape, generator=g) * std

    template = new_vortex(cfg).state_dict()
    state = {}
    for key, t in template.items():
        shape, leaf = tuple(t.shape), key.rsplit(".", 1)[-1]
        if key.endswith("rotary_emb.inv_freq"):
            state[key] = t.clone()
        elif key == "embedding_layer.weight":
            state[key] = normal(shape, 0.05)
        elif leaf == "scale":  # RMSNorm
            state[key] = 1 + normal(shape, 0.1)
        elif leaf == "log_poles":
            u = torch.rand(shape, generator=g) * math.log(1e-3)  # U(log 1e-3, 0)
            state[key] = -torch.exp(u)
        elif leaf == "residues":
            state[key] = normal(shape, 0.1 / math.sqrt(shape[1]))
        elif leaf == "D":
            state[key] = normal(shape, 0.5)
        elif leaf == "h":  # (G, 1, K): short (SE) or medium (MR) explicit taps
            K = shape[-1]
            decay = torch.exp(-torch.arange(K) / 16.0) if K >= 128 else torch.ones(K)
            state[key] = normal(shape, 1 / math.sqrt(K)) * decay
        elif leaf == "short_filter_weight":
            state[key] = normal(shape, 1 / math.sqrt(shape[-1]))
        elif leaf == "bias":
            state[key] = normal(shape, 0.05)
        elif leaf == "weight" and len(shape) == 2:
            out_layer = key.endswith(("out_filter_dense.weight", "out_proj.weight", "l3.weight"))
            state[key] = normal(shape, (0.5 if out_layer else 1.0) / math.sqrt(shape[1]))
        else:
            raise AssertionError(f"oracle: no rule to draw {key} {shape}")
        if extra_state and key.endswith("projections.weight"):
            state[key.replace(".weight", "._extra_state")] = io.BytesIO(b"fp8 metadata stand-in")
    return state


def save_release(state: dict, path: str | Path, parts: int = 0) -> list[Path]:
    """Write `state` as Evo 2 releases are: one `torch.save` file at `path`, or with `parts`
    > 0 that file's bytes cut into `path.part0` .. `path.part{parts-1}` (and no `path`)."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    if not parts:
        path.write_bytes(data)
        return [path]
    size = -(-len(data) // parts)
    out = []
    for i in range(parts):
        p = path.with_name(f"{path.name}.part{i}")
        p.write_bytes(data[i * size : (i + 1) * size])
        out.append(p)
    return out


def load_release(path: str | Path) -> dict:
    """A release file as Vortex's loader reads it (weights_only, mmap, BytesIO allowed)."""
    with torch.serialization.safe_globals([io.BytesIO]):
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def build_vortex(cfg: dict, state: dict):
    """Vortex's model of `cfg` holding `state` (release layout), loaded with Vortex's own
    custom_load_state_dict (drops `_extra_state` without TE, reorders the attention rows);
    fp32, eval mode."""
    model = new_vortex(cfg)
    state = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in state.items()}
    with vortex_env(), torch.no_grad():
        model.custom_load_state_dict(state, strict=True)
    return model.float().eval()


@torch.no_grad()
def vortex_logits(model, evo_ids: torch.Tensor) -> torch.Tensor:
    """Vortex's logits (B, L, vocab) of Evo 2 ids (B, L) (one stateless forward)."""
    with vortex_env():
        logits, _ = model(evo_ids)
    return logits.float()


class _Tokenizer:
    """What Vortex's Generator reads of a tokenizer (CharLevelTokenizer has no `eos`)."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.eos = vocab_size, 0


def _byte_greedy(logits, top_k=1, top_p=0.0, temperature=1.0):
    """Greedy over the 256 byte ids only: what hyena-glt's sampler allows (its specials and
    padded rows are Evo 2 ids 256..511), so both pick from the same tokens."""
    return logits[..., :256].argmax(dim=-1)


@torch.no_grad()
def vortex_generate(model, evo_prompt: torch.Tensor, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Vortex's own cached generation (prefill through the FFT path, then step_fir / step_iir
    and the KV cache) from `evo_prompt` (B, L): greedy over byte ids. Returns (new ids (B, N),
    their step logits (B, N, vocab))."""
    vx = load_vortex()
    gen = vx.generation.Generator(model, _Tokenizer(model.config.vocab_size), top_k=1, top_p=1.0, temperature=0.0)
    real_sample = vx.generation.sample
    vx.generation.sample = _byte_greedy
    try:
        with vortex_env():
            ids, scores, _ = gen.generate(device="cpu", input_ids=evo_prompt, num_tokens=n_tokens,
                                          cached_generation=True, print_generation=False, verbose=False,
                                          stop_at_eos=False)
    finally:
        vx.generation.sample = real_sample
    return ids, scores.float()
