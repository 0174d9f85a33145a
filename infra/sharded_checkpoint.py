"""
Sharded checkpoints, for models whose weights are split over devices (FSDP2, XLA SPMD): each process
writes the part of the model and optimizer state it holds, through torch.distributed.checkpoint
(DCP), and reads back the part its own layout needs, so nothing is gathered on one process and a
run saved by 8 processes resumes on 2, or on 1. In a run's out_dir:

    latest                 one line naming the newest complete checkpoint, e.g. ckpt-000004
    ckpt-000004/           .metadata (DCP's index) and __R_0.distcp (process R's shards): the model
                           and optimizer state; meta.pt: step, data_position, model_args, config,
                           and every rank's RNG state

A save writes a new folder; only when every process has finished does the main process point
`latest` at it (os.replace, atomic) and remove the older one. A crash or a full disk mid-save
leaves `latest` naming the last good checkpoint; a full disk on any process is told to all (each
stops with the error, none waits at a barrier).

    save(out_dir, model, optimizer, meta, env)   # every process calls it
    meta = read_meta(folder)                     # the small values; meta["shards"] is the folder
    load(folder, model, optimizer, env)          # every process: its part, into the model in place
    state = load_weights(folder, args)           # the whole model on one process (sample.py)

meta.pt loads with weights_only, but DCP's .metadata is a pickle: open sharded checkpoints only
from sources you trust.
"""
import dataclasses
import os
import shutil
import warnings
from pathlib import Path

import torch

from infra import distributed
from model import Transformer

LATEST = "latest"


def latest(out_dir):
    """The folder out_dir/latest names, or None."""
    pointer = Path(out_dir) / LATEST
    return pointer.parent / pointer.read_text().strip() if pointer.is_file() else None


def is_sharded(path):
    """Whether path is a sharded checkpoint's folder (meta.pt is written after the shards)."""
    return Path(path).is_dir() and (Path(path) / "meta.pt").is_file()


def save(out_dir, model, optimizer, meta, env):
    """Every process writes its shards into out_dir/ckpt-STEP/ (meta: step, data_position, ...);
    then `latest` is switched to it. A write that fails on any process (a full disk) raises an
    OSError on every process, after the partial folder is removed: the previous checkpoint is
    untouched. The processes agree after each part, so none is left waiting at a barrier."""
    out_dir = Path(out_dir)
    folder = out_dir / f"ckpt-{meta['step']:06d}"
    if env.is_main:
        if latest(out_dir) == folder:  # a fresh run reached the step of this out_dir's checkpoint
            (out_dir / LATEST).unlink()
        shutil.rmtree(folder, ignore_errors=True)  # left by a save of this step that was cut short
    distributed.barrier(env)
    rng = distributed.rng_states(env)  # every rank's
    error = None
    try:  # a failed shard on any rank is raised on every rank (DCP gathers the failures)
        _write_shards(folder, model, optimizer, env)
        if env.is_main:
            write_file(folder / "meta.pt", lambda f: torch.save(dict(meta, rng=rng), f))
    except OSError as e:
        error = e
    if distributed.all_ok(error is None, env) and env.is_main:  # every process's shards are on disk
        try:
            write_file(out_dir / (LATEST + ".tmp"), lambda f: f.write(folder.name.encode()))
            os.replace(out_dir / (LATEST + ".tmp"), out_dir / LATEST)  # the switch, atomic
        except OSError as e:
            error = e
    if not distributed.all_ok(error is None, env):
        if env.is_main:
            (out_dir / (LATEST + ".tmp")).unlink(missing_ok=True)
            shutil.rmtree(folder, ignore_errors=True)  # give the disk space back
        raise error or OSError("the main process could not write its part")
    if env.is_main:  # the older checkpoints, of either kind
        (out_dir / "ckpt.pt").unlink(missing_ok=True)
        remove(out_dir, keep=folder)


def _write_shards(folder, model, optimizer, env):
    """dcp.save of the parts of the model and optimizer state this process holds. A failure is
    raised on every rank: a full disk as the OSError itself."""
    import torch.distributed.checkpoint as dcp  # here: it takes a while to import
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optim_state = get_state_dict(model, optimizer)
    try:
        with warnings.catch_warnings():  # a single process (one XLA host): as intended
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=folder,
                     planner=_save_planner(env))
    except dcp.CheckpointException as e:  # one exception per failed rank, the same on every rank
        rank, (failure, _) = next(iter(e.failures.items()))
        if isinstance(failure, OSError):
            raise failure from None
        if "unexpected pos" in str(failure):  # torch.save's zip writer after its file's write failed
            raise OSError(f"process {rank}'s write of its shards stopped short: the disk is full or "
                          "a file-size limit was reached") from None
        raise


