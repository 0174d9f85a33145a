"""Several processes on CPU (gloo), as torchrun starts them on a GPU node (the DDP test by torchrun itself, the others
forked with torchrun's environment variables, processes.py): DDP and FSDP2 train exactly like one process with the
same global batch; FSDP2 writes sharded checkpoints, each process its part, that resume on 2 processes or on 1 (and a
1-process ckpt.pt resumes under FSDP2) like an unbroken run; a save cut short by a full disk or a kill leaves the
last checkpoint; plus the device tables."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from infra import distributed
from infra.checkpoint import load_model
from conftest import raise_unfinished
from processes import run as processes_run
from test_train import toy_images, write_tokens

ROOT = Path(__file__).resolve().parents[1]


def run(out_dir, data, *extra, processes=1, script="pretrain.py", env=None, torchrun=False):
    """pretrain.py (or script) on CPU, as `python pretrain.py` or `torchrun --nproc_per_node=N pretrain.py`: by
    torchrun itself, or (quicker) in processes forked with its environment variables (processes.py)."""
    args = ["--size=tiny", "--stage=pretrain-toy", "--tokens_per_image=16", "--batch_size=8",
            "--micro_batch_size=4", "--max_steps=4", "--warmup_steps=2", "--log_interval=1", "--eval_interval=2",
            "--eval_iters=1", "--num_samples=0", "--export_hf=false", "--device=cpu", f"--data={data}",
            f"--out_dir={out_dir}", *extra]
    env = {"OMP_NUM_THREADS": "1", **(env or {})}
    if not torchrun:
        return raise_unfinished(processes_run(ROOT / script, args, processes=processes, env=env))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return raise_unfinished(subprocess.run(launcher + [str(script)] + args, cwd=ROOT, env={**os.environ, **env},
                                           capture_output=True, text=True, timeout=600))


def train(out_dir, data, *extra, processes=1, torchrun=False):
    """Run pretrain.py; the losses in metrics.jsonl (a resumed run keeps the lines up to its checkpoint)."""
    result = run(out_dir, data, *extra, processes=processes, torchrun=torchrun)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tokens(tmp_path_factory.mktemp("tokens") / "images", toy_images(64))


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    """The reference: one process, 8 sequences per step as 2 accumulated micro-batches of 4, 4 steps unbroken."""
    return train(tmp_path_factory.mktemp("single"), data)


@pytest.fixture(scope="module")
def fsdp_at_step_2(data, one_process, tmp_path_factory):
    """An FSDP2 run on 2 processes stopped after step 2: its out_dir, with a sharded checkpoint (tests copy it)."""
    out_dir = tmp_path_factory.mktemp("fsdp") / "run"
    first_half = train(out_dir, data, "--parallel=fsdp", "--stop_at=2", processes=2)
    assert first_half == pytest.approx(one_process[:2], abs=1e-5)
    return out_dir


def copy_run(out_dir, tmp_path):
    return Path(shutil.copytree(out_dir, tmp_path / "run"))


@pytest.mark.decoder
@pytest.mark.data
def test_ddp_on_two_processes_matches_one_process(tmp_path, data, one_process):
    # started by torchrun itself, as on a GPU node; each rank: one micro-batch of 4
    ddp = train(tmp_path, data, "--parallel=ddp", processes=2, torchrun=True)
    assert len(ddp) == len(one_process) == 4
    assert ddp == pytest.approx(one_process, abs=1e-5)


@pytest.mark.decoder
@pytest.mark.data
def test_fsdp2_writes_shards_and_resumes_like_an_unbroken_run(tmp_path, data, one_process, fsdp_at_step_2):
    out = copy_run(fsdp_at_step_2, tmp_path)
    assert (out / "latest").read_text() == "ckpt-000002" and not (out / "ckpt.pt").exists()
    folder = out / "ckpt-000002"
    assert sorted(f.name for f in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    meta = torch.load(folder / "meta.pt", weights_only=True)
    assert (meta["step"], meta["data_position"], len(meta["rng"])) == (2, 16, 2)
    # each process wrote the half it holds: the model and AdamW's two moments, 3 x 4 bytes per parameter
    shards = [(folder / f"__{rank}_0.distcp").stat().st_size for rank in (0, 1)]
    whole = 12 * load_model(folder).num_params()
    assert all(0.4 * whole < size < 0.6 * whole for size in shards), (shards, whole)

    resumed = train(out, data, "--parallel=fsdp", "--resume", "--export_hf=true", processes=2)
    assert len(resumed) == 4  # steps 1-2 logged before the checkpoint, 3-4 by the resumed run
    assert resumed == pytest.approx(one_process, abs=1e-5)
    assert (out / "latest").read_text() == "ckpt-000004" and not (out / "ckpt-000002").exists()
    model = load_model(out)  # the whole model from the shards, on one process (sample.py, evaluate.py)
    exported = load_model(out / "hf")
    assert all(torch.equal(v, exported.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.decoder
@pytest.mark.data
def test_fsdp2_checkpoint_resumes_on_one_process(tmp_path, data, one_process, fsdp_at_step_2):
    out = copy_run(fsdp_at_step_2, tmp_path)
    resumed = train(out, data, "--resume")  # no process group: every tensor read whole from the shards
    assert resumed == pytest.approx(one_process, abs=1e-5)
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 4
    assert not (out / "latest").exists() and not list(out.glob("ckpt-*"))  # one checkpoint per out_dir


@pytest.mark.decoder
@pytest.mark.data
def test_one_process_checkpoint_resumes_under_fsdp2(tmp_path, data, one_process):
    train(tmp_path, data, "--stop_at=2")
    resumed = train(tmp_path, data, "--parallel=fsdp", "--resume", processes=2)  # ckpt.pt read whole, then split
    assert resumed == pytest.approx(one_process, abs=1e-5)
    assert (tmp_path / "latest").read_text() == "ckpt-000004" and not (tmp_path / "ckpt.pt").exists()


FAULTY_PRETRAIN = """\"\"\"pretrain.py whose checkpoint writes fail before they are complete: os.fsync, which
every write calls before its rename, raises a full disk's OSError (FAULT=full) or kills the process (FAULT=kill).\"\"\"
import errno, os, runpy, signal, sys


