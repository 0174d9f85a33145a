"""Fixtures shared by the test files."""
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
