"""`hyena-glt convert` (distributed checkpoint -> single-GPU model) and `hyena-glt reshard`.

convert: TP slices concatenated, pipeline stages merged (ZeRO partitions were already
gathered at save time), every key and shape checked against the config, written as
`config.json` + `model.safetensors` for `HyenaGLTForCausalLM.from_pretrained`. With
`--verify` the checkpoint is also loaded into its own parallel layout (torchrun, as many
processes as wrote it) and the logits of a probe batch are compared. A checkpoint of a
co-training run (`tasks:`) also holds task heads: the language model converts as without
them, and OUT_DIR/tasks/ gets the multi-task model (backbone and every head, tasks.json), as
`hyena-glt finetune --tasks` writes one (`hyena-glt predict --task NAME` runs it).

Both verify the files they read against the sizes and sha256 recorded in meta.json first: a
checkpoint.dir falls back to its newest intact checkpoint (said in one line on stderr), one
named step_* folder that is damaged is refused naming the file.

Both publish OUT_DIR whole (launch/checkpoint/publish.py): under the lock `OUT_DIR.LOCK`,
written into `OUT_DIR.partial-XXXXXXXX` and renamed into place when complete; a non-empty
OUT_DIR is refused unless `--replace` (then swapped in whole). The model directory convert
writes carries checksums.json (hyena_glt/checksums.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from launch.args import nonnegative_float

PROBE_SEED, PROBE_LEN, PROBE_BATCH = 1234, 256, 2


def resolve_checkpoint(path: str | Path, kinds: tuple[str, ...] = ("model",), log=None) -> Path:
    """The checkpoint to read: `path` itself if it is one step_* folder (refused if damaged),
    else the newest intact checkpoint of the checkpoint.dir `path` (by step number; `log` says
    which damaged ones were passed over and why). Only files whose names start with `kinds`
    are verified (what the caller reads)."""
    from launch.checkpoint import (
        META,
        CheckpointError,
        check_checkpoint,
        damage_report,
        describe,
        find_intact,
        step_dirs,
        step_of,
    )

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or checkpoint.dir")
    if (path / META).is_file() or step_of(path) is not None:
        problems = check_checkpoint(path, kinds)
        if problems:
            raise CheckpointError(f"{describe(problems)}; the checkpoint {path} cannot be used")
        return path
    candidates = list(reversed(step_dirs(path)))
    if not candidates:
        raise FileNotFoundError(f"{path}: no checkpoint here (expected a step_* folder with meta.json, or a checkpoint.dir)")
    found, damaged = find_intact(candidates, lambda p: check_checkpoint(p, kinds))
    if found is None:
        raise CheckpointError(f"no intact checkpoint in {path}: {damage_report(damaged)}")
    if damaged and log is not None:
        log(f"{damage_report(damaged)}: using {found.name}, the newest intact checkpoint")
    return found


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


TASKS_DIR = "tasks"  # where convert writes a co-trained checkpoint's multi-task model, inside OUT_DIR


def convert(ckpt: str | Path, out_dir: str | Path, log=_warn, replace: bool = False):
    """Write the model of checkpoint `ckpt` to `out_dir`, published whole (a non-empty
    `out_dir` is refused unless `replace`)."""
    from hyena_glt import HyenaGLTConfig, build_causal_lm
    from hyena_glt.heads import HyenaGLTMultiTask
    from hyena_glt.model import check_state_dict
    from launch.checkpoint import Publication, full_model_state, read_meta
    from megatron_adapters.task_heads import is_head_parameter

    with Publication([out_dir], command="convert", replace=replace) as (tmp,):
        path = resolve_checkpoint(ckpt, ("model",), log)
        meta = read_meta(path)
        cfg = HyenaGLTConfig.from_dict(meta["model_config"])
        state = full_model_state(path)
        heads = {k: state.pop(k) for k in [k for k in state if is_head_parameter(k)]}
        model = build_causal_lm(cfg, initialize=False)
        check_state_dict(model, state, str(path))
        model.load_state_dict(state, strict=True)
        model.save_pretrained(tmp)
        if heads or meta.get("tasks"):
            multi = HyenaGLTMultiTask(cfg, meta.get("tasks") or {}, dropout=0.0, initialize=False)
            multi_state = {**{k: v for k, v in state.items() if k.startswith("model.")}, **heads}
            check_state_dict(multi, multi_state, str(path))
            multi.load_state_dict(multi_state, strict=True)
            multi.save_pretrained(tmp / TASKS_DIR)
    return model, meta, path


def probe_batch(vocab_bytes: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randint(4, 4 + vocab_bytes, (PROBE_BATCH, PROBE_LEN), generator=g)


def _verify(path: Path, out_dir: Path, meta: dict) -> float:
    """Run the sharded model on the probe batch under torchrun and compare logits."""
    import tempfile

    from launch.net import free_port

    world = meta["layout"]["world_size"]
    port = free_port()
    scratch = tempfile.TemporaryDirectory(prefix="hyena-glt-verify-")  # never inside the published OUT_DIR
    result = Path(scratch.name) / "verify_logits.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "launch.checkpoint.convert", "--probe", str(path), str(result)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"--verify: the sharded model failed to run:\n{proc.stderr[-3000:]}")
    from hyena_glt import load_causal_lm
    from launch.checkpoint import read_tensors

    sharded = read_tensors(result)["logits"]
    scratch.cleanup()
    single = load_causal_lm(out_dir).eval()
    with torch.no_grad():
        logits = single(probe_batch()).logits
    return (logits - sharded).abs().max().item()


def _probe_worker(ckpt: str, result: str) -> None:
    """Inside torchrun: build the checkpoint's own layout, load it, write full probe logits."""
    import torch.distributed as dist

    from hyena_glt import HyenaGLTConfig
    from launch.checkpoint import ShardReader, read_meta
    from megatron_adapters.build import build_parallel_model
    from megatron_adapters.groups import destroy_parallel, initialize_parallel
    from megatron_adapters.parallel_config import ParallelConfig

    meta = read_meta(ckpt)
    lay = meta["layout"]
    cfg = HyenaGLTConfig.from_dict(meta["model_config"])
    vpp = lay.get("vpp", 1)  # checkpoints written before vpp was recorded: plain 1F1B
    pcfg = ParallelConfig(tp=lay["tp"], cp=lay["cp"], pp=lay["pp"], sp=lay["sp"], vpp=vpp if vpp > 1 else None)
    layout = initialize_parallel(pcfg, cfg, seq_length=PROBE_LEN)
    pm = build_parallel_model(cfg, layout)
    reader = ShardReader(ckpt, "model")
    tp, tp_rank = pm.ctx.tp, pm.ctx.coords.tp
    with torch.no_grad():
        for n, p in pm.named_parameters():
            p.copy_(reader.local(n, n, tp_rank, tp))
        for n, b in pm.named_persistent_buffers():
            b.copy_(reader.full(n))
    logits: list = []
    ids = probe_batch()
    pm.forward_backward([{"input_ids": ids, "labels": ids}] * lay["pp"], forward_only=True, logits_out=logits)
    c = pm.ctx.coords
    if logits and c.tp == 0 and c.cp == 0 and c.dp == 0:  # one rank of the last stage writes
        from launch.checkpoint import write_tensors

        write_tensors(result, {"logits": logits[0]})
    dist.barrier()
    destroy_parallel()


