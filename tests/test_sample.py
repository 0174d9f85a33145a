"""Sampling: the cached loop equals a naive one, top-k / temperature / codebook do what they say, the context window
slides image by image, and the command line writes grids, images and GIFs."""
import inspect

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import vqgan
from infra import vqgan_checkpoint
from bench import sample as bench_sample
from infra.checkpoint import load_model, save_hf
from infra.images import load_image, save_grid, to_uint8
from model import ModelArgs, Transformer
from sample import generate, sample_images, sample_next, window_start
from vqgan import images_to_tokens, tokens_to_images

SMALL = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=100, max_seq_len=48)


def small_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return Transformer(ModelArgs(**{**SMALL, **overrides})).eval().double()  # float64: argmax ties cannot flip


def naive_greedy(model, prompt, new, tokens_per_image=None):
    """Re-run the whole visible context for every token (no cache), dropping whole images past max_seq_len."""
    seq = prompt.clone()
    with torch.no_grad():
        for _ in range(new):
            start = window_start(seq.shape[1], model.args.max_seq_len, tokens_per_image)
            logits = model(seq[:, start:])[0][:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq


def naive_sampled(model, prompt, new, tokens_per_image=None, **sampling):
    """The same re-run loop, each token chosen by sample_next (top-k, temperature, codebook, generator)."""
    seq = prompt.clone()
    with torch.no_grad():
        for _ in range(new):
            start = window_start(seq.shape[1], model.args.max_seq_len, tokens_per_image)
            token = sample_next(model(seq[:, start:])[0][:, -1], **sampling)
            seq = torch.cat([seq, token[:, None]], dim=1)
    return seq


def draws(logits, n, seed=0, **kwargs):
    """n samples from one row of logits, as a frequency vector."""
    gen = torch.Generator().manual_seed(seed)
    tokens = sample_next(logits.expand(n, -1), generator=gen, **kwargs)
    return torch.bincount(tokens, minlength=logits.shape[-1]).double() / n, tokens


@pytest.mark.decoder
@pytest.mark.inference
def test_greedy_cached_generation_equals_naive_rerun():
    model = small_model()
    prompt = torch.randint(0, 100, (3, 7))
    out = generate(model, prompt, 30, temperature=0.0)
    assert out.shape == (3, 37) and torch.equal(out[:, :7], prompt)
    assert torch.equal(out, naive_greedy(model, prompt, 30))
    assert torch.equal(generate(model, prompt, 30, temperature=1e-6), out)  # T -> 0 is greedy


@pytest.mark.decoder
@pytest.mark.inference
def test_seeded_sampled_generation_equals_a_naive_rerun_with_the_same_draws():
    """Top-k at a temperature, within the codebook, sliding past the context: the cached loop draws what a
    naive re-run draws from the same generator, token for token (so every option reaches sample_next)."""
    model = small_model()
    prompt = torch.randint(0, 90, (2, 10))
    sampling = dict(temperature=0.7, top_k=20, codebook_size=90)
    out = generate(model, prompt, 60, tokens_per_image=8, generator=torch.Generator().manual_seed(5), **sampling)
    expected = naive_sampled(model, prompt, 60, 8, generator=torch.Generator().manual_seed(5), **sampling)
    assert torch.equal(out, expected) and out.max() < 90


@pytest.mark.inference
def test_top_k_never_samples_outside_the_k_best():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(1))
    freq, tokens = draws(logits, 20000, top_k=5)
    best = set(logits[0].topk(5).indices.tolist())
    assert set(tokens.unique().tolist()) == best  # every one of the 5 appears, nothing else
    expected = torch.zeros(50, dtype=torch.double)
    expected[list(best)] = torch.softmax(logits[0, list(best)].double(), -1)
    torch.testing.assert_close(freq, expected, rtol=0, atol=0.015)


@pytest.mark.inference
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_reshapes_the_distribution_as_softmax_of_logits_over_t(temperature):
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    freq, _ = draws(logits, 20000, temperature=temperature, top_k=None)
    expected = torch.softmax(logits[0].double() / temperature, -1)
    torch.testing.assert_close(freq, expected, rtol=0, atol=0.015)


