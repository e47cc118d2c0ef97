"""Model families: which classes a config builds.

A family is a causal-LM class and its backbone (what task heads sit on). A config belongs
to exactly one family (`CausalLM.accepts`), so every command and trainer that builds or
loads a model asks here instead of testing config fields itself:

    plain          HyenaGLTForCausalLM / HyenaGLTModel   (patching: none)
    token-merging  BLTForCausalLM / BLTModel             (patching: static | entropy | learned)

A new family registers itself with `register_family`. What a saved directory holds on top
of the family (a language model, a fine-tuned head, several heads) is hyena_glt.pretrained.
"""

from __future__ import annotations

from dataclasses import dataclass
from torch import nn

from .blt.ushape import BLTForCausalLM, BLTModel
from .config import HyenaGLTConfig
from .model import CausalLM, HyenaGLTForCausalLM, HyenaGLTModel
from .spec import LOCAL, ModelSpec


@dataclass(frozen=True)
class Family:
    name: str
    causal_lm: type[CausalLM]
    backbone: type[nn.Module]
    description: str


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    if family.name in FAMILIES:
        raise ValueError(f"model family {family.name!r} is already registered")
    FAMILIES[family.name] = family
    return family


register_family(Family("plain", HyenaGLTForCausalLM, HyenaGLTModel, "striped Hyena over bytes"))
register_family(Family("token-merging", BLTForCausalLM, BLTModel, "byte U-shape with a striped model over merged patches"))


def family_of(config: HyenaGLTConfig) -> Family:
    matches = [f for f in FAMILIES.values() if f.causal_lm.accepts(config)]
    if len(matches) != 1:
        raise ValueError(f"patching: {config.patching!r} matches {len(matches)} model families "
                         f"({', '.join(f.name for f in matches) or 'none'}); expected exactly one")
    return matches[0]


def build_causal_lm(config: HyenaGLTConfig, initialize: bool = True, spec: ModelSpec = LOCAL) -> CausalLM:
    """The causal LM of `config`'s family (same forward and output type for every family)."""
    return family_of(config).causal_lm(config, initialize=initialize, spec=spec)


def build_backbone(config: HyenaGLTConfig, spec: ModelSpec = LOCAL) -> nn.Module:
    """The backbone (input_ids -> (B, L, D) hidden states) of `config`'s family."""
    return family_of(config).backbone(config, spec)
