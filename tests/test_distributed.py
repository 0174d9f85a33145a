"""Several processes on CPU (gloo), as torchrun starts them on a GPU node (the DDP test by torchrun itself, the others
forked with torchrun's environment variables, processes.py): DDP and FSDP2 train exactly like one process with the
same global batch; FSDP2 writes sharded checkpoints, each process its part, that resume on 2 processes or on 1 (and a
1-process ckpt.pt resumes under FSDP2) like an unbroken run. Faults, made real in the process (tests/faulty.py): a
full disk (a file-size limit) or a kill while saving leaves the last checkpoint and every rank stops with one line;
a worker killed under torchrun --max-restarts is restarted and the run resumes by itself; a rank that dies stops the
others with one line; two torchrun nodes on one machine (slow). Plus the device tables."""
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
from processes import free_port, run as processes_run
from test_train import toy_images, write_tokens

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--size=tiny", "--stage=pretrain-toy", "--tokens_per_image=16", "--batch_size=8", "--micro_batch_size=4",
        "--max_steps=4", "--warmup_steps=2", "--log_interval=1", "--eval_interval=2", "--eval_iters=1",
        "--num_samples=0", "--export_hf=false", "--device=cpu"]


def run(out_dir, data, *extra, processes=1, script="pretrain.py", env=None, torchrun=False, launcher=(), **kw):
    """pretrain.py (or script) on CPU, as `python pretrain.py` or `torchrun --nproc_per_node=N pretrain.py`: by
    torchrun itself (with the launcher's extra arguments), or (quicker) in processes forked with its environment
    variables (processes.py, with its keywords kw)."""
    args = TINY + [f"--data={data}", f"--out_dir={out_dir}", *extra]
    env = {"OMP_NUM_THREADS": "1", **(env or {})}
    if not torchrun:
        return raise_unfinished(processes_run(ROOT / script, args, processes=processes, env=env, **kw))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                *launcher]
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


FAULTY = ROOT / "tests" / "faulty.py"  # pretrain.py with a real fault in its process: a file-size limit, a kill
KILL_AT_FSYNC = """\"\"\"pretrain.py killed by SIGKILL inside a checkpoint write, before its rename: at the os.fsync
every write calls.\"\"\"
import os, runpy, signal, sys
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
sys.path[0] = {root!r}
runpy.run_path({root!r} + "/pretrain.py", run_name="__main__")
"""
SHARD_LIMIT = 1 << 20  # bytes: the tiny model's shards (6 MB) and ckpt.pt (12 MB) are bigger, its logs smaller


@pytest.fixture
def killed_at_fsync(tmp_path):
    script = tmp_path / "killed_at_fsync.py"
    script.write_text(KILL_AT_FSYNC.format(root=str(ROOT)))
    return script


def one_line_each(result, processes):
    """Each process stopped by itself (exit code 1) with one line, no traceback: the lines."""
    assert result.exitcodes == [1] * processes and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == processes, result.stderr[-3000:]
    return errors


@pytest.mark.decoder
@pytest.mark.data
@pytest.mark.parametrize("kind", ["ckpt.pt", "sharded"])
def test_a_real_full_disk_stops_every_rank_with_one_line_and_keeps_the_last_checkpoint(
        tmp_path, data, one_process, fsdp_at_step_2, kind):
    # a file-size limit in one process (ulimit -f): its checkpoint write fails with EFBIG, as on a full disk.
    # ckpt.pt: DDP, the main process writes it; sharded: FSDP2, rank 1's shard fails
    if kind == "ckpt.pt":
        out, parallel, rank, good = tmp_path / "run", "--parallel=ddp", "0", "ckpt.pt"
        train(out, data, "--stop_at=2")
        before = (out / "ckpt.pt").read_bytes()
    else:
        out, parallel, rank, good = copy_run(fsdp_at_step_2, tmp_path), "--parallel=fsdp", "1", "ckpt-000002"
    failed = run(out, data, parallel, "--resume", processes=2, script=FAULTY, stop_others=False, timeout=120,
                 env={"FAULT_FSIZE": str(SHARD_LIMIT), "FAULT_RANK": rank})
    errors = one_line_each(failed, 2)
    for line in errors:
        assert re.fullmatch(r"error: could not save the checkpoint of step 4 in .*\(OSError: .*\); the last good "
                            rf"checkpoint .*{good} \(step 2\) is untouched. Free disk space .*then --resume", line)
    # ckpt.pt: errno 27 (EFBIG); sharded: DCP passes on the zip writer's error that followed it
    assert ("File too large" if kind == "ckpt.pt" else "process 1's write of its shards stopped short") in errors[0]
    assert max(failed.ended) - min(failed.ended) < 10  # they stop together: none waits for the one that failed
    if kind == "ckpt.pt":
        assert (out / "ckpt.pt").read_bytes() == before and not (out / "ckpt.pt.tmp").exists()
    else:
        assert (out / "latest").read_text() == "ckpt-000002" and not (out / "ckpt-000004").exists()
    resumed = train(out, data, parallel, "--resume", processes=2)
    assert resumed == pytest.approx(one_process, abs=1e-5)


