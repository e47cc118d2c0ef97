"""Evo 2 interop: `hyena-glt import-evo2` (a released Evo 2 checkpoint -> a hyena-glt model
directory) and `hyena-glt export-vortex` (a hyena-glt model -> the checkpoint + config Vortex,
the Evo 2 inference engine, loads).

Every difference between the two formats is written once, in this file, for both directions:

* the config: `config_from_evo2` (a published Vortex YAML -> HyenaGLTConfig) and
  `config_to_evo2` (the reverse, after `export_refusals` found nothing Evo 2 cannot express);
* the tensors: `tensor_rules(cfg)`, one `Rule` per Vortex key with its hyena-glt key and both
  transforms (vocabulary rows, filter tap order, poles, dropped or computed entries).

docs/evo2.md has the mapping table, what is refused, and how the tests check it against
Vortex itself (tests/support/evo2_oracle.py).
"""

from __future__ import annotations

import errno
import glob
import io
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml

# ---------------------------------------------------------------------------- vocabulary
# hyena-glt: id = byte + 4 (ids 0..3 are PAD, BOS, EOS, SEP). Evo 2: id = byte, 512 rows.
# Rows map one to one, ours[(r + 4) % V] = evo[r]: a bijection, so export(import(x)) gives
# back x's rows exactly (Evo 2 rows 508..511 land on our specials, ours 260..511 on its
# 256..507).
from hyena_glt.config import MAX_LENGTH, MAX_WIDTH, PATCHING_NONE
from hyena_glt.tokenizer import NUM_SPECIAL

EVO2_VOCAB_SIZE = 512

# ---------------------------------------------------------------------------- configs

# Vortex's four block types (short, medium and long Hyena filters, attention). Which layer
# kind each is, is the kind's declaration (`LayerKind.evo2`, hyena_glt/kinds.py); a Vortex
# config lists a type's blocks in `<type>_layer_idxs`.
HCS, HCM, HCL, ATTN = "hcs", "hcm", "hcl", "attn"
VORTEX_BLOCKS = (HCS, HCM, HCL, ATTN)
HYENA_BLOCKS = (HCS, HCM, HCL)
LAYER_FIELDS = {f"{block}_layer_idxs": block for block in VORTEX_BLOCKS}  # Vortex field -> block type
_REQUIRED = object()


def block_kinds() -> dict[str, str]:
    """Vortex block type -> the code of the registered layer kind that is it."""
    from hyena_glt.kinds import KINDS

    found = {k.evo2: code for code, k in KINDS.items() if k.evo2 is not None}
    unknown = sorted(set(found) - set(VORTEX_BLOCKS))
    if unknown:
        raise ValueError(f"layer kind(s) {[found[b] for b in unknown]} declare Evo 2 block type(s) {unknown}; "
                         f"Vortex has {', '.join(VORTEX_BLOCKS)}")
    return found


def layer_field_codes() -> dict[str, str]:
    """Vortex layer-index field (`hcs_layer_idxs`, ...) -> the code of its layer kind."""
    codes = block_kinds()
    return {field: codes[block] for field, block in LAYER_FIELDS.items() if block in codes}


def _blocks(pattern: str) -> dict[str, str | None]:
    """Each layer code of `pattern` -> its Vortex block type (None: the kind has none)."""
    from hyena_glt.kinds import layer_kind

    return {c: layer_kind(c).evo2 for c in dict.fromkeys(pattern)}

# Fields Vortex reads that define the model; config_from_evo2 maps or checks each one.
MODEL_FIELDS = frozenset({
    "vocab_size", "hidden_size", "num_filters", "num_layers", "num_attention_heads", *LAYER_FIELDS,
    "hcs_filter_groups", "hcm_filter_groups", "hcs_filter_length", "hcm_filter_length", "short_filter_length",
    "short_filter_bias", "state_size", "eps", "rotary_emb_base", "rotary_emb_scaling_factor",
    "use_interpolated_rotary_pos_emb", "inner_mlp_size", "inner_size_multiple_of", "model_parallel_size",
    "mlp_activation", "evo2_style_activations", "proj_groups", "smeared_gqa", "column_split_hyena",
    "column_split", "interleave", "tie_embeddings", "mha_out_proj_bias", "hyena_out_proj_bias", "hyena_flip_x1x2",
    "qkv_proj_bias", "final_norm", "use_flash_rmsnorm", "long_fir_threshold", "max_seqlen", "tokenizer_type",
})
# Fields that do not change what the model computes (kernels, precision, parallel layout,
# initialisation, logging, bookkeeping), or that Vortex never reads: accepted and ignored.
IGNORED_FIELDS = frozenset({
    "model_name", "hcl_filter_groups",  # Vortex gives every LI channel its own filter whatever this says
    "hyena_filter_groups", "make_vocab_size_divisible_by", "mlp_init_method", "mlp_output_init_method",
    "log_intermediate_values", "pipe_parallel_size", "use_fp8_input_projections", "max_batch_size",
    "use_flash_attn", "use_flash_depthwise", "use_flashfft", "use_laughing_hyena", "inference_mode",
    "prefill_style", "print_activations", "use_hcs_kernel", "use_hcm_kernel", "use_hcl_kernel", "compile",
    "low_mem_mode", "attn_block_dtype", "hyena_block_dtype", "mlp_dtype", "depthwise_dtype", "params_dtype",
    "ground_truth_activations_path", "seqlen", "padding_idx",
})

