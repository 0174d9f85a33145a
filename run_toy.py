"""
The whole LVM-Lite method on the toy world, one command:

    toy world -> VQ-GAN -> tokens -> stage 1 (single images) -> stage 2 (sequences)
        -> in-context evaluation

    python run_toy.py               # 6-12 minutes on a 2-core CPU; on a GPU if there is one
                                    # (a larger profile)
    python run_toy.py --quick       # a minute or two: the same pipeline at tiny budgets (tests)
    python run_toy.py --ablation pretrain   # Table 4 in miniature: single-image vs random-sequence
                                            # stage 1
    python run_toy.py --ablation finetune   # Table 5 in miniature: fine-tuning mixtures
    python run_toy.py --ablation scale      # Table 6 in miniature: model size and stage-1 length
    python run_toy.py --ablation sampling   # Figure 6 in miniature: temperature, top-k, prompts
    python run_toy.py --ablation long-video # Figure 12 in miniature: 4x the context, sliding window
    python run_toy.py --ablation mapping    # learning a mapping only the prompt shows (per-group
                                            # palettes), beside the demo's task recognition
    python run_toy.py --ablation scale --docs docs   # also copy the tables and pictures to docs/

Every ablation reuses what the demo trained (the same folder), training only its own variants.
Each step runs the project's own script (printed before it starts) and leaves a `.done` marker in
its folder, so an interrupted run, started again with the same command, skips what is finished and
resumes the step it was in (the training scripts resume from their checkpoints). Everything goes to
--out (default out/toy, out/toy-quick or out/toy-gpu). Results: OUT/results.md (the tables) and
OUT/results.json; pictures: OUT/eval_*/*.png.
"""
import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from infra import distributed
import evaluate
from toy import toyworld
import vqgan
from infra import vqgan_checkpoint
from infra.checkpoint import load_model

ROOT = Path(__file__).resolve().parent  # the repository: each step runs its script from here

