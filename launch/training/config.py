"""The training config: one YAML file, one validated object, dotted overrides.

    model:      the HyenaGLTConfig fields
    parallel:   tp, cp, pp, vpp, sp, cp_long_conv
    zero:       stage (0 = plain optimizer, 1/2/3 = DeepSpeed ZeRO)
    train:      steps, micro_batch_size, global_batch_size, seq_len, lr, init_from, ...
    data:       train / val: packed directories (or {dir: weight} to mix)
    tasks:      task heads co-trained with the LM: {name: {kind, train, val, weight, global_batch_size}}
    checkpoint: dir, every, keep, resume, fresh_optimizer
    out_dir:    where metrics.jsonl and the final model go
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hyena_glt import HyenaGLTConfig
from hyena_glt.heads import TASK_KINDS
from hyena_glt.kinds import CP_LONG_CONV_PATHS, CP_LONG_CONV_STATE
from launch.training.curriculum import CurriculumConfig, validate_curriculum
from launch.training.watchdog import DEFAULT_TIMEOUT as DEFAULT_PEER_TIMEOUT


class _Section(BaseModel):
    # allow_inf_nan=False: a NaN or infinite number (`.nan`, `.inf`, 1e400) is refused, naming the key
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ParallelSection(_Section):
    tp: int = Field(1, ge=1, description="tensor-parallel size")
    cp: int = Field(1, ge=1, description="context-parallel size")
    pp: int = Field(1, ge=1, description="pipeline-parallel size")
    vpp: int = Field(1, ge=1, description="virtual pipeline stages per pipeline rank (interleaved 1F1B); 1: plain 1F1B")
    sp: bool = Field(False, description="sequence parallel (needs tp > 1)")
    # Its values, like every layout rule, are checked by megatron_adapters.parallel_config.check_layout.
    cp_long_conv: str = Field(
        CP_LONG_CONV_STATE, description=f"D/H convolutions under cp > 1, one of {', '.join(CP_LONG_CONV_PATHS)}: "
        "halo + modal state (O(halo + state) traffic) or all-to-all")


class ZeroSection(_Section):
    stage: int = Field(0, ge=0, le=3, description="0: no ZeRO; 1/2/3: DeepSpeed ZeRO stage")
    config: str | None = Field(None, description="a DeepSpeed JSON config to use instead of the generated one")


class TrainSection(_Section):
    steps: int = Field(100, ge=1)
    micro_batch_size: int = Field(1, ge=1)
    global_batch_size: int = Field(8, ge=1)
    seq_len: int = Field(1024, ge=2)
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decays to lr * min_lr_ratio")
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 disables")
    seed: int = Field(0, ge=0)
    precision: str = Field("fp32", pattern="^(fp32|bf16)$")
    soft_mask_weight: float = Field(0.1, ge=0, le=1)
    reverse_complement_prob: float = Field(0.0, ge=0, le=1, description="load-time RC augmentation")
    activation_checkpointing: bool = False
    log_every: int = Field(1, ge=1)
    eval_every: int = Field(0, ge=0, description="validate every N steps (0: only at the end)")
    eval_batches: int = Field(8, ge=0, description="micro-batches of validation windows (0: no validation)")
    exit_after_steps: int = Field(0, ge=0, description="save and exit after this many steps in this run (0: run to the end); for wall-time-limited jobs")
    init_from: str | None = Field(
        None, description="start from this saved model directory's weights (convert, save_pretrained, import-evo2) "
        "with a fresh optimizer; the model section defaults to its config.json (see launch/training/warm_start.py)")
    max_nonfinite_steps: int = Field(5, ge=1, description="stop after this many NaN/inf losses in a row")
    peer_timeout_s: float = Field(
        DEFAULT_PEER_TIMEOUT, ge=0, description="seconds without a heartbeat from a rank (killed, hung, or cut off from the network) "
        "before every rank stops with one line naming it and its host (launch/training/watchdog.py); 0: off")
    tensorboard: bool = False
    curriculum: CurriculumConfig = Field(default_factory=CurriculumConfig, description="sequence-length warm-up")


class DataSection(_Section):
    train: Union[str, list[str], dict[str, float]] = Field(..., description="packed dir(s), or {dir: weight}")
    val: Union[str, list[str], dict[str, float], None] = None

    @model_validator(mode="before")
    @classmethod
    def _drop_removed_keys(cls, data):
        # data.num_workers was accepted but never used (the indexed loader reads in the
        # training process); it is dropped with a warning so that older configs and the
        # train_config stored in older checkpoints (`hyena-glt reshard`) still load.
        if isinstance(data, dict) and "num_workers" in data:
            data = {k: v for k, v in data.items() if k != "num_workers"}
            warnings.warn("data.num_workers is ignored: it was removed (it never had an effect)", UserWarning, stacklevel=2)
        return data


class TaskSection(_Section):
    """One task head co-trained with the language model (megatron_adapters/task_heads.py)."""

    kind: str = Field(description=f"a task kind of hyena_glt.heads.TASK_KINDS: {', '.join(TASK_KINDS)}")
    train: str = Field(description="labelled training file: CSV/TSV (sequence,label) or FASTA with labels in the "
                       "headers (data_tools/labelled.py)")
    val: str | None = Field(None, description="labelled validation file: the task's metrics at every evaluation")
    weight: float = Field(1.0, gt=0, description="the task's mean loss enters the objective times this (the LM's: 1)")
    global_batch_size: int | None = Field(None, ge=1, description="examples per step (default: train.global_batch_size)")

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        from hyena_glt.heads import task_kind

        return task_kind(kind).name


_TASK_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class CheckpointSection(_Section):
    dir: str | None = None
    every: int = Field(0, ge=0, description="save every N steps (0: only at the end)")
    keep: int = Field(2, ge=1, description="keep the newest N checkpoints (by step number)")
    resume: bool = Field(True, description="continue from the newest intact checkpoint in dir; false: dir must hold none")
    fresh_optimizer: bool = Field(False, description="on resume, start the optimizer state fresh (Adam moments "
                                  "from zero) instead of loading it; needed when the optimizer-state files are gone")


class TrainConfig(_Section):
    model: HyenaGLTConfig
    parallel: ParallelSection = ParallelSection()
    zero: ZeroSection = ZeroSection()
    train: TrainSection = TrainSection()
    data: DataSection
    checkpoint: CheckpointSection = CheckpointSection()
    tasks: dict[str, TaskSection] = Field(default_factory=dict, description="task heads co-trained with the LM")
    out_dir: str = "runs/train"

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        from megatron_adapters.parallel_config import check_layout

        t, p = self.train, self.parallel
        if t.global_batch_size % t.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size={t.global_batch_size} must be a multiple of "
                f"train.micro_batch_size={t.micro_batch_size}"
            )
        # Every layout rule that does not need the world size (layout_for adds it): the same
        # function the parallel builder and each step call.
        check_layout(self.parallel_config(), self.model, seq_length=t.seq_len)
        validate_curriculum(t.curriculum, t.seq_len, p.cp)
        for name, task in self.tasks.items():
            if not _TASK_NAME.match(name):
                raise ValueError(f"tasks: task name {name!r} must be letters, digits, '_' or '-'")
            if task.global_batch_size is not None and task.global_batch_size % t.micro_batch_size:
                raise ValueError(f"tasks.{name}.global_batch_size={task.global_batch_size} must be a multiple of "
                                 f"train.micro_batch_size={t.micro_batch_size}")
        return self

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> "TrainConfig":
        from pydantic import ValidationError

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        data = yaml.safe_load(_yaml_text(path)) or {}  # bad YAML: the CLI names the line (cli._yaml_error)
        if not isinstance(data, dict):
            raise ValueError(f"config file {path}: expected a mapping of sections (model:, train:, data:, ...) at the "
                             f"top level, got a {type(data).__name__}")
        for item in overrides or []:
            apply_override(data, item)
        train = data.get("train")
        init_from = train.get("init_from") if isinstance(train, dict) else None  # else: refused below, naming it
        if init_from and isinstance(data.get("model") or {}, dict):
            # a warm start: the saved model's config, under whatever model.* the run sets
            from hyena_glt.model import read_config

            try:
                saved = read_config(str(init_from), need_weights=True).to_dict()
            except FileNotFoundError as e:  # say where the path came from (the file or an override)
                raise FileNotFoundError(f"{path}: train.init_from: {e}") from None
            data["model"] = {**saved, **(data.get("model") or {})}
        try:
            return cls.model_validate(data)
        except ValidationError as e:  # pydantic's report spans lines and repeats the whole input
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            raise ValueError(f"{path}: {where + ': ' if where else ''}{msg}") from None

    def dump(self) -> dict:
        return self.model_dump(mode="json")

    # ---- the layout of a run: the same checks for `train` and `train --dry-run` ----
    def parallel_config(self):
        from megatron_adapters.parallel_config import ParallelConfig

        p = self.parallel
        return ParallelConfig(tp=p.tp, cp=p.cp, pp=p.pp, sp=p.sp, vpp=p.vpp if p.vpp > 1 else None,
                              cp_long_conv=p.cp_long_conv, zero_stage=self.zero.stage)

    def micro_batches_per_rank(self, dp: int) -> int:
        """Micro-batches each data-parallel rank runs per step; ValueError (one line naming the
        rule) when the global batch does not split into them."""
        from megatron_adapters.pipeline import check_num_microbatches

        t, p = self.train, self.parallel
        per_step = t.micro_batch_size * dp
        if t.global_batch_size % per_step:
            raise ValueError(f"train.global_batch_size={t.global_batch_size} must be a multiple of "
                             f"train.micro_batch_size x dp = {t.micro_batch_size} x {dp} = {per_step}")
        n = t.global_batch_size // per_step
        try:
            check_num_microbatches(n, p.pp, p.vpp if p.vpp > 1 else None)
        except ValueError as e:
            raise ValueError(f"train.global_batch_size / (train.micro_batch_size x dp) = {t.global_batch_size} / "
                             f"({t.micro_batch_size} x {dp}) = {n} micro-batches per data-parallel rank: {e}") from None
        return n

    def task_batch_size(self, name: str) -> int:
        return self.tasks[name].global_batch_size or self.train.global_batch_size

    def task_micro_batches_per_rank(self, dp: int) -> dict[str, int]:
        """Each task's micro-batches per data-parallel rank and step; ValueError (one line naming
        the rule) when a task's batch does not split into them."""
        from megatron_adapters.pipeline import check_num_microbatches

        t, p = self.train, self.parallel
        per_step = t.micro_batch_size * dp
        out = {}
        for name in self.tasks:
            g = self.task_batch_size(name)
            if g % per_step:
                raise ValueError(f"tasks.{name}.global_batch_size={g} must be a multiple of train.micro_batch_size x dp "
                                 f"= {t.micro_batch_size} x {dp} = {per_step}")
            out[name] = g // per_step
        if out:  # one pipeline schedule runs every task's micro-batches of a step
            try:
                check_num_microbatches(sum(out.values()), p.pp, p.vpp if p.vpp > 1 else None)
            except ValueError as e:
                raise ValueError(f"tasks: {sum(out.values())} task micro-batches per data-parallel rank and step: "
                                 f"{e}") from None
        return out

    def layout_for(self, world_size: int):
        """The validated Layout of this run on `world_size` processes (every layout rule of
        megatron_adapters.parallel_config.check_layout, then the batch rules), without any
        process group."""
        from megatron_adapters.parallel_config import make_layout

        layout = make_layout(self.parallel_config(), self.model, world_size, self.train.seq_len)
        self.micro_batches_per_rank(layout.dp)
        self.task_micro_batches_per_rank(layout.dp)
        return layout

    def layout_record(self, dp: int | None, world_size: int | None) -> dict:
        """The `layout` a checkpoint's meta.json records."""
        p = self.parallel
        return {"tp": p.tp, "cp": p.cp, "pp": p.pp, "vpp": p.vpp, "sp": p.sp, "dp": dp, "world_size": world_size,
                "zero_stage": self.zero.stage}