# (field, the value Vortex assumes when the field is absent, the value we need, what another value means)
_FIXED_FIELDS = [
    ("hyena_flip_x1x2", False, False, "the Hyena gate and key projections are swapped"),
    ("qkv_proj_bias", True, False, "the Hyena and attention input projections have biases"),
    ("proj_groups", 1, 1, "grouped-query attention"),
    ("smeared_gqa", False, False, "grouped-query attention"),
    ("column_split_hyena", True, False, "the Hyena projection rows are split per head"),
    ("column_split", True, True, "the attention rows in the file are (q|k|v, head, head_dim)"),
    ("interleave", False, True, "the Hyena projection rows are in q | k | v blocks, not per channel"),
    ("short_filter_bias", False, False, "the featurizer has a bias"),
    ("tie_embeddings", False, True, "a separate output layer"),
    ("final_norm", True, True, "no final norm"),
    ("use_flash_rmsnorm", False, False, "flash-attn's RMSNorm (eps inside the square root) replaces Evo 2's"),
    ("long_fir_threshold", None, None, "long filters are truncated to that many taps"),
    ("tokenizer_type", "CharLevelTokenizer", "CharLevelTokenizer", "ids that are not byte values"),
]


def _value(evo: dict, key: str, default=_REQUIRED):
    if key in evo and evo[key] is not None:
        return evo[key]
    if default is _REQUIRED:
        raise ValueError(f"missing field {key}")
    return default


MAX_LAYERS = 4096  # Evo 2 40B has 50: a larger num_layers is a damaged config (and is looped over)


def _whole(evo: dict, key: str, default=_REQUIRED, low: int = 1, high: int = MAX_WIDTH) -> int | None:
    """A whole-number field in [low, high], or ValueError naming it (None: absent, with default
    None). YAML gives ints; a float that is whole or a string of digits is taken too, anything
    else is refused."""
    v = _value(evo, key, default)
    if v is None:
        return None
    n = None
    if isinstance(v, int) and not isinstance(v, bool):
        n = v
    elif isinstance(v, float) and v.is_integer():
        n = int(v)
    elif isinstance(v, str):
        try:
            n = int(v)
        except ValueError:
            pass
    if n is None or not low <= n <= high:
        raise ValueError(f"{key}: expected a whole number in [{low}, {high}], got {v!r}")
    return n


def _real(evo: dict, key: str, default=_REQUIRED) -> float:
    """A finite number field (a number, or a string YAML did not read as one: `1e-6`), or ValueError naming it."""
    v = _value(evo, key, default)
    try:
        x = float(v) if isinstance(v, (int, float, str)) and not isinstance(v, bool) else math.nan
    except (ValueError, OverflowError):
        x = math.nan
    if not math.isfinite(x):
        raise ValueError(f"{key}: expected a finite number, got {v!r}")
    return x


def _same(a, b) -> bool:
    if isinstance(b, bool) or b is None:  # Vortex tests these fields for truth
        return bool(a) == bool(b)
    return a == b


def _validated(fields: dict):
    from pydantic import ValidationError

    from hyena_glt import HyenaGLTConfig

    try:
        return HyenaGLTConfig(**fields)
    except ValidationError as e:
        msgs = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
        raise ValueError(f"not expressible as a hyena-glt config: {msgs}") from None