def write_file(path, write):
    """write(f) into path, then wait until it is on disk. A write that fails (a full disk: ENOSPC,
    or EFBIG past a file-size limit) raises that OSError, also from inside torch.save, whose zip
    writer then fails closing the file and raises a RuntimeError on top of it."""
    try:
        with open(path, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except RuntimeError as e:
        if isinstance(e.__context__, OSError):
            raise e.__context__ from None
        raise


def remove(out_dir, keep=None):
    """The sharded checkpoints in out_dir but `keep`; all of them, and `latest`, by default (a
    whole ckpt.pt replaced them). Main process only."""
    out_dir = Path(out_dir)
    if keep is None:
        (out_dir / LATEST).unlink(missing_ok=True)
    for old in out_dir.glob("ckpt-*"):
        if old != keep and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def read_meta(folder):
    """meta.pt of a sharded checkpoint (step, data_position, model_args, config, rng), with
    "shards": the folder."""
    try:
        meta = torch.load(Path(folder) / "meta.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{folder} is not a readable sharded checkpoint ({type(e).__name__}: "
                         f"{e})") from None
    return dict(meta, shards=Path(folder))


def load(folder, model, optimizer, env):
    """Every process reads the parts of the model and optimizer state it holds (DTensor shards, XLA
    shardings, or whole tensors on a single device) into them, in place. Call it after
    distributed.wrap_model."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    if env.device_type == "xla":
        # DCP loads into existing tensors: the optimizer state must exist, sharded like the weights
        from torch_xla.experimental.distributed_checkpoint import prime_optimizer
        prime_optimizer(optimizer)
    model_state, optim_state = get_state_dict(model, optimizer)  # also creates AdamW's state
    state = {"model": model_state, "optimizer": optim_state}
    _read(state, folder, _load_planner(env))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])


def load_weights(folder, args):
    """The whole model's weights (a state dict of CPU tensors) read by this process alone, whatever
    the number of processes that wrote them: for sampling, evaluation and the Hugging Face
    export."""
    with torch.device("meta"):
        shapes = Transformer(args).state_dict()
    state = {name: torch.empty(t.shape, dtype=t.dtype) for name, t in shapes.items()}
    _read({"model": state}, folder, no_dist=True)
    return state


def _read(state, folder, planner=None, no_dist=False):
    """dcp.load: the checkpoint's tensors into those of `state`, in place; a failure as a one-line
    ValueError."""
    import torch.distributed.checkpoint as dcp
    try:
        with warnings.catch_warnings():  # a single process: as intended
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(state, checkpoint_id=folder, planner=planner, no_dist=no_dist)
    except dcp.CheckpointException as e:
        failure = next(iter(e.failures.values()))[0]
        reason = (str(failure).splitlines() or [""])[0]
        raise ValueError(f"{folder} is not a readable sharded checkpoint of this model "
                         f"({type(failure).__name__}: {reason})") from None


# XLA SPMD: torch_xla's planners write and read each device's shard of a sharded XLA tensor.


def _save_planner(env):
    if env.device_type != "xla":
        return None  # DCP's default: DTensor shards and plain tensors
    from torch_xla.experimental.distributed_checkpoint import SPMDSavePlanner

    class OneCopyPerShard(SPMDSavePlanner):
        """torch_xla 2.9 plans every replica of a shard (e.g. along the mesh's data axis) as its
        own write; its de-duplication then drops all of them when they are on one host, and the
        checkpoint lacks the tensor. Plan one copy of each."""

        def create_local_plan(self):
            plan = super().create_local_plan()
            seen, items = set(), []
            for item in plan.items:
                if (item.index.fqn, item.index.offset) not in seen:
                    seen.add((item.index.fqn, item.index.offset))
                    items.append(item)
            return dataclasses.replace(plan, items=items)

    return OneCopyPerShard()


def _load_planner(env):
    if env.device_type != "xla":
        return None
    from torch_xla.experimental.distributed_checkpoint import SPMDLoadPlanner
    return SPMDLoadPlanner()
