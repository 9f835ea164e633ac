"""Run code in fresh interpreters cheaply: one child process imports the heavy third-party
libraries once, then forks a grandchild per snippet, so each snippet starts with no alignkd
module loaded but does not pay torch's and transformers' import again (3 s each here).

    outputs = run_fresh(["import alignkd.data.shards; print(1)", ...])   # one stdout per snippet

What a test may conclude from a snippet's output is what it could from `python -c snippet`
for anything about alignkd's own modules: the forked interpreter has imported only `PRELOAD`.
"""

from __future__ import annotations

import json
import subprocess
import sys

__all__ = ["run_fresh"]

PRELOAD = ("numpy", "PIL.Image", "torch", "transformers", "safetensors.torch")

_DRIVER = r"""
import importlib, io, json, os, sys, traceback
for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
assert not [m for m in sys.modules if m == "alignkd" or m.startswith("alignkd.")]
results = []
for code in json.loads(sys.stdin.read()):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the fresh interpreter
        os.close(read)
        out, status = io.StringIO(), 0
        sys.stdout = out
        try:
            exec(compile(code, "<snippet>", "exec"), {"__name__": "__main__"})
        except BaseException:
            out.write(traceback.format_exc())
            status = 1
        with os.fdopen(write, "w") as pipe:
            pipe.write(out.getvalue())
        os._exit(status)
    os.close(write)
    with os.fdopen(read) as pipe:
        text = pipe.read()
    _, status = os.waitpid(pid, 0)
    results.append({"stdout": text, "ok": os.waitstatus_to_exitcode(status) == 0})
sys.__stdout__.write(json.dumps(results))
"""


def run_fresh(snippets: list[str], timeout: float = 300) -> list[str]:
    """Each snippet's stdout; an AssertionError carrying its traceback if one fails."""
    done = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(PRELOAD)], input=json.dumps(snippets),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    for code, result in zip(snippets, results):
        assert result["ok"], f"{code!r} failed:\n{result['stdout']}"
    return [result["stdout"] for result in results]
