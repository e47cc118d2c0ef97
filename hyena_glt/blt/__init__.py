"""Token merging for Hyena-GLT (BLT-style byte U-shape): patchers, a position system that
survives merging, the byte<->patch bridge, and the U-shaped causal LM.

Read in this order: segments.py (patch bookkeeping), patchers.py, bridge.py, position.py,
ushape.py.
"""

from .patchers import (
    AdaptiveTokenMerger,
    EntropyModel,
    EntropyPatcher,
    PatcherOutput,
    StaticPatcher,
    entropy_config,
    make_patcher,
    optimal_boundaries,
    target_patch_length,
)
from .position import BLTPositionManager, sinusoid
from .segments import PatchInfo, enforce_patch_lengths, patch_info, scan_boundaries
from .ushape import BLTCausalLMOutput, BLTForCausalLM, BLTModel

__all__ = [
    "AdaptiveTokenMerger",
    "BLTCausalLMOutput",
    "BLTForCausalLM",
    "BLTModel",
    "BLTPositionManager",
    "EntropyModel",
    "EntropyPatcher",
    "PatchInfo",
    "PatcherOutput",
    "StaticPatcher",
    "enforce_patch_lengths",
    "entropy_config",
    "make_patcher",
    "optimal_boundaries",
    "patch_info",
    "scan_boundaries",
    "sinusoid",
    "target_patch_length",
]
