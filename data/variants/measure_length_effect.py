"""Measure the indel length effect of `hyena-glt score-variants` (the figures in docs/inference.md).

1. Train the configs/tiny.yaml architecture (SDH*SDH*, d_model 64, max_seq_len 1024) briefly
   on E. coli K-12 W3110: --steps steps (400) of 8 random 512-base windows, either strand,
   AdamW, lr 3e-3 (20 warm-up steps, cosine to 10%), one CPU thread (4 to 5 minutes).
   Or pass --model DIR to score with a model you have.
2. Score every record of data/variants/ecoli_w3110_contig.vcf (261 real differences between
   two E. coli strains: 154 SNVs, 57 insertions, 50 deletions) against W3110 with each
   option set, and fit delta against the length change len(ALT) - len(REF) over the indels.

Run from the repository root:
    .venv/bin/python data/variants/measure_length_effect.py [--steps 400] [--model DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import math
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
GENOME = REPO / "data" / "genomes" / "ecoli_k12_w3110.fasta.gz"
VCF = REPO / "data" / "variants" / "ecoli_w3110_contig.vcf"
MODES = [
    ("shared-flanks, sum", ["--windows", "shared-flanks"]),
    ("shared-flanks, --per-base", ["--windows", "shared-flanks", "--per-base"]),
    ("shared-flanks, --strands both", ["--windows", "shared-flanks", "--strands", "both"]),
    ("equal, sum (the default)", []),
    ("equal, --strands both", ["--strands", "both"]),
]


def train(out: Path, steps: int) -> Path:
    import torch

    from hyena_glt import HyenaGLTConfig, build_causal_lm
    from hyena_glt.tokenizer import BOS_ID, NUM_SPECIAL

    torch.set_num_threads(1)
    with gzip.open(GENOME, "rt") as f:
        seq = "".join(line.strip() for line in f if not line.startswith(">")).upper()
    comp = str.maketrans("ACGT", "TGCA")
    cfg = HyenaGLTConfig(pattern="SDH*SDH*", d_model=64, num_heads=4, num_filter_groups=8, max_seq_len=1024,
                         short_filter_len=7, featurizer_len=3, medium_filter_len=128, modal_order=16, mlp_ratio=2.0,
                         seed=0)
    model = build_causal_lm(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    rng, t0 = random.Random(0), time.time()
    for step in range(steps):
        lr = 3e-3 * min(1, (step + 1) / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        rows = []
        for _ in range(8):
            s = rng.randrange(0, len(seq) - 512)
            w = seq[s : s + 512]
            if rng.random() < 0.5:
                w = w.translate(comp)[::-1]
            rows.append([BOS_ID] + [b + NUM_SPECIAL for b in w.encode()])
        ids = torch.tensor(rows)
        logits = model(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.4f} nats/base ({time.time() - t0:.0f} s)", flush=True)
    model.save_pretrained(out / "model")
    return out / "model"


def fit(path: Path) -> str:
    import numpy as np

    with open(path) as f:
        rows = [r for r in csv.DictReader((x for x in f if not x.startswith("#")), delimiter="\t")
                if r["status"] in ("ok", "clipped")]
    dl = np.array([len(r["alt"]) - len(r["ref"]) for r in rows], float)
    d = np.array([float(r["delta"]) for r in rows])
    ind = dl != 0
    slope = np.polyfit(dl[ind], d[ind], 1)[0]
    corr = np.corrcoef(dl[ind], d[ind])[0, 1]
    return (f"{ind.sum()} indels: slope {slope:+.4g} per base of length change, r = {corr:+.3f}; delta > 0 for "
            f"{np.mean(d[dl < 0] > 0):.0%} of deletions and {np.mean(d[dl > 0] > 0):.0%} of insertions")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--model", type=Path, help="score with this model instead of training one")
    ap.add_argument("--out", type=Path, default=Path("runs/length_effect"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model or train(args.out, args.steps)
    for name, opts in MODES:
        out = args.out / f"{name.split(',')[0]}{''.join(opts)}.tsv"
        subprocess.run([sys.executable, "-m", "launch.cli", "score-variants", "--model", str(model), "--reference",
                        str(GENOME), "--variants", str(VCF), "--out", str(out), "--no-progress", *opts],
                       check=True, cwd=REPO)
        print(f"{name:32s} {fit(out)}", flush=True)


if __name__ == "__main__":
    main()
