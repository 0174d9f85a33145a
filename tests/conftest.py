"""Fixtures shared by the test files."""
import re
import subprocess

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """The tiny test models' operations are too small to share among threads: token-by-token decoding and tiny
    training steps are latency-bound, a second intra-op thread only adds synchronisation (on a busy shared CPU it
    made some files ~10x slower). One thread for the module that asks for it, restored after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def raise_unfinished(result):
    """If a script run by a test died of NotImplementedError (an unfinished function of a course assignment,
    course/course.py), raise that error here, so the test fails naming the function rather than with an exit code."""
    found = re.findall(r"^NotImplementedError: (.*)$", (result.stderr or "") + (result.stdout or ""), re.M)
    if result.returncode != 0 and found:
        raise NotImplementedError(found[-1])
    return result


@pytest.fixture
def run_script():
    """run_script(args, **subprocess.run keywords): run a command with its output captured, as text; a failure
    raises (with the unfinished function's NotImplementedError when that is what stopped it)."""
    def run(args, check=True, **kwargs):
        result = raise_unfinished(subprocess.run(args, capture_output=True, text=True, **kwargs))
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, args))} exited with {result.returncode}:\n{result.stderr[-3000:]}")
        return result
    return run
