"""Run the training scripts in new processes without paying for their imports each time: each process is forked
from a server that imported torch and the project's modules once (multiprocessing's forkserver), then runs the
script as `python SCRIPT ARGS` would, with its output in files. Several processes get the environment variables
torchrun gives the processes of one node (RANK, WORLD_SIZE, MASTER_PORT, ...); as torchrun does, the others are
stopped when one fails. A process costs its work, not the second of imports a fresh interpreter spends (the
distributed tests start about twenty)."""
import multiprocessing
import multiprocessing.connection
import os
import runpy
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what pretrain.py and finetune.py import: read once, by the server
PRELOAD = ["torch", "torch.distributed.checkpoint", "torch.distributed.fsdp", "numpy", "model", "data", "train",
           "infra.distributed", "infra.checkpoint", "infra.sharded_checkpoint", "sample"]
_server = None


def _context():
    global _server
    if _server is None:
        if str(ROOT) not in sys.path:  # the server finds the project's modules on the path it is given
            sys.path.insert(0, str(ROOT))
        _server = multiprocessing.get_context("forkserver")
        _server.set_forkserver_preload(PRELOAD)
    return _server


def _main(script, args, env, cwd, log):
    """In the new process: the environment, the folder and the output files it would have been started with, then
    the script as __main__ (an exception or sys.exit ends it as it would end `python SCRIPT`)."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, suffix in ((1, ".out"), (2, ".err")):
        file = os.open(log + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(file, fd)
        os.close(file)
    sys.stdout, sys.stderr = open(1, "w", buffering=1, closefd=False), open(2, "w", buffering=1, closefd=False)
    import torch
    if "OMP_NUM_THREADS" in env:  # read when torch was imported, by the server: set again
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = [str(script), *map(str, args)]
    sys.path[0] = str(Path(script).resolve().parent)
    runpy.run_path(str(script), run_name="__main__")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(script, args, processes=1, env=None, cwd=ROOT, timeout=600, stop_others=True):
    """`python SCRIPT ARGS`, or with processes=N `torchrun --standalone --nproc_per_node=N SCRIPT ARGS`, each
    process forked from the server. Returns a subprocess.CompletedProcess: the first failing process's exit code
    (negative: killed by that signal) or 0, and the processes' output, rank after rank; plus exitcodes and ended
    (seconds from the start), rank by rank. stop_others=False: a failure does not stop the others (no launcher
    watching, as when a process dies beyond torchrun's restarts)."""
    env = {**os.environ, **(env or {})}
    if processes > 1:
        port = free_port()
        ranks = [{**env, "RANK": str(r), "LOCAL_RANK": str(r), "GROUP_RANK": "0", "ROLE_RANK": str(r),
                  "WORLD_SIZE": str(processes), "LOCAL_WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1",
                  "MASTER_PORT": str(port)} for r in range(processes)]
    else:
        ranks = [env]
    with tempfile.TemporaryDirectory() as logs:
        started = []
        for r, rank_env in enumerate(ranks):
            p = _context().Process(target=_main, args=(str(script), list(args), rank_env, str(cwd),
                                                       f"{logs}/{r}"))
            p.start()
            started.append(p)
        waiting, code, start, ended = {p.sentinel: p for p in started}, 0, time.monotonic(), {}
        while waiting:
            ready = multiprocessing.connection.wait(list(waiting), timeout=timeout)
            if not ready:
                break
            for sentinel in ready:
                p = waiting.pop(sentinel)
                p.join()
                ended[p] = time.monotonic() - start
                if p.exitcode and not code:  # the first failure stops the others, as torchrun does
                    code = p.exitcode
                    for other in waiting.values() if stop_others else ():
                        other.kill()
        for p in waiting.values():  # past the timeout
            p.kill()
            p.join()
        if waiting:
            raise subprocess.TimeoutExpired([str(script), *args], timeout)
        read = lambda suffix: "".join(Path(f"{logs}/{r}{suffix}").read_text()
                                      for r in range(len(ranks)) if Path(f"{logs}/{r}{suffix}").exists())
        result = subprocess.CompletedProcess([str(script), *args], code, read(".out"), read(".err"))
        result.exitcodes, result.ended = [p.exitcode for p in started], [ended[p] for p in started]
        return result