def fail(fd):
    if os.environ["FAULT"] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


os.fsync = fail
sys.path[0] = {root!r}
runpy.run_path({root!r} + "/pretrain.py", run_name="__main__")
"""


@pytest.fixture
def faulty_pretrain(tmp_path):
    script = tmp_path / "faulty_pretrain.py"
    script.write_text(FAULTY_PRETRAIN.format(root=str(ROOT)))
    return script


@pytest.mark.decoder
@pytest.mark.data
@pytest.mark.parametrize("fault", ["full", "kill"])
def test_a_failed_sharded_save_leaves_the_last_checkpoint(tmp_path, data, one_process, fsdp_at_step_2,
                                                           faulty_pretrain, fault):
    out = copy_run(fsdp_at_step_2, tmp_path)
    failed = run(out, data, "--parallel=fsdp", "--resume", processes=2, script=faulty_pretrain,
                 env={"FAULT": fault})
    assert failed.returncode != 0
    if fault == "full":  # one line on each rank, saying what is left and what to do
        errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 2 and re.fullmatch(
            r"error: could not save the checkpoint of step 4 in .*No space left on device.*the last good "
            r"checkpoint .*ckpt-000002 \(step 2\) is untouched. Free disk space .*then --resume", errors[0])
        assert not (out / "ckpt-000004").exists()  # the partial shards are removed
    else:  # killed with the shards written but not their index: a folder `latest` does not name
        assert (out / "ckpt-000004").is_dir() and not (out / "ckpt-000004" / ".metadata").exists()
    assert (out / "latest").read_text() == "ckpt-000002"
    resumed = train(out, data, "--parallel=fsdp", "--resume", processes=2)
    assert resumed == pytest.approx(one_process, abs=1e-5)
    assert (out / "latest").read_text() == "ckpt-000004" and sorted(p.name for p in out.glob("ckpt-*")) == \
        ["ckpt-000004"]


@pytest.mark.decoder
@pytest.mark.data
def test_a_process_killed_while_saving_ckpt_pt_leaves_the_last_one(tmp_path, data, one_process, faulty_pretrain):
    train(tmp_path, data, "--stop_at=2")
    before = (tmp_path / "ckpt.pt").read_bytes()
    killed = run(tmp_path, data, "--resume", script=faulty_pretrain, env={"FAULT": "kill"})
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "ckpt.pt").read_bytes() == before and (tmp_path / "ckpt.pt.tmp").exists()
    assert train(tmp_path, data, "--resume") == one_process  # one process, the same arithmetic: bitwise
    assert not (tmp_path / "ckpt.pt.tmp").exists()


def test_peak_flops_are_looked_up_by_device_name():
    assert distributed.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert distributed.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert distributed.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert distributed.peak_flops("TPU v4") == 275e12
    assert distributed.peak_flops("cpu") is None  # MFU is then printed as n/a


def test_spmd_shards_each_parameter_on_its_largest_even_dimension():
    assert distributed.fsdp_partition_spec((8192, 1024), 4) == ("fsdp", None)
    assert distributed.fsdp_partition_spec((1024, 2688), 4) == (None, "fsdp")
    assert distributed.fsdp_partition_spec((8292, 4096), 8) == (None, "fsdp")  # LVM-7B's vocabulary
    assert distributed.fsdp_partition_spec((6,), 4) == (None,)  # replicated when nothing divides
