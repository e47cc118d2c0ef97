"""Hyena-GLT: byte-level striped-Hyena genomic language model (plain single-device PyTorch)."""

from .config import HyenaGLTConfig
from .heads import (
    HyenaGLTForSequenceClassification,
    HyenaGLTForSequenceRegression,
    HyenaGLTForTokenClassification,
    HyenaGLTMultiTask,
    MultiTaskMetrics,
    TaskSampler,
    TaskSpec,
)
from .model import CausalLM, CausalLMOutput, HyenaGLTForCausalLM, HyenaGLTModel, Stage
from .pretrained import inspect_pretrained, load_backbone, load_causal_lm, load_pretrained
from .registry import FAMILIES, build_backbone, build_causal_lm, family_of
from .spec import LOCAL, ModelSpec
from .tokenizer import ByteTokenizer, SeqType, detect_seq_type, reverse_complement

__all__ = [
    "ByteTokenizer",
    "CausalLM",
    "CausalLMOutput",
    "FAMILIES",
    "LOCAL",
    "ModelSpec",
    "Stage",
    "HyenaGLTConfig",
    "HyenaGLTForCausalLM",
    "HyenaGLTForSequenceClassification",
    "HyenaGLTForSequenceRegression",
    "HyenaGLTForTokenClassification",
    "HyenaGLTModel",
    "HyenaGLTMultiTask",
    "MultiTaskMetrics",
    "SeqType",
    "TaskSampler",
    "TaskSpec",
    "build_backbone",
    "build_causal_lm",
    "detect_seq_type",
    "family_of",
    "inspect_pretrained",
    "load_backbone",
    "load_causal_lm",
    "load_pretrained",
    "reverse_complement",
]
