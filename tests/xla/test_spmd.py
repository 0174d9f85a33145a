"""The TPU path on 4 virtual CPU devices (torch_xla SPMD), in its own environment (torch_xla 2.9 needs torch 2.9):

    PJRT_DEVICE=CPU CPU_NUM_DEVICES=4 .venv-xla/bin/python -m pytest -q tests/xla -o addopts=""

On a 2x2 (data, fsdp) mesh, train.train must give the losses of plain PyTorch on the CPU, with each parameter
split over the fsdp axis, one compiled step reused every step, and sharded checkpoints (each device's shard,
through torch_xla's planners) that resume on XLA, on 2 devices instead of 4, or on the CPU."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_xla
import torch_xla.debug.metrics as met
import torch_xla.distributed.spmd as xs

import data
import train
from configs import MODEL_SIZES
from infra import distributed
from infra.checkpoint import load_model
from infra.settings import parse_config
from model import ModelArgs, Transformer
from train import configure_optimizer

S = 16
# The XLA runtime starts (in SPMD mode) before any CPU backward pass: PyTorch's autograd engine sizes its device
# queues on first use and would not know the XLA devices otherwise.
distributed.setup("xla")
torch.set_num_threads(1)  # the plain-CPU reference: the tiny model's operations are too small to share


def settings(out_dir, *extra):
    """tiny, 6 steps of 16 sequences = 2 accumulated micro-batches of 8 (XLA: 2 per device x 4 devices)."""
    return parse_config(["--size=tiny", "--stage=pretrain-toy", f"--tokens_per_image={S}",
                                  "--batch_size=16", "--micro_batch_size=2", "--max_steps=6", "--warmup_steps=2",
                                  "--log_interval=1", "--eval_interval=3", "--eval_iters=1", "--num_samples=0",
                                  "--export_hf=false", "--dtype=float32", "--device=xla", "--xla_fsdp=2",
                                  f"--out_dir={out_dir}", *extra], train.SETTINGS)


ON_CPU = ("--device=cpu", "--micro_batch_size=8")


def batches(seed, log=None):
    """Learnable toy images held in memory (the loop only needs get(first, count)); log records, at each call,
    how many XLA graphs have been compiled so far."""
    base = np.random.default_rng(seed).integers(0, 500, size=(256, 1))
    images = data.TokenData((base + np.arange(S)[None] // 4).astype(np.uint16), {"groups": []})
    get = data.image_stream([images], 1, seed)

    def logged(first, count):
        if log is not None:
            log.append((met.metric_data("CompileTime") or (0,))[0])
        return get(first, count)

    return logged


def run(c, log=None):
    return train.train(c, batches(0, log), batches(1))


@pytest.fixture(scope="module")
def cpu(tmp_path_factory):
    return run(settings(tmp_path_factory.mktemp("cpu"), *ON_CPU))


@pytest.fixture(scope="module")
def compiles():
    return []


@pytest.fixture(scope="module")
def xla(tmp_path_factory, compiles):
    return run(settings(tmp_path_factory.mktemp("xla")), compiles)


def losses(metrics, key="loss"):
    return [m[key] for m in metrics if key in m]


def test_spmd_on_a_2x2_mesh_trains_like_plain_cpu(cpu, xla):
    assert len(losses(xla)) == len(losses(cpu)) == 6
    assert losses(xla) == pytest.approx(losses(cpu), abs=1e-5)
    assert losses(xla, "val_loss") == pytest.approx(losses(cpu, "val_loss"), abs=1e-5)
    assert losses(cpu)[-1] < losses(cpu)[0]


def test_one_compiled_step_serves_every_step(xla, compiles):
    # step 1 compiles the step (whose optimizer state starts empty) and the logging; step 2 the steady-state step;
    # the evaluation after step 3 its forward pass; checkpoints compile nothing; then nothing new
    assert len(compiles) == 6 and compiles[2] > 0
    assert compiles[3] <= compiles[2] + 2
    assert compiles[3:] == [compiles[3]] * 3


def test_parameters_optimizer_state_and_batches_are_sharded():
    env = distributed.setup("xla", xla_fsdp=2)
    assert env.mesh.mesh_shape == (2, 2) and env.mesh.axis_names == ("data", "fsdp")
    cpu_model = Transformer(ModelArgs(**MODEL_SIZES["tiny"]))
    cpu_opt = configure_optimizer(cpu_model, 1e-3)
    cpu_model(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long))[1].backward()
    cpu_opt.step()
    model = distributed.wrap_model(Transformer(ModelArgs(**MODEL_SIZES["tiny"])), env)
    optimizer = configure_optimizer(model, 1e-3, device_type="xla")
    distributed.load_optimizer_state(optimizer, cpu_opt.state_dict(), env)
    # wq [128, 128]: rows split in 2 along the fsdp axis, the halves replicated along the data axis
    halves = "{devices=[2,1,2]0,2,1,3 last_tile_dim_replicate}"
    wq = model.layers[0].attention.wq.weight
    assert torch_xla._XLAC._get_xla_sharding_spec(wq) == halves
    assert {tuple(s.data.shape) for s in xs.XLAShardedTensor(wq).local_shards} == {(64, 128)}
    assert torch_xla._XLAC._get_xla_sharding_spec(optimizer.state[wq]["exp_avg"]) == halves
    assert torch_xla._XLAC._get_xla_sharding_spec(model.output.weight) == halves  # [512, 128]
    tokens = distributed.to_device([np.zeros((8, S), dtype=np.int64)], env)[0]
    assert torch_xla._XLAC._get_xla_sharding_spec(tokens) == "{devices=[4,1]0,1,2,3}"  # 2 rows per device


@pytest.fixture(scope="module")
def xla_at_step_3(tmp_path_factory):
    """A run on the 4 devices stopped after step 3: its losses and its out_dir (tests copy it)."""
    out = tmp_path_factory.mktemp("xla3") / "run"
    return run(settings(out, "--stop_at=3")), out


def test_checkpoint_saved_under_spmd_is_sharded_and_resumes_on_xla_and_on_cpu(tmp_path, cpu, xla, xla_at_step_3):
    first, saved = xla_at_step_3
    shutil.copytree(saved, tmp_path / "xla")
    folder = tmp_path / "xla" / "ckpt-000003"  # torch_xla's planners: each device's shard, nothing gathered
    assert (tmp_path / "xla" / "latest").read_text() == "ckpt-000003"
    assert not (tmp_path / "xla" / "ckpt.pt").exists()
    assert torch.load(folder / "meta.pt", weights_only=True)["step"] == 3
    assert load_model(folder).layers[0].attention.wq.weight.shape == (128, 128)  # read whole on the host
    shutil.copytree(tmp_path / "xla", tmp_path / "cpu")
    resumed = run(settings(tmp_path / "xla", "--resume"))
    assert losses(first + resumed) == pytest.approx(losses(xla), abs=1e-6)
    resumed_cpu = run(settings(tmp_path / "cpu", *ON_CPU, "--resume"))  # the same checkpoint, on the CPU
    assert losses(first + resumed_cpu) == pytest.approx(losses(cpu), abs=1e-5)


# a process whose XLA runtime has 2 CPU devices (the count is fixed when the runtime starts): it resumes the run
RESUME_ON_2_DEVICES = """import json, sys
sys.path[:0] = [{here!r}, {root!r}]
import test_spmd as t
print(json.dumps(t.losses(t.run(t.settings(sys.argv[1], "--resume")))))
"""


def test_checkpoint_saved_on_4_devices_resumes_on_2(tmp_path, xla, xla_at_step_3):
    first, saved = xla_at_step_3
    out = shutil.copytree(saved, tmp_path / "run")
    here = Path(__file__).resolve().parent
    script = RESUME_ON_2_DEVICES.format(here=str(here), root=str(here.parents[1]))
    child = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=600,
                           env={**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "2"})
    assert child.returncode == 0, child.stderr[-3000:]
    assert "device: 2 x" in child.stdout  # a (1, 2) mesh: each parameter in halves, as on 4 devices' fsdp axis
    resumed = json.loads(child.stdout.strip().splitlines()[-1])  # 4 accumulated micro-batches instead of 2
    assert losses(first) + resumed == pytest.approx(losses(xla), abs=1e-5)
