"""Hyena-GLT: byte-level striped-Hyena genomic language model (plain single-device PyTorch).

The public names below are imported lazily (PEP 562): `from hyena_glt import HyenaGLTConfig`
imports `hyena_glt.config` on first use, and importing a submodule that needs no torch
(`hyena_glt.alphabet`, all that `hyena-glt pack` takes from this package) loads no torch.
"""

from importlib import import_module

# public name -> the submodule that defines it
_EXPORTS = {
    "ByteTokenizer": "tokenizer",
    "CausalLM": "model",
    "CausalLMOutput": "model",
    "FAMILIES": "registry",
    "LOCAL": "spec",
    "ModelSpec": "spec",
    "Stage": "model",
    "HyenaGLTConfig": "config",
    "HyenaGLTForCausalLM": "model",
    "HyenaGLTForSequenceClassification": "heads",
    "HyenaGLTForSequenceRegression": "heads",
    "HyenaGLTForTokenClassification": "heads",
    "HyenaGLTModel": "model",
    "HyenaGLTMultiTask": "heads",
    "MultiTaskMetrics": "multitask",
    "SeqType": "alphabet",
    "TaskSampler": "multitask",
    "TaskSpec": "heads",
    "build_backbone": "registry",
    "build_causal_lm": "registry",
    "detect_seq_type": "alphabet",
    "family_of": "registry",
    "inspect_pretrained": "pretrained",
    "load_backbone": "pretrained",
    "load_causal_lm": "pretrained",
    "load_pretrained": "pretrained",
    "reverse_complement": "alphabet",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