def reshard(ckpt: str | Path, out_dir: str | Path, overrides: list[str], log=_warn, replace: bool = False) -> Path:
    """Rewrite a checkpoint's model and optimizer shards for another tp/pp/vpp (cp, dp and the
    ZeRO stage need no rewrite: any checkpoint loads under them as it is). Written with
    launch/checkpoint/'s writer (shards, meta.json with every file's size and sha256,
    `latest`), as a training run would, into a new checkpoint.dir OUT_DIR published whole (a
    non-empty one is refused unless `replace`; replacing one a training run uses is refused)."""
    from hyena_glt import HyenaGLTConfig
    from launch.checkpoint import Publication, read_meta, step_name
    from launch.training.config import TrainConfig, apply_override
    from megatron_adapters.parallel_config import make_layout

    path = resolve_checkpoint(ckpt, ("model", "optim"), log)
    meta = read_meta(path)
    train = meta["train_config"]
    for item in overrides:
        if not item.startswith(("parallel.", "zero.")):
            raise ValueError(f"reshard: only parallel.* and zero.* can change, got {item!r}")
        apply_override(train, item)
    new = TrainConfig.model_validate(train)
    cfg = HyenaGLTConfig.from_dict(meta["model_config"])
    p = new.parallel
    mp = p.tp * p.cp * p.pp
    layout = make_layout(new.parallel_config(), cfg, mp, seq_length=new.train.seq_len)
    with Publication([out_dir], command="reshard", replace=replace, checkpoint_dir=True) as (root,):
        _reshard_into(root, path, meta, new, cfg, layout, mp)
    return Path(out_dir) / step_name(meta["step"])


