"""
Where training runs: one CPU or GPU, several GPUs under torchrun (DDP, or FSDP2 for models too big
to replicate), or a TPU pod through torch_xla SPMD. The training loop (train.py) calls these few
functions and otherwise never asks which of them it is on:

    env = setup_run(config)                # the device, the process group or XLA mesh, the dtype
    model = wrap_model(model, env)         # to the device; DDP / fully_shard / SPMD; compile
    step_fn = trace(step_fn, env)          # XLA: one whole optimizer step as a single graph
    x = to_device(micro_batches, env)      # numpy -> device tensors (XLA: sharded over the batch)
    model_state, optim_state = full_state(model, optimizer, env)  # whole tensors for a ckpt.pt
                                           # (FSDP2 and SPMD runs write shards instead)

Under SPMD one process drives all the devices of its host: the mesh has a 'data' and an 'fsdp' axis,
each parameter is split along the fsdp axis (FSDP style) and each batch along both axes, and XLA
inserts the collectives.
"""
import contextlib
import os
import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from infra.settings import TrainingError


@dataclass
class Env:
    device: torch.device
    device_type: str  # "cpu" | "cuda" | "xla"
    parallel: str = "none"  # "none" | "ddp" | "fsdp" (torchrun) | "spmd" (torch_xla)
    rank: int = 0  # this process among world_size processes
    world_size: int = 1
    local_devices: int = 1  # devices this process drives: 1, or every device of the host under SPMD
    mesh: object = None  # the XLA SPMD mesh, or the torch DeviceMesh of FSDP2
    dtype: str = "float32"  # the compute dtype: float32, or bfloat16 under autocast
    autocast: object = field(default_factory=contextlib.nullcontext)  # entered around each forward

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def num_devices(self):
        return self.world_size * self.local_devices


def repeatable_cpu_math():
    """Pin MKL's code path to this CPU's vector instructions. Left to choose (its default), MKL
    takes one of two paths for the same matrix product from one process to the next on some CPUs
    (measured: 1 run in 10 of a toy stage 2 differed in the last bits), so a resumed CPU run could
    drift from the unbroken one. A pinned path gives the same bits every run, at the same speed.
    Call it before the first matrix product (MKL reads the setting then); an MKL_CBWR already set
    wins."""
    branch = {"AVX512": "AVX512", "AVX2": "AVX2"}.get(torch.backends.cpu.get_cpu_capability())
    if branch:
        os.environ.setdefault("MKL_CBWR", branch)


def setup(device="auto", parallel="ddp", xla_fsdp=0):
    """Pick the device and join the others: torchrun's environment variables mean one process per
    device (DDP or FSDP2); --device=xla means one process per host driving all its devices through
    an SPMD mesh."""
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        # set on TPU VMs (PJRT_DEVICE=TPU) and by the CPU test of this path
        elif os.environ.get("PJRT_DEVICE"):
            device = "xla"
        else:
            device = "cpu"
    if device not in ("cpu", "cuda", "xla"):
        raise ValueError(f"--device={device}: use cpu, cuda, xla or auto")
    if parallel not in ("ddp", "fsdp"):
        raise ValueError(f"--parallel={parallel}: use ddp (replicated model) or fsdp "
                         "(sharded model)")
    if device == "xla":
        return _setup_xla(xla_fsdp)
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device=cuda but no GPU is visible: use --device=cpu, or check "
                           "CUDA_VISIBLE_DEVICES")
    if device == "cuda":
        # the float32 parts (norms, loss) on tensor cores
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device == "cpu":
        repeatable_cpu_math()
    if "RANK" not in os.environ:  # a plain `python pretrain.py`
        return Env(torch.device(device, 0) if device == "cuda" else torch.device("cpu"), device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
    dist.init_process_group("nccl" if device == "cuda" else "gloo", store=attempt_store(),
                            rank=rank, world_size=world_size,
                            device_id=dev if device == "cuda" else None)
    mesh = None
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(device, (world_size,))
    return Env(dev, device, parallel, rank, world_size, mesh=mesh)


def attempt_store():
    """The store the processes meet in, its keys apart for each attempt of a torchrun run; None
    outside torchrun (init_process_group then reads MASTER_ADDR/PORT itself). torchrun (2.13)
    keeps one store server for all attempts and its workers connect to it with no prefix, so a
    group it restarted after a worker died read the dead group's gloo addresses: measured, 4
    restarts in 9 failed (connection refused, torchrun exits 1) and 1 hung in gloo's connection
    inside init_process_group (until the 30-minute timeout). Each attempt's keys start fresh
    here (docs/faults.md)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                           int(os.environ["WORLD_SIZE"]), is_master=False)
    return dist.PrefixStore(f"lvm/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}",
                            client)


def lost_peer(e):
    """The line to stop with when e is a collective's failure because another process is gone (it
    died, or its host did): gloo's closed connection or a timeout; None for any other error."""
    text = (str(e).splitlines() or [""])[0]
    signs = ("Connection reset by peer", "Connection closed by peer", "Connection refused",
             "Timed out", "timed out", "Broken pipe")
    if not (dist.is_initialized() and dist.get_world_size() > 1 and any(s in text for s in signs)):
        return None
    reason = re.sub(r"\[[^\]]*\.(cc|cpp):\d+\] ", "", text).split(". ")[0]  # no source path
    return (f"process {dist.get_rank()} lost contact with the other processes of this run "
            f"({reason}); another one died or stopped: its own output says why. Training stopped "
            "at the last checkpoint: run again with --resume (under torchrun --max-restarts a "
            "restart resumes by itself)")