# What a resumed run may change from its checkpoint's recorded config (docs/checkpoints.md):
# how long it runs and its learning-rate schedule, what it validates and logs, where and how
# often it saves, its layout (a checkpoint loads into any layout) and its fault handling. Any
# other key changes what the steps compute (the data, the windows, the model, the optimizer,
# the batch) and is refused. Patterns as fnmatch's.
RESUME_MAY_CHANGE = (
    "train.steps", "train.lr", "train.min_lr_ratio", "train.warmup_steps",
    "train.eval_every", "train.eval_batches", "train.log_every", "train.tensorboard",
    "train.exit_after_steps", "train.max_nonfinite_steps", "train.peer_timeout_s",
    "train.activation_checkpointing", "train.micro_batch_size", "train.init_from",
    # where the data is: what it holds is checked by content (the loader's and the tasks' fingerprints)
    "data.train", "data.val", "tasks.*.train", "tasks.*.val", "tasks.*.weight",
    "checkpoint.*", "out_dir", "parallel.*", "zero.*",
)


def resume_differences(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(key, checkpoint's value, this run's) for every key outside RESUME_MAY_CHANGE that
    differs. A key the checkpoint's config does not have (written by an older version) is
    not compared."""
    from fnmatch import fnmatchcase

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and v and key not in ("data.train", "data.val"):
                out.update(flat(v, key + "."))
            else:
                out[key] = v
        return out

    old, new = flat(saved), flat(current)
    return [(k, old[k], new[k]) for k in sorted(old)
            if k in new and old[k] != new[k] and not any(fnmatchcase(k, p) for p in RESUME_MAY_CHANGE)]


def _yaml_text(path: Path) -> str:
    """A YAML file's text; ValueError naming the file and line for bytes that are not UTF-8 or
    characters YAML refuses (control characters: a damaged file), which PyYAML reports without
    the file's name."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path} line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the file as UTF-8") from None
    bad = yaml.reader.Reader.NON_PRINTABLE.search(text)
    if bad:
        line = text.count("\n", 0, bad.start()) + 1
        raise ValueError(f"{path} line {line}: character U+{ord(bad.group()[0]):04X} is not allowed in YAML (a control "
                         "character: is the file damaged?)")
    return text


def apply_override(data: dict, item: str) -> None:
    """`a.b.c=value`: the value is parsed as YAML (numbers, booleans, lists, null)."""
    if "=" not in item:
        raise ValueError(f"override {item!r}: expected key=value, e.g. train.steps=100")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {item!r}: {part} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError:  # e.g. model.pattern=**** (YAML reads '*' as an alias): take it as text
        node[parts[-1]] = raw