def config_from_evo2(evo: dict):
    """A published Evo 2 / Vortex config (the YAML as a dict) as a HyenaGLTConfig. ValueError
    naming the field for anything the model cannot express, or that this importer does not know."""
    if not isinstance(evo, dict):
        raise ValueError("not a YAML mapping of config fields")
    odd = [k for k in evo if not isinstance(k, str)]
    if odd:
        raise ValueError(f"field {odd[0]!r}: field names must be text")
    unknown = sorted(set(evo) - MODEL_FIELDS - IGNORED_FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}: this importer does not know what they do in Vortex")
    for key, default, need, meaning in _FIXED_FIELDS:
        got = evo.get(key, default)
        if not _same(got, need):
            shown = f"{got!r}" if key in evo else f"absent (Vortex default {default!r})"
            raise ValueError(f"{key}: {shown} means {meaning}; hyena-glt needs {need!r}")

    n = _whole(evo, "num_layers", high=MAX_LAYERS)
    codes = block_kinds()
    kinds: dict[int, str] = {}
    for field, code in layer_field_codes().items():
        listed = evo.get(field)
        if listed is not None and not isinstance(listed, list):
            raise ValueError(f"{field}: expected a list of layer indices, got {listed!r}")
        for i in listed or []:
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n:
                raise ValueError(f"{field}: {i!r} is not a layer index in 0..{n - 1}")
            if i in kinds:
                raise ValueError(f"{field}: layer {i} is also listed as another kind of block")
            kinds[i] = code
    missing = [i for i in range(n) if i not in kinds]
    if missing:
        shown = f"{missing[:8]}"[:-1] + (f", ... ({len(missing)} in all)]" if len(missing) > 8 else "]")
        raise ValueError(f"layers {shown} are in none of {', '.join(LAYER_FIELDS)}")
    pattern = "".join(kinds[i] for i in range(n))
    blocks = set(_blocks(pattern).values())

    D = _whole(evo, "hidden_size")
    filters = _whole(evo, "num_filters", D)
    if filters > D or D % filters:
        raise ValueError(f"num_filters: {filters} must divide hidden_size={D} (Vortex asserts it)")
    groups = {}
    if HCS in blocks:
        groups["hcs_filter_groups"] = _whole(evo, "hcs_filter_groups")
        if _whole(evo, "hcs_filter_length") >= 128:
            raise ValueError(f"hcs_filter_length: {evo['hcs_filter_length']} >= 128 gives Vortex's short filters a "
                             f"skip term and FFT path; hyena-glt's {codes[HCS]} filters of Evo 2 have neither "
                             "(needs < 128)")
    if HCM in blocks:
        groups["hcm_filter_groups"] = _whole(evo, "hcm_filter_groups")
        if _whole(evo, "hcm_filter_length") < 128:
            raise ValueError(f"hcm_filter_length: {evo['hcm_filter_length']} < 128 leaves Vortex's medium filters "
                             f"without their skip term; hyena-glt's {codes[HCM]} filters have one (needs >= 128)")
    if len(set(groups.values())) > 1:
        raise ValueError(f"hcs_filter_groups ({groups['hcs_filter_groups']}) != hcm_filter_groups "
                         f"({groups['hcm_filter_groups']}): hyena-glt has one num_filter_groups for "
                         f"{codes[HCS]} and {codes[HCM]} filters")
    hyena = bool(blocks & set(HYENA_BLOCKS))

    act = _value(evo, "mlp_activation", "gelu")
    if act not in ("gelu", "silu"):
        raise ValueError(f"mlp_activation: {act!r}; Vortex runs 'gelu' or 'silu'")
    evo2_style = bool(evo.get("evo2_style_activations", False))
    inner = _whole(evo, "inner_mlp_size", None)
    if inner is None:  # Vortex's own default width
        multiple = _whole(evo, "inner_size_multiple_of", 64) * _whole(evo, "model_parallel_size", 1)
        inner = multiple * ((int(2 * D * 4 / 3) + multiple - 1) // multiple)

    mha_bias, hyena_bias = bool(evo.get("mha_out_proj_bias", True)), bool(evo.get("hyena_out_proj_bias", False))
    if ATTN in blocks and hyena and mha_bias != hyena_bias:
        raise ValueError(f"mha_out_proj_bias ({mha_bias}) != hyena_out_proj_bias ({hyena_bias}): hyena-glt has one "
                         "mixer_out_bias for Hyena and attention blocks")
    out_bias = mha_bias if ATTN in blocks else hyena_bias

    interpolated = bool(evo.get("use_interpolated_rotary_pos_emb", False))
    fields = dict(
        pattern=pattern, d_model=D, num_heads=_whole(evo, "num_attention_heads"),
        vocab_size=_whole(evo, "vocab_size"), max_seq_len=_whole(evo, "max_seqlen", 8192, high=MAX_LENGTH),
        mlp_hidden_size=inner, mlp_activation="identity" if evo2_style else act,
        first_mlp_activation=act if evo2_style else None,
        num_filter_groups=next(iter(groups.values()), 1), norm_eps=_real(evo, "eps"),
        norm_eps_placement="outside", mixer_out_bias=out_bias, medium_decay=False, short_filter_skip=False,
        rope_base=_real(evo, "rotary_emb_base", 1000000),
        rope_position_scale=_real(evo, "rotary_emb_scaling_factor", 1.0) if interpolated else 1.0,
        tie_embeddings=True, bos_token=False,  # Evo 2 reads raw bytes: no BOS
    )
    if hyena:
        fields.update(featurizer_len=_whole(evo, "short_filter_length"), modal_order=_whole(evo, "state_size"))
    if HCS in blocks:
        fields["short_filter_len"] = _whole(evo, "hcs_filter_length")
    if HCM in blocks:
        fields["medium_filter_len"] = _whole(evo, "hcm_filter_length")
    return _validated(fields)


def export_refusals(cfg) -> list[str]:
    """What in `cfg` a Vortex / Evo 2 model cannot express, each naming the option ([] = exportable)."""
    blocks = _blocks(cfg.layers)
    out = []

    def need(option: str, ok: bool, why: str) -> None:
        if not ok:
            out.append(f"{option}={getattr(cfg, option)!r} ({why})")

    missing = [c for c, block in blocks.items() if block is None]
    need("pattern", not missing, f"layer kind(s) {missing} have no Evo 2 / Vortex block type")
    need("patching", cfg.patching == PATCHING_NONE, "Evo 2 is a plain byte-level model")
    for option in ("seq_type_embedding", "motif_branch", "conservation"):
        need(option, not getattr(cfg, option), "no Evo 2 counterpart")
    need("tie_embeddings", cfg.tie_embeddings, "Evo 2 ties its output layer to the embedding")
    need("vocab_size", cfg.vocab_size == EVO2_VOCAB_SIZE, f"Evo 2 has {EVO2_VOCAB_SIZE} ids")
    need("norm_eps_placement", cfg.norm_eps_placement == "outside", "Evo 2 adds eps outside the square root")
    if HCM in blocks.values():
        need("medium_decay", not cfg.medium_decay, "Evo 2 runs its medium filters without a fixed decay")
        need("medium_filter_len", cfg.medium_filter_len >= 128, "Vortex gives filters under 128 taps no skip term")
    if HCS in blocks.values():
        need("short_filter_skip", not cfg.short_filter_skip, "Evo 2's short filters have no skip term")
        need("short_filter_len", cfg.short_filter_len < 128, "Vortex gives filters of 128+ taps a skip term")
    first, rest = cfg.first_mlp_activation, cfg.mlp_activation
    if first is None or first == rest:
        need("mlp_activation", rest in ("gelu", "silu"), "Vortex runs gelu or silu, or evo2-style: "
             "first_mlp_activation gelu/silu and identity after")
    else:
        need("first_mlp_activation", first in ("gelu", "silu") and rest == "identity",
             "Vortex runs either one activation (gelu/silu) in every MLP, or that one in layer 0 and identity after")
    return out


def config_to_evo2(cfg, model_name: str = "hyena-glt-export") -> dict:
    """The Vortex config (published field order and runtime defaults) of an exportable `cfg`."""
    refusals = export_refusals(cfg)
    if refusals:
        raise ValueError(f"cannot be expressed as an Evo 2 / Vortex model: {'; '.join(refusals)}")
    layers, blocks = cfg.layers, _blocks(cfg.layers)
    idx = {field: [i for i, c in enumerate(layers) if blocks[c] == block] for field, block in LAYER_FIELDS.items()}
    evo2_style = cfg.first_mlp_activation not in (None, cfg.mlp_activation)
    evo = {
        "model_name": model_name,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_filters": cfg.d_model,
        **idx,
        "hcm_filter_length": cfg.medium_filter_len,
        "hcl_filter_groups": cfg.d_model,
        "hcm_filter_groups": cfg.num_filter_groups,
        "hcs_filter_groups": cfg.num_filter_groups,
        "hcs_filter_length": cfg.short_filter_len,
        "num_layers": cfg.num_layers,
        "short_filter_length": cfg.featurizer_len,
        "num_attention_heads": cfg.num_heads,
        "short_filter_bias": False,
        "mlp_init_method": "torch.nn.init.zeros_",
        "mlp_output_init_method": "torch.nn.init.zeros_",
        "eps": cfg.norm_eps,
        "state_size": cfg.modal_order,
        "rotary_emb_base": cfg.rope_base,
    }
    if cfg.rope_position_scale != 1.0:
        evo.update(rotary_emb_scaling_factor=cfg.rope_position_scale, use_interpolated_rotary_pos_emb=True)
    evo.update({
        "make_vocab_size_divisible_by": 8,
        "inner_size_multiple_of": 16,
        "inner_mlp_size": cfg.mlp_hidden,
        "log_intermediate_values": False,
        "proj_groups": 1,
        "hyena_filter_groups": 1,
        "column_split_hyena": False,
        "column_split": True,
        "interleave": True,
        "evo2_style_activations": evo2_style,
        "model_parallel_size": 1,
        "pipe_parallel_size": 1,
        "tie_embeddings": True,
        "mha_out_proj_bias": True,  # zeros when the model has no bias (docs/evo2.md)
        "hyena_out_proj_bias": True,
        "hyena_flip_x1x2": False,
        "qkv_proj_bias": False,
        "use_fp8_input_projections": False,
        "max_seqlen": cfg.max_seq_len,
        "max_batch_size": 1,
        "final_norm": True,
        "use_flash_attn": True,
        "use_flash_rmsnorm": False,
        "use_flash_depthwise": False,
        "use_flashfft": False,
        "use_laughing_hyena": False,
        "inference_mode": True,
        "tokenizer_type": "CharLevelTokenizer",
        "prefill_style": "fft",
        "mlp_activation": cfg.first_mlp_activation if evo2_style else cfg.mlp_activation,
        "print_activations": False,
    })
    return evo


# ---------------------------------------------------------------------------- tensors


@dataclass(frozen=True)
class Rule:
    """One Vortex tensor: its key, the hyena-glt key it maps to (None: none, e.g. a buffer we
    recompute, or a bias our model does not have), and the two directions. `to_ours(t, key)`
    may return None (checked, then dropped); `to_evo(ours)` gets None when `ours` is None."""

    evo: str
    ours: str | None
    to_ours: Callable
    to_evo: Callable


def _same_tensor(t, key=None):
    return t


def _vocab_to_ours(t, key=None):
    return torch.roll(t, NUM_SPECIAL, dims=0)  # ours[(r + 4) % V] = evo[r]


def _vocab_to_evo(t):
    return torch.roll(t, -NUM_SPECIAL, dims=0)


def _xcorr_to_ours(t, key=None):
    return t[:, 0].flip(-1)  # (C, 1, K), tap of lag j at K-1-j (conv1d order) -> (C, K), lag j at j


def _xcorr_to_evo(t):
    return t.flip(-1)[:, None]


def _lag_to_ours(t, key=None):
    return t[:, 0]  # (G, 1, K) already in lag order


def _lag_to_evo(t):
    return t[:, None]


def _poles_to_ours(t, key):
    lam = t[..., 0]  # (D, order, 1): h[t] = sum R exp(lambda t)
    bad = ~(lam < 0)  # NaN counts as bad
    if bool(bad.any()):
        raise ValueError(f"{key}: {int(bad.sum())} of {lam.numel()} poles are not negative (largest "
                         f"{lam[bad].max().item():.4g}); hyena-glt's long filters decay, log_rates = log(-lambda), "
                         "so a pole lambda >= 0 cannot be imported")
    return torch.log(-lam.double()).to(t.dtype)


def _poles_to_evo(t):
    return (-torch.exp(t.double())).to(t.dtype)[..., None]


def rope_inv_freq(cfg) -> torch.Tensor:
    """Vortex's rotary frequencies, 1 / base^(2i / head_dim) in fp32 (ours are the same)."""
    hd = cfg.head_dim
    return 1.0 / (cfg.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))


