"""A training script (pretrain.py, or FAULT_SCRIPT) run with a real fault in its process, as a test starts it:
FAULT_FSIZE=N: a file-size limit of N bytes (RLIMIT_FSIZE, as `ulimit -f`), so a write past it fails with EFBIG as on
a full disk; FAULT_KILL_AT=STEP: the process kills itself (SIGKILL) just after saving that step's checkpoint, in the
first attempt of a torchrun run only (TORCHELASTIC_RESTART_COUNT unset or 0). FAULT_RANK: the one rank hit (default:
every rank)."""
import os
import resource
import runpy
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def hit():
    return os.environ.get("FAULT_RANK", os.environ.get("RANK", "0")) == os.environ.get("RANK", "0")


def kill_after_save(step):
    from infra import checkpoint
    save = checkpoint.save

    def save_then_die(*args, **kwargs):
        saved = save(*args, **kwargs)
        if saved == step and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            os.kill(os.getpid(), signal.SIGKILL)
        return saved

    checkpoint.save = save_then_die


if hit() and os.environ.get("FAULT_FSIZE"):
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
    limit = int(os.environ["FAULT_FSIZE"])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
if hit() and os.environ.get("FAULT_KILL_AT"):
    sys.path.insert(0, str(ROOT))
    kill_after_save(int(os.environ["FAULT_KILL_AT"]))
script = ROOT / os.environ.get("FAULT_SCRIPT", "pretrain.py")
sys.path[0] = str(script.parent)
sys.argv[0] = str(script)
runpy.run_path(str(script), run_name="__main__")
