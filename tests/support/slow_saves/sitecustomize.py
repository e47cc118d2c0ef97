"""Slow checkpoint saves, injected into a child process by the tests (never by the product).

A test that must kill or preempt a run in the middle of a save puts this folder first on the
child's PYTHONPATH with HYENA_GLT_TEST_SAVE_DELAY=SECONDS (tests/support/__init__.py:
`slow_saves_env`). Python imports `sitecustomize` at start-up; this one waits for
launch.checkpoint.writer to be imported and wraps the two functions every file of a save goes
through (`write_tensors`: model, optimizer, RNG and state files; `write_meta`), so each
written file is followed by a sleep.

HYENA_GLT_TEST_SAVE_DELAY_AT=module:function,module:function,... wraps those functions instead
(`slow_saves_env(delay, at=...)`): e.g. the file writes of a saved model directory
(hyena_glt.checksums) and each rename of an output being published (launch.checkpoint.publish),
so a test can kill `convert` or `export-vortex` at chosen moments.
"""

import importlib.abc
import os
import sys
import time

DELAY = float(os.environ.get("HYENA_GLT_TEST_SAVE_DELAY") or 0)
_AT = os.environ.get("HYENA_GLT_TEST_SAVE_DELAY_AT") or "launch.checkpoint.writer:write_tensors,launch.checkpoint.writer:write_meta"
WRAP: dict[str, list[str]] = {}
for _item in _AT.split(","):
    _module, _fn = _item.strip().split(":")
    WRAP.setdefault(_module, []).append(_fn)


def _then_sleep(fn):
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        time.sleep(DELAY)
        return out

    return wrapper


class _SlowSaves(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in WRAP:
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
            for fn in WRAP[name]:
                setattr(module, fn, _then_sleep(getattr(module, fn)))

        spec.loader.exec_module = patched
        return spec


if DELAY > 0:
    sys.meta_path.insert(0, _SlowSaves())