def _inv_freq_check(cfg):
    def check(t, key):
        want = rope_inv_freq(cfg)
        if tuple(t.shape) != tuple(want.shape):
            raise ValueError(f"{key}: shape {tuple(t.shape)}, expected {tuple(want.shape)} for head_dim {cfg.head_dim}")
        tol = max(1e-5, 4 * torch.finfo(t.dtype).eps)
        rel = ((t.float() - want.to(t.dtype).float()).abs() / want).max().item()
        if not rel <= tol:
            raise ValueError(f"{key}: does not match rotary_emb_base={cfg.rope_base:g} (relative difference "
                             f"{rel:.3g}); hyena-glt computes the frequencies 1/base^(2i/head_dim) from the base")
        return None

    return check


def _zeros_like_bias(d: int):
    return lambda ours: torch.zeros(d)


def tensor_rules(cfg, export: bool = False) -> list[Rule]:
    """Every tensor of the Vortex checkpoint of `cfg`, with its hyena-glt counterpart. With
    `export`, a model without output-projection biases gets zero ones (config_to_evo2 always
    writes the published bias flags)."""
    rules = [
        Rule("embedding_layer.weight", "model.embed.weight", _vocab_to_ours, _vocab_to_evo),
        Rule("norm.scale", "model.final_norm.weight", _same_tensor, _same_tensor),
    ]
    blocks = _blocks(cfg.layers)
    for i, code in enumerate(cfg.layers):
        block = blocks[code]
        if block is None:
            raise ValueError(f"layer {i}: layer kind {code!r} has no Evo 2 / Vortex block type")
        e, o = f"blocks.{i}.", f"model.layers.{i}."
        rules += [
            Rule(e + "pre_norm.scale", o + "mixer_norm.weight", _same_tensor, _same_tensor),
            Rule(e + "post_norm.scale", o + "mlp_norm.weight", _same_tensor, _same_tensor),
            Rule(e + "mlp.l1.weight", o + "mlp.gate_proj.weight", _same_tensor, _same_tensor),
            Rule(e + "mlp.l2.weight", o + "mlp.up_proj.weight", _same_tensor, _same_tensor),
            Rule(e + "mlp.l3.weight", o + "mlp.down_proj.weight", _same_tensor, _same_tensor),
        ]
        if block == ATTN:
            m = e + "inner_mha_cls."
            # File rows (head, q|k|v, head_dim), as ours; Vortex reorders them only after loading.
            rules += [
                Rule(m + "Wqkv.weight", o + "mixer.qkv_proj.weight", _same_tensor, _same_tensor),
                Rule(m + "out_proj.weight", o + "mixer.out_proj.weight", _same_tensor, _same_tensor),
                Rule(m + "rotary_emb.inv_freq", None, _inv_freq_check(cfg), lambda ours: rope_inv_freq(cfg)),
            ]
            out_bias = m + "out_proj.bias"
        else:
            f = e + "filter."
            # Projection rows: for channel c, 3c = output gate q, 3c+1 = k, 3c+2 = v, in both.
            rules += [
                Rule(e + "projections.weight", o + "mixer.in_proj.weight", _same_tensor, _same_tensor),
                Rule(f + "short_filter_weight", o + "mixer.featurizer.weight", _xcorr_to_ours, _xcorr_to_evo),
                Rule(e + "out_filter_dense.weight", o + "mixer.out_proj.weight", _same_tensor, _same_tensor),
            ]
            if block == HCS:
                rules.append(Rule(f + "h", o + "mixer.filter.weight", _xcorr_to_ours, _xcorr_to_evo))
            elif block == HCM:
                rules += [Rule(f + "h", o + "mixer.filter.weight", _lag_to_ours, _lag_to_evo),
                          Rule(f + "D", o + "mixer.filter.skip", _same_tensor, _same_tensor)]
            else:
                rules += [Rule(f + "log_poles", o + "mixer.filter.log_rates", _poles_to_ours, _poles_to_evo),
                          Rule(f + "residues", o + "mixer.filter.residues", _same_tensor, _same_tensor),
                          Rule(f + "D", o + "mixer.filter.skip", _same_tensor, _same_tensor)]
            out_bias = e + "out_filter_dense.bias"
        if cfg.mixer_out_bias:
            rules.append(Rule(out_bias, o + "mixer.out_proj.bias", _same_tensor, _same_tensor))
        elif export:  # the published configs always have the bias; zeros change nothing
            rules.append(Rule(out_bias, None, _same_tensor, _zeros_like_bias(cfg.d_model)))
    return rules