@pytest.mark.decoder
@pytest.mark.inference
def test_codes_beyond_the_codebook_are_never_sampled():
    logits = torch.zeros(1, 8292)
    logits[0, 8192:] = 100.0  # LVM's 100 unused slots, made overwhelmingly likely
    _, tokens = draws(logits, 2000, top_k=None, codebook_size=8192)
    assert tokens.max() < 8192
    _, tokens = draws(logits, 2000, top_k=100, codebook_size=8192)
    assert tokens.max() < 8192
    assert sample_next(logits, temperature=0.0, codebook_size=8192).item() < 8192
    model = small_model(vocab_size=120)
    out = generate(model, torch.randint(0, 100, (4, 5)), 40, top_k=None, codebook_size=100)
    assert out.max() < 100
    last = torch.zeros(1, 8292)
    last[0, 8191] = 100.0  # the last image code is one too: it must come out
    assert sample_next(last, temperature=0.0, codebook_size=8192).item() == 8191
    assert (draws(last, 50, top_k=100, codebook_size=8192)[1] == 8191).all()


@pytest.mark.decoder
@pytest.mark.inference
def test_sliding_window_runs_past_the_context_and_matches_a_naive_windowed_rerun():
    model = small_model()  # context 48 tokens = 6 images of 8
    prompt = torch.randint(0, 100, (2, 20))
    out = generate(model, prompt, 60, temperature=0.0, tokens_per_image=8)
    assert out.shape == (2, 80)
    assert torch.equal(out, naive_greedy(model, prompt, 60, tokens_per_image=8))
    long_prompt = torch.randint(0, 100, (1, 70))  # a prompt longer than the context is windowed too
    out = generate(model, long_prompt, 10, temperature=0.0, tokens_per_image=8)
    assert torch.equal(out, naive_greedy(model, long_prompt, 10, tokens_per_image=8))


@pytest.mark.decoder
@pytest.mark.inference
def test_window_drops_whole_images_only():
    assert window_start(48, 48, 8) == 0
    assert window_start(49, 48, 8) == 8  # one token too many: the oldest image goes
    assert window_start(57, 48, 8) == 16
    with pytest.raises(ValueError, match="(?i)tokens_per_image|context|window"):  # what it is about, any words
        generate(small_model(), torch.zeros(1, 40, dtype=torch.long), 20)


@pytest.mark.decoder
@pytest.mark.inference
def test_cache_is_allocated_once_per_call_and_released(monkeypatch):
    model = small_model()
    calls = []
    setup = model.setup_cache
    signature = inspect.signature(setup)  # arguments by name, however they are passed
    monkeypatch.setattr(model, "setup_cache", lambda *a, **k: calls.append(signature.bind(*a, **k).arguments)
                        or setup(*a, **k))
    generate(model, torch.randint(0, 100, (2, 10)), 60, tokens_per_image=8)  # slides 4 times
    # batch 2, a cache of the model's full context: allocated once, never per token
    assert [(c["batch_size"], c["max_seq_len"]) for c in calls] == [(2, 48)]
    assert model.layers[0].attention.kv_cache is None and model.causal_mask is None  # freed after the call


@pytest.mark.fast
def test_compiled_generation_equals_eager_for_each_model_and_shape():
    """One compiled decode step (model and sampling in one graph, guards checked on each call's first
    step) serves several models and batch sizes, token for token as the eager loop."""
    a, b = small_model(0), small_model(1)  # same shapes, other weights: the step must read each one's
    prompt = torch.randint(0, 100, (2, 10))
    for model, batch, temperature in [(a, 2, 0.0), (b, 2, 1.0), (a, 1, 1.0)]:
        run = lambda compile: generate(model, prompt[:batch], 60, temperature, top_k=20, compile=compile,
                                       generator=torch.Generator().manual_seed(3), tokens_per_image=8)
        assert torch.equal(run(compile=True), run(compile=False))
    with torch.compiler.set_stance("fail_on_recompile"):  # other lengths, same shapes: the same compiled step
        for new in (30, 50):
            generate(a, prompt[:1], new, 1.0, top_k=20, compile=True, tokens_per_image=8)


