"""An interrupt (how Ray cancels a running task) cannot leave half-imported libraries behind."""

import subprocess
import sys

import pytest

# Run in a fresh interpreter: the libraries must not be imported yet. The interrupt is raised in the
# main thread 0.3 s in, the way Ray's `ray.cancel` does (`_thread.interrupt_main`), while the imports
# (seconds of work) are still running.
SCRIPT = r"""
import _thread, importlib, threading
from llava.ray_runtime import uninterruptible

finished = []

def load():
    importlib.import_module("transformers.models.auto.tokenization_auto")
    importlib.import_module("transformers.activations")
    finished.append("load")

threading.Timer(0.3, _thread.interrupt_main).start()
try:
    uninterruptible(load)
    print("finished-before-the-interrupt")
except KeyboardInterrupt:
    print("interrupted", "finished" if finished else "still-running")
print(*uninterruptible(list, finished))  # the next call waits for the first: it ran to its end, once
import sympy, torch.distributed.tensor
from transformers.models.auto.tokenization_auto import AutoTokenizer
assert hasattr(sympy, "printing") and callable(AutoTokenizer.from_pretrained)
print("whole")
"""


def test_an_interrupted_caller_leaves_the_imports_whole_for_the_next_call():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    said = result.stdout.split()
    assert said[0] == "interrupted"  # the interrupt came (at the earliest when the work was done) ...
    assert said[2:] == ["load", "whole"]  # ... and the work ran to its end, once (in the caller's thread: [])


def test_errors_and_results_come_back_to_the_caller():
    from llava.ray_runtime import uninterruptible

    assert uninterruptible(sorted, [3, 1, 2], reverse=True) == [3, 2, 1]
    with pytest.raises(ValueError, match="not a number"):
        uninterruptible(int, "not a number")
