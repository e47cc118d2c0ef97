"""Hyena-GLT: byte-level striped-Hyena genomic language model (plain single-device PyTorch)."""

from .config import HyenaGLTConfig
from .curriculum import CurriculumConfig, apply_curriculum, seq_len_at
from .heads import (
    HyenaGLTForSequenceClassification,
    HyenaGLTForSequenceRegression,
    HyenaGLTForTokenClassification,
    HyenaGLTMultiTask,
    MultiTaskMetrics,
    TaskSampler,
    TaskSpec,
)
from .model import CausalLMOutput, HyenaGLTForCausalLM, HyenaGLTModel, build_backbone, build_causal_lm, load_causal_lm
from .tokenizer import ByteTokenizer, SeqType, detect_seq_type, reverse_complement

__all__ = [
    "ByteTokenizer",
    "CausalLMOutput",
    "CurriculumConfig",
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
    "apply_curriculum",
    "build_backbone",
    "build_causal_lm",
    "detect_seq_type",
    "load_causal_lm",
    "reverse_complement",
    "seq_len_at",
]