@pytest.mark.decoder
@pytest.mark.inference
def test_seeds_make_batched_samples_reproducible_and_distinct():
    model = small_model()
    prompt = torch.randint(0, 100, (1, 6)).expand(4, -1)
    run = lambda seed: generate(model, prompt, 20, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len({tuple(row.tolist()) for row in a}) == 4  # each row of a batch is its own sample


@pytest.mark.decoder
def test_load_model_reads_checkpoints_with_wrapper_prefixes_and_hf_directories(tmp_path):
    model = small_model().float()
    state = {f"_orig_mod.module.{k}": v for k, v in model.state_dict().items()}  # compiled + DDP names
    torch.save({"model": state, "model_args": SMALL, "iter_num": 3}, tmp_path / "ckpt.pt")
    save_hf(model, tmp_path / "hf")
    idx = torch.randint(0, 100, (1, 12))
    for path in (tmp_path / "ckpt.pt", tmp_path, tmp_path / "hf"):
        loaded = load_model(path)
        with torch.no_grad():
            torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=1e-5)
    assert load_model(tmp_path / "hf", dtype=torch.bfloat16).output.weight.dtype == torch.bfloat16
    with pytest.raises(FileNotFoundError, match="ckpt.pt"):
        load_model(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------------------------------------------
# images and the command line, with a random toy VQ-GAN (32x32 images -> 16 codes of 512)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    torch.manual_seed(0)
    vqgan_checkpoint.save_pretrained(vqgan.VQGAN(vqgan.CONFIGS["toy"]), root / "vqgan")
    args = dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=512, max_seq_len=64)  # 4 images
    save_hf(Transformer(ModelArgs(**{**args, "vocab_size": 600})), root / "hf")  # 600 > 512 codes, as LVM's 8292
    torch.save({"model": Transformer(ModelArgs(**args)).state_dict(), "model_args": args}, root / "ckpt.pt")
    rng = np.random.default_rng(0)
    for i in range(3):  # non-square, off-size inputs: resized and centre-cropped to 32x32
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    for i in range(5):  # pictures the random VQ-GAN gives tokens of their own: a prompt's order can be read back
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"pic{i}.png")
    return root


def tokens_of(toy, files):
    """[n, 16]: the tokens of image files, each image's its own (else the tests could not tell them apart)."""
    tokens = images_to_tokens(vqgan_checkpoint.load_pretrained(toy / "vqgan", device="cpu"),
                              torch.stack([load_image(f, 32) for f in files]))
    assert len(set(map(tuple, tokens.tolist()))) == len(files)
    return tokens


def recording_generate(monkeypatch):
    """sample.generate, recording each call's (prompt, returned sequence)."""
    calls, generate = [], sample.generate

    def recorded(model, prompt, *args, **kwargs):
        seq = generate(model, prompt, *args, **kwargs)
        calls.append((prompt.cpu().clone(), seq.cpu().clone()))
        return seq

    monkeypatch.setattr(sample, "generate", recorded)
    return calls


def recording_model_inputs(monkeypatch):
    """The model the command line loads, recording the (tokens, positions) of each of its forward calls."""
    calls, load = [], sample.load_model

    def load_recorded(*args, **kwargs):
        model = load(*args, **kwargs)
        forward = model.forward
        model.forward = lambda idx, targets=None, input_pos=None: calls.append(
            (idx.cpu().clone(), input_pos.cpu().clone())) or forward(idx, targets, input_pos)
        return model

    monkeypatch.setattr(sample, "load_model", load_recorded)
    return calls


def replay_windows(fed, seq, prompt_len, S, context):
    """Replay generation's forward calls against the sequence it returned, the call of step `cur` predicting token
    cur: each time the window (re)starts, the model is fed the last whole images before cur that fit the context,
    in order, at positions 0, 1, ...; in between, the last token alone at its place in the window. Returns how many
    times the window (re)started."""
    cur, start, starts = prompt_len, None, 0
    for tokens, positions in fed:
        if tokens.shape[1] > 1:  # the window (re)starts
            start, starts = cur - tokens.shape[1], starts + 1
            assert start % S == 0 and (start == 0 or cur - start + S > context)  # the most whole images that fit
            assert torch.equal(positions, torch.arange(cur - start))
            assert torch.equal(tokens, seq[:, start:cur])
        else:
            assert torch.equal(tokens, seq[:, cur - 1:cur]) and positions.tolist() == [cur - 1 - start]
        assert cur - start <= context
        cur += 1
    assert cur == seq.shape[1]
    return starts


