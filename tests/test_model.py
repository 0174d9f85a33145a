"""The decoder: sizes and FLOPs of the paper, causality, the KV cache, the optimizer, Hugging Face interop."""
import math
import sys
from pathlib import Path

import pytest
import torch

from configs import MODEL_SIZES, STAGES, TABLE4_TFLOPS, TABLE7_PARAMS_M
from infra.checkpoint import load_model, rename, save_hf
from model import ModelArgs, Transformer, estimate_flops
from train import configure_optimizer

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(dim=64, n_layers=2, n_heads=4, hidden_dim=96, vocab_size=100, max_seq_len=64)


def small_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return Transformer(ModelArgs(**{**SMALL, **overrides})).eval()


@pytest.mark.decoder
@pytest.mark.parametrize("size", ["300M", "600M", "1B", "3B"])
def test_parameter_counts_match_table7(size):
    with torch.device("meta"):
        n = Transformer(ModelArgs(**MODEL_SIZES[size])).num_params()
    assert abs(n / 1e6 - TABLE7_PARAMS_M[size]) / TABLE7_PARAMS_M[size] < 0.01


@pytest.mark.parametrize("size", ["300M", "600M", "1B", "3B"])
def test_forward_flops_match_table4(size):
    args = ModelArgs(**MODEL_SIZES[size])
    long = estimate_flops(args, 4096) / 1e12
    assert abs(long - TABLE4_TFLOPS[size][4096]) / TABLE4_TFLOPS[size][4096] < 0.10
    # Table 4 prints one decimal; its 256-token figures are ours rounded up to that decimal
    short = estimate_flops(args, 256) / 1e12
    assert math.ceil(short * 10) / 10 == pytest.approx(TABLE4_TFLOPS[size][256])


@pytest.mark.decoder
def test_every_config_builds_a_model():
    for name, cfg in MODEL_SIZES.items():
        with torch.device("meta"):
            Transformer(ModelArgs(**cfg))
    assert MODEL_SIZES["lvm-7b"]["vocab_size"] == 8292
    assert STAGES["pretrain"]["lr"] == 1.5e-4 and STAGES["finetune"]["min_lr"] == 1.5e-6


@pytest.mark.decoder
def test_forward_returns_logits_and_mean_cross_entropy():
    model = small_model()
    idx = torch.randint(0, 100, (2, 10))
    targets = torch.randint(0, 100, (2, 10))
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 10, 100)
    expected = torch.nn.functional.cross_entropy(logits.view(-1, 100), targets.view(-1))
    torch.testing.assert_close(loss, expected)
    assert model(idx)[1] is None


@pytest.mark.decoder
@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_changing_a_token_never_changes_earlier_logits(n_kv_heads):
    model = small_model(n_kv_heads=n_kv_heads)
    idx = torch.randint(0, 100, (1, 20))
    changed = idx.clone()
    changed[0, 12] = (idx[0, 12] + 1) % 100
    before, after = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(before[:, :12], after[:, :12], rtol=0, atol=0)
    assert not torch.allclose(before[:, 12:], after[:, 12:])


@pytest.mark.decoder
@pytest.mark.parametrize("n_kv_heads", [4, 1])
def test_kv_cache_decoding_equals_full_forward(n_kv_heads):
    model = small_model(n_kv_heads=n_kv_heads)
    idx = torch.randint(0, 100, (3, 24))
    full = model(idx)[0]
    model.setup_cache(batch_size=3, max_seq_len=32)  # longer than the sequence: the mask hides the empty slots
    # a prompt at once, a few tokens at once (a chunk after filled slots), then one at a time
    prefill = model(idx[:, :8], input_pos=torch.arange(8))[0]
    assert prefill.shape == (3, 1, 100)  # generating: the last position's logits only
    chunk = model(idx[:, 8:12], input_pos=torch.arange(8, 12))[0]
    steps = [model(idx[:, t:t + 1], input_pos=torch.tensor([t]))[0] for t in range(12, 24)]
    cached = torch.cat([prefill, chunk] + steps, dim=1)
    torch.testing.assert_close(cached, torch.cat([full[:, 7:8], full[:, 11:]], dim=1), rtol=0, atol=1e-5)
    model.clear_cache()


