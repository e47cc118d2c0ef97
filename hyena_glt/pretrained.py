"""Saved model directories: what one holds, and loading it as what a command needs.

Every directory has config.json (its family, hyena_glt.registry) and model.safetensors;
what sits on the backbone is told by a sidecar file:

    (none)       a causal language model      (train + convert, or save_pretrained)
    head.json    one fine-tuned task head     (hyena-glt finetune --task)
    tasks.json   several named task heads     (hyena-glt finetune --tasks)

Commands load through here: `eval` and `generate` need a language model, `predict` a head,
`embed` and `info` accept any directory. A directory of the wrong kind is refused with one
line that says what it holds and which command fits.

Every directory also has checksums.json (hyena_glt/checksums.py): the size and sha256 of each
file save_pretrained wrote. `inspect_pretrained` (so every loader here) verifies them first; a
damaged file is refused in one line naming it. `verify`: None = on unless
HYENA_GLT_VERIFY_MODEL=0; directories saved before checksums were recorded load unverified.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import HyenaGLTConfig
from .heads import (
    HEAD_NAME,
    TASKS_NAME,
    HyenaGLTMultiTask,
    load_head_model,
    read_head_json,
    read_tasks_json,
)
from .model import CausalLM, read_config
from .registry import Family, family_of


@dataclass(frozen=True)
class SavedModel:
    directory: Path
    config: HyenaGLTConfig
    family: Family
    kind: str  # "causal-lm", "head" or "multi-task"
    tasks: dict[str, str]  # task name -> task kind (a head directory: {kind: kind})

    def describe(self) -> str:
        what = {"causal-lm": "a causal language model", "head": "a fine-tuned task head",
                "multi-task": "a multi-task model"}[self.kind]
        tasks = f" ({', '.join(f'{n}: {k}' if n != k else k for n, k in self.tasks.items())})" if self.tasks else ""
        return f"{what}{tasks}, family {self.family.name}"


def inspect_pretrained(directory: str | Path, verify: bool | None = None) -> SavedModel:
    """What a saved directory holds, its files verified against checksums.json first."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such model directory")
    config = read_config(directory, need_weights=True, verify=verify)
    tasks: dict[str, str] = {}
    if (directory / TASKS_NAME).is_file():
        kind = "multi-task"
        tasks = {n: t.kind for n, t in read_tasks_json(directory / TASKS_NAME)["tasks"].items()}
    elif (directory / HEAD_NAME).is_file():
        kind = "head"
        task = read_head_json(directory / HEAD_NAME)["task"]
        tasks = {task: task}
    else:
        kind = "causal-lm"
    return SavedModel(directory, config, family_of(config), kind, tasks)


def load_causal_lm(directory: str | Path, map_location: str | torch.device = "cpu",
                   verify: bool | None = None) -> CausalLM:
    """A saved causal language model of any family."""
    saved = inspect_pretrained(directory, verify)
    if saved.kind != "causal-lm":
        raise ValueError(f"{saved.directory} holds {saved.describe()}: it has no language-model head "
                         "(use `hyena-glt predict` or `embed`, or the pretrained directory it was fine-tuned from)")
    return saved.family.causal_lm.from_pretrained(saved.directory, map_location=map_location, verify=verify)


def load_pretrained(directory: str | Path, map_location: str = "cpu", verify: bool | None = None) -> nn.Module:
    """Whatever the directory holds: a causal LM, a head model or a multi-task model."""
    saved = inspect_pretrained(directory, verify)
    if saved.kind == "multi-task":
        return HyenaGLTMultiTask.from_pretrained(saved.directory, map_location=map_location)
    if saved.kind == "head":
        return load_head_model(saved.directory, map_location=map_location)
    return saved.family.causal_lm.from_pretrained(saved.directory, map_location=map_location, verify=verify)


def load_backbone(directory: str | Path, map_location: str = "cpu", verify: bool | None = None) -> nn.Module:
    """The backbone (input_ids -> hidden states) of any saved directory."""
    return load_pretrained(directory, map_location, verify).model