def write_video(path, n_frames):
    import av
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 48, 40, "yuv420p"
        for i in range(n_frames):
            pixels = np.full((40, 48, 3), (30 * i) % 256, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())


@pytest.mark.decoder
@pytest.mark.tokenizer
def test_images_tokens_round_trip_shapes(toy):
    tokenizer = vqgan_checkpoint.load_pretrained(toy / "vqgan", device="cpu")
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    tokens = images_to_tokens(tokenizer, images)
    assert tokens.shape == (3, 16) and tokens.dtype == torch.long
    assert torch.equal(images_to_tokens(tokenizer, images.float() / 255), tokens)
    back = tokens_to_images(tokenizer, tokens.view(1, 48), 16)
    assert back.shape == (1, 3, 3, 32, 32) and back.min() >= 0 and back.max() <= 1


@pytest.mark.decoder
@pytest.mark.tokenizer
@pytest.mark.inference
def test_sample_images_for_prompts_and_unconditional(toy):
    tokenizer = vqgan_checkpoint.load_pretrained(toy / "vqgan", device="cpu")
    model = load_model(toy / "hf")
    prompts = torch.randint(0, 256, (2, 3, 3, 32, 32), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    out = sample_images(model, tokenizer, prompts, 2, num_samples=2, generator=gen)  # 5 images > 4 in context
    assert out.shape == (4, 2, 3, 32, 32)
    assert sample_images(model, tokenizer, None, 1, num_samples=3, generator=gen).shape == (3, 1, 3, 32, 32)


def test_save_grid_lays_out_rows_with_blank_cells(tmp_path):
    rows = [[torch.zeros(3, 8, 8), None, torch.ones(3, 8, 8)], [torch.full((3, 8, 8), 255, dtype=torch.uint8)]]
    save_grid(rows, tmp_path / "grid.png", gap=2, min_size=16)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == ((2 * 10 - 2) * 2, (3 * 10 - 2) * 2, 3)  # 2 rows, 3 columns, scaled x2
    assert grid[0, 0].tolist() == [0, 0, 0] and grid[0, -1].tolist() == [255, 255, 255]


@pytest.mark.decoder
@pytest.mark.tokenizer
@pytest.mark.inference
def test_cli_analogy_writes_grid_and_generated_images(toy, tmp_path):
    out = tmp_path / "out"
    sample.main(["--model", str(toy / "hf"), "--vqgan", str(toy / "vqgan"), "--prompt", str(toy / "img0.png"),
                 str(toy / "img1.png"), "--query", str(toy / "img2.png"), "--num_samples", "2", "--top_k", "50",
                 "--out_dir", str(out)])
    grid = Image.open(out / "grid.png")
    assert grid.size == ((5 * 34 - 2) * 4, (2 * 34 - 2) * 4)  # A1 B1 | Q G, two samples, 32px scaled x4
    assert sorted(p.name for p in out.glob("sample*.png")) == ["sample00_00.png", "sample01_00.png"]
    assert Image.open(out / "sample00_00.png").size == (32, 32)


@pytest.mark.decoder
@pytest.mark.tokenizer
@pytest.mark.inference
def test_cli_analogy_prompts_the_pairs_in_order_then_the_query_and_writes_what_follows(toy, tmp_path, monkeypatch):
    calls = recording_generate(monkeypatch)
    files = [toy / f"pic{i}.png" for i in range(5)]  # A1 B1 A2 B2, then the query
    sample.main(["--model", str(toy / "hf"), "--vqgan", str(toy / "vqgan"), "--prompt", *map(str, files[:4]),
                 "--query", str(files[4]), "--num_samples", "2", "--out_dir", str(tmp_path)])
    (prompt, seq), = calls
    assert torch.equal(prompt, tokens_of(toy, files).view(1, -1).expand(2, -1))
    # each sample's image is the tokens that follow the prompt, decoded
    decoded = tokens_to_images(vqgan_checkpoint.load_pretrained(toy / "vqgan", device="cpu"), seq[:, 80:], 16)
    assert seq.shape == (2, 96)
    for i in range(2):
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"sample{i:02d}_00.png")), to_uint8(decoded[i, 0]))


