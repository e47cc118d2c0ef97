"""Parallel layouts (TP, SP, CP, PP, DP) of the single-device hyena_glt model, on megatron-core.

hyena_glt never imports this package. Its modules are built from a ModelSpec; this package
supplies the parallel one (spec.parallel_spec: megatron-core linears, vocab-parallel
embedding and loss, context-parallel convolutions and attention) and builds each rank's
pipeline stages of the one model (build.py).

Public API (see README "Parallel layouts"):
    ParallelConfig, ParallelConfigError, Layout, check_layout, make_layout  (parallel_config)
    initialize_parallel, destroy_parallel, RankContext                      (groups)
    build_parallel_model, ParallelModel (.forward_backward)                  (build)
    parallel_spec                                                            (spec)
    finalize_model_parallel_grads, reduce_gradients_dp_cp                    (grads)
    gather_full_state_dict, shard_state_dict                                 (state_dict)
    apply_cpu_patches, cuda_to_cpu                                           (cpu_compat)
"""

from .build import ParallelModel, build_parallel_model, localize_batch
from .cpu_compat import apply_cpu_patches, cuda_to_cpu
from .grads import finalize_model_parallel_grads, reduce_gradients_dp_cp
from .groups import RankContext, destroy_parallel, initialize_parallel, parallel_device
from .parallel_config import (
    Layout,
    ParallelConfig,
    ParallelConfigError,
    RankCoords,
    check_layout,
    make_layout,
    rank_coords,
    stage_layers,
)
from .spec import parallel_spec
from .state_dict import gather_full_state_dict, shard_state_dict

__all__ = [
    "Layout",
    "ParallelConfig",
    "ParallelConfigError",
    "ParallelModel",
    "RankContext",
    "RankCoords",
    "apply_cpu_patches",
    "build_parallel_model",
    "check_layout",
    "cuda_to_cpu",
    "destroy_parallel",
    "finalize_model_parallel_grads",
    "gather_full_state_dict",
    "initialize_parallel",
    "localize_batch",
    "make_layout",
    "parallel_device",
    "parallel_spec",
    "rank_coords",
    "reduce_gradients_dp_cp",
    "shard_state_dict",
    "stage_layers",
]
