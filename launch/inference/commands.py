"""Inference subcommands on a saved model: `generate` and `info` (eval, score, embed: evaluate.py)."""

from __future__ import annotations

from launch.args import nonnegative_float, nonnegative_int, positive_int, probability


def register(sub) -> None:
    p = sub.add_parser(
        "generate", help="sample continuations from a saved language model (either family)",
        description="Sample continuations of one or more prompts. Plain models prefill each prompt once and then "
        "take one cached step per new token (O(1) per token for Hyena layers). Token-merging models have no "
        "inference cache: they recompute the whole prefix for every new token (cost grows with the square of "
        "the output length). Prompts of different lengths run as one batch. Every sample draws from its own random "
        "stream, derived from --seed, the prompt and the sample's number: the --num-samples samples of a prompt are "
        "independent draws, different prompts draw independently, a rerun with the same --seed gives the same "
        "output, and sample K of a prompt is the same whatever the other prompts and however many samples.")
    p.add_argument("--model", required=True, help="directory with config.json + model.safetensors")
    p.add_argument("--prompt", action="append", default=[], help="prompt bases (repeatable); none: start from BOS")
    p.add_argument("--prompts", metavar="FASTA", help="also take every record of this FASTA file as a prompt")
    p.add_argument("--max-new-tokens", type=nonnegative_int, default=100,
                   help="bytes to sample after each prompt (0: only the prompt)")
    p.add_argument("--temperature", type=nonnegative_float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=nonnegative_int, default=4, help="sample among the k most likely bytes (0: all)")
    p.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling: the smallest set reaching this mass")
    p.add_argument("--num-samples", type=positive_int, default=1, help="samples per prompt (independent draws)")
    p.add_argument("--seed", type=nonnegative_int, default=0,
                   help="base of every sample's random stream (with the prompt and the sample's number)")
    p.add_argument("--stop-at-eos", action="store_true", help="let the model emit EOS and end a sample there")
    p.add_argument("--recompute", action="store_true", help="no cache: recompute the prefix each step (a check)")
    p.add_argument("--out", metavar="FASTA", help="write the samples (prompt + continuation) as FASTA here")
    p.set_defaults(func=_generate)

    p = sub.add_parser("info", help="print a model's family, layers and parameter count",
                       description="Print a model's family, layers and parameter count. A saved model directory is "
                       "checked against its checksums.json first (as every command that loads it does; "
                       "HYENA_GLT_VERIFY_MODEL=0: off); --verify reports every file's status instead of stopping at "
                       "the first damaged one, and exits 1 if any is damaged or missing, or nothing could be "
                       "verified.")
    p.add_argument("config", help="model or training YAML, or a saved model directory (LM, head or multi-task)")
    p.add_argument("--verify", action="store_true",
                   help="a saved model directory: check every file against checksums.json and print each one's "
                   "status (exit 1 if any is damaged or missing)")
    p.set_defaults(func=_info)