def _reshard_into(root: Path, path: Path, meta: dict, new, cfg, layout, mp: int) -> Path:
    from launch.checkpoint import (
        ShardReader,
        commit,
        new_folder,
        write_meta,
        write_shards,
    )
    from megatron_adapters.state_dict import shard_state_dict
    from megatron_adapters.task_heads import is_head_parameter

    model = ShardReader(path, "model")
    full = {n: model.full(n) for n in model.keys()}
    states = {}
    if any(path.glob("optim-*.safetensors")):
        optim = ShardReader(path, "optim")
        states = {k: {n: optim.full(f"{k}/{n}", n) for n in model.keys() if f"{k}/{n}" in optim.where}
                  for k in ("exp_avg", "exp_avg_sq")}
    # Task heads (co-training) are whole on every TP rank of the last pipeline stage.
    heads = {n: full.pop(n) for n in [n for n in full if is_head_parameter(n)]}
    head_states = {k: {n: st.pop(n) for n in [n for n in st if is_head_parameter(n)]} for k, st in states.items()}
    last = layout.parallel.num_stages - 1
    tmp = new_folder(root, meta["step"])  # inside the partial OUT_DIR: removed with it on failure
    files: dict[str, dict] = {}
    for rank in range(mp):  # dp = 1 here: one writer per (tp, pp)
        c = layout.coords(rank)
        if c.cp != 0:
            continue
        shard = {}
        for k, st in states.items():
            shard.update({f"{k}/{n}": t for n, t in _shard_partial(st, layout, rank).items()})
        weights = shard_state_dict(full, layout, rank)
        if last in layout.chunk_stages(c.pp):
            weights.update(heads)
            shard.update({f"{k}/{n}": t for k, st in head_states.items() for n, t in st.items()})
        files.update(write_shards(tmp, c.tp, c.pp, weights, shard))
    meta["train_config"] = new.model_dump(mode="json")
    meta["layout"] = new.layout_record(None, None)
    write_meta(tmp, meta, files=files)
    return commit(tmp, root, meta["step"])


def _shard_partial(states: dict[str, torch.Tensor], layout, rank: int) -> dict[str, torch.Tensor]:
    """shard_state_dict for a subset of parameters (optimizer states exist only for trained ones)."""
    from megatron_adapters.sharding import canonical_params
    from megatron_adapters.state_dict import shard_state_dict

    template = canonical_params(layout.model)
    filled = {n: states.get(n, torch.zeros(tuple(t.shape))) for n, t in template.items()}
    return {n: t for n, t in shard_state_dict(filled, layout, rank).items() if n in states}


def register(sub) -> None:
    from launch.checkpoint.publish import add_replace_option

    p = sub.add_parser("convert", help="merge a distributed checkpoint into one single-GPU model directory")
    p.add_argument("ckpt", metavar="CKPT_DIR", help="a checkpoint.dir (its latest checkpoint) or one step_* folder")
    p.add_argument("out", metavar="OUT_DIR")
    p.add_argument("--verify", action="store_true",
                   help="also run the sharded model (torchrun, its own layout) and compare logits on a probe batch")
    p.add_argument("--tolerance", type=nonnegative_float, default=1e-4, help="max |logit difference| accepted by --verify")
    add_replace_option(p)
    p.set_defaults(func=_convert_cmd)

    p = sub.add_parser("reshard", help="rewrite a distributed checkpoint for another parallel layout")
    p.add_argument("ckpt", metavar="CKPT_DIR")
    p.add_argument("out", metavar="OUT_DIR", help="a new checkpoint.dir to continue training from")
    p.add_argument("overrides", nargs="+", help="parallel.tp=.. parallel.pp=.. parallel.vpp=.. parallel.cp=.. zero.stage=..")
    add_replace_option(p)
    p.set_defaults(func=_reshard_cmd)


def _convert_cmd(args) -> int:
    model, meta, path = convert(args.ckpt, args.out, replace=args.replace)
    lay = meta["layout"]
    print(f"converted {path} (step {meta['step']}, layout tp={lay['tp']} cp={lay['cp']} pp={lay['pp']} "
          f"vpp={lay.get('vpp', 1)}) -> {args.out}: {model.num_parameters():,} parameters")
    if meta.get("tasks"):
        print(f"task heads ({', '.join(meta['tasks'])}) with the backbone -> {Path(args.out) / TASKS_DIR} "
              "(a multi-task model: `hyena-glt predict --task NAME`)")
    if args.verify:
        diff = _verify(path, Path(args.out), meta)
        ok = diff <= args.tolerance
        print(f"verify: max |logit difference| single-device vs sharded = {diff:.3e} "
              f"({'OK' if ok else 'FAILED'}, tolerance {args.tolerance:g})")
        return 0 if ok else 1
    return 0


def _reshard_cmd(args) -> int:
    out = reshard(args.ckpt, args.out, args.overrides, replace=args.replace)
    print(f"resharded -> {out}; continue with checkpoint.dir={args.out} and the same overrides")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--probe":
        _probe_worker(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python -m launch.checkpoint.convert --probe CKPT RESULT (internal, used by convert --verify)")