@pytest.mark.decoder
@pytest.mark.tokenizer
@pytest.mark.inference
def test_cli_video_file_continuation_writes_the_new_frames_and_a_gif(toy, tmp_path):
    write_video(tmp_path / "clip.mp4", 8)
    sample.main(["--model", str(toy / "ckpt.pt"), "--vqgan", str(toy / "vqgan"), "--frames",
                 str(tmp_path / "clip.mp4"), "--num_frames", "5", "--num_new", "3", "--out_dir", str(tmp_path)])
    assert len(list(tmp_path.glob("sample00_*.png"))) == 3
    assert Image.open(tmp_path / "sample00.gif").n_frames == 8  # the 5 prompt frames, then the 3 new


@pytest.mark.decoder
@pytest.mark.tokenizer
@pytest.mark.inference
def test_cli_video_continuation_prompts_the_frames_in_time_order_and_slides_by_whole_frames(toy, tmp_path,
                                                                                           monkeypatch):
    """5 frames of 16 tokens and 3 new ones, a 64-token context: from the prompt on, the model always sees the last
    whole frames that fit, in time order, from position 0."""
    frames = tmp_path / "frames"
    frames.mkdir()
    for t in range(5):  # written last frame first: the time order is the names' order
        Image.open(toy / f"pic{4 - t}.png").save(frames / f"{4 - t:02d}.png")
    calls, fed = recording_generate(monkeypatch), recording_model_inputs(monkeypatch)
    sample.main(["--model", str(toy / "ckpt.pt"), "--vqgan", str(toy / "vqgan"), "--frames", str(frames),
                 "--num_new", "3", "--out_dir", str(tmp_path / "out")])
    (prompt, seq), = calls
    assert torch.equal(prompt[0], tokens_of(toy, [toy / f"pic{t}.png" for t in range(5)]).view(-1))
    assert seq.shape == (1, 128)
    assert replay_windows(fed, seq, 80, 16, 64) == 4  # at tokens 80 (the prompt), 81, 97 and 113
    assert Image.open(tmp_path / "out" / "sample00.gif").n_frames == 8


@pytest.mark.decoder
@pytest.mark.inference
def test_cli_unconditional_batches_samples(toy, tmp_path):
    sample.main(["--model", str(toy / "hf"), "--vqgan", str(toy / "vqgan"), "--unconditional", "--num_samples", "3",
                 "--batch_size", "2", "--out_dir", str(tmp_path)])
    assert len(list(tmp_path.glob("sample*_00.png"))) == 3
    assert Image.open(tmp_path / "grid.png").size == (128, (3 * 34 - 2) * 4)


@pytest.mark.decoder
def test_cli_rejects_bad_input_with_one_line(toy, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(["--model", str(toy / "hf"), "--vqgan", str(toy / "vqgan"), "--prompt", str(toy / "img0.png"),
                     "--query", str(toy / "img1.png")])
    assert e.value.code == 2 and "pairs" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no checkpoint at"):
        sample.main(["--model", str(tmp_path / "nope"), "--vqgan", str(toy / "vqgan"), "--unconditional"])


@pytest.mark.decoder
@pytest.mark.inference
def test_sampling_benchmark_agrees_with_transformers_and_reports_speed_floor_and_profile(capsys):
    """The eager loop only: the compiled one reports through the same lines, and equals the eager one token for
    token (test_compiled_generation_equals_eager_for_each_model_and_shape)."""
    bench_sample.main(["--dim=32", "--n_layers=1", "--vocab_size=64", "--prompt_len=8", "--new=8", "--repeats=1",
                       "--profile"])
    out = capsys.readouterr().out
    assert "greedy agreement with transformers over 32 tokens: 100.0%" in out
    for line in ("ours (eager)  ", "ours (eager) / transformers:", "floor: the step's matrix products alone take",
                 "ours (eager), one generate call under the profiler"):
        assert line in out