def _generate(args) -> int:
    import sys
    from pathlib import Path

    from hyena_glt import ByteTokenizer, load_causal_lm

    if args.max_new_tokens < 0 or args.num_samples < 1:
        raise ValueError("--max-new-tokens must be >= 0 and --num-samples >= 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise ValueError("--temperature must be >= 0, --top-k >= 0 and --top-p in (0, 1]")
    model = load_causal_lm(args.model).eval()
    tok = ByteTokenizer()
    named = [(f"prompt{i + 1}", p.encode()) for i, p in enumerate(args.prompt)]
    if args.prompts:
        from data_tools.fasta import check_file, read_records

        check = check_file(Path(args.prompts))
        check.raise_if_bad()
        named += [(rec.id, rec.seq) for rec in read_records(Path(args.prompts), lambda: check)]
    if not named:
        named = [("bos", b"")]
    rows = [(name, s) for name, seq in named for s in [seq] * args.num_samples]
    bos = model.config.bos_token
    if not bos and any(not seq for _, seq in rows):
        raise ValueError(f"--prompt: {args.model} reads raw bytes without BOS (bos_token false): give a non-empty prompt")
    prompts = [tok.encode(seq, add_bos=bos).ids for _, seq in rows]
    longest = max(len(p) for p in prompts) + args.max_new_tokens
    if longest > model.config.max_seq_len:
        print(f"hyena-glt generate: warning: the longest prompt plus --max-new-tokens is {longest:,} positions, more than "
              f"the {model.config.max_seq_len:,} of the model's max_seq_len (the longest it was trained on): samples "
              "past that length come from positions it never saw", file=sys.stderr)
    out = model.generate(prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                         top_p=args.top_p, seed=args.seed, stop_at_eos=args.stop_at_eos,
                         use_cache=False if args.recompute else None,
                         progress=sys.stderr.isatty() or args.max_new_tokens * len(rows) >= 2000)
    texts = [tok.decode(ids).decode("ascii", errors="replace") for ids in out]
    if args.out:
        counts: dict[str, int] = {}
        lines = []
        for (name, prompt), text in zip(rows, texts):
            counts[name] = counts.get(name, 0) + 1
            lines.append(f">{name}_sample{counts[name]} seed={args.seed} new_tokens={len(text) - len(prompt)}\n")
            lines.extend(text[i : i + 80] + "\n" for i in range(0, len(text), 80))
        Path(args.out).write_text("".join(lines))
        print(f"wrote {len(texts)} sample(s) to {args.out}")
    else:
        for text in texts:
            print(text)
    return 0


def _info(args) -> int:
    import math
    from pathlib import Path

    from hyena_glt import HyenaGLTConfig, build_causal_lm, family_of, inspect_pretrained
    from hyena_glt.config import PATCHING_NONE
    from hyena_glt.kinds import KINDS

    path = Path(args.config)
    if getattr(args, "verify", False):
        if not path.is_dir():
            raise ValueError(f"--verify: {path} is not a saved model directory (--verify checks a directory's files "
                             "against its checksums.json)")
        if not _verify_report(path):
            return 1
    if path.is_dir():
        saved = inspect_pretrained(path)
        cfg, what = saved.config, saved.describe()
        from safetensors import safe_open

        buffers = {n for n, _ in _meta_model(cfg, path, build_causal_lm).named_buffers()}
        with safe_open(str(path / "model.safetensors"), "pt") as f:  # what is stored, heads included
            n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if k not in buffers)
    else:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such config file or model directory")
        cfg = HyenaGLTConfig.from_yaml(path)
        what = f"family {family_of(cfg).name}"
        n_params = _meta_model(cfg, path, build_causal_lm).num_parameters()
    counts = {c: cfg.layers.count(c) for c in KINDS}
    print(f"{what}: pattern {cfg.pattern}: {cfg.num_layers} layers {counts}, d_model {cfg.d_model}, "
          f"{n_params:,} parameters")
    if cfg.patching != PATCHING_NONE:
        print(f"token merging: {cfg.patching} patcher, mean patch {cfg.patch_size:g} bytes, "
              f"local encoder {cfg.local_encoder_pattern}, local decoder {cfg.local_decoder_pattern}")
    return 0


def _meta_model(cfg, path, build):
    """The model of `cfg` on the meta device: counted without allocating (works for 40B configs).
    Sizes the config's bounds let through but whose tensors torch cannot describe (an element
    count past int64) are refused in one line naming the file."""
    import torch

    try:
        with torch.device("meta"):
            return build(cfg, initialize=False)
    except (RuntimeError, TypeError, OverflowError) as e:
        if not isinstance(e, OverflowError) and "overflow" not in str(e).lower():
            raise  # not about sizes: a bug, keep its traceback
        raise ValueError(f"{path}: model: too large to build ({' '.join(str(e).split())})") from None


def _verify_report(path) -> bool:
    """`info --verify`: one line per file of the directory (recorded ones first); True when
    every recorded file matches."""
    from hyena_glt.checksums import CHECKSUMS_NAME, check_pretrained

    checks = check_pretrained(path)
    if checks is None:
        print(f"{path}: no {CHECKSUMS_NAME} (saved before hyena-glt recorded checksums): nothing to verify; save it "
              "again to add them")
        return False
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"  {c.name:<{width}}  {c.detail}")
    bad = [c for c in checks if not c.ok]
    recorded = sum(c.status != "not recorded" for c in checks)
    if bad:
        print(f"{path}: {len(bad)} of {recorded} recorded file(s) damaged or missing: "
              f"{', '.join(c.name for c in bad)}")
        return False
    print(f"{path}: all {recorded} recorded file(s) match {CHECKSUMS_NAME}")
    return True