@pytest.mark.decoder
def test_rms_norm_of_bfloat16_inputs_is_computed_in_float32():
    """Under bf16 the normalisation must run in float32: within one bf16 step (2^-7, relative) of a float64
    computation, where squaring and averaging in bf16 would be off by more."""
    from model import RMSNorm
    torch.manual_seed(0)
    for dim in (64, 256):
        x = (torch.randn(8, 32, dim) * torch.logspace(-2, 2, dim)).to(torch.bfloat16)  # a wide range of scales
        norm = RMSNorm(dim, eps=1e-6)
        norm.weight.data = torch.rand(dim) + 0.5
        exact = norm.weight.double() * x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)
        relative = (norm(x).double() - exact).abs() / exact.abs()
        assert relative.max() <= 2 ** -7


@pytest.mark.decoder
def test_optimizer_decays_matrices_not_norm_gains():
    model = small_model()
    opt = configure_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.defaults["betas"] == (0.9, 0.95)


@pytest.mark.decoder
def test_residual_projections_start_smaller():
    model = small_model(dim=256, n_layers=8, hidden_dim=512)
    assert model.layers[0].attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.layers[0].attention.wo.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)


def hf_llama(n_kv_heads, rope_theta=10000.0, rms_norm_eps=1e-6):
    import transformers  # a test-only dependency (requirements-dev.txt)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=n_kv_heads, vocab_size=100,
                                      rms_norm_eps=rms_norm_eps, max_position_embeddings=64,
                                      tie_word_embeddings=False, rope_theta=rope_theta)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.decoder
def test_other_rope_theta_and_norm_eps_and_the_gradients_match_transformers(tmp_path):
    """Every option ModelArgs has, away from its default, and the gradients too (a bug can keep the logits and
    change the gradients: a detach in the wrong place)."""
    hf = hf_llama(2, rope_theta=500000.0, rms_norm_eps=1e-2)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert (ours.args.rope_theta, ours.args.norm_eps) == (500000.0, 1e-2)
    idx = torch.randint(0, 100, (2, 30))
    targets = torch.randint(0, 100, (2, 30))
    logits, loss = ours(idx, targets)
    out = hf(idx)
    torch.testing.assert_close(logits, out.logits, rtol=0, atol=1e-4)
    theirs = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), targets.flatten())
    loss.backward()
    theirs.backward()
    for name, p in ours.named_parameters():
        hf_name = rename(name, to_hf=True)
        torch.testing.assert_close(p.grad, hf.get_parameter(hf_name).grad, rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.decoder
@pytest.mark.parametrize("n_kv_heads,layout", [(4, "safetensors"), (2, "safetensors"), (2, "sharded"), (2, "bin")])
def test_hugging_face_checkpoints_give_transformers_logits(tmp_path, n_kv_heads, layout):
    hf = hf_llama(n_kv_heads)
    if layout == "bin":
        hf.save_pretrained(tmp_path, safe_serialization=False)
    else:
        hf.save_pretrained(tmp_path, max_shard_size="20KB" if layout == "sharded" else "5GB")
    ours = load_model(tmp_path)
    assert ours.args.n_kv_heads == n_kv_heads
    idx = torch.randint(0, 100, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, rtol=0, atol=1e-4)


@pytest.mark.decoder
@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_save_hf_round_trip_is_exact_and_transformers_reads_it(tmp_path, n_kv_heads):
    import transformers
    model = small_model(n_kv_heads=n_kv_heads)
    save_hf(model, tmp_path / "ours", max_shard_bytes=40_000)  # small shards exercise the index file
    back = load_model(tmp_path / "ours")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    idx = torch.randint(0, 100, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], rtol=0, atol=1e-4)


def test_loading_explains_a_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="Hugging Face LLaMA directory"):
        load_model(tmp_path)


@pytest.mark.decoder
def test_model_cli_prints_params_and_flops(run_script):
    out = run_script([sys.executable, "model.py", "--size", "300M"], cwd=ROOT).stdout
    assert "parameters: 290.8M (paper: 291M)" in out
    assert "4096 tokens: 3.82 (Table 4: 4.1)" in out
