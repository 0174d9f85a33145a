"""The one image reader (images.py): the same file gives the same pixels, and so the same codes, whether
tokenize_data.py writes it into a token file or sample.py reads it as a prompt."""
import numpy as np
import pytest
import torch
from PIL import Image

import sample
import tokenize_data
import vqgan
from infra import vqgan_checkpoint
from data import load_tokens
from infra.images import PALETTES, read_annotation, read_image, square
from model import ModelArgs, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def write_files(root):
    """An EXIF-rotated JPEG, a half-transparent RGBA PNG and a palette segmentation map of another size, as
    image / annotation pairs matched by name."""
    (root / "images").mkdir(parents=True)
    (root / "maps").mkdir()
    stored = np.zeros((32, 48, 3), np.uint8)  # stored 48 wide: left half red, right half blue
    stored[:, :24, 0], stored[:, 24:, 2] = 230, 230
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn 90 degrees clockwise to show it (the left half goes on top)
    Image.fromarray(stored).save(root / "images" / "a.jpg", exif=exif, quality=95)
    rgba = np.random.default_rng(0).integers(0, 256, (40, 56, 4), dtype=np.uint8)
    rgba[:, :20, 3] = 0  # the left part fully transparent: white, as on a page
    Image.fromarray(rgba).save(root / "images" / "b.png")
    for name, seed in (("a", 1), ("b", 2)):  # class maps of 45 x 61, in the toy palette, as palette PNGs
        classes = np.kron(np.random.default_rng(seed).integers(0, 4, (9, 12)), np.ones((5, 5), np.int64))[:, :61]
        seg = Image.fromarray(classes.astype(np.uint8), "P")
        seg.putpalette(PALETTES["toy"].flatten().tolist())
        seg.save(root / "maps" / f"{name}.png")
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_files(tmp_path_factory.mktemp("images"))


def write_models(root):
    torch.manual_seed(0)
    vqgan_checkpoint.save_pretrained(vqgan.VQGAN(vqgan.CONFIGS["toy"]), root / "vqgan")  # 32x32 -> 16 codes of 512
    args = dict(dim=32, n_layers=1, n_heads=2, hidden_dim=64, vocab_size=512, max_seq_len=64)
    torch.save({"model": Transformer(ModelArgs(**args)).state_dict(), "model_args": args}, root / "ckpt.pt")


def test_exif_orientation_transparency_and_map_colours_survive_reading(files):
    photo = read_image(files / "images" / "a.jpg", 32).astype(int)
    assert photo[:12, :, 0].mean() > 200 > photo[:12, :, 2].mean()  # turned: red on top
    assert photo[-12:, :, 2].mean() > 200 > photo[-12:, :, 0].mean()
    rgba = read_image(files / "images" / "b.png", 32)
    assert (rgba[:, :2] == 255).all()  # transparent pixels (left of the centre crop) are white
    for name in ("a", "b"):  # resized 45x61 -> 32x32 by nearest neighbour: no colour outside the palette
        colours = {tuple(c) for c in read_annotation(files / "maps" / f"{name}.png", 32).reshape(-1, 3)}
        assert colours <= {tuple(c) for c in PALETTES["toy"]} and len(colours) > 1
    smooth = square(Image.open(files / "maps" / "a.png").convert("RGB"), 32, Image.BILINEAR)
    assert {tuple(c) for c in smooth.reshape(-1, 3)} - {tuple(c) for c in PALETTES["toy"]}, \
        "a smooth resize would have blended the map's colours (the test must be able to fail)"


@pytest.mark.decoder
@pytest.mark.tokenizer
def test_token_files_and_sample_prompts_read_a_file_into_the_same_codes(files, monkeypatch):
    write_models(files)
    tokenize_data.main(["pairs", "--images", str(files / "images"), "--annotations", str(files / "maps"),
                        "--vqgan", str(files / "vqgan"), "--out", str(files / "tokens"), "--name", "pairs",
                        "--num_workers", "0", "--device", "cpu"])
    rows = torch.from_numpy(load_tokens(files / "tokens" / "pairs").tokens.astype(np.int64))  # a, a map, b, b map
    assert rows.shape == (4, 16)

    prompts = []  # what reaches generation

    def recording_generate(model, prompt, new, *args, **kwargs):
        prompts.append(prompt.cpu())
        return torch.cat([prompt, prompt[:, :new]], 1)

    monkeypatch.setattr(sample, "generate", recording_generate)
    sample.main(["--model", str(files / "ckpt.pt"), "--vqgan", str(files / "vqgan"), "--out_dir",
                 str(files / "out"), "--prompt", str(files / "images" / "a.jpg"), str(files / "maps" / "a.png"),
                 "--query", str(files / "images" / "b.png")])
    assert torch.equal(prompts[0], rows[:3].reshape(1, -1))  # "image, map" then the query: the codes of the file
