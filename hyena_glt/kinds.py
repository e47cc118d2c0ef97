"""Layer kinds: what one character of a layer pattern is, declared once.

A pattern (`SDH*SDH*`) has one character per block, and each character is a *layer kind*:
one `LayerKind` record in this registry. Everything the rest of the system asks about a kind
is a field of that record, and nothing else in the project keys on the character:

    what                                 field                who asks
    the mixer module of a block          build                layers.Block (operators.make_mixer)
    forward FLOPs per token              flops                launch/bench/gpu.py (MFU), launch/plan
    activation memory per token          activations          launch/plan/memory.py (train --dry-run, plan)
    inference-cache entry                cache, cache_state   hyena_glt/cache.py
    tensor-parallel splits               tp_split             megatron_adapters/sharding.py
    context-parallel path and halo       cp, halo             megatron_adapters/context_parallel.py,
                                                              parallel_config.check_layout
    context-parallel traffic             cp_sends             launch/plan/cost.py
    Evo 2 / Vortex block type            evo2                 launch/interop/evo2.py
    a valid pattern character            code                 hyena_glt/config.py (every pattern field,
                                                              the token-merging ones included)

The built-in kinds S, D, H (the Hyena operator with a short, medium or long filter) and *
(attention) register themselves in hyena_glt/operators.py, beside their modules. A new kind
is a `LayerKind` given to `register_kind` by any module; to add one without editing the
package, name that module in the HYENA_GLT_PLUGINS environment variable (comma-separated
importable module names). The plug-ins are imported once, the first time the registry is
read (a config validated, a block built, a table asked for), in every process: an
environment variable reaches each process a launcher starts (torchrun, deepspeed, Slurm), so a
plug-in kind trains in every parallel layout. See docs/model.md#layer-kinds.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator, Mapping

from . import operators  # noqa: F401  (the built-in kinds S, D, H and * register themselves on import)
from .kind_record import (  # noqa: F401  (the record and its vocabulary are part of this module's API)
    CACHE_KV,
    CACHE_LAYOUTS,
    CACHE_RECURRENT,
    CP_FIR,
    CP_HALO,
    CP_KV_GATHER,
    CP_LONG_CONV_ALL2ALL,
    CP_LONG_CONV_KINDS,
    CP_LONG_CONV_PATHS,
    CP_LONG_CONV_STATE,
    CP_MODAL,
    CP_PATHS,
    CP_SEND_HALO,
    CP_SEND_KV,
    CP_SEND_LONG_CONV,
    CP_SENDS,
    FLOP_TERMS,
    STAGE_SEPARATOR,
    TABLE,
    CPExchange,
    LayerKind,
    direct_conv_flops,
    fft_conv_flops,
    fft_flops,
    no_halo,
    register_kind,
)

PLUGINS_ENV = "HYENA_GLT_PLUGINS"


class PluginError(ValueError):
    """A plug-in module named in HYENA_GLT_PLUGINS could not be imported (one line)."""


_plugins = "unloaded"  # -> "loading" -> "loaded"


def import_plugins(names: str) -> list[str]:
    """Import the comma-separated plug-in modules `names` (each registers its kinds);
    PluginError naming the module that fails and why."""
    modules = [n.strip() for n in names.split(",") if n.strip()]
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # whatever breaks a plug-in, the user gets one line naming it
            why = " ".join(str(e).split()) or type(e).__name__
            raise PluginError(f"{PLUGINS_ENV}: cannot import plug-in module {name!r}: {type(e).__name__}: {why}") from e
    return modules


def load_plugins() -> None:
    """Import the plug-ins named in HYENA_GLT_PLUGINS, once per process. Every read of the
    registry calls it; a plug-in that reads the registry while it is imported sees the kinds
    registered so far. A failed import is retried (and fails again) at the next read, so a
    broken plug-in is never skipped silently."""
    global _plugins
    if _plugins != "unloaded":
        return
    _plugins = "loading"
    try:
        import_plugins(os.environ.get(PLUGINS_ENV, ""))
    except BaseException:
        _plugins = "unloaded"
        raise
    _plugins = "loaded"


def unknown_codes(pattern: str) -> list[str]:
    """The characters of `pattern` that are no registered kind (STAGE_SEPARATOR aside), sorted."""
    load_plugins()
    return sorted(set(pattern) - set(TABLE) - {STAGE_SEPARATOR})


def registered_codes() -> str:
    """'S, D, H, *' (and any plug-in's): for error messages."""
    load_plugins()
    return ", ".join(TABLE)


def unknown_code_hint() -> str:
    return f"register a new kind with hyena_glt.kinds.register_kind, in a module named in {PLUGINS_ENV}"


def layer_kind(code: str) -> LayerKind:
    """The registered kind of pattern character `code`; ValueError (one line) for another."""
    load_plugins()
    kind = TABLE.get(code)
    if kind is None:
        raise ValueError(f"unknown layer code {code!r}; registered: {registered_codes()} ({unknown_code_hint()})")
    return kind


class _Kinds(Mapping[str, LayerKind]):
    """The registered kinds by code, read-only, in registration order. Reading it imports the
    plug-ins first, like every other read of the registry."""

    def __getitem__(self, code: str) -> LayerKind:
        load_plugins()
        return TABLE[code]

    def __iter__(self) -> Iterator[str]:
        load_plugins()
        return iter(list(TABLE))

    def __len__(self) -> int:
        load_plugins()
        return len(TABLE)

    def __repr__(self) -> str:
        return f"KINDS({', '.join(f'{k!r}: {v.name}' for k, v in self.items())})"


KINDS: Mapping[str, LayerKind] = _Kinds()


_tp_split: tuple[int, dict[str, int]] = (-1, {})


def mixer_tp_split() -> Mapping[str, int]:
    """Every registered kind's `tp_split` in one table: mixer parameter name -> split dim.
    One table serves every kind because register_kind refuses a name split two ways."""
    global _tp_split
    load_plugins()
    if _tp_split[0] != len(TABLE):  # kinds are only ever added: the count versions the table
        merged: dict[str, int] = {}
        for kind in TABLE.values():
            merged.update(kind.tp_split)
        _tp_split = (len(TABLE), merged)
    return _tp_split[1]


def mixer_flops(code: str, cfg, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of one mixer of kind `code`, every term of FLOP_TERMS present."""
    kind = layer_kind(code)
    terms = dict(kind.flops(cfg, seq_len))
    bad = sorted(set(terms) - set(FLOP_TERMS))
    if bad:
        raise ValueError(f"layer kind {code!r} ({kind.origin}): flops terms {bad} are none of {', '.join(FLOP_TERMS)}")
    return {t: float(terms.get(t, 0.0)) for t in FLOP_TERMS}
