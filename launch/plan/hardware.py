"""Hardware profiles: what the planner knows of a device, its node and the network.

A profile is a small YAML file (configs/hardware/h100.yaml is the commented example):

    peak_tflops            the device's dense rate in the training precision
    memory_gib             device memory; `usable_memory` of it is the planner's budget
    memory_bandwidth_gbs   device memory bandwidth (the optimizer step streams the states)
    devices_per_node       devices that share a node (and its fast link)
    intra_node, inter_node a link's bandwidth (GB/s per device, one direction) and latency (us);
                           optional `ops`: the same per collective (all_reduce, all_gather,
                           reduce_scatter) where they differ from a point-to-point message (gloo
                           on CPU: `hyena-glt calibrate` measures each; NCCL rings: leave it out)
    achieved               fraction of peak reached, by FLOP term (matmul, attention, conv)
    kind_achieved          optional: fraction of peak of a whole block of a layer kind (mixer +
                           MLP), by pattern character; `hyena-glt calibrate` measures these
    cores_per_device       CPU profiles: cores one rank's threads use (more ranks per node than
                           devices share them)
    runtime_gib            memory per rank beside the tensors the model counts (measured by
                           `hyena-glt calibrate` on a CPU; a GPU profile's usable_memory covers it)

`--hardware h100` names configs/hardware/h100.yaml; any other value is a path.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hyena_glt.kinds import FLOP_TERMS

PROFILES = Path(__file__).resolve().parents[2] / "configs" / "hardware"


class Rate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    bandwidth_gbs: float = Field(gt=0, description="GB/s per device, one direction")
    latency_us: float = Field(ge=0, description="time of an empty message, microseconds")

    def seconds(self, nbytes: float, messages: float = 1) -> float:
        return nbytes / (self.bandwidth_gbs * 1e9) + messages * self.latency_us * 1e-6


COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter")


class Link(Rate):
    """A point-to-point message's rate, and each collective's where it differs."""

    ops: dict[str, Rate] = Field(default_factory=dict)

    def model_post_init(self, _) -> None:
        bad = sorted(set(self.ops) - set(COLLECTIVES))
        if bad:
            raise ValueError(f"ops: unknown collective(s) {', '.join(bad)}; known: {', '.join(COLLECTIVES)}")

    def op(self, collective: str) -> Rate:
        return self.ops.get(collective, self)


class Hardware(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str
    description: str = ""
    peak_tflops: float = Field(gt=0)
    memory_gib: float = Field(gt=0)
    usable_memory: float = Field(0.9, gt=0, le=1)
    memory_bandwidth_gbs: float = Field(gt=0)
    devices_per_node: int = Field(ge=1)
    intra_node: Link
    inter_node: Link
    achieved: dict[str, float]
    kind_achieved: dict[str, float] = Field(default_factory=dict)
    cores_per_device: int = Field(0, ge=0, description="CPU profiles: a device is this many cores (0: not a CPU)")
    runtime_gib: float = Field(0.0, ge=0, description="memory per rank beside the tensors the model counts (the "
                               "trainer's buffers, allocator slack); GPU profiles leave it to usable_memory")
    calibration: dict = Field(default_factory=dict, description="how a calibrated profile was measured")

    def model_post_init(self, _) -> None:
        missing = [t for t in FLOP_TERMS if t not in self.achieved]
        bad = {k: v for k, v in {**self.achieved, **self.kind_achieved}.items() if not 0 < v <= 1}
        if missing or bad:
            raise ValueError(f"achieved needs a fraction in (0, 1] for each of {', '.join(FLOP_TERMS)}"
                             + (f"; missing {', '.join(missing)}" if missing else "") + (f"; out of range: {bad}" if bad else ""))

    @property
    def usable_bytes(self) -> float:
        return self.memory_gib * 2**30 * self.usable_memory

    def rate(self, term: str) -> float:
        """Achieved FLOP/s of a FLOP term."""
        return self.peak_tflops * 1e12 * self.achieved[term]

    def link(self, crosses_nodes: bool) -> Link:
        return self.inter_node if crosses_nodes else self.intra_node


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES.glob("*.yaml"))


def load_hardware(name_or_path: str) -> Hardware:
    """A profile by name (configs/hardware/NAME.yaml) or path; ValueError (one line) naming the file."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = PROFILES / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ValueError(f"--hardware {name_or_path}: no such profile (built in: {', '.join(profile_names())}; "
                             "or a YAML file's path; `hyena-glt calibrate --out FILE` writes one for this machine)")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read a hardware profile: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of profile fields, got a {type(data).__name__}")
    try:
        return Hardware.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise ValueError(f"{path}: {where + ': ' if where else ''}{err['msg'].removeprefix('Value error, ')}") from None
