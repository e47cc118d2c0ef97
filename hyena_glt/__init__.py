"""Hyena-GLT: byte-level striped-Hyena genomic language model (plain single-device PyTorch)."""

from .config import HyenaGLTConfig
from .model import CausalLMOutput, HyenaGLTForCausalLM, HyenaGLTModel
from .tokenizer import ByteTokenizer, SeqType, detect_seq_type, reverse_complement

__all__ = [
    "ByteTokenizer",
    "CausalLMOutput",
    "HyenaGLTConfig",
    "HyenaGLTForCausalLM",
    "HyenaGLTModel",
    "SeqType",
    "detect_seq_type",
    "reverse_complement",
]
