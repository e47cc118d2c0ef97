"""A pause in the middle of a pack, injected into a child process by tests/data/test_pack_lock.py
(never by the product).

With this folder first on the child's PYTHONPATH and HYENA_GLT_TEST_GATE=DIR, the function
HYENA_GLT_TEST_GATE_AT ("module:function", default data_tools.shards:completion_record, which
the job calls once per shard completed) returns normally N-1 times (HYENA_GLT_TEST_GATE_AFTER,
default 3); after its N-th call the process writes DIR/paused-PID and waits until DIR/go
exists (at most 10 minutes). So a test knows the pack is in the middle of its work, holds
its locks and has completed some shards, and can start another pack, or kill this one, at
that very point, without any timing.
"""

import importlib.abc
import os
import sys
import time
from pathlib import Path

GATE = os.environ.get("HYENA_GLT_TEST_GATE")
MODULE, FN = (os.environ.get("HYENA_GLT_TEST_GATE_AT") or "data_tools.shards:completion_record").split(":")
AFTER = int(os.environ.get("HYENA_GLT_TEST_GATE_AFTER") or 3)


def _gated(fn):
    calls = 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        out = fn(*args, **kwargs)
        calls += 1
        if calls == AFTER:
            gate = Path(GATE)
            (gate / f"paused-{os.getpid()}").write_text("")
            deadline = time.monotonic() + 600
            while not (gate / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        return out

    return wrapper


class _Gate(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != MODULE:
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
        else:
            return None
        exec_module = spec.loader.exec_module

        def patched(module):
            exec_module(module)
            setattr(module, FN, _gated(getattr(module, FN)))

        spec.loader.exec_module = patched
        return spec


if GATE:
    sys.meta_path.insert(0, _Gate())
