"""`train.init_from=MODEL_DIR`: start a pretraining run from a single-device model's weights.

The weights of a saved model directory (`convert`, `save_pretrained` or `import-evo2`) are
sliced for this rank's layout (any TP/CP/PP/DP, any ZeRO stage) and loaded; the optimizer
starts fresh and the step count at 0. The run's model config must match the saved one but
for the fields that do not change what a parameter means (`CHANGEABLE`): so a longer
`train.seq_len` needs no checkpoint surgery (the modal `H` filter has no length in its
parameters; attention can interpolate positions with `rope_position_scale`).
"""

from __future__ import annotations

from pathlib import Path

import torch

# Fields a warm start may change: none of them alters what a stored tensor means.
CHANGEABLE = {
    "max_seq_len": "the longest context (the H filter is length-free; only its init used it)",
    "rope_position_scale": "RoPE position interpolation for a longer context",
    "seed": "the init seed (no parameter is drawn)",
    "init_std": "the init scale (no parameter is drawn)",
    "soft_mask_weight": "the loss weight of soft-masked bases",
}


def check_config(saved, run, where: str) -> None:
    """Raise naming every field that differs and may not."""
    diffs = [f"{k}: saved {getattr(saved, k)!r}, run {getattr(run, k)!r}" for k in type(saved).model_fields
             if k not in CHANGEABLE and getattr(saved, k) != getattr(run, k)]
    if diffs:
        raise ValueError(f"train.init_from {where}: the run's model section differs from the saved model in "
                         f"{'; '.join(diffs)} (only {', '.join(sorted(CHANGEABLE))} may change)")


@torch.no_grad()
def load_initial_weights(model_dir: str | Path, pm, opt, run_config,
                         fresh: dict[str, torch.Tensor] | None = None) -> dict[str, str]:
    """Load this rank's share of MODEL_DIR's weights into the parallel model `pm` and the
    optimizer's master copy. `fresh`: full values for parameters the directory may lack
    (co-training's task heads at their initial values; a directory that holds them, such as
    the multi-task model `convert` writes, gives its own). Returns the changed config fields
    (name -> 'saved -> run')."""
    from megatron.core import parallel_state as ps
    from safetensors import safe_open

    from hyena_glt.model import WEIGHTS_NAME, read_config
    from launch.checkpoint import set_model_weights
    from megatron_adapters.sharding import tp_split_dim

    model_dir = Path(model_dir)
    saved = read_config(model_dir, need_weights=True)
    check_config(saved, run_config, str(model_dir))
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    local: dict[str, torch.Tensor] = {}
    with safe_open(str(model_dir / WEIGHTS_NAME), "pt") as f:
        stored = set(f.keys())

        def read(name: str) -> torch.Tensor:  # only this rank's TP slice is read from disk
            if name not in stored:
                raise ValueError(f"train.init_from {model_dir}: {WEIGHTS_NAME} has no tensor {name}")
            dim = tp_split_dim(name)
            if dim is None or tp == 1:
                return f.get_tensor(name)
            sl = f.get_slice(name)
            n = sl.get_shape()[dim] // tp
            index = [slice(None)] * len(sl.get_shape())
            index[dim] = slice(tp_rank * n, (tp_rank + 1) * n)
            return sl[tuple(index)]

        fresh = fresh or {}
        for name, _ in pm.named_parameters():
            local[name] = fresh[name] if name in fresh and name not in stored else read(name)
        buffers = {name: read(name) for name, _ in pm.named_persistent_buffers()}
    set_model_weights(pm, opt, local, buffers, f"train.init_from {model_dir}")
    return {k: f"{getattr(saved, k)!r} -> {getattr(run_config, k)!r}" for k in CHANGEABLE
            if getattr(saved, k) != getattr(run_config, k)}