# Budgets in steps, not minutes, so runs are repeatable. "cpu" fits 15 minutes on the slower 2-core
# machines (about 6.5 on the faster ones); "gpu" is meant for 10 minutes on one H100.
# the recipe's stage-2 mixture: half videos, half "image, annotation" pairs of the five tasks
RECIPE_MIX = "natural:1,discriminative:1"
PROFILES = {
    "cpu": dict(device="cpu", size="tiny",
                world=dict(num_images=10000, num_val_images=200, num_videos=1000,
                           num_val_videos=100, frames=20),
                vqgan=dict(max_steps=200, batch_size=16),
                stage1=dict(max_steps=200, batch_size=128),
                stage2=dict(max_steps=2400, batch_size=8), mix=RECIPE_MIX,
                queries=96, videos=100, ablation_stage2_steps=600, num_samples=8,
                scale_sizes=("micro", "tiny", "mini"), mapping_steps=4500, long_videos=32),
    "gpu": dict(device="cuda", size="small",
                world=dict(num_images=40000, num_val_images=200, num_videos=4000,
                           num_val_videos=100, frames=20),
                vqgan=dict(max_steps=400, batch_size=64),
                stage1=dict(max_steps=1000, batch_size=512, lr=1e-3),
                stage2=dict(max_steps=3000, batch_size=64, lr=1e-3, min_lr=1e-4),
                mix=RECIPE_MIX,
                queries=192, videos=100, ablation_stage2_steps=1000, num_samples=8,
                scale_sizes=("tiny", "small", "small"), mapping_steps=6000, long_videos=100),
    # the demo scaled down until it fits a CI run (about 2 minutes here) and still learns in
    # context: the test that in-context learning beats its baselines runs it
    "ci": dict(device="cpu", size="tiny",
               world=dict(num_images=2000, num_val_images=60, num_videos=200,
                          num_val_videos=16, frames=20),
               vqgan=dict(max_steps=100, batch_size=16), stage1=dict(max_steps=100, batch_size=64),
               stage2=dict(max_steps=800, batch_size=8), mix=RECIPE_MIX,
               queries=32, videos=16, ablation_stage2_steps=100, num_samples=0,
               scale_sizes=("micro", "tiny", "mini"), mapping_steps=100, long_videos=2),
    "quick": dict(device="cpu", size="tiny",
                  world=dict(num_images=300, num_val_images=40, num_videos=20,
                             num_val_videos=6, frames=20),
                  vqgan=dict(max_steps=20, batch_size=16), stage1=dict(max_steps=30, batch_size=32),
                  stage2=dict(max_steps=20, batch_size=8, probe_sequences=4), mix=RECIPE_MIX,
                  queries=4, videos=4, ablation_stage2_steps=10, num_samples=2,
                  scale_sizes=("micro", "tiny", "mini"), mapping_steps=10, long_videos=2),
}
# the photo world (toy/photoworld.py, --photos): the same steps and the toy codec's layout (16
# tokens per 32x32 picture); budgets of its own, and a quarter of stage 2 on videos, not half: the
# pairs gain from every extra step, while the videos teach as much at a quarter as at half
PHOTO_MIX = "natural:1,discriminative:3"
PHOTO_PROFILES = {
    "cpu": {**PROFILES["cpu"], "mix": PHOTO_MIX,
            "vqgan": dict(max_steps=200, batch_size=16, num_embeddings=512)},
    "gpu": {**PROFILES["gpu"], "mix": PHOTO_MIX,
            "vqgan": dict(max_steps=400, batch_size=64, num_embeddings=2048)},
    "ci": {**PROFILES["ci"], "mix": PHOTO_MIX,
           "vqgan": dict(max_steps=100, batch_size=16, num_embeddings=512)},
    "quick": {**PROFILES["quick"], "mix": PHOTO_MIX,
              "world": dict(num_images=200, num_val_images=24, num_videos=16, num_val_videos=6,
                            frames=20)},
}
# Table 5's rows: which sequence kinds stage 2 mixes, with what weights
# ("natural+discriminative" is the recipe)
MIXTURES = {"natural": "natural:1", "generative": "generative:1",
            "discriminative": "discriminative:1",
            "natural+discriminative": RECIPE_MIX,
            "natural+generative+discriminative": "natural:2,generative:1,discriminative:2",
            "all + random": "natural:2,generative:1,discriminative:2,random:1"}
TASKS = tuple(toyworld.TASKS)  # the toy world's five tasks, all in stage 2


