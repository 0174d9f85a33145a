"""The two training stages on CPU: settings, schedule, data order, learning, exact resume, checkpoints, errors,
logs and sample grids, and stage 2 starting from stage 1."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import data as data_files
import finetune
import pretrain
import train
from bench import train as bench_train
from data import discriminative_sequence, load_tokens
from infra.checkpoint import load_model
from infra.settings import TrainingError, parse_config
from train import learning_rate

FIXTURES = Path(__file__).resolve().parent / "fixtures"
VOCAB, S = 128, 16  # the fixture VQ-GAN's codebook; 64x64 images at f16 -> 4x4 = 16 tokens


def write_tokens(prefix, tokens, kind="images", groups=None):
    """Token files as tokenize_data.py writes them: raw uint16 rows + JSON metadata."""
    tokens = np.asarray(tokens, dtype=np.uint16)
    tokens.tofile(f"{prefix}.tokens")
    meta = dict(kind=kind, tokens_per_image=tokens.shape[1], num_images=len(tokens), image_size=64,
                vocab_size=VOCAB, groups=groups or [], sources=["test"], skipped=[], tokenizer="test")
    Path(f"{prefix}.json").write_text(json.dumps(meta))
    return str(prefix)


def toy_images(n, seed=0):
    """Learnable images: a random first token, then each row of 4 tokens one step further along the codebook."""
    base = np.random.default_rng(seed).integers(0, VOCAB - 4, size=(n, 1))
    return base + np.arange(S)[None] // 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokens")
    video = toy_images(64, seed=2)
    return dict(
        images=write_tokens(d / "images", toy_images(256, seed=0)),
        val=write_tokens(d / "val", toy_images(32, seed=1)),
        video=write_tokens(d / "video", video, "video", [[i * 8, 8] for i in range(8)]),
        pairs=write_tokens(d / "pairs", np.stack([video, (video + 1) % VOCAB], 1).reshape(-1, S), "pairs",
                           [[0, 128]]))


def tiny(out_dir, data, *extra):
    return ["--size=tiny", "--stage=pretrain-toy", f"--tokens_per_image={S}", "--batch_size=8",
            "--micro_batch_size=8", "--max_steps=6", "--warmup_steps=2", "--log_interval=1", "--eval_interval=3",
            "--eval_iters=1", "--num_samples=0", "--device=cpu", "--export_hf=false", f"--out_dir={out_dir}",
            f"--data={data['images']}", f"--val_data={data['val']}", *extra]


def losses(out_dir, key="loss"):
    return [r[key] for r in map(json.loads, (Path(out_dir) / "metrics.jsonl").read_text().splitlines())
            if key in r]


def test_defaults_are_table8_and_every_value_is_overridable():
    c = parse_config([], train.SETTINGS)
    assert (c.lr, c.min_lr, c.warmup_steps, c.max_steps, c.batch_size) == (1.5e-4, 1.5e-5, 2000, 125112, 8192)
    assert (c.beta1, c.beta2, c.weight_decay, c.images_per_seq * c.tokens_per_image) == (0.9, 0.95, 0.1, 256)
    f = parse_config([], finetune.SETTINGS)
    assert (f.lr, f.min_lr, f.warmup_steps, f.batch_size, f.images_per_seq * f.tokens_per_image) == \
        (1.5e-5, 1.5e-6, 0, 512, 4096)
    c = parse_config(["--size", "tiny", "--lr=2e-3", "--compile=false", "--resume", "--stage=pretrain-toy"], train.SETTINGS)
    assert (c.size, c.lr, c.compile, c.resume, c.tokens_per_image) == ("tiny", 2e-3, False, True, 16)


def test_unknown_setting_is_rejected_with_a_hint(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(["--weight_decy=0.1"], train.SETTINGS)
    assert e.value.code != 0
    assert "unknown setting '--weight_decy=0.1'; did you mean --weight_decay" in capsys.readouterr().err


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    c = parse_config([], train.SETTINGS)
    schedule = lambda step, c: learning_rate(step, c.lr, c.min_lr, c.warmup_steps, c.max_steps)
    assert schedule(0, c) == pytest.approx(1.5e-4 / 2000)
    assert schedule(1999, c) == pytest.approx(1.5e-4)
    middle = 2000 + (125112 - 2000) // 2
    assert schedule(middle, c) == pytest.approx((1.5e-4 + 1.5e-5) / 2, rel=1e-4)
    assert schedule(125112, c) == pytest.approx(1.5e-5)
    f = parse_config([], finetune.SETTINGS)
    assert schedule(0, f) == pytest.approx(1.5e-5)  # no warm-up in stage 2


@pytest.mark.data
def test_targets_are_the_next_tokens_and_the_last_position_is_ignored():
    inputs, targets = train.micro_batches(np.arange(8).reshape(2, 4), accum=2)
    assert [a.tolist() for a in inputs] == [[[0, 1, 2, 3]], [[4, 5, 6, 7]]]
    assert [a.tolist() for a in targets] == [[[1, 2, 3, -1]], [[5, 6, 7, -1]]]
    tokens = np.arange(24).reshape(4, 6)
    for accum in (1, 4):  # any number of micro-batches: the same rows, in order
        inputs, targets = train.micro_batches(tokens, accum)
        assert len(inputs) == len(targets) == accum and all(a.shape == (4 // accum, 6) for a in targets)
        assert np.array_equal(np.concatenate(inputs), tokens)
        assert np.array_equal(np.concatenate(targets)[:, :-1], tokens[:, 1:]) and (np.concatenate(targets)[:, -1] == -1).all()


@pytest.mark.data
def test_each_process_reads_its_own_slice_of_the_batch_and_token_ids_are_checked():
    stream = lambda first, count: np.arange(first, first + count)[:, None].repeat(3, 1)  # sequence i: i, i, i
    ranks = [train.rank_batch(stream, 40, 4, SimpleNamespace(rank=r), vocab_size=100) for r in range(2)]
    assert [b[:, 0].tolist() for b in ranks] == [[40, 41, 42, 43], [44, 45, 46, 47]]
    with pytest.raises(TrainingError, match="(?i)vocabulary"):
        train.rank_batch(stream, 98, 4, SimpleNamespace(rank=0), vocab_size=100)


@pytest.mark.data
def test_images_are_read_once_per_epoch_and_ranks_read_different_images(data):
    tokens = data_files.open_token_files(data["images"], S)
    get = data_files.image_stream(tokens, 1, seed=0)
    rank0, rank1 = get(0, 4), get(4, 4)  # one step of 8 sequences split over two ranks
    assert not {r.tobytes() for r in rank0} & {r.tobytes() for r in rank1}
    epoch = get(0, 256)
    rows = {r.tobytes() for r in tokens[0].tokens.astype(np.int64)}
    assert {r.tobytes() for r in epoch} == rows and len(np.unique(epoch, axis=0)) == len(rows)
    assert np.array_equal(get(3, 2), epoch[3:5])  # sequence i does not depend on who asks, or when
    assert not np.array_equal(get(256, 8), epoch[:8])  # the next epoch is shuffled anew


@pytest.mark.decoder
@pytest.mark.data
def test_loss_falls_on_toy_tokens(tmp_path, data):
    pretrain.main(tiny(tmp_path, data, "--max_steps=40", "--eval_interval=40", "--log_interval=5", "--lr=3e-3"))
    train = losses(tmp_path)
    assert train[0] > 5.5 and train[-1] < train[0] - 1.5, train  # from about ln(512) = 6.2
    assert losses(tmp_path, "val_loss")[-1] < train[0] - 1.0


@pytest.mark.decoder
@pytest.mark.data
def test_resumed_run_repeats_the_unbroken_run_step_for_step(tmp_path, data):
    accumulate = "--micro_batch_size=4"  # 2 micro-batches per step
    pretrain.main(tiny(tmp_path / "unbroken", data, accumulate))
    pretrain.main(tiny(tmp_path / "broken", data, accumulate, "--stop_at=3"))
    assert torch.load(tmp_path / "broken" / "ckpt.pt", weights_only=True)["step"] == 3
    pretrain.main(tiny(tmp_path / "broken", data, accumulate, "--resume"))
    assert len(losses(tmp_path / "unbroken")) == 6
    assert losses(tmp_path / "broken") == losses(tmp_path / "unbroken")  # bitwise
    assert losses(tmp_path / "broken", "val_loss") == losses(tmp_path / "unbroken", "val_loss")


@pytest.mark.decoder
@pytest.mark.data
def test_checkpoint_holds_what_resuming_needs_and_loads_weights_only(tmp_path, data):
    pretrain.main(tiny(tmp_path, data, "--max_steps=3"))
    ckpt = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "step", "model_args", "config", "rng", "data_position"} <= set(ckpt)
    assert ckpt["step"] == 3 and ckpt["data_position"] == 3 * 8 and ckpt["config"]["lr"] == 1e-3
    assert not (tmp_path / "ckpt.pt.tmp").exists()
    model = load_model(tmp_path / "ckpt.pt")  # sample.py reads it as is
    assert torch.equal(model.output.weight, ckpt["model"]["output.weight"])


@pytest.mark.decoder
@pytest.mark.data
def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data):
    pretrain.main(tiny(tmp_path, data, "--max_steps=3"))
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit, match=r"loss became nan .* last good checkpoint .*step 3\) is untouched"):
        pretrain.main(tiny(tmp_path, data, "--resume", "--lr=inf", "--min_lr=inf"))  # weights become inf/nan
    assert (tmp_path / "ckpt.pt").read_bytes() == before


@pytest.mark.decoder
@pytest.mark.data
def test_bad_inputs_stop_with_a_clear_message(tmp_path, data):
    with pytest.raises(SystemExit, match="cannot read the token files .*missing"):
        pretrain.main(tiny(tmp_path, data, f"--data={tmp_path / 'missing'}"))
    (tmp_path / "broken.tokens").write_bytes(b"\0" * 64)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(SystemExit, match="cannot read the token files .*broken"):
        pretrain.main(tiny(tmp_path, data, f"--data={tmp_path / 'broken'}"))
    big = write_tokens(tmp_path / "big", np.full((8, S), 600))  # ids beyond tiny's 512-token vocabulary
    with pytest.raises(SystemExit, match="token id 600 is outside the model's vocabulary"):
        pretrain.main(tiny(tmp_path, data, f"--data={big}"))
    with pytest.raises(SystemExit, match="has 16 tokens per image but the stage expects 64"):
        pretrain.main(tiny(tmp_path, data, "--tokens_per_image=64"))
    with pytest.raises(SystemExit, match="not a multiple of micro_batch_size"):
        pretrain.main(tiny(tmp_path, data, "--micro_batch_size=3"))
    with pytest.raises(SystemExit, match="no checkpoint at"):
        pretrain.main(tiny(tmp_path / "nothing", data, "--resume"))


@pytest.mark.decoder
@pytest.mark.data
def test_resuming_with_another_model_size_is_refused(tmp_path, data):
    pretrain.main(tiny(tmp_path, data, "--max_steps=1"))
    with pytest.raises(SystemExit, match=r"holds a different model: dim=128 \(asked: 1024\)"):
        pretrain.main(tiny(tmp_path, data, "--resume", "--size=300M"))


@pytest.mark.decoder
@pytest.mark.data
@pytest.mark.inference
def test_metrics_sample_grid_and_hugging_face_export(tmp_path, data):
    pretrain.main(tiny(tmp_path, data, "--max_steps=3", "--num_samples=2", "--export_hf=true",
                       f"--vqgan={FIXTURES / 'muse_vqgan_tiny'}"))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in records)
    assert "val_loss" in records[-1] and records[-1]["tokens_per_s"] > 0 and records[-1]["mfu"] is None
    # 2 rows x (true image, completion), decoded to 64x64 pixels, 2 px apart, scaled x2 to at least 128 px
    assert Image.open(tmp_path / "samples_000003.png").size == (2 * (2 * 64 + 2), 2 * (2 * 64 + 2))
    exported = load_model(tmp_path / "hf")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in exported.state_dict().items())


@pytest.mark.decoder
@pytest.mark.data
@pytest.mark.inference
def test_sample_grid_without_vqgan_shows_token_ids(tmp_path, data):
    pretrain.main(tiny(tmp_path, data, "--max_steps=3", "--num_samples=3"))
    # 3 rows x 2 pictures of 4x4 token colours, 2 px apart, scaled x32 to at least 128 px
    assert Image.open(tmp_path / "samples_000003.png").size == (32 * (2 * 4 + 2), 32 * (3 * 4 + 4))


@pytest.mark.data
def test_mixture_draws_each_kind_from_its_data_in_proportion(data):
    datasets = data_files.open_token_files(",".join([data["video"], data["pairs"], data["images"]]), S)
    mix = finetune.parse_mix("natural:3,generative:1,random:0")
    assert mix == {"natural": 3.0, "generative": 1.0}
    get = data_files.sequence_stream(datasets, mix, images_per_seq=4, seed=0)
    batch = get(0, 400)
    assert batch.shape == (400, 4 * S) and np.array_equal(get(10, 3), batch[10:13])
    annotation_first = (batch[:, S] - batch[:, 0]) % VOCAB == VOCAB - 1  # generative: annotation (+1), image
    assert 0.18 < annotation_first.mean() < 0.32  # 1/4 of the sequences
    with pytest.raises(TrainingError, match="no file of --data is of kind images"):
        data_files.sequence_stream(datasets[:2], {"random": 1.0}, 4, 0)
    with pytest.raises(TrainingError, match="unknown sequence kind 'videos'"):
        finetune.parse_mix("videos:1")


@pytest.mark.decoder
@pytest.mark.data
@pytest.mark.parametrize("source", ["ckpt", "hf"])
def test_finetune_starts_from_stage1_weights(tmp_path, data, source):
    pretrain.main(tiny(tmp_path / "stage1", data, "--max_steps=2", "--export_hf=true"))
    init = tmp_path / "stage1" / ("hf" if source == "hf" else "ckpt.pt")
    finetune.main(["--stage=finetune-toy", f"--init_from={init}", f"--tokens_per_image={S}", "--images_per_seq=4",
                   "--batch_size=4", "--micro_batch_size=2", "--max_steps=1", "--lr=0", "--min_lr=0",
                   "--eval_iters=1", "--num_samples=0", "--device=cpu", f"--out_dir={tmp_path / 'stage2'}",
                   f"--data={data['video']},{data['pairs']}", "--export_hf=false"])
    stage1 = torch.load(tmp_path / "stage1" / "ckpt.pt", weights_only=True)["model"]
    stage2 = torch.load(tmp_path / "stage2" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(stage1[k], stage2[k]) for k in stage1)  # lr 0: the weights it started from


@pytest.mark.decoder
@pytest.mark.data
@pytest.mark.inference
def test_finetune_logs_in_context_accuracy_by_number_of_prompt_pairs(tmp_path, data):
    pretrain.main(tiny(tmp_path / "stage1", data, "--max_steps=1"))
    finetune.main(["--stage=finetune-toy", f"--init_from={tmp_path / 'stage1'}", f"--tokens_per_image={S}",
                   "--batch_size=2", "--micro_batch_size=2", "--max_steps=4", "--eval_interval=2", "--eval_iters=1",
                   "--num_samples=0", "--device=cpu", f"--out_dir={tmp_path / 'stage2'}", "--export_hf=false",
                   "--mix=discriminative:1", f"--data={data['pairs']}"])
    logged = [r for r in map(json.loads, (tmp_path / "stage2" / "metrics.jsonl").open()) if "in_context" in r]
    assert [r["step"] for r in logged] == [2, 4]  # with every evaluation
    accuracy = logged[-1]["in_context"]["pairs"]  # the annotation name, or "pairs" when the file has none
    assert list(accuracy) == ["0", "1", "2", "4", "7"] and all(0 <= v <= 100 for v in accuracy.values())


@pytest.mark.data
def test_in_context_probe_prompts_k_pairs_then_the_query_and_scores_the_answer_after_them(data, monkeypatch):
    """With generate replaced by an oracle that knows the held-out sequences: every prompt is pairs 0..k-1 then
    the image of pair k, k = 0, 1, 2, 4, 7, and answering the annotation of pair k scores 100%."""
    held_out = load_tokens(data["pairs"])
    rng = np.random.default_rng([0, 2])  # the probe's own draw of held-out sequences (seed 0)
    truth = torch.from_numpy(np.stack([discriminative_sequence(held_out, rng, 8) for _ in range(3)]))
    S, prompts = truth.shape[1] // 16, []

    def oracle(model, prompt, new, **kwargs):
        prompts.append(prompt.shape[1] // S)
        assert torch.equal(prompt, truth[:, :prompt.shape[1]])  # the sequences' own beginning
        return truth[:, :prompt.shape[1] + new]

    monkeypatch.setattr(finetune, "generate", oracle)
    model = SimpleNamespace(output=SimpleNamespace(weight=torch.zeros(1)))  # the probe asks only its device
    scores = finetune.in_context_probe([held_out], seed=0, num_sequences=3)(model)
    assert prompts == [2 * k + 1 for k in (0, 1, 2, 4, 7)]  # k pairs, then the query image
    assert scores == {"pairs": {str(k): 100.0 for k in (0, 1, 2, 4, 7)}}


@pytest.mark.decoder
@pytest.mark.data
def test_finetune_resumes_from_its_own_checkpoint_without_init_from(tmp_path, data):
    pretrain.main(tiny(tmp_path / "stage1", data, "--max_steps=1"))
    common = ["--stage=finetune-toy", f"--tokens_per_image={S}", "--images_per_seq=4", "--batch_size=4",
              "--micro_batch_size=4", "--max_steps=2", "--eval_iters=1", "--num_samples=0", "--device=cpu",
              "--log_interval=1", f"--out_dir={tmp_path / 'stage2'}", f"--data={data['video']}", "--mix=natural:1",
              "--export_hf=false"]
    finetune.main(common + [f"--init_from={tmp_path / 'stage1'}", "--stop_at=1"])
    finetune.main(common + ["--resume"])
    assert [r["step"] for r in map(json.loads, (tmp_path / "stage2" / "metrics.jsonl").open())] == [1, 2]


@pytest.mark.decoder
@pytest.mark.data
def test_finetune_needs_stage1_weights_of_the_asked_size(tmp_path, data):
    with pytest.raises(SystemExit, match="pass --init_from"):
        finetune.main([f"--data={data['video']}", "--device=cpu"])
    pretrain.main(tiny(tmp_path, data, "--max_steps=1"))
    with pytest.raises(SystemExit, match="is not --size=300M"):
        finetune.main([f"--init_from={tmp_path}", "--size=300M", f"--data={data['video']}", "--device=cpu"])


@pytest.mark.decoder
@pytest.mark.data
def test_speed_benchmark_reports_tokens_per_second(tmp_path, capsys):
    bench_train.main(["--size=tiny", "--device=cpu", "--seq_lens=32", "--micro_batch_sizes=2", "--steps=3",
                      "--warmup=1", f"--out_dir={tmp_path}"])
    assert "tiny at 32 tokens, micro-batch 2: " in capsys.readouterr().out.splitlines()[-1]
