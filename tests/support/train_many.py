"""Several `hyena-glt train` runs of one world size in one launch (one process, or every rank
of a torchrun launch): the torch / megatron-core / DeepSpeed start-up of each process is paid
once instead of once per run.

    python tests/support/train_many.py RUNS.json                 # world size 1
    torchrun --nproc_per_node 2 ... tests/support/train_many.py RUNS.json

RUNS.json is a list of {"id": name, "argv": ["train", "--config", ...]}: each run goes through
the command line exactly as `hyena-glt train` would (launch.cli.main), one after the other.
The process group stays up between runs (only megatron-core's groups are rebuilt, as
initialize_parallel does for each run); everything else, the model, the optimizer, the
DeepSpeed engine, the loaders and the seeds, is built anew by each run. Rank 0 prints
`RUN <id> <exit status>` after each; a run that fails ends the launch (the other ranks may be
waiting in a collective), so the ones after it are reported as not run.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> int:
    runs = json.loads(open(sys.argv[1]).read())
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    import megatron_adapters.groups as groups
    from launch.cli import main as cli_main

    def keep_process_group() -> None:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()

    groups.destroy_parallel = keep_process_group  # what run_train calls at its end
    for run in runs:
        rc = cli_main(run["argv"])
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"RUN {run['id']} {rc}", flush=True)
        if rc:
            return rc
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
