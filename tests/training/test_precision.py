"""`train.precision=bf16`: the tiny config trained in bf16 (CPU autocast: matmuls in bf16, fp32 master
weights, FFT convolutions upcast to fp32) follows the fp32 run from the same seed and data.

Both runs: configs/tiny.yaml, 4 steps on the session's packs (E. coli training windows, phage
lambda validation), one process, in this process. Measured relative gap of the per-step training
losses, |bf16 - fp32| / fp32, on train.seed 0, 1 and 2: at most 1.6e-4 (per seed 1.2e-4, 6.9e-5,
1.6e-4); of the final validation loss at most 6.4e-5. Tolerance: BF16_REL_TOL = 1e-3 (6x the
largest gap measured). That bf16 really ran: fp32 runs are bit-identical (tests/training/test_train.py
resumes compare them bit for bit), so any gap is autocast's; every measured run differs from fp32
from the first step's loss on (by 1.4e-5 to 2.9e-5 relative), and the run logs its precision.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_cli

REPO = Path(__file__).resolve().parents[2]
STEPS = 4
BF16_REL_TOL = 1e-3



def train(packs: Path, out: Path, precision: str) -> tuple[list[float], float, str]:
    """(per-step losses, final validation loss, stdout) of the tiny run in `precision`."""
    rc, stdout, err = run_cli("train", "--config", REPO / "configs" / "tiny.yaml", f"train.steps={STEPS}",
                              "train.seq_len=128", "train.global_batch_size=8", "train.micro_batch_size=2",
                              "train.warmup_steps=1", "train.eval_batches=2", f"data.train={packs / 'train'}",
                              f"data.val={packs / 'val'}", f"out_dir={out}", "checkpoint.dir=null",
                              f"train.precision={precision}")
    assert rc == 0, (stdout + err)[-4000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))
    (val,) = [r["val_loss"] for r in rows if "val_loss" in r]
    return losses, val, stdout


def test_bf16_losses_follow_fp32(tiny_packs, tmp_path):
    fp32, fp32_val, _ = train(tiny_packs, tmp_path / "fp32", "fp32")
    bf16, bf16_val, log = train(tiny_packs, tmp_path / "bf16", "bf16")
    assert "bf16; 4 steps" in log  # the run says which precision it trains in
    assert fp32[-1] < fp32[0] and bf16[-1] < bf16[0]  # both learn
    gaps = [abs(b - a) / abs(a) for a, b in zip(fp32, bf16)]
    assert max(gaps) <= BF16_REL_TOL, (gaps, fp32, bf16)
    assert abs(bf16_val - fp32_val) <= BF16_REL_TOL * abs(fp32_val), (bf16_val, fp32_val)
    # bf16 ran: already the first step's forward differs from fp32's
    assert gaps[0] > 0 and max(gaps) > 1e-6, (fp32, bf16)
