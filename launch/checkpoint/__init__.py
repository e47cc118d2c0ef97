"""Distributed checkpoints that any layout can read, for pretraining and fine-tuning.

The package's parts: io.py (primitives, names), lock.py, writer.py, pruning.py, reader.py;
convert.py holds `convert` and `reshard`. Everything is imported from `launch.checkpoint`.

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
"""


from launch.checkpoint.io import (  # noqa: F401
    FORMAT,
    LOCK,
    META,
    STATE,
    VERSION,
    CheckpointError,
    file_record,
    latest_checkpoint,
    oneline,
    open_tensors,
    read_json,
    read_tensors,
    rng_file,
    rng_state_tensors,
    set_rng_state_tensors,
    shard_file,
    step_dirs,
    step_name,
    step_of,
    write_json,
    write_tensors,
    write_text_atomic,
)
from launch.checkpoint.lock import (  # noqa: F401
    DirLock,
)
from launch.checkpoint.pruning import (  # noqa: F401
    prune,
    remove_checkpoint,
    remove_stale_temporaries,
    set_aside,
)
from launch.checkpoint.reader import (  # noqa: F401
    Problem,
    ShardReader,
    check_checkpoint,
    damage_report,
    describe,
    find_intact,
    full_model_state,
    load_checkpoint,
    missing_optimizer_files,
    read_meta,
    read_state_tensors,
    set_model_weights,
)
from launch.checkpoint.writer import (  # noqa: F401
    commit,
    new_folder,
    save_checkpoint,
    write_meta,
    write_shards,
)