def run(cmd, done_dir, resumable=None):
    """Run one step unless done_dir/.done says it finished; resume its own checkpoint if it was
    interrupted."""
    done = Path(done_dir) / ".done"
    if done.exists():
        print(f"[run_toy] done already: {done_dir}")
        return
    if resumable and Path(resumable).exists():
        cmd = cmd + ["--resume"]
    print("[run_toy] $ " + " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    Path(done_dir).mkdir(parents=True, exist_ok=True)
    done.write_text(f"{time.time() - t0:.1f} seconds\n")


def flags(settings):
    return [f"--{k}={v}" for k, v in settings.items()]


def train_models(out, p, random_stage1=False, mix=None, stage1_tag="", stage2_tag="",
                 stage2_steps=None, size=None, stage1_steps=None, pairs=TASKS, stage2_init=None):
    """Toy world, tokenizer, tokens (shared by every variant), then stage 1 and stage 2 of one
    variant (its own size, stage-1 steps, stage-2 steps, mixture, pair files; stage 2 starts from
    its stage 1, or from stage2_init)."""
    py, world, vq, tok = sys.executable, out / "world", out / "vqgan", out / "tokens"
    maker = [str(ROOT / "toy" / "toyworld.py")]
    if "photos" in p:  # the photo world: from its folder, or the packages' sample photos
        maker = [str(ROOT / "toy" / "photoworld.py")] + (["--photos", p["photos"]] if p["photos"]
                                                          else [])
    # redone if cut
    run([py] + maker + ["--out", str(world), "--seed", "0"] + flags(p["world"]), world)
    # a patch codec, started from PCA and k-means of the patches: a few hundred steps of
    # fine-tuning suffice
    run([py, str(ROOT / "tools" / "vqgan_train.py"), "--data", str(world / "train"),
         "--val_data", str(world / "val"),
         "--config", "toy", "--out_dir", str(vq), "--rec_loss=l2", "--lr=1e-3", "--restart_every=0",
         "--warmup_steps=20", f"--device={p['device']}"] + flags(p["vqgan"]),
        vq, vq / "training_state.pt")
    run([py, str(ROOT / "tokenize_data.py"), "toyworld", "--root", str(world), "--vqgan", str(vq),
         "--out", str(tok), "--device", p["device"]], tok)
    common = [f"--size={size or p['size']}", f"--device={p['device']}", f"--vqgan={vq}",
              "--log_interval=50", f"--num_samples={p['num_samples']}"]
    s1, s2 = out / f"stage1{stage1_tag}", out / f"stage2{stage2_tag}"
    stage1 = {**p["stage1"], "max_steps": stage1_steps or p["stage1"]["max_steps"]}
    stage2 = {**p["stage2"], "max_steps": stage2_steps or p["stage2"]["max_steps"]}
    # stage 1: single images of 16 tokens (the paper), or for Table 4's baseline random 16-image
    # sequences with as many tokens per step (16x fewer sequences)
    per_seq = 16 if random_stage1 else 1
    stage1["batch_size"] = max(1, stage1["batch_size"] // per_seq)
    run([py, str(ROOT / "pretrain.py"), "--stage=pretrain-toy", f"--images_per_seq={per_seq}",
         f"--data={tok}/train_images", f"--val_data={tok}/val_images", f"--out_dir={s1}",
         f"--eval_interval={stage1['max_steps']}", f"--micro_batch_size={stage1['batch_size']}"]
        + flags(stage1) + common, s1, s1 / "ckpt.pt")
    # stage 2 on videos and the five tasks of the same images (pairs); the single images serve only
    # Table 5's random sequences (each kind draws from files of its own kind)
    names = ("video",) + tuple(pairs) + ("images",)
    seq_data = ",".join(f"{tok}/train_{n}" for n in names)
    val_data = ",".join(f"{tok}/val_{n}" for n in names)
    run([py, str(ROOT / "finetune.py"), "--stage=finetune-toy", f"--init_from={stage2_init or s1}",
         f"--data={seq_data}",
         f"--val_data={val_data}", f"--mix={mix or p['mix']}", f"--out_dir={s2}",
         f"--eval_interval={max(1, stage2['max_steps'] // 4)}", "--eval_iters=8",
         f"--micro_batch_size={stage2['batch_size']}"]
        + flags(stage2) + common, s2, s2 / "ckpt.pt")
    return s1, s2


def evaluate_models(out, models, p, in_context=("stage 1 + stage 2 (LVM-Lite)",)):
    """The paper's protocols (evaluate.py) on the held-out split, for each model; the task and curve
    checks for the models named in in_context. Returns {name: results}."""
    device = torch.device(p["device"])
    vq = vqgan_checkpoint.load_pretrained(out / "vqgan", device)
    results = {}
    for name, path in models.items():
        model = load_model(path / "ckpt.pt", device)
        pictures = out / ("eval_" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))
        cfg = evaluate.EvalConfig(limit=p["queries"], out=str(pictures), prompt_split="train")
        seq = evaluate.EvalConfig(limit=min(32, p["queries"]), seed=1)
        print(f"[run_toy] evaluating {name}", flush=True)
        results[name] = {
            "segmentation": evaluate.eval_segmentation(model, vq, out / "world", cfg),
            "video": evaluate.eval_video(model, vq, out / "world", replace(cfg, limit=p["videos"])),
            "generation": evaluate.eval_generation(model, vq, out / "world", cfg),
            # held-out next-token loss on stage 2's kinds of sequence (16 images each)
            "perplexity": {k: evaluate.eval_perplexity(model, out / "tokens" / f"val_{k}", seq)
                           for k in ("video",) + TASKS},
        }
        if name in in_context:
            results[name]["tasks"] = evaluate.eval_tasks(model, vq, out / "world", cfg)
            results[name]["curve"] = evaluate.eval_curve(model, vq, out / "world", cfg)
    return results


def summary_rows(results):
    """One row per model and baseline: mIoU in %, PSNR in dB, loss in nats."""
    rows = []
    for name, r in results.items():
        seq_loss = [m["loss"] for pr in r["perplexity"].values() for kind, m in pr["model"].items()
                    if kind in ("natural", "discriminative")]
        video = r["video"]["model"]
        rows.append(dict(model=name, seg_miou=r["segmentation"]["model"]["miou"],
                         video_psnr=video["psnr"], video_first=video["psnr_per_frame"][0],
                         gen_psnr=r["generation"]["model"]["psnr"],
                         gen_fid=r["generation"]["model"]["fid"],
                         seq_loss=sum(seq_loss) / len(seq_loss)))
    first = next(iter(results.values()))
    rows.append(dict(model="VQ-GAN round trip of the truth (upper bound)",
                     seg_miou=first["segmentation"]["gt_rec"]["miou"],
                     video_psnr=first["video"]["gt_rec"]["psnr"],
                     gen_psnr=first["generation"]["gt_rec"]["psnr"],
                     gen_fid=first["generation"]["gt_rec"]["fid"]))
    last = first["video"]["repeat_last"]
    rows.append(dict(model="repeat the last prompt frame", video_psnr=last["psnr"],
                     video_first=last["psnr_per_frame"][0]))
    rows.append(dict(model="background everywhere (class 0)",
                     seg_miou=first["segmentation"]["first_class"]["miou"]))
    return rows


def markdown(rows, title):
    cols = [("seg_miou", "segmentation mIoU (%) ↑", 1),
            ("video_psnr", "video PSNR, 11 frames (dB) ↑", 2),
            ("video_first", "video PSNR, 1st frame (dB) ↑", 2),
            ("gen_psnr", "seg.→image PSNR (dB) ↑", 2), ("gen_fid", "seg.→image FID* ↓", 1),
            ("seq_loss", "held-out sequence loss ↓", 3)]
    lines = [f"### {title}", "", "| model | " + " | ".join(c[1] for c in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        cells = [f"{r[k]:.{d}f}" if r.get(k) is not None else "-" for k, _, d in cols]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pick_profile(a):
    if a.quick:
        return "quick"
    return a.profile or ("gpu" if torch.cuda.is_available() else "cpu")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="tiny budgets: a few minutes (CI); the same as --profile quick")
    ap.add_argument("--profile", choices=list(PROFILES),
                    help="budgets (default: gpu if there is one, else cpu)")
    from toy.studies import STUDIES
    ap.add_argument("--ablation", choices=["pretrain", "finetune"] + list(STUDIES),
                    help="Table 4, 5 or 6, Figure 6 or 12 in miniature, or the mapping probe")
    ap.add_argument("--docs", help="also copy the tables and pictures to this folder (e.g. docs)")
    ap.add_argument("--out", help="output folder (default out/toy, out/toy-quick or out/toy-gpu; "
                                  "with --photos out/photos...)")
    ap.add_argument("--photos", nargs="?", const="", metavar="DIR",
                    help="the method on photos (toy/photoworld.py): a folder of "
                         "JPEG / PNG / WebP, or none for the sample photos of scikit-image")
    a = ap.parse_args(argv)
    if a.quick and a.profile not in (None, "quick"):
        ap.error(f"--quick is --profile quick; drop one of --quick and --profile {a.profile}")
    profile = pick_profile(a)
    p = PROFILES[profile] if a.photos is None else {**PHOTO_PROFILES[profile], "photos": a.photos}
    if a.photos is not None and a.ablation:
        ap.error("--ablation runs on the toy world; drop --photos")
    if p["device"] == "cuda" and not torch.cuda.is_available():
        ap.error("--profile gpu needs a CUDA GPU; use --profile cpu")
    if p["device"] == "cpu":  # the same bits every run, here and in each step's process
        distributed.repeatable_cpu_math()
    world_name = "toy" if a.photos is None else "photos"
    default_out = f"out/{world_name}" if profile == "cpu" else f"out/{world_name}-{profile}"
    out = Path(a.out or default_out)
    for flag, folder in (("--out", out), ("--docs", a.docs)):  # checked before hours of work
        if folder and Path(folder).exists() and not Path(folder).is_dir():
            ap.error(f"{flag} {folder} is a file; pass a folder")
    if a.photos is not None and not (out / "world" / ".done").exists():
        from toy import photoworld  # bad photos: one line, nothing written
        try:
            photoworld.find_photos(a.photos or None)
        except photoworld.PhotoError as e:
            sys.exit(f"error: {e}")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if a.ablation in STUDIES:  # the studies of toy/studies.py, on the demo's models
        demo = None if a.ablation == "scale" else train_models(out, p)[1]
        text, results, pictures = STUDIES[a.ablation](out, p, demo, sys.modules[__name__])
        wall = time.time() - t0
        text += (f"\n{profile} profile, wall time {wall / 60:.1f} min in this run (steps finished "
                 "by an earlier run are not counted).\n")
        publish(out, a.ablation, text, dict(results=results, wall_seconds=wall, profile=profile),
                pictures, a.docs)
        return
    # both stage-1 variants see the same number of tokens, then the same stage 2
    if a.ablation == "pretrain":
        steps = p["ablation_stage2_steps"]
        models = {
            "single-image stage 1": train_models(out, p, stage2_tag="-ab-nat-disc",
                                                 stage2_steps=steps)[1],
            "random-sequence stage 1": train_models(out, p, random_stage1=True,
                                                    stage1_tag="-randseq", stage2_tag="-randseq",
                                                    stage2_steps=steps)[1]}
        title = ("Table 4 in miniature: stage 1 on single images vs on random 16-image sequences "
                 "(same tokens)")
        seconds = {k: float((out / d / ".done").read_text().split()[0]) for k, d in
                   (("single", "stage1"), ("random", "stage1-randseq"))}
        notes = (f"Stage-1 wall time: single images {seconds['single']:.0f} s, "
                 f"random 16-image sequences {seconds['random']:.0f} s: "
                 f"{seconds['random'] / seconds['single']:.2f}x speedup. ")
    elif a.ablation == "finetune":  # Table 5: every row starts from the same stage 1
        models = {name: train_models(out, p, mix=mix, stage2_tag=f"-ab-{tag}",
                                     stage2_steps=p["ablation_stage2_steps"])[1]
                  for (name, mix), tag in zip(MIXTURES.items(), ("nat", "gen", "disc", "nat-disc",
                                                                 "all", "all-rand"))}
        title = ("Table 5 in miniature: stage-2 mixtures "
                 "(natural / generative / discriminative / random)")
        notes = ""
    else:
        stage1, stage2 = train_models(out, p)
        models = {"stage 1 only": stage1, "stage 1 + stage 2 (LVM-Lite)": stage2}
        title = ("In-context tasks on held-out toy data" if a.photos is None else
                 "In-context tasks on held-out photos (" + json.loads(
                     (out / "world" / "meta.json").read_text())["source"] + ")")
        notes = ""
    train_seconds = time.time() - t0
    results = evaluate_models(out, models, p)
    rows = summary_rows(results)
    wall = time.time() - t0
    text = markdown(rows, title) + (
        f"\n{notes}{profile} profile, wall time {wall / 60:.1f} min in this run "
        f"({train_seconds / 60:.1f} min before evaluation; steps finished by an earlier run are "
        "not counted). *FID with a small random feature network (toy scale): compare rows, not "
        "with the paper.\n")
    for model_name, r in results.items():
        for k in ("tasks", "curve"):
            if k in r:
                text += f"\n#### {model_name}: " + {"tasks": "the prompt chooses the task",
                                                     "curve": "the in-context curve"}[k] + "\n\n"
                text += evaluate.markdown_table([r[k]], model_name)
    demo = results.get("stage 1 + stage 2 (LVM-Lite)")
    if demo:
        text += "\n" + video_frames(demo["video"], "stage 1 + stage 2 (LVM-Lite): the video, "
                                                    "frame by frame")
    for model_name, r in results.items():  # the per-protocol tables, in the paper's layout
        for k in ("segmentation", "video", "generation"):
            text += "\n" + evaluate.markdown_table([r[k]], model_name)
    # the pictures of the in-context model(s) (the demo: stage 1 + stage 2)
    pictures = [r[k]["grid"] for r in results.values() if "tasks" in r
                for k in ("segmentation", "video", "generation", "tasks")]
    pictures += [r["curve"]["plot"] for r in results.values() if "curve" in r]
    publish(out, a.ablation, text, dict(rows=rows, results=results, wall_seconds=wall,
                                        profile=profile), pictures, a.docs,
            prefix=world_name, summary=text.split("\n\n#### ")[0].split("\n\n| Model")[0])


def publish(out, ablation, text, record, pictures, docs=None, summary=None, prefix="toy"):
    """OUT/results[-ABLATION].md and .json; with docs, they and the pictures also go there as
    toy_results[-ABLATION].md, .json and toy_NAME.png."""
    name = f"results{'-' + ablation if ablation else ''}"
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(record, indent=1, default=str))
    print("\n" + (summary or text))
    print(f"tables: {out / (name + '.md')}")
    for picture in pictures:
        print(f"picture: {picture}")
    if docs:
        Path(docs).mkdir(parents=True, exist_ok=True)
        for suffix in (".md", ".json"):
            shutil.copy(out / f"{name}{suffix}", Path(docs) / f"{prefix}_{name}{suffix}")
        for picture in map(Path, filter(None, pictures)):
            # segmentation_toy.png -> toy_segmentation.png, generation_toy_segmentation.png ->
            # toy_generation.png
            stem = re.sub(r"_toy(_segmentation)?$", "", picture.stem)
            shutil.copy(picture, Path(docs) / f"{prefix}_{stem}.png")
        print(f"copied to {docs}/")


def video_frames(video, title):
    """The video protocol frame by frame: PSNR of the model and of repeating the last frame, and the
    share of the copyable cells the model got right."""
    m, last = video["model"], video["repeat_last"]
    frames = range(len(m["psnr_per_frame"]))
    line = lambda name, values, d: f"| {name} | " + " | ".join(f"{v:.{d}f}" for v in values) + " |"
    return "\n".join([
        f"#### {title}", "", "| predicted frame | " + " | ".join(str(t + 6) for t in frames) + " |",
        "|---" * (len(frames) + 1) + "|", line("model PSNR (dB)", m["psnr_per_frame"], 1),
        line("repeat the last frame (dB)", last["psnr_per_frame"], 1),
        line("copyable cells right (%)", m["copyable_right_per_frame"], 1),
        line("cells copyable (%)", m["copyable_share_per_frame"], 0), "",
        "Copyable: a cell some prompt frame already showed, pixel for pixel; right: its sampled "
        "code is the truth's (paper protocol: temperature 1, top-k 100).", ""])

if __name__ == "__main__":
    main()
