import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import vqgan as bench_vqgan  # noqa: E402
import vqgan  # noqa: E402
from infra import vqgan_checkpoint
from tools import vqgan_train  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
TINY = dict(vqgan.CONFIGS["toy"], resolution=16, hidden_channels=32, channel_mult=[1, 2], z_channels=32,
            num_embeddings=64, quantized_embed_dim=8, resample_with_conv=True, norm_groups=8, patch_encoder=False,
            patch_decoder=False)  # the taming network, f=2: 16x16 -> 8x8 codes
PALETTE = [[0, 0, 0], [255, 40, 40], [40, 220, 40], [40, 90, 255]]


def write_shapes(folder, n, size=16, seed=0):
    """n images of a random-colour rectangle on a random background, plus their segmentation maps in PALETTE."""
    rng = np.random.default_rng(seed)
    for kind in ("images", "segmentation"):
        (folder / kind).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (size, size, 3)).copy()
        seg = np.zeros((size, size, 3), np.uint8)
        x, y = rng.integers(0, size // 2, 2)
        w, h = rng.integers(3, size // 2, 2)
        img[y:y + h, x:x + w] = rng.integers(0, 256, 3)
        seg[y:y + h, x:x + w] = PALETTE[1 + i % 3]
        Image.fromarray(img).save(folder / "images" / f"{i:03d}.png")
        Image.fromarray(seg).save(folder / "segmentation" / f"{i:03d}.png")
    return folder


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def small_model(seed=0):
    torch.manual_seed(seed)
    return vqgan.VQGAN(TINY).eval()


@pytest.mark.tokenizer
def test_loads_muse_checkpoint_and_reproduces_reference_outputs():
    model = vqgan_checkpoint.load_pretrained(FIXTURES / "muse_vqgan_tiny", device="cpu")
    expected = load_file(str(FIXTURES / "muse_vqgan_tiny" / "expected.safetensors"))
    with torch.no_grad():
        latents = model.latents(expected["pixels"])
    codes = model.encode(expected["pixels"])
    assert codes.dtype == torch.int64 and torch.equal(codes, expected["codes"])
    torch.testing.assert_close(latents, expected["latents"], atol=1e-5, rtol=0)
    torch.testing.assert_close(model.decode(expected["codes"]), expected["decoded"], atol=1e-5, rtol=0)


def test_default_config_has_released_keys_and_shapes():
    released = json.loads((FIXTURES / "muse_vqgan_f16_8192_keys.json").read_text())
    with torch.device("meta"):  # no 146M-parameter allocation
        model = vqgan.VQGAN(vqgan.CONFIGS["f16-8192"])
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == released["tensors"]
    assert sum(p.numel() for p in model.parameters()) == 146_244_675
    assert model.downsample_factor == 16 and model.config["num_embeddings"] == 8192
    assert {k: model.config[k] for k in released["config"]} == released["config"]


@pytest.mark.tokenizer
def test_toy_config_turns_32x32_images_into_16_codes_of_512():
    model = vqgan.VQGAN(vqgan.CONFIGS["toy"]).eval()
    codes = model.encode(torch.rand(3, 3, 32, 32))
    assert codes.shape == (3, 16) and codes.dtype == torch.int64 and int(codes.max()) < 512
    assert model.decode(codes).shape == (3, 3, 32, 32)


@pytest.mark.tokenizer
def test_a_patch_codec_codes_each_patch_from_that_patch_alone():
    model = vqgan.VQGAN(vqgan.CONFIGS["toy"]).eval()
    x = torch.rand(2, 3, 32, 32)
    y = x.clone()
    y[:, :, 8:, :] = torch.rand(2, 3, 24, 32)  # everything but the top row of 8x8 cells changes
    assert torch.equal(model.encode(x)[:, :4], model.encode(y)[:, :4])
    flat = torch.full((1, 3, 32, 32), 0.3)
    flat[:, :, 16:, 16:] = 0.9  # one flat colour in three cells, another in the fourth quadrant
    codes = model.encode(flat).view(4, 4)
    assert len(codes[:2].unique()) == 1 and len(codes[2:, 2:].unique()) == 1


@pytest.mark.tokenizer
def test_pca_and_kmeans_init_make_a_patch_codec_good_before_any_step():
    from toy import toyworld
    images = torch.from_numpy(np.stack([toyworld.make_image(np.random.default_rng(i), 32)[k] for i in range(300)
                                        for k in ("images", "segmentation")])).permute(0, 3, 1, 2)
    model, gen = vqgan.VQGAN(dict(vqgan.CONFIGS["toy"], num_embeddings=128)), torch.Generator().manual_seed(0)
    before = vqgan_train.evaluate(model, images)[0]
    vqgan_train.pca_init_patch_codec(model, images, gen)
    vqgan_train.kmeans_init_codebook(model, images, gen)
    after = vqgan_train.evaluate(model, images)[0]
    assert after["psnr"] > 22 > before["psnr"] and after["usage"] > 80


def test_spread_picks_takes_distinct_points_before_repeating_any():
    z = torch.cat([torch.zeros(1000, 2), torch.eye(2), -torch.eye(2)])  # one point 1000 times, four others once
    picks = vqgan_train.spread_picks(z, 5, torch.Generator().manual_seed(0))
    assert len(picks.unique(dim=0)) == 5


@pytest.mark.tokenizer
def test_codes_are_row_major_and_non_square_images_work():
    model = small_model()
    pixels = torch.rand(2, 3, 16, 32)
    codes = model.encode(pixels, batch_size=1)  # batching must not change the answer
    assert codes.shape == (2, 8 * 16)
    with torch.no_grad():
        z = model.latents(pixels)  # [2, D, 8, 16]
    e = model.quantize.embedding.weight
    for row, col in [(0, 0), (0, 15), (3, 2), (7, 15)]:
        nearest = (z[:, :, row, col, None] - e.t()[None]).pow(2).sum(1).argmin(1)  # direct ||z - e||^2
        assert torch.equal(codes[:, row * 16 + col], nearest)
    assert model.decode(codes, grid=(8, 16)).shape == (2, 3, 16, 32)


def test_encode_rejects_uint8_and_wrong_sizes_with_clear_errors():
    model = small_model()
    with pytest.raises(ValueError, match="divide by 255"):
        model.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiple of the downsample factor 2"):
        model.encode(torch.rand(1, 3, 15, 16))
    with pytest.raises(ValueError, match="codes must be in"):
        model.decode(torch.full((1, 64), 64))


@pytest.mark.tokenizer
def test_straight_through_gradient_reaches_encoder_unchanged():
    model = small_model().train()
    z = model.latents(torch.rand(2, 3, 16, 16))
    zq, vq_loss, codes = model.quantize(z)
    z.retain_grad()
    zq.retain_grad()
    model.decode_latents(zq).square().mean().backward(retain_graph=True)
    assert z.grad.abs().sum() > 0
    torch.testing.assert_close(z.grad, zq.grad)  # d loss / d z == d loss / d z_q
    model.zero_grad()
    vq_loss.backward()  # codebook term moves the used codes, commitment term the encoder
    assert model.quantize.embedding.weight.grad[codes.unique()].abs().sum() > 0
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0


@pytest.mark.tokenizer
def test_quantizer_losses_and_codes_of_hand_built_latents():
    q = vqgan.VectorQuantizer(3, 2, beta=0.25)
    q.embedding.weight.data = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    z = torch.tensor([[[[0.2, 0.9]], [[0.1, 1.5]]]])  # [1, D=2, h=1, w=2]: latents (0.2, 0.1) and (0.9, 1.5)
    zq, loss, codes = q(z)
    assert codes.tolist() == [[0, 2]]
    torch.testing.assert_close(zq, torch.tensor([[[[0.0, 0.0]], [[0.0, 2.0]]]]))
    squared = (0.2 ** 2 + 0.1 ** 2 + 0.9 ** 2 + 0.5 ** 2) / 4  # mean over the 4 numbers
    torch.testing.assert_close(loss, torch.tensor(squared * 1.25))  # codebook term + 0.25 x commitment term


@pytest.mark.tokenizer
def test_codebook_term_moves_the_codes_and_beta_weighs_the_commitment_term():
    """The loss has the same value whichever term beta weighs; the gradients tell them apart: the codebook
    term ||sg[z] - e||^2 (weight 1) pulls the chosen codes to the latents, beta x ||z - sg[e]||^2 the latents to
    their codes."""
    q = vqgan.VectorQuantizer(3, 2, beta=0.25)
    q.embedding.weight.data = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    z = torch.tensor([[[[0.2, 0.9]], [[0.1, 1.5]]]], requires_grad=True)  # latents (0.2, 0.1), (0.9, 1.5)
    q(z)[1].backward()
    # mean over 4 numbers: d/de_k = 2 (e_k - z) / 4 for the codes in use (0 and 2), none for code 1
    torch.testing.assert_close(q.embedding.weight.grad, torch.tensor([[-0.1, -0.05], [0.0, 0.0], [-0.45, 0.25]]))
    torch.testing.assert_close(z.grad, 0.25 * torch.tensor([[[[0.1, 0.45]], [[0.05, -0.25]]]]))  # beta 2 (z - e) / 4


@pytest.mark.tokenizer
def test_l2_normalised_quantizer_compares_and_returns_unit_vectors():
    """With l2_normalize the nearest code is the most similar direction (here not the nearest raw vector), the
    answer is that code's unit vector, and the loss compares unit vectors."""
    q = vqgan.VectorQuantizer(2, 2, beta=0.25, l2_normalize=True)
    q.embedding.weight.data = torch.tensor([[5.0, 0.0], [0.0, 1.0]])
    z = torch.tensor([[[[2.0]], [[1.5]]]])  # one latent (2, 1.5): direction (0.8, 0.6); raw, nearest to (0, 1)
    zq, loss, codes = q(z)
    assert codes.tolist() == [[0]] and q.nearest(z).tolist() == [[0]]
    torch.testing.assert_close(zq, torch.tensor([[[[1.0]], [[0.0]]]]))
    torch.testing.assert_close(loss, torch.tensor(1.25 * ((1 - 0.8) ** 2 + 0.6 ** 2) / 2))
    z = torch.randn(2, 2, 3, 3, requires_grad=True)  # the straight-through passes the normalisation's gradient
    g = torch.randn(2, 2, 3, 3)
    (q(z)[0] * g).sum().backward()
    expected = torch.autograd.grad((torch.nn.functional.normalize(z, dim=1) * g).sum(), z)[0]
    torch.testing.assert_close(z.grad, expected)


@pytest.mark.tokenizer
def test_l2_normalised_codes_pick_the_most_similar_direction():
    torch.manual_seed(0)
    model = vqgan.VQGAN(dict(TINY, l2_normalize_codes=True))
    z = model.latents(torch.rand(2, 3, 16, 16))
    zq, _, codes = model.quantize(z)
    torch.testing.assert_close(zq.norm(dim=1), torch.ones(2, 8, 8))
    cosine = torch.einsum("bdhw,kd->bhwk", torch.nn.functional.normalize(z, dim=1),
                          torch.nn.functional.normalize(model.quantize.embedding.weight, dim=1))
    assert torch.equal(codes, cosine.flatten(1, 2).argmax(-1))


def test_dead_codes_restart_onto_current_latents():
    model = small_model()
    usage = torch.zeros(64, dtype=torch.long)
    usage[:10] = 5
    x = torch.rand(4, 3, 16, 16)
    before = model.quantize.embedding.weight.detach().clone()
    assert vqgan_train.restart_dead_codes(model, usage, x, torch.Generator().manual_seed(0)) == 54
    after = model.quantize.embedding.weight.detach()
    assert torch.equal(after[:10], before[:10])
    with torch.no_grad():
        z = model.latents(x).permute(0, 2, 3, 1).reshape(-1, 8)
    assert all(torch.isclose(code, z).all(1).any() for code in after[10:])


@pytest.mark.tokenizer
def test_diffusers_vqmodel_layout_loads(tmp_path):
    model = small_model()
    n = len(TINY["channel_mult"])
    renames = [(r"down\.(\d+)\.block\.", r"down_blocks.\1.resnets."), (r"down\.(\d+)\.downsample\.", r"down_blocks.\1.downsamplers.0."),
               (r"mid\.block_1\.", "mid_block.resnets.0."), (r"mid\.block_2\.", "mid_block.resnets.1."),
               ("nin_shortcut", "conv_shortcut"), (r"\.norm_out\.", ".conv_norm_out."), (r"upsample\.", "upsamplers.0.")]
    sd = {}
    for k, v in model.state_dict().items():
        m = re.match(r"decoder\.up\.(\d+)\.block\.(.*)", k) or re.match(r"decoder\.up\.(\d+)\.(upsample.*)", k)
        if m:
            k = f"decoder.up_blocks.{n - 1 - int(m.group(1))}." + ("resnets." if "block." in k else "") + m.group(2)
        for pattern, repl in renames:
            k = re.sub(pattern, repl, k)
        sd[k] = v
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(dict(
        _class_name="VQModel", block_out_channels=[32, 64], layers_per_block=1, latent_channels=32,
        num_vq_embeddings=64, vq_embed_dim=8, in_channels=3, norm_num_groups=8)))
    loaded = vqgan_checkpoint.load_pretrained(tmp_path, device="cpu")
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(loaded.encode(x), model.encode(x))
    torch.testing.assert_close(loaded.decode(model.encode(x)), model.decode(model.encode(x)))


def test_missing_checkpoint_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; pass a directory holding config.json"):
        vqgan_checkpoint.load_pretrained(tmp_path / "no_such_dir")
    with pytest.raises(FileNotFoundError, match="is not a VQGAN checkpoint"):
        vqgan_checkpoint.load_pretrained(tmp_path)


def test_hub_id_without_huggingface_hub_says_how_to_download(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if it were not installed
    with pytest.raises(FileNotFoundError, match="huggingface_hub is not installed; download it by hand"):
        vqgan_checkpoint.load_pretrained("Emma02/vqvae_ckpts")


def train_args(data, out, steps, *extra):
    return vqgan_train.parse_args([
        "--data", str(data), "--out_dir", str(out), "--max_steps", str(steps), "--batch_size", "8",
        "--lr_decay_steps", "5", "--disc_start", "2", "--restart_every", "2", "--eval_interval", "2", "--warmup_steps", "2",
        "--resolution=16", "--hidden_channels=32", "--channel_mult=[1,2]", "--z_channels=32",
        "--num_embeddings=64", "--quantized_embed_dim=8", "--dropout=0.1", "--patch_encoder=false",
        "--patch_decoder=false", *extra])  # the taming network: GAN, dropout, restarts


@pytest.mark.tokenizer
def test_training_writes_a_loadable_checkpoint_and_resumes_exactly(tmp_path, capsys):
    data = write_shapes(tmp_path / "data", 40)
    unbroken = vqgan_train.train(train_args(data, tmp_path / "a", 5))
    first = vqgan_train.train(train_args(data, tmp_path / "b", 3))
    resumed = vqgan_train.train(train_args(data, tmp_path / "b", 5, "--resume"))
    assert [h["step"] for h in resumed] == [4, 5]
    assert first == unbroken[:3]
    assert resumed == unbroken[3:]  # same batches, dropout, GAN and codebook restarts: identical losses
    assert unbroken[1]["d"] == 0 and unbroken[2]["d"] > 0  # the discriminator switches on at --disc_start
    assert "perceptual loss: OFF" in capsys.readouterr().out or vqgan_train.load_lpips("cpu") is not None

    model = vqgan_checkpoint.load_pretrained(tmp_path / "b", device="cpu")
    assert model.config["num_embeddings"] == 64 and model.downsample_factor == 2
    assert model.encode(torch.rand(1, 3, 16, 16)).shape == (1, 64)
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [m["step"] for m in log] == [2, 3, 4, 5] and all(0 <= m["usage"] <= 100 for m in log)
    assert (tmp_path / "b" / "recon_000005.png").exists()

    metrics = bench_vqgan.main(["--ckpt", str(tmp_path / "b"), "--data", str(data / "segmentation"), "--palette", "auto"])
    assert metrics["palette_size"] == 4 and 0 <= metrics["palette_survival"] <= 100 and metrics["images"] == 40


def test_palette_survival_counts_pixels_still_nearest_to_their_colour():
    seg = torch.tensor(PALETTE, dtype=torch.uint8)[torch.tensor([[0, 1], [2, 3]])].permute(2, 0, 1)[None]  # [1,3,2,2]
    recon = seg.float() / 255
    assert bench_vqgan.palette_survival(seg, recon, PALETTE) == 100.0
    recon[0, :, 0, 1] = torch.tensor([40, 200, 60]) / 255  # the red pixel now reads as green
    recon[0, :, 1, 1] = torch.tensor([60, 80, 200]) / 255  # the blue pixel is off, but still nearest to blue
    assert bench_vqgan.palette_survival(seg, recon, PALETTE) == 75.0


def test_cli_reports_a_missing_image_folder_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "vqgan_train.py"), "--data", str(tmp_path / "nothing"),
                        "--out_dir", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("error: image folder") and "does not exist" in r.stderr