def is_dropped_key(key: str) -> bool:
    """Entries a loader without Transformer Engine drops: its fp8 metadata."""
    return key.endswith("._extra_state")


def expected_evo_shapes(cfg, rules: list[Rule]) -> dict[str, tuple[int, ...]]:
    """The shape of every Vortex tensor of `cfg` (through the rules, on the meta device)."""
    from hyena_glt import build_causal_lm

    with torch.device("meta"):
        ours = build_causal_lm(cfg, initialize=False).state_dict()
    shapes = {}
    for r in rules:
        t = r.to_evo(ours[r.ours] if r.ours else None)
        shapes[r.evo] = tuple(t.shape)
    return shapes


# ---------------------------------------------------------------------------- release files


def checkpoint_parts(path: Path) -> list[Path]:
    """The file(s) of a release checkpoint: `path` itself, or `path.part0`, `path.part1`, ...
    (also when `path` names one of the parts). FileNotFoundError / ValueError when none is
    there or a part in the middle is missing."""
    name = path.name
    base = path
    if ".part" in name and name.rsplit(".part", 1)[1].isdigit():
        base = path.with_name(name.rsplit(".part", 1)[0])
    elif path.is_file():
        return [path]
    prefix = base.name + ".part"
    found = {}
    for p in base.parent.glob(glob.escape(prefix) + "*") if base.parent.is_dir() else []:
        tail = p.name[len(prefix):]
        if tail.isdigit():
            found[int(tail)] = p
    if not found:
        raise FileNotFoundError(f"{path}: no such checkpoint file, and no {base.name}.part0, .part1, ... pieces")
    n = max(found) + 1
    gaps = [i for i in range(n) if i not in found]
    if gaps:
        raise ValueError(f"{base}: part file(s) {', '.join(f'{base.name}.part{i}' for i in gaps)} missing "
                         f"(found {len(found)} of parts 0..{n - 1})")
    return [found[i] for i in range(n)]


