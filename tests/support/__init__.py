"""Helpers shared by the tests (no tests here)."""

import os
from pathlib import Path

SLOW_SAVES = Path(__file__).resolve().parent / "slow_saves"


def slow_saves_env(delay: float, at: list[str] | None = None) -> dict[str, str]:
    """Environment for a child process whose checkpoint saves sleep `delay` s after each file
    (tests/support/slow_saves/sitecustomize.py), so a test can kill it in the middle of a save.
    `at`: the functions to slow down instead ("module:function"; default: the checkpoint
    writer's write_tensors and write_meta)."""
    path = os.pathsep.join(p for p in (str(SLOW_SAVES), os.environ.get("PYTHONPATH", "")) if p)
    env = {"HYENA_GLT_TEST_SAVE_DELAY": str(delay), "PYTHONPATH": path}
    if at:
        env["HYENA_GLT_TEST_SAVE_DELAY_AT"] = ",".join(at)
    return env
