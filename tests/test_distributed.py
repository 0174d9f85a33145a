"""Several processes on CPU (gloo), started by torchrun as on a GPU node: DDP and FSDP2 train exactly like one
process with the same global batch, FSDP2 checkpoints hold whole tensors and resume; plus the device tables."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distributed
from conftest import raise_unfinished
from test_train import toy_images, write_tokens

ROOT = Path(__file__).resolve().parents[1]


def train(out_dir, data, *extra, processes=1):
    """pretrain.py on CPU, as `python pretrain.py` or `torchrun --nproc_per_node=N pretrain.py`."""
    launcher = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    args = ["pretrain.py", "--size=tiny", "--stage=pretrain-toy", "--tokens_per_image=16", "--batch_size=8",
            "--micro_batch_size=4", "--max_steps=4", "--warmup_steps=2", "--log_interval=1", "--eval_interval=2",
            "--eval_iters=1", "--num_samples=0", "--export_hf=false", "--device=cpu", f"--data={data}",
            f"--out_dir={out_dir}", *extra]
    result = subprocess.run(launcher + args, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=600)
    raise_unfinished(result)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tokens(tmp_path_factory.mktemp("tokens") / "images", toy_images(64))


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    """The reference: one process, 8 sequences per step as 2 accumulated micro-batches of 4."""
    return train(tmp_path_factory.mktemp("single"), data)


@pytest.mark.decoder
@pytest.mark.data
def test_ddp_on_two_processes_matches_one_process(tmp_path, data, one_process):
    ddp = train(tmp_path, data, "--parallel=ddp", processes=2)  # each rank: one micro-batch of 4
    assert len(ddp) == len(one_process) == 4
    assert ddp == pytest.approx(one_process, abs=1e-5)


@pytest.mark.decoder
@pytest.mark.data
def test_fsdp2_on_two_processes_matches_one_process_and_resumes(tmp_path, data, one_process):
    first = train(tmp_path, data, "--parallel=fsdp", "--stop_at=2", processes=2)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["model"]["layers.0.attention.wq.weight"].shape == (128, 128)  # whole tensors, not shards
    assert ckpt["optimizer"]["state"][0]["exp_avg"].shape == (512, 128)
    resumed = train(tmp_path, data, "--parallel=fsdp", "--resume", processes=2)
    assert first == resumed[:2]
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