def _join_parts(parts: list[Path], dest: Path, progress: bool) -> None:
    from tqdm import tqdm

    total = sum(p.stat().st_size for p in parts)
    with open(dest, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc="join parts",
                                       disable=not progress, leave=False) as bar:
        for p in parts:
            with open(p, "rb") as f:
                while chunk := f.read(64 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))


def read_release(path: Path) -> dict:
    """A release file: a `torch.save` dict, read as the evo2 loader does (weights only, memory
    mapped: tensors are paged in when used). ValueError for a truncated or foreign file."""
    try:
        with torch.serialization.safe_globals([io.BytesIO]):  # TE fp8 metadata (`_extra_state`)
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # zip/pickle errors of a truncated or corrupt file
        detail = " ".join(str(e).split()).split(". ")[0][:200]  # torch's first sentence
        raise ValueError(f"cannot be read as a torch.save checkpoint (truncated or corrupt?): "
                         f"{type(e).__name__}: {detail}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"holds a {type(state).__name__}, not a dict of named tensors (a state dict)")
    return state


# ---------------------------------------------------------------------------- import / export


def evo2_to_ours(evo_state: dict, cfg, progress: bool = False) -> dict:
    """Map a Vortex state dict (release layout) to hyena-glt's, checking every key and shape
    against `cfg`: one ValueError naming the first offending key."""
    from tqdm import tqdm

    rules = tensor_rules(cfg)
    kept = {k: v for k, v in evo_state.items() if not is_dropped_key(k)}
    want = expected_evo_shapes(cfg, rules)
    unknown = sorted(set(kept) - set(want))
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise ValueError(f"unknown key {unknown[0]}{more}: not part of the Evo 2 model the config describes")
    missing = [k for k in want if k not in kept]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"missing key {missing[0]}{more}: the config describes a tensor the file does not hold")
    for k, shape in want.items():
        t = kept[k]
        if not torch.is_tensor(t):
            raise ValueError(f"{k}: holds a {type(t).__name__}, not a tensor")
        if tuple(t.shape) != shape:
            raise ValueError(f"{k}: shape {tuple(t.shape)} in the file, {shape} from the config")
        if not t.is_floating_point():
            raise ValueError(f"{k}: dtype {t.dtype}, expected floating point")
    ours = {}
    for r in tqdm(rules, desc="import-evo2", unit="tensor", disable=not progress, leave=False):
        t = r.to_ours(kept[r.evo], r.evo)
        if r.ours is not None and t is not None:
            ours[r.ours] = t
    return ours