def setup_run(config):
    """setup() for a training run's --device, --parallel and --xla_fsdp, with its compute dtype:
    bfloat16 autocast on accelerators, float32 on a CPU, unless --dtype says."""
    try:
        env = setup(config.device, config.parallel, config.xla_fsdp)
        cpu = env.device_type == "cpu"
        env.dtype = config.dtype if config.dtype != "auto" else "float32" if cpu else "bfloat16"
        env.autocast = autocast(env, env.dtype)
    except (ValueError, RuntimeError, ImportError) as e:
        raise TrainingError(str(e)) from e
    return env


def _setup_xla(xla_fsdp):
    try:
        import torch_xla
    except ImportError:
        raise ImportError("--device=xla needs torch_xla: pip install -r requirements-tpu.txt "
                          "(its own environment)")
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr
    if not xr.is_spmd():
        xr.use_spmd()  # before any XLA tensor exists
    n = xr.global_runtime_device_count()
    fsdp = xla_fsdp or n
    if n % fsdp:
        raise ValueError(f"--xla_fsdp={fsdp} does not divide the {n} devices")
    mesh = xs.Mesh(np.arange(n), (n // fsdp, fsdp), ("data", "fsdp"))
    if xr.process_count() > 1 and not dist.is_initialized():
        # the hosts agree on sharded checkpoints (torch.distributed.checkpoint) over gloo
        import torch_xla.distributed.xla_backend  # noqa: F401 (registers the xla:// rendezvous)
        dist.init_process_group("gloo", init_method="xla://")
    return Env(torch_xla.device(), "xla", "spmd", xr.process_index(), xr.process_count(),
               local_devices=n // xr.process_count(), mesh=mesh)


def sharded(env):
    """Whether the weights are split over devices (FSDP2, XLA SPMD): checkpoints are then written
    in shards, each process its own (sharded_checkpoint.py), rather than gathered."""
    return env.parallel in ("fsdp", "spmd")


def fsdp_partition_spec(shape, fsdp_size):
    """Split a parameter along the mesh's fsdp axis on its largest dimension that divides evenly
    (replicate it when none does): each device then holds 1/fsdp_size of the weights and of their
    optimizer state."""
    spec = [None] * len(shape)
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec[dim] = "fsdp"
            break
    return tuple(spec)


def wrap_model(model, env, compile=False):
    """Move the model to its device and apply the parallelism: DDP replicas, FSDP2 shards
    (each transformer block, then the rest), or SPMD shardings on XLA. compile: torch.compile on
    GPU. Returns the module to call; `model` itself keeps the plain parameter names for
    checkpoints."""
    model.to(env.device)
    if env.device_type == "xla":
        import torch_xla.distributed.spmd as xs
        fsdp_size = env.mesh.mesh_shape[1]
        for p in model.parameters():
            xs.mark_sharding(p, env.mesh, fsdp_partition_spec(p.shape, fsdp_size))
        return model
    if env.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in model.layers:
            fully_shard(block, mesh=env.mesh)
        fully_shard(model, mesh=env.mesh)
    wrapped = torch.compile(model) if compile and env.device_type == "cuda" else model
    if env.parallel == "ddp" and env.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel
        wrapped = DistributedDataParallel(
            wrapped, device_ids=[env.device.index] if env.device_type == "cuda" else None)
    return wrapped


def set_gradient_sync(model, enabled):
    """Gradient accumulation: reduce gradients across processes only on the last micro-batch of a
    step."""
    if hasattr(model, "require_backward_grad_sync"):  # DDP
        model.require_backward_grad_sync = enabled
    inner = getattr(model, "_orig_mod", model)
    if hasattr(inner, "set_requires_gradient_sync"):  # FSDP2
        inner.set_requires_gradient_sync(enabled)


def autocast(env, dtype):
    """bfloat16 autocast (matmuls in bf16, weights and optimizer in float32), or nothing for
    float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    if dtype != "bfloat16":
        raise ValueError(f"--dtype={dtype}: use float32 or bfloat16")
    return torch.autocast(env.device_type, dtype=torch.bfloat16)


def trace(fn, env):
    """XLA: run fn lazily and compile everything it does (forward, backward and optimizer update of
    all the micro-batches) into one graph, executed at its end; the graph is reused while shapes
    stay the same."""
    if env.device_type != "xla":
        return fn
    import torch_xla
    return torch_xla.compile(fn, name=fn.__name__)


def to_device(arrays, env):
    """A list of int64 numpy arrays [micro_batch, T] -> device tensors. XLA: each is split along the
    batch over both mesh axes; with several hosts each holds its own rows of the global batch
    (minibatch=True)."""
    tensors = [torch.from_numpy(a) for a in arrays]
    if env.device_type == "xla":
        import torch_xla.core.xla_model as xm
        import torch_xla.distributed.spmd as xs
        spec = xs.ShardingSpec(env.mesh, (("data", "fsdp"), None), minibatch=env.world_size > 1)
        return xm.send_cpu_data_to_device(tensors, env.device, input_sharding=spec)
    if env.device_type == "cuda":
        return [t.pin_memory().to(env.device, non_blocking=True) for t in tensors]
    return tensors


def mean_over_ranks(value, env):
    """A device scalar -> Python float, averaged over processes. Waits for the device: call it at
    log time only."""
    if env.world_size > 1 and env.device_type != "xla":
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= env.world_size
    return float(value)


def _xla_to_host(t, env):
    """A whole XLA tensor on the host. With one host, sharded tensors are assembled from their
    device shards (t.cpu() would compile a gather graph for every tensor at every checkpoint); with
    several hosts, t.cpu() runs that gather on all of them."""
    import torch_xla
    import torch_xla.distributed.spmd as xs
    if env.world_size > 1 or torch_xla._XLAC._get_xla_sharding_type(t) is None:
        return t.cpu()
    whole = torch.empty(t.shape, dtype=t.dtype)
    for shard in xs.XLAShardedTensor(t).local_shards:
        if shard.indices is Ellipsis:  # a replica of the whole tensor
            whole.copy_(shard.data)
        else:  # a tile; the device copy may carry padding beyond the tensor's edge
            whole[tuple(shard.indices)] = shard.data[tuple(slice(0, s.stop - s.start)
                                                           for s in shard.indices)]
    return whole


def _to_host(t, env):
    """Whole tensor on the CPU (main process only): FSDP2 shards are gathered (all ranks take part),
    XLA tensors assembled, CPU tensors copied (the checkpoint must not change while training goes
    on)."""
    if not torch.is_tensor(t):
        return t
    if hasattr(t, "full_tensor"):  # a DTensor
        t = t.full_tensor()
    if t.device.type == "xla":
        t = _xla_to_host(t.detach(), env)
    return t.detach().to("cpu", copy=True) if env.is_main else None


def full_model_state(model, env):
    """The model's weights as whole CPU tensors, on the main process (every process must call
    it)."""
    return {k: _to_host(v, env) for k, v in model.state_dict().items()}


def full_state(model, optimizer, env):
    """The model's and optimizer's state as whole CPU tensors, identical whatever the device layout
    (so a run saved on a TPU pod resumes on one GPU). Every process must call it; only the main one
    gets the tensors."""
    model_state = full_model_state(model, env)
    optim = optimizer.state_dict()
    state = {i: {k: _to_host(v, env) for k, v in s.items()} for i, s in optim["state"].items()}
    return model_state, {"state": state, "param_groups": optim["param_groups"]}


def load_optimizer_state(optimizer, state, env):
    """Load full_state()'s optimizer part, re-split like the parameters (FSDP2 shards, XLA
    shardings)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if env.parallel == "fsdp":
        from torch.distributed.tensor import distribute_tensor
        state = {"param_groups": state["param_groups"], "state": {
            i: {k: v if k == "step" else distribute_tensor(v.to(env.device), params[i].device_mesh,
                                                           params[i].placements)
                for k, v in s.items()} for i, s in state["state"].items()}}
    optimizer.load_state_dict(state)
    if env.device_type == "xla":
        import torch_xla.distributed.spmd as xs
        for p in params:
            for k, v in optimizer.state[p].items():
                if k != "step":
                    xs.mark_sharding(v, env.mesh,
                                     fsdp_partition_spec(v.shape, env.mesh.mesh_shape[1]))


def rng_states(env):
    """Every rank's RNG state, in rank order (every process must call it)."""
    state = {"cpu": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state(env.device) if env.device_type == "cuda" else None}
    if env.world_size == 1 or not dist.is_initialized():
        return [state]
    states = [None] * env.world_size
    dist.all_gather_object(states, state)
    return states


def set_rng_state(states, env):
    """This rank's state from rng_states(). A rank the saving run did not have takes rank 0's (all
    ranks start from the same seed); checkpoints before per-rank states hold one dict."""
    if isinstance(states, dict):
        states = [states]
    state = states[env.rank] if env.rank < len(states) else states[0]
    torch.set_rng_state(state["cpu"])
    if env.device_type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], env.device)


