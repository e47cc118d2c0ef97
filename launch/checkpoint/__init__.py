"""Distributed checkpoints that any layout can read, for pretraining and fine-tuning.

The package's parts: io.py (primitives, names), lock.py, writer.py, pruning.py, reader.py,
publish.py (output directories written whole, under a lock); convert.py holds `convert` and
`reshard`. Everything is imported from `launch.checkpoint`, lazily (PEP 562): a command that
takes only the lock or publish.py (import-evo2, export-vortex) does not import megatron-core.

    CKPT_DIR/
      latest                         the name of the newest complete checkpoint
      step_00000100/
        meta.json                    step, layout, configs, loader state, Adam step(s), metrics
                                     (and whatever else the trainer adds: JSON only)
        model-tp00-pp00.safetensors  canonical (single-device) names, this TP rank's slice
                                     (parameters and persistent buffers),
        optim-tp00-pp00.safetensors  'exp_avg/<name>', 'exp_avg_sq/<name>' (same slicing)
        rng-rank00000.safetensors    each rank's RNG states (uint8 tensors)
        state.safetensors            run-level tensors the trainer adds, the same on every
                                     rank (fine-tuning: its batch-order generators)

No pickle anywhere: tensors are safetensors, everything else JSON, and nothing here (or in
the trainers) calls `torch.load`. A file that is not what its name says is refused with a
one-line ValueError; files of an older format (`rng-rank*.pt`) are ignored, never read.
The primitives for that (atomic JSON / tensor writes, checked reads, RNG state as
tensors) live here and are used by both trainers and by `hyena-glt reshard`.

Tensors are keyed by the single-device parameter name (global layer indices) and sliced
only along tensor parallelism; optimizer states are full over data parallelism whatever
the ZeRO stage. Loading therefore works under any tp/cp/pp/dp and ZeRO stage: each rank
reads the TP slices it needs, concatenates and re-slices. Writes go to a temporary folder
renamed into place only when every rank has finished, so a crash mid-save never damages
the previous checkpoint.

Trust (docs/checkpoints.md):
  * meta.json's "files" records the size and sha256 of every other file of the checkpoint,
    computed by the writer (write_tensors, used by save_checkpoint and `hyena-glt reshard`);
    check_checkpoint / find_intact verify them, newest first, and say why a checkpoint is
    skipped. Checkpoints are ordered by the step number in their name, never by the name.
  * DirLock: one run per checkpoint.dir (a LOCK file holding host, PID and start time).
  * Pruning never deletes a checkpoint newer than the one just saved; a failed save removes
    its temporary folder and leaves `latest` and the previous checkpoint as they were.
  * Outputs of convert, reshard, import-evo2, export-vortex and finetune (publish.py): locked
    (`OUT.LOCK`), written beside OUT and renamed into place when complete; a non-empty OUT is
    refused without `--replace`. Saved model directories carry checksums.json
    (hyena_glt/checksums.py), checked when loaded.
"""

from importlib import import_module

# public name -> the submodule that defines it
_EXPORTS = {
    "FORMAT": "io",
    "LOCK": "io",
    "META": "io",
    "STATE": "io",
    "VERSION": "io",
    "CheckpointError": "io",
    "file_record": "io",
    "latest_checkpoint": "io",
    "oneline": "io",
    "open_tensors": "io",
    "read_json": "io",
    "read_tensors": "io",
    "rng_file": "io",
    "rng_state_tensors": "io",
    "set_rng_state_tensors": "io",
    "shard_file": "io",
    "step_dirs": "io",
    "step_name": "io",
    "step_of": "io",
    "write_json": "io",
    "write_tensors": "io",
    "write_text_atomic": "io",
    "DirLock": "lock",
    "prune": "pruning",
    "remove_checkpoint": "pruning",
    "remove_stale_temporaries": "pruning",
    "set_aside": "pruning",
    "Publication": "publish",
    "add_replace_option": "publish",
    "recover": "publish",
    "Problem": "reader",
    "ShardReader": "reader",
    "check_checkpoint": "reader",
    "damage_report": "reader",
    "describe": "reader",
    "find_intact": "reader",
    "full_model_state": "reader",
    "load_checkpoint": "reader",
    "missing_optimizer_files": "reader",
    "read_meta": "reader",
    "read_state_tensors": "reader",
    "set_model_weights": "reader",
    "commit": "writer",
    "new_folder": "writer",
    "save_checkpoint": "writer",
    "write_meta": "writer",
    "write_shards": "writer",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value
