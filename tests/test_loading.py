"""Loading a model as a user of LVM's released checkpoint meets it: in the dtype the checkpoint is stored in, with
one line instead of a kill when memory is short, never holding two copies; and sampling that never leaves the
codebook nor stops at LVM's end-of-sequence id."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from infra import checkpoint
import sample
import vqgan
from infra import vqgan_checkpoint
from infra.checkpoint import load_model, memory_needed, save_hf
from model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.decoder  # every test builds or loads a Transformer (its rotary tables included)
LVM_LIKE = ModelArgs(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=8292, max_seq_len=256)


def released(folder, dtype, args=LVM_LIKE, **kwargs):
    """A Hugging Face LlamaForCausalLM directory of LVM's layout (vocabulary 8292), weights stored in dtype."""
    torch.manual_seed(0)
    save_hf(Transformer(args), folder, dtype=dtype, **kwargs)
    return folder


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16, torch.float32])
def test_auto_loads_the_checkpoints_own_dtype_on_a_cpu(tmp_path, stored):
    model = load_model(released(tmp_path / "hf", stored), "cpu", "auto")
    assert {p.dtype for p in model.parameters()} == {stored}


def test_the_dtype_is_read_from_the_tensors_when_config_json_does_not_say(tmp_path):
    folder = released(tmp_path / "hf", torch.bfloat16)
    config = (folder / "config.json").read_text().replace('"torch_dtype": "bfloat16",', "")
    (folder / "config.json").write_text(config)
    assert checkpoint._hf_args_and_dtype(folder)[1] == torch.bfloat16


def test_float32_too_big_for_free_memory_loads_in_bfloat16_and_says_so(tmp_path, monkeypatch, capsys):
    folder = released(tmp_path / "hf", torch.float32)
    free = (memory_needed(LVM_LIKE, torch.float32) + memory_needed(LVM_LIKE, torch.bfloat16)) // 2
    monkeypatch.setattr(checkpoint, "free_memory", lambda device: free)
    model = load_model(folder, "cpu", "auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert "loading them in bfloat16" in capsys.readouterr().out


def test_a_model_that_cannot_fit_stops_sample_py_with_one_line(tmp_path, monkeypatch):
    folder, tokenizer = released(tmp_path / "hf", torch.bfloat16), tmp_path / "vq"
    vqgan_checkpoint.save_pretrained(vqgan.VQGAN(vqgan.CONFIGS["toy"]), tokenizer)
    monkeypatch.setattr(checkpoint, "free_memory", lambda device: memory_needed(LVM_LIKE, torch.bfloat16) // 3)
    with pytest.raises(SystemExit) as stop:
        sample.main(["--model", str(folder), "--vqgan", str(tokenizer), "--unconditional", "--device", "cpu",
                     "--out_dir", str(tmp_path / "out")])
    message = str(stop.value.code)
    assert len(message.splitlines()) == 1 and "GB in bfloat16" in message and "GB is free on cpu" in message
    assert "--dtype bfloat16" in message and "a GPU" in message and not (tmp_path / "out").exists()


def test_an_allocation_failure_while_loading_anyway_ends_in_one_line(tmp_path, monkeypatch):
    """Memory that looked free but is not (an address-space limit, another process): torch's error becomes one
    line saying what helps."""
    folder = released(tmp_path / "hf", torch.bfloat16)

    def out_of_memory(path, dtype=None, quantize=None):
        raise RuntimeError("unable to mmap 13340000000 bytes from file </x>: Cannot allocate memory (12)\nmore")

    monkeypatch.setattr(checkpoint, "_read_hf", out_of_memory)
    with pytest.raises(MemoryError) as error:
        load_model(folder, "cpu", "auto")
    assert len(str(error.value).splitlines()) == 1 and "Cannot allocate memory" in str(error.value)
    assert "--dtype bfloat16" in str(error.value)


def test_loading_peaks_at_the_model_plus_one_shard_not_two_copies(tmp_path):
    """A float32 checkpoint in 8 shards, loaded in bfloat16 in a fresh process: the memory it adds stays near the
    bfloat16 model plus one float32 shard, well under the float32 copy plus the bfloat16 one."""
    args = ModelArgs(dim=512, n_layers=8, n_heads=8, hidden_dim=1536, vocab_size=8292, max_seq_len=256)
    float32 = memory_needed(ModelArgs(**{**args.__dict__, "max_seq_len": 0}), torch.float32)
    folder = released(tmp_path / "hf", torch.float32, args, max_shard_bytes=float32 // 8)
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from infra.checkpoint import load_model, memory_needed
        from model import ModelArgs
        memory_needed(ModelArgs(), torch.float32)  # loads torch's meta-device kernels once (~70 MB of code)
        kb = lambda key: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
        open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
        before = kb("VmRSS:")
        load_model({str(folder)!r}, "cpu", torch.bfloat16)
        print((kb("VmHWM:") - before) * 1024)
        """)
    added = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                               check=True).stdout.split()[-1])
    shard = max(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert len(list(folder.glob("*.safetensors"))) >= 8
    assert added < float32 / 2 + 2 * shard + 32 * 2**20, (added, float32, shard)  # model + a shard (+ its copy)
    assert added < 0.8 * (float32 + float32 / 2)  # far from both copies at once


@pytest.mark.inference
def test_sampling_neither_leaves_the_codebook_nor_stops_at_lvms_end_of_sequence_id(tmp_path):
    model = load_model(released(tmp_path / "hf", torch.float32), "cpu")
    model.output = torch.nn.Linear(LVM_LIKE.dim, LVM_LIKE.vocab_size)  # logits set by its bias alone
    with torch.no_grad():
        model.output.weight.zero_()
        model.output.bias.zero_()
        model.output.bias[2] = 8.0  # id 2, LVM's eos_token_id, is also an image code: make it likely
        model.output.bias[8192:] = 20.0  # the 100 unused slots: overwhelmingly likely
    tokens = sample.generate(model, torch.zeros(2, 1, dtype=torch.long), 40, codebook_size=8192,
                             generator=torch.Generator().manual_seed(0))
    new = tokens[:, 1:]
    assert new.shape == (2, 40) and new.max() < 8192  # every token asked for, none outside the codebook
    assert (new == 2).float().mean() > 0.5  # id 2 drawn again and again, and sampling went on
