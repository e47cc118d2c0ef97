"""Every layout of a training config on N devices, checked, predicted and ranked.

A candidate sets tp, cp, pp, vpp, sp, the ZeRO stage, the micro-batch size and activation
checkpointing of the config (the model, sequence length and global batch stay). Each is
checked by the trainer's own rules (TrainConfig.layout_for: check_layout and the batch
split); a valid one gets a Prediction (cost.py) and is kept when its largest rank fits the
profile's usable memory. Rejected candidates keep their reason, grouped for the report.
Sequence parallelism is on whenever tp > 1 (it only removes memory: the same bytes move
as an all-gather + reduce-scatter pair instead of an all-reduce) and CP crosses long
convolutions by their state (`cp_long_conv=state`; all-to-all moves O(L) more).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from megatron_adapters.parallel_config import ParallelConfigError

from .cost import Prediction, predict
from .hardware import Hardware


@dataclass(frozen=True)
class Candidate:
    tp: int
    cp: int
    pp: int
    vpp: int
    zero: int
    micro_batch: int
    recompute: bool

    @property
    def sp(self) -> bool:
        return self.tp > 1

    def overrides(self) -> list[str]:
        """The config overrides that train with this layout (`hyena-glt train KEY=VALUE ...`)."""
        return [f"parallel.tp={self.tp}", f"parallel.cp={self.cp}", f"parallel.pp={self.pp}",
                f"parallel.vpp={self.vpp}", f"parallel.sp={str(self.sp).lower()}", f"zero.stage={self.zero}",
                f"train.micro_batch_size={self.micro_batch}",
                f"train.activation_checkpointing={str(self.recompute).lower()}"]

    def describe(self) -> str:
        return (f"tp={self.tp} cp={self.cp} pp={self.pp} vpp={self.vpp} zero={self.zero} mb={self.micro_batch} "
                f"recompute={'on' if self.recompute else 'off'}")


@dataclass
class Planned:
    candidate: Candidate
    dp: int
    prediction: Prediction


def _powers_of_two(limit: int) -> list[int]:
    out, x = [], 1
    while x <= limit:
        out.append(x)
        x *= 2
    return out


def candidates(tc, world: int, max_tp: int = 64, max_cp: int = 32, max_pp: int = 32) -> list[Candidate]:
    t = tc.train
    out = []
    for tp in _powers_of_two(min(max_tp, world)):
        for cp in _powers_of_two(min(max_cp, world // tp)):
            for pp in _powers_of_two(min(max_pp, world // (tp * cp), tc.model.num_layers)):
                for vpp in ([1] if pp == 1 else [1, 2, 4]):
                    for zero in range(4):
                        for mb in _powers_of_two(min(16, t.global_batch_size)):
                            for recompute in (False, True):
                                out.append(Candidate(tp, cp, pp, vpp, zero, mb, recompute))
    return out


def configure(tc, c: Candidate):
    """`tc` with candidate `c`'s layout (no validation: layout_for checks it)."""
    return tc.model_copy(update={
        "parallel": tc.parallel.model_copy(update={"tp": c.tp, "cp": c.cp, "pp": c.pp, "vpp": c.vpp, "sp": c.sp}),
        "zero": tc.zero.model_copy(update={"stage": c.zero}),
        "train": tc.train.model_copy(update={"micro_batch_size": c.micro_batch, "activation_checkpointing": c.recompute}),
    })


_NUMBERS = re.compile(r"\d+(\.\d+)?")


def reason_kind(message: str) -> str:
    """A rejection reason with its numbers blanked, to group like reasons."""
    rule = message.split("): ", 1)[-1] if message.startswith("invalid parallel layout") else message
    return _NUMBERS.sub("N", rule.split(";")[0])


def plan(tc, world: int, hw: Hardware, per_node: int | None = None, candidate_list: list[Candidate] | None = None):
    """(fitting layouts best first, rejected: [(candidate, reason)])."""
    kept, rejected = [], []
    for c in candidate_list if candidate_list is not None else candidates(tc, world):
        run = configure(tc, c)
        try:
            layout = run.layout_for(world)
        except (ParallelConfigError, ValueError) as e:
            rejected.append((c, str(e)))
            continue
        pr = predict(run, layout, hw, per_node)
        if not pr.fits:
            rejected.append((c, f"needs {pr.peak_bytes / 2**30:,.1f} GiB on its largest rank, more than the "
                                f"{pr.budget_bytes / 2**30:,.1f} GiB usable ({hw.name})"))
            continue
        kept.append(Planned(c, layout.dp, pr))
    kept.sort(key=lambda p: (-p.prediction.tokens_per_s, p.prediction.peak_bytes))  # a tie: the smaller
    return kept, rejected


def rejection_summary(rejected) -> list[tuple[int, str, str]]:
    """(count, reason kind, one example's full reason and layout), most frequent first."""
    groups: Counter = Counter()
    example: dict[str, str] = {}
    for c, why in rejected:
        kind = "does not fit in memory" if why.startswith("needs ") else reason_kind(why)
        groups[kind] += 1
        example.setdefault(kind, f"{c.describe()}: {why}")
    return [(n, kind, example[kind]) for kind, n in groups.most_common()]
