"""Training subcommands: `train` (and its --dry-run) and `demo`."""

from __future__ import annotations

from launch.args import positive_int


def register(sub) -> None:
    p = sub.add_parser("demo", help="end-to-end demo on the bundled E. coli genome (tiny model, CPU)")
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--steps", type=positive_int, default=None, help="override the number of training steps")
    p.add_argument("--eval-windows", type=positive_int, default=None, metavar="N",
                   help="score at most N held-out windows in the evaluation (default: all of them)")
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "train",
        help="train from a YAML config: one process, or under torchrun / deepspeed / srun",
        description="Train from a YAML config. The same command runs in one process or under "
        "`torchrun --nproc_per_node N`, `deepspeed --num_gpus N` or SLURM (launch/cluster/slurm.sbatch); the layout "
        "comes from parallel.* and zero.stage. A checkpoint.dir holding a checkpoint is resumed from.",
    )
    p.add_argument("--config", required=True, help="YAML training config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=50 parallel.tp=2")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config for --world-size processes (every layout and batch rule) and print the "
                   "estimated memory per rank; starts no process and reads no data")
    p.add_argument("--world-size", type=positive_int, default=None, help="the world size --dry-run checks for")
    p.set_defaults(func=_train)


def _demo(args) -> int:
    from launch.training.demo import run_demo

    return run_demo(args.out, steps=args.steps, eval_windows=args.eval_windows)


def _train(args) -> int:
    if args.dry_run:
        if args.world_size is None:
            raise ValueError("--dry-run needs --world-size N, the number of processes to check the config for")
        from launch.training.dry_run import run_dry_run

        return run_dry_run(args.config, args.overrides, args.world_size)
    if args.world_size is not None:
        raise ValueError("--world-size goes with --dry-run; a real run takes its world size from the launcher")
    from launch.training.trainer import run_train

    return run_train(args.config, args.overrides)
