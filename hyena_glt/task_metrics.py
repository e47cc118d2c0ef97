"""The task metrics: classification (accuracy, MCC, F1) and regression (MSE, Pearson).

Each takes flat predictions and labels and returns {"n": ..., metric: value}. Which kind
uses which is the task-kind registry's business (hyena_glt.heads.TASK_KINDS); the per-task
accumulation over batches and ranks is hyena_glt.multitask.MultiTaskMetrics.
"""

from __future__ import annotations

import math

import torch


def classification_metrics(preds: torch.Tensor, labels: torch.Tensor, num_labels: int | None = None) -> dict:
    """accuracy, MCC (Gorodkin's multi-class R_K; the usual MCC for two classes) and F1
    (of class 1 for two classes, macro otherwise). Ignores labels == -100."""
    preds, labels = preds.detach().reshape(-1).long(), labels.detach().reshape(-1).long()
    keep = labels != -100
    preds, labels = preds[keep], labels[keep]
    n = int(labels.numel())
    if n == 0:
        return {"accuracy": float("nan"), "mcc": float("nan"), "f1": float("nan"), "n": 0}
    K = int(num_labels or int(max(preds.max(), labels.max())) + 1)
    cm = torch.zeros(K, K, dtype=torch.float64)
    cm.index_put_((labels, preds), torch.ones(n, dtype=torch.float64), accumulate=True)
    correct, t, p = cm.trace(), cm.sum(1), cm.sum(0)
    cov = correct * n - (t * p).sum()
    denom = math.sqrt(float((n * n - (p * p).sum()) * (n * n - (t * t).sum())))
    mcc = float(cov) / denom if denom > 0 else 0.0
    tp = cm.diag()
    prec = tp / p.clamp_min(1)
    rec = tp / t.clamp_min(1)
    f1s = torch.where(prec + rec > 0, 2 * prec * rec / (prec + rec), torch.zeros_like(prec))
    f1 = float(f1s[1]) if K == 2 else float(f1s.mean())
    return {"accuracy": float(correct) / n, "mcc": mcc, "f1": f1, "n": n}


def regression_metrics(preds: torch.Tensor, targets: torch.Tensor) -> dict:
    p, t = preds.detach().reshape(-1).double(), targets.detach().reshape(-1).double()
    mse = float(((p - t) ** 2).mean()) if p.numel() else float("nan")
    pc, tc = p - p.mean(), t - t.mean()
    denom = float(pc.norm() * tc.norm())
    pearson = float((pc * tc).sum()) / denom if denom > 0 else 0.0
    return {"mse": mse, "pearson": pearson, "n": int(p.numel())}
