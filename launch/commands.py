"""Model-level subcommands: demo, train, generate, info."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("demo", help="end-to-end demo on the bundled E. coli genome (tiny model, CPU)")
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "train",
        help="train from a YAML config: one process, or under torchrun / deepspeed / srun",
        description="Train from a YAML config. The same command runs in one process or under "
        "`torchrun --nproc_per_node N`, `deepspeed --num_gpus N` or SLURM (launch/slurm.sbatch); the layout "
        "comes from parallel.* and zero.stage. A checkpoint.dir holding a checkpoint is resumed from.",
    )
    p.add_argument("--config", required=True, help="YAML training config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=50 parallel.tp=2")
    p.set_defaults(func=_train)

    p = sub.add_parser("generate", help="sample continuations from a saved language model (either family)")
    p.add_argument("--model", required=True, help="directory with config.json + model.safetensors")
    p.add_argument("--prompt", default="", help="prompt bases (e.g. ATG)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_generate)

    p = sub.add_parser("info", help="print a model's family, layers and parameter count")
    p.add_argument("config", help="model or training YAML, or a saved model directory (LM, head or multi-task)")
    p.set_defaults(func=_info)


def _demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.out, steps=args.steps)


def _train(args) -> int:
    from .trainer import run_train

    return run_train(args.config, args.overrides)


def _generate(args) -> int:
    import torch

    from hyena_glt import ByteTokenizer, load_causal_lm

    if args.max_new_tokens < 0 or args.num_samples < 1:
        raise ValueError("--max-new-tokens must be >= 0 and --num-samples >= 1")
    model = load_causal_lm(args.model).eval()
    tok = ByteTokenizer()
    prompt = tok.encode(args.prompt, add_bos=True).ids[None].repeat(args.num_samples, 1)
    g = torch.Generator().manual_seed(args.seed)
    out = model.generate(prompt, args.max_new_tokens, args.temperature, args.top_k, generator=g)
    for row in out:
        print(tok.decode(row).decode("ascii", errors="replace"))
    return 0


def _info(args) -> int:
    import math
    from pathlib import Path

    import torch

    from hyena_glt import HyenaGLTConfig, build_causal_lm, family_of, inspect_pretrained

    path = Path(args.config)
    if path.is_dir():
        saved = inspect_pretrained(path)
        cfg, what = saved.config, saved.describe()
        from safetensors import safe_open

        with torch.device("meta"):
            buffers = {n for n, _ in build_causal_lm(cfg, initialize=False).named_buffers()}
        with safe_open(str(path / "model.safetensors"), "pt") as f:  # what is stored, heads included
            n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if k not in buffers)
    else:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such config file or model directory")
        cfg = HyenaGLTConfig.from_yaml(path)
        what = f"family {family_of(cfg).name}"
        with torch.device("meta"):  # count without allocating (works for 40B configs)
            model = build_causal_lm(cfg, initialize=False)
        n_params = model.num_parameters()
    counts = {c: cfg.layers.count(c) for c in "SDH*"}
    print(f"{what}: pattern {cfg.pattern}: {cfg.num_layers} layers {counts}, d_model {cfg.d_model}, "
          f"{n_params:,} parameters")
    if cfg.patching != "none":
        print(f"token merging: {cfg.patching} patcher, mean patch {cfg.patch_size:g} bytes, "
              f"local encoder {cfg.local_encoder_pattern}, local decoder {cfg.local_decoder_pattern}")
    return 0

