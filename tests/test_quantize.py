"""Weight-only int8 and int4 (infra/quantize.py): the round trip of a weight, the model's logits and greedy tokens
against the unquantized model's, loading from both checkpoint layouts with the memory check counting the quantized
size, and bad values as one line."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import evaluate
import sample
import vqgan
from infra import checkpoint, quantize, vqgan_checkpoint
from infra.checkpoint import load_model, memory_needed, save_checkpoint, save_hf
from configs import MODEL_SIZES
from model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = ModelArgs(dim=128, n_layers=2, n_heads=4, hidden_dim=256, vocab_size=64, max_seq_len=64)


def relative_error(x, reference):
    return ((x.float() - reference.float()).norm() / reference.float().norm()).item()


def counting_sequences(n, length, vocab, generator):
    """Sequences that count up from a random start by a step of 1, 2 or 3 (mod vocab): the step is read from the
    context, so a model that learned them predicts each next token with confidence, as a trained LVM does."""
    start = torch.randint(vocab, (n, 1), generator=generator)
    step = torch.randint(1, 4, (n, 1), generator=generator)
    return (start + step * torch.arange(length)) % vocab


@pytest.fixture(scope="module")
def trained():
    """SMALL trained for 100 steps on counting sequences (a few seconds)."""
    torch.manual_seed(0)
    model, generator = Transformer(SMALL), torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(100):
        seq = counting_sequences(16, 33, SMALL.vocab_size, generator)
        loss = model(seq[:, :-1], seq[:, 1:])[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5, loss.item()  # it learned to count
    return model.eval()


def quantized(model, mode, dtype=torch.float32):
    copy = Transformer(model.args).to(dtype).eval()
    copy.load_state_dict(model.state_dict())
    return quantize.quantize_model(copy, mode)


@pytest.mark.parametrize("mode, bound", [("int8", 0.01), ("int4", 0.12)])
def test_the_round_trip_of_a_weight_loses_little(mode, bound):
    """int8: a scale per row, error about 0.6% of a Gaussian weight; int4: 16 levels a group of 128, about 9%."""
    weight = torch.randn(96, 256, generator=torch.Generator().manual_seed(0))
    if mode == "int8":
        q, scale = quantize.int8_weight(weight, torch.float32)
        assert q.dtype == torch.int8 and scale.shape == (96,)
        restored = q.float() * scale[:, None]
    else:
        q, scales_and_zeros = quantize.int4_weight(weight, torch.float32)
        assert q.min() >= 0 and q.max() <= 15 and scales_and_zeros.shape == (2, 96, 2)
        scale, zero = (t.transpose(0, 1).repeat_interleave(128, dim=1) for t in scales_and_zeros.unbind(-1))
        restored = (q.float() - 8) * scale + zero
    assert relative_error(restored, weight) < bound
    # the module computes x W^T with that restored weight (int4: through the packing torch's kernel reads)
    linear = torch.nn.Linear(256, 96, bias=False)
    linear.weight.data = weight
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Module()])
    model.layers[0].feed_forward = torch.nn.Module()
    model.layers[0].feed_forward.w1 = linear
    quantize.swap_linears(model, mode)
    x = torch.randn(3, 5, 256)
    assert relative_error(model.layers[0].feed_forward.w1(x), F.linear(x, restored)) < 1e-5


@pytest.mark.decoder
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activations_stay_in_the_compute_dtype_and_only_the_blocks_linears_are_quantized(trained, dtype):
    model = quantized(trained, "int8", dtype)
    linears = [m for m in model.modules() if isinstance(m, quantize.Int8Linear)]
    assert len(linears) == 7 * SMALL.n_layers and all(m.weight.dtype == torch.int8 for m in linears)
    assert model.output.weight.dtype == model.tok_embeddings.weight.dtype == dtype  # the head and embedding stay
    logits = model(torch.zeros(1, 4, dtype=torch.long))[0]
    assert logits.dtype == dtype


@pytest.mark.decoder
@pytest.mark.inference
def test_greedy_tokens_and_logits_of_a_trained_model_agree_with_the_unquantized_ones(trained):
    """int8: >= 97% of greedy tokens (in practice all) and logits within 2%; int4: reported (pinned loosely)."""
    prompts = counting_sequences(16, 8, SMALL.vocab_size, torch.Generator().manual_seed(1))
    reference = sample.generate(trained, prompts, 40, temperature=0)[:, 8:]
    logits = trained(prompts)[0]
    for mode, agreement, error in (("int8", 0.97, 0.02), ("int4", 0.9, 0.2)):
        model = quantized(trained, mode)
        tokens = sample.generate(model, prompts, 40, temperature=0)[:, 8:]
        assert (tokens == reference).float().mean() >= agreement, mode
        assert relative_error(model(prompts)[0], logits) < error, mode


@pytest.mark.decoder
@pytest.mark.parametrize("layout", ["ckpt", "hf"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_load_model_quantizes_both_layouts_as_it_reads(tmp_path, trained, layout, mode):
    if layout == "ckpt":
        path = tmp_path / "ckpt.pt"
        save_checkpoint(path, dict(model=trained.state_dict(), model_args=vars(SMALL)))
    else:
        path = tmp_path / "hf"
        save_hf(trained, path, dtype=torch.bfloat16)
    plain, model = load_model(path, "cpu", "auto"), load_model(path, "cpu", "auto", quantize=mode)
    kind = quantize.Int8Linear if mode == "int8" else quantize.Int4Linear
    assert sum(isinstance(m, kind) for m in model.modules()) == 7 * SMALL.n_layers
    assert model.output.weight.dtype == plain.output.weight.dtype  # the compute dtype: the checkpoint's
    prompt = counting_sequences(2, 16, SMALL.vocab_size, torch.Generator().manual_seed(2))
    assert relative_error(model(prompt)[0], plain(prompt)[0]) < (0.02 if mode == "int8" else 0.2)


@pytest.mark.decoder
def test_a_saved_quantized_model_loads_as_it_is_and_refuses_a_second_quantization(tmp_path, trained):
    model = quantized(trained, "int8")
    save_checkpoint(tmp_path / "ckpt.pt", dict(model=model.state_dict(), model_args=vars(SMALL)))
    again = load_model(tmp_path / "ckpt.pt")
    prompt = torch.arange(10)[None]
    assert torch.equal(again(prompt)[0], model(prompt)[0])
    with pytest.raises(ValueError, match="quantized to int8 already") as error:
        load_model(tmp_path / "ckpt.pt", quantize="int8")
    assert len(str(error.value).splitlines()) == 1
    with pytest.raises(ValueError, match="quantized already"):
        quantize.quantize_model(model, "int8")


@pytest.mark.decoder
def test_the_memory_check_counts_the_quantized_size(tmp_path, monkeypatch, trained):
    """The released 7B: about 14 GB in bfloat16 (weights and a full cache), about 8 GB with int8 weights (a 16 GB
    machine holds it), about 5 GB with int4. A machine with room for the int8 model only loads it with --quantize."""
    lvm7b = ModelArgs(**MODEL_SIZES["lvm-7b"])
    gb = {mode: memory_needed(lvm7b, torch.bfloat16, mode) / 2**30 for mode in (None, "int8", "int4")}
    assert 13 < gb[None] < 15 and 7.5 < gb["int8"] < 9 and 4.5 < gb["int4"] < 6, gb
    folder = tmp_path / "hf"
    save_hf(trained, folder, dtype=torch.bfloat16)
    int8, bf16 = memory_needed(SMALL, torch.bfloat16, "int8"), memory_needed(SMALL, torch.bfloat16)
    monkeypatch.setattr(checkpoint, "free_memory", lambda device: (int8 + bf16) // 2)
    load_model(folder, "cpu", "auto", quantize="int8")
    with pytest.raises(MemoryError, match="--quantize int8"):
        load_model(folder, "cpu", "auto")
    monkeypatch.setattr(checkpoint, "free_memory", lambda device: int8 // 2)
    with pytest.raises(MemoryError, match="in bfloat16 with int8 weights"):
        load_model(folder, "cpu", "auto", quantize="int8")


@pytest.mark.decoder
def test_loading_int8_peaks_at_the_int8_model_not_the_bfloat16_one(tmp_path):
    """A bfloat16 checkpoint read with int8 weights in a fresh process: the memory it adds stays near the int8 model
    (plus a tensor being quantized), well under the bfloat16 model that memory-mapped loading would touch."""
    args = ModelArgs(dim=1024, n_layers=6, n_heads=8, hidden_dim=2816, vocab_size=512, max_seq_len=64)
    folder = tmp_path / "hf"
    torch.manual_seed(0)
    save_hf(Transformer(args), folder, dtype=torch.bfloat16)
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from infra.checkpoint import load_model, memory_needed
        from model import ModelArgs
        memory_needed(ModelArgs(), torch.float32)  # loads torch's meta-device kernels once
        kb = lambda key: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
        open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
        before = kb("VmRSS:")
        model = load_model({str(folder)!r}, "cpu", "auto", quantize="int8")
        model(torch.zeros(1, 4, dtype=torch.long))
        print((kb("VmHWM:") - before) * 1024)
        """)
    # every allocation over 1 MB its own mapping, given back when freed: the peak is what loading holds, not how
    # malloc reuses freed blocks of this small model's sizes (a 7B's weights are mapped that way anyway)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**20))
    added = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                               env=env).stdout.split()[-1])
    bf16 = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    int8 = memory_needed(args, torch.bfloat16, "int8") - 2 * 2 * args.n_layers * args.max_seq_len * args.dim
    tensor = 2 * args.dim * args.hidden_dim  # the largest, in bfloat16, and its float32 copy while quantized
    assert added < int8 + 4 * tensor + 32 * 2**20, (added, int8, bf16)
    assert added < 0.75 * bf16, (added, int8, bf16)


@pytest.mark.decoder
def test_bad_values_stop_with_one_line(tmp_path, trained, capsys):
    folder, tokenizer = tmp_path / "hf", tmp_path / "vq"
    save_hf(trained, folder)
    torch.manual_seed(0)
    vqgan_checkpoint.save_pretrained(vqgan.VQGAN(vqgan.CONFIGS["toy"]), tokenizer)
    for command, args in ((sample.main, ["--vqgan", str(tokenizer), "--unconditional"]),
                          (evaluate.main, ["perplexity", "--tokens", str(tmp_path / "none")])):
        with pytest.raises(SystemExit) as stop:
            command(["--model", str(folder), "--device", "cpu", "--quantize", "int3", *args])
        assert len(str(stop.value.code).splitlines()) == 1 and "choose int8 or int4" in str(stop.value.code)
    with pytest.raises(ValueError, match="int4 runs on a CPU only") as error:  # no int4 GPU kernel wired here
        load_model(folder, "cuda", quantize="int4")
    assert len(str(error.value).splitlines()) == 1