def barrier(env):
    if env.world_size > 1 and dist.is_initialized():
        dist.barrier()


def all_ok(ok, env):
    """Whether every process says ok: each learns whether any failed (e.g. its write), so all stop
    together instead of the others waiting for it at their next collective."""
    if env.world_size == 1 or not dist.is_initialized():
        return ok
    flag = torch.tensor([int(ok)], device=env.device if env.device_type == "cuda" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def cleanup():
    if dist.is_initialized():
        # A gloo worker thread frees its last collective's tensors just after the collective
        # returns, and that needs the GIL. Give it the GIL first: the group's destructor (run
        # later, when DDP is freed, with the GIL held) joins that thread and would otherwise wait
        # for it forever (seen as a rare hang at exit after a failed checkpoint write).
        time.sleep(0.1)
        dist.destroy_process_group()


# Peak dense bfloat16 FLOP/s per device, for MFU (vendors' data sheets). Matched in order against
# the device name, so the more specific names come first. TPU v2/v3 chips show up as two devices
# (one per core).
PEAK_FLOPS = [
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("B200", 2250e12),
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("A10G", 70e12), ("A10", 125e12), ("RTX 4090", 165e12), ("RTX A6000", 155e12),
    ("RTX 3090", 71e12), ("V100", 125e12), ("TPU v2", 22.5e12), ("TPU v3", 61.5e12),
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12),
    ("TPU v5", 459e12), ("TPU v6 lite", 918e12), ("TPU v6e", 918e12),
]


def device_name(env):
    if env.device_type == "cuda":
        return torch.cuda.get_device_name(env.device)
    if env.device_type == "xla":
        import torch_xla.runtime as xr
        try:
            import torch_xla.core.xla_model as xm
            kind = xm.xla_device_kind(env.device)  # e.g. "TPU v4"
        except Exception:
            kind = xr.device_type()
        return str(kind)
    return "cpu"


def peak_flops(name):
    """Peak bf16 FLOP/s of one device called `name`, or None when unknown (then MFU is not
    printed)."""
    for key, flops in PEAK_FLOPS:
        if key.lower() in name.lower():
            return flops
    return None