@pytest.mark.decoder
@pytest.mark.data
def test_a_process_killed_while_saving_shards_leaves_the_last_checkpoint(tmp_path, data, one_process, fsdp_at_step_2,
                                                                        killed_at_fsync):
    out = copy_run(fsdp_at_step_2, tmp_path)
    killed = run(out, data, "--parallel=fsdp", "--resume", processes=2, script=killed_at_fsync)
    assert killed.returncode != 0
    # killed with the shards written but not their index: a folder `latest` does not name
    assert (out / "ckpt-000004").is_dir() and not (out / "ckpt-000004" / ".metadata").exists()
    assert (out / "latest").read_text() == "ckpt-000002"
    resumed = train(out, data, "--parallel=fsdp", "--resume", processes=2)
    assert resumed == pytest.approx(one_process, abs=1e-5)
    assert (out / "latest").read_text() == "ckpt-000004" and sorted(p.name for p in out.glob("ckpt-*")) == \
        ["ckpt-000004"]


@pytest.mark.decoder
@pytest.mark.data
def test_a_process_killed_while_saving_ckpt_pt_leaves_the_last_one(tmp_path, data, one_process, killed_at_fsync):
    train(tmp_path, data, "--stop_at=2")
    before = (tmp_path / "ckpt.pt").read_bytes()
    killed = run(tmp_path, data, "--resume", script=killed_at_fsync)
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "ckpt.pt").read_bytes() == before and (tmp_path / "ckpt.pt.tmp").exists()
    assert train(tmp_path, data, "--resume") == one_process  # one process, the same arithmetic: bitwise
    assert not (tmp_path / "ckpt.pt.tmp").exists()


@pytest.mark.decoder
@pytest.mark.data
def test_a_full_disk_at_the_hugging_face_export_says_one_line_and_resume_exports(tmp_path, data):
    train(tmp_path, data)  # to max_steps, no export
    failed = run(tmp_path, data, "--resume", "--export_hf=true", script=FAULTY, env={"FAULT_FSIZE": str(SHARD_LIMIT)})
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert re.fullmatch(r"error: could not write the Hugging Face export .*hf \(SafetensorError: .*File too large.*\); "
                        r"the final checkpoint .*ckpt.pt is complete. Free disk space, then --resume \(it only "
                        r"exports\)", failed.stderr.strip().splitlines()[-1])
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.tmp").exists()
    assert run(tmp_path, data, "--resume", "--export_hf=true").returncode == 0
    exported, model = load_model(tmp_path / "hf"), load_model(tmp_path)
    assert all(torch.equal(v, exported.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.decoder
@pytest.mark.data
def test_torchrun_restarts_a_killed_worker_and_the_run_resumes_by_itself(tmp_path, data, one_process):
    # FSDP2 on 2 processes; rank 1 dies (SIGKILL) just after the checkpoint of step 2, in the first attempt only;
    # torchrun restarts the group, which finds the checkpoint its run wrote: no --resume
    restarted = run(tmp_path, data, "--parallel=fsdp", processes=2, script=FAULTY, torchrun=True,
                    launcher=["--max-restarts=1"], env={"FAULT_KILL_AT": "2", "FAULT_RANK": "1"})
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert re.search(r"restart 1 of this torchrun run: resuming from .*ckpt-000002 \(step 2\)", restarted.stdout)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(one_process, abs=1e-5)  # steps 1-2 before the kill, 3-4 after the restart


@pytest.mark.decoder
@pytest.mark.data
def test_a_rank_that_dies_stops_the_others_with_one_line(tmp_path, data, one_process):
    # no launcher watching: rank 1 is killed (SIGKILL) after the checkpoint of step 2; rank 0 must not wait for it
    died = run(tmp_path, data, "--parallel=fsdp", processes=2, script=FAULTY, stop_others=False, timeout=120,
               env={"FAULT_KILL_AT": "2", "FAULT_RANK": "1"})
    assert died.exitcodes == [1, -signal.SIGKILL] and "Traceback" not in died.stderr, died.stderr[-3000:]
    line = died.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: process 0 lost contact with the other processes of this run \(.*\); another one "
                        r"died or stopped: .* run again with --resume .*", line), line
    assert died.ended[0] - died.ended[1] < 10  # measured: under a second
    resumed = train(tmp_path, data, "--parallel=fsdp", "--resume", processes=2)
    assert resumed == pytest.approx(one_process, abs=1e-5)


@pytest.mark.slow
@pytest.mark.decoder
@pytest.mark.data
def test_two_torchrun_nodes_on_one_machine_write_a_checkpoint_that_resumes_on_one_process(tmp_path, data,
                                                                                         one_process):
    # two agents, one process each, meeting by c10d rendezvous on localhost; the shared folder: tmp_path
    port = free_port()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=two-nodes-{port}"]
    args = TINY + [f"--data={data}", f"--out_dir={tmp_path}", "--parallel=fsdp", "--stop_at=2"]
    nodes = [subprocess.Popen(launcher + ["pretrain.py"] + args, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    folder = tmp_path / "ckpt-000002"
    assert (tmp_path / "latest").read_text() == folder.name
    assert sorted(f.name for f in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    resumed = train(tmp_path, data, "--resume")  # one node, one process
    assert resumed == pytest.approx(one_process, abs=1e-5)


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