FP32_IN_RELEASES = ("log_poles", "residues", "inv_freq")


def ours_to_evo2(state: dict, cfg, dtype: torch.dtype | None = None, progress: bool = False) -> dict:
    """Map a hyena-glt state dict to Vortex's release layout (cfg must be exportable).
    `dtype`: cast every tensor to it (bf16: as the releases, where poles, residues and the
    rotary frequencies stay fp32); None keeps each tensor's dtype (zero biases take that of
    their output projection)."""
    from tqdm import tqdm

    rules = tensor_rules(cfg, export=True)
    want = {r.ours for r in rules if r.ours}
    extra = sorted(set(state) - want)
    missing = sorted(want - set(state))
    if extra or missing:
        raise ValueError(f"weights do not match the config: missing {missing[:3]}, unexpected {extra[:3]}")
    out = {}
    for r in tqdm(rules, desc="export-vortex", unit="tensor", disable=not progress, leave=False):
        t = r.to_evo(state[r.ours] if r.ours else None)
        if r.ours is None and r.evo.endswith(".bias"):
            t = t.to(state[_out_weight_key(r, rules)].dtype)
        if dtype is not None and not (dtype == torch.bfloat16 and r.evo.endswith(FP32_IN_RELEASES)):
            t = t.to(dtype)
        out[r.evo] = t.contiguous()
    return out


def _out_weight_key(bias_rule: Rule, rules: list[Rule]) -> str:
    """Our key of the weight beside a (zero) output bias."""
    w = bias_rule.evo[: -len("bias")] + "weight"
    return next(r.ours for r in rules if r.evo == w)


def import_evo2(checkpoint: str | Path, config: str | Path, out_dir: str | Path, progress: bool = False,
                replace: bool = False):
    """Released Evo 2 checkpoint + its published YAML -> hyena-glt model directory (config.json +
    model.safetensors + checksums.json), published whole (launch/checkpoint/publish.py): written
    into `OUT_DIR.partial-XXXXXXXX` and renamed into place when complete, so nothing is left
    at out_dir on error; a non-empty out_dir is refused unless `replace`. Returns (config,
    tensors mapped)."""
    from hyena_glt import build_causal_lm
    from launch.checkpoint.publish import Publication

    checkpoint, config, out = Path(checkpoint), Path(config), Path(out_dir)
    with Publication([out], command="import-evo2", replace=replace) as (tmp,):
        if not config.is_file():
            raise FileNotFoundError(f"{config}: no such config file")
        try:
            evo = yaml.safe_load(config.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"{config}: not valid YAML ({' '.join(str(e).split())})") from None
        try:
            cfg = config_from_evo2(evo)
        except ValueError as e:
            raise ValueError(f"{config}: {e}") from None
        parts = checkpoint_parts(checkpoint)
        # name.pt.part* when it comes in pieces, joined inside the partial output (removed with it)
        source = parts[0] if len(parts) == 1 else parts[0].with_name(parts[0].name[:-1] + "*")
        joined = tmp / ".evo2-joined.pt"
        if len(parts) > 1:
            _join_parts(parts, joined, progress)
            path = joined
        else:
            path = parts[0]
        try:
            evo_state = read_release(path)
            ours = evo2_to_ours(evo_state, cfg, progress)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        with torch.device("meta"):
            model = build_causal_lm(cfg, initialize=False)
        model.load_state_dict(ours, strict=True, assign=True)
        del evo_state
        joined.unlink(missing_ok=True)
        model.save_pretrained(tmp)
    return cfg, len(ours)


DTYPES = {"keep": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


def export_vortex(model_dir: str | Path, out_pt: str | Path, config_out: str | Path | None = None,
                  dtype: str = "keep", model_name: str | None = None, progress: bool = False, replace: bool = False):
    """hyena-glt model directory (verified against its checksums.json) -> Vortex checkpoint
    (`torch.save` dict, release layout) + Vortex YAML config, Vortex's own format (no checksums
    file is added). The two files are published as one set (launch/checkpoint/publish.py):
    written as `OUT.pt.partial-XXXXXXXX` / `OUT.yml.partial-XXXXXXXX`, under the locks
    `OUT.pt.LOCK` / `OUT.yml.LOCK`, and renamed into place together when both are complete;
    existing ones are refused unless `replace`. Returns (config path, tensors written)."""
    from safetensors.torch import load_file

    from hyena_glt import inspect_pretrained
    from hyena_glt.model import WEIGHTS_NAME
    from launch.checkpoint.publish import Publication

    out_pt = Path(out_pt)
    config_out = Path(config_out) if config_out else out_pt.with_suffix(".yml")
    with Publication([out_pt, config_out], command="export-vortex", replace=replace, is_dir=False) as (tmp_pt, tmp_cfg):
        saved = inspect_pretrained(model_dir)
        if saved.kind != "causal-lm":
            raise ValueError(f"{saved.directory} holds {saved.describe()}; export-vortex takes a causal language model")
        cfg = saved.config
        try:
            evo_cfg = config_to_evo2(cfg, model_name or saved.directory.resolve().name)
        except ValueError as e:
            raise ValueError(f"{saved.directory}: {e}") from None
        state = load_file(str(saved.directory / WEIGHTS_NAME))
        evo_state = ours_to_evo2(state, cfg, DTYPES[dtype], progress)
        header = f"# Vortex config written by `hyena-glt export-vortex` from {saved.directory}\n"
        try:
            torch.save(evo_state, tmp_pt)
        except RuntimeError as e:  # torch's zip writer: no errno (a full disk reads "file write failed")
            raise OSError(errno.EIO, f"torch.save failed ({' '.join(str(e).split())[:200]})", str(tmp_pt)) from None
        tmp_cfg.write_text(header + yaml.safe_dump(evo_cfg, sort_keys=False))
    return config_out, len(evo_state)


# ---------------------------------------------------------------------------- CLI


def register(sub) -> None:
    from launch.checkpoint.publish import add_replace_option

    p = sub.add_parser(
        "import-evo2", help="convert a released Evo 2 checkpoint (+ its published YAML config) to a model directory",
        description="Read an Evo 2 checkpoint as released (one torch.save file, or its .part0, .part1, ... pieces, "
        "joined byte for byte next to OUT_DIR and removed after) with the model's published Vortex YAML config, map "
        "every key, layout and the vocabulary (Evo 2 id = byte; hyena-glt id = byte + 4), and write config.json + "
        "model.safetensors, with bos_token false (every command then feeds it raw bytes, as Evo 2). Anything the "
        "mapping cannot express is refused with the field or key named, and nothing is written. See docs/evo2.md.")
    p.add_argument("checkpoint", metavar="CHECKPOINT.pt",
                   help="the .pt file, or its name when it comes as .partN pieces")
    p.add_argument("--config", required=True, metavar="EVO2.yml", help="the published config, e.g. evo2-7b-8k.yml")
    p.add_argument("out", metavar="OUT_DIR", help="new (or empty) model directory (or --replace)")
    add_replace_option(p)
    p.set_defaults(func=_import_cmd)

    p = sub.add_parser(
        "export-vortex", help="write a model as a Vortex / Evo 2 checkpoint + YAML config",
        description="The reverse of import-evo2, for a model whose options Evo 2 can express (norm_eps_placement "
        "outside, medium_decay false, short_filter_skip false, vocab_size 512, tied embeddings, no token merging "
        "or genomic input features, ...); other models are refused with the options named. Writes a torch.save "
        "dict with Vortex's keys (zero output-projection biases when the model has none) and a Vortex YAML config, "
        "both renamed into place together once complete (existing ones are refused without --replace).")
    p.add_argument("model", metavar="MODEL_DIR")
    p.add_argument("out", metavar="OUT.pt")
    p.add_argument("--config-out", metavar="OUT.yml", help="where the Vortex config goes (default: OUT.yml)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="keep",
                   help="tensor dtype: keep (as stored), float32, or bfloat16 (poles, residues and rotary "
                   "frequencies stay float32, as in the releases)")
    p.add_argument("--model-name", help="model_name in the config (default: the model directory's name)")
    add_replace_option(p, "OUT.pt / OUT.yml")
    p.set_defaults(func=_export_cmd)


def _import_cmd(args) -> int:
    cfg, n = import_evo2(args.checkpoint, args.config, args.out, progress=sys.stderr.isatty(), replace=args.replace)
    counts = {code: cfg.layers.count(code) for code in block_kinds().values()}
    print(f"imported {args.checkpoint} ({n} tensors; {cfg.num_layers} layers {counts}, d_model {cfg.d_model}) "
          f"-> {args.out} (bos_token false: the commands feed it raw bytes, as Evo 2)")
    return 0


def _export_cmd(args) -> int:
    config_out, n = export_vortex(args.model, args.out, args.config_out, args.dtype, args.model_name,
                                  progress=sys.stderr.isatty(), replace=args.replace)
    print(f"exported {args.model} -> {args.out} ({n} tensors) + {config_out}")
    return 0
