"""
The whole LVM-Lite method on the toy world, one command, on a laptop CPU:

    toy world -> VQ-GAN -> tokens -> stage 1 (single images) -> stage 2 (sequences) -> in-context evaluation

    python run_toy.py               # about 15 minutes on a 2-core CPU; prints the tables and the picture paths
    python run_toy.py --quick       # a minute or two: the same pipeline, tiny budgets (what CI runs)
    python run_toy.py --ablation pretrain   # Table 4 in miniature: single-image vs random-sequence stage 1
    python run_toy.py --ablation finetune   # Table 5 in miniature: fine-tuning mixtures

Each step runs the project's own script (printed before it starts) and leaves a `.done` marker in its folder, so
an interrupted run, started again with the same command, skips what is finished and resumes the step it was in
(the training scripts resume from their checkpoints). Everything goes to --out (default out/toy or out/toy-quick).
Results: OUT/results.md (the tables) and OUT/results.json; pictures: OUT/eval_*/*.png.
"""
import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import evaluate
import vqgan
from sample import load_model

# Budgets, chosen so the full run fits 15 minutes on a 2-core CPU. Steps, not minutes, so runs are repeatable.
PROFILES = {
    "full": dict(world=dict(num_images=2000, num_val_images=200, num_videos=120, num_val_videos=30, frames=20),
                 vqgan=dict(max_steps=800, batch_size=16, warmup_steps=50), stage1=dict(max_steps=300, batch_size=32),
                 stage2=dict(max_steps=440, batch_size=4), eval_limit=48, ablation_stage2_steps=160, num_samples=8),
    "quick": dict(world=dict(num_images=200, num_val_images=40, num_videos=12, num_val_videos=6, frames=20),
                  vqgan=dict(max_steps=40, batch_size=16), stage1=dict(max_steps=30, batch_size=16),
                  stage2=dict(max_steps=20, batch_size=4), eval_limit=4, ablation_stage2_steps=10, num_samples=2),
}
# Table 5's rows: which sequence kinds stage 2 mixes (equal weights)
MIXTURES = {"natural": "natural:1", "generative": "generative:1", "discriminative": "discriminative:1",
            "natural+generative+discriminative": "natural:1,generative:1,discriminative:1",
            "all + random": "natural:1,generative:1,discriminative:1,random:1"}


def run(cmd, done_dir, resumable=None):
    """Run one step unless done_dir/.done says it finished; resume its own checkpoint if it was interrupted."""
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


def train_models(out, p, random_stage1=False, mix=MIXTURES["natural+generative+discriminative"], stage1_tag="",
                 stage2_tag="", stage2_steps=None):
    """Toy world, tokenizer, tokens (shared by every variant), then stage 1 and stage 2 of one variant."""
    py, world, vq, tok = sys.executable, out / "world", out / "vqgan", out / "tokens"
    run([py, "toyworld.py", "--out", str(world), "--seed", "0"]  # an unfinished world is simply made again
        + [f"--{k}={v}" for k, v in p["world"].items()], world)
    # Squared error and a high learning rate, so the flat class colours of the maps survive the round trip (L1 left
    # blue triangles greenish at this budget: ceiling 0.32 vs 0.86 mIoU after 400 steps). No dead-code restarts:
    # they re-seed codes where latents are densest, black background, until one flat black patch has ~140 synonym
    # codes (6.4 bits the decoder ignores but the decoder-only model must predict); without them, 4.4 bits.
    run([py, "vqgan.py", "--data", str(world / "train"), "--val_data", str(world / "val"), "--config", "toy",
         "--out_dir", str(vq), "--rec_loss=l2", "--lr=3e-3", "--restart_every=0"]
        + [f"--{k}={v}" for k, v in p["vqgan"].items()],
        vq, vq / "training_state.pt")
    run([py, "tokenize_data.py", "toyworld", "--root", str(world), "--vqgan", str(vq), "--out", str(tok)], tok)
    common = ["--size=tiny", "--device=cpu", f"--vqgan={vq}", "--log_interval=20",
              f"--num_samples={p['num_samples']}"]
    s1, s2 = out / f"stage1{stage1_tag}", out / f"stage2{stage2_tag}"
    stage2 = {**p["stage2"], "max_steps": stage2_steps or p["stage2"]["max_steps"]}
    # stage 1: single images of 64 tokens (the paper), or for Table 4's baseline random 16-image sequences with
    # as many tokens per step (16x fewer sequences)
    per_seq = 16 if random_stage1 else 1
    batch = max(1, p["stage1"]["batch_size"] // per_seq)
    run([py, "pretrain.py", "--stage=pretrain-toy", f"--images_per_seq={per_seq}", f"--data={tok}/train_images",
         f"--val_data={tok}/val_images", f"--out_dir={s1}", f"--eval_interval={p['stage1']['max_steps']}",
         f"--max_steps={p['stage1']['max_steps']}", f"--batch_size={batch}", f"--micro_batch_size={batch}"]
        + common, s1, s1 / "ckpt.pt")
    # stage 2 on the kinds of sequence the evaluation asks about: videos and (image, segmentation) pairs; edges and
    # depth pairs would take two thirds of the pair sequences away from segmentation at this budget. The single
    # images serve only Table 5's random sequences (each kind draws from files of its own kind).
    seq_data = ",".join(f"{tok}/train_{n}" for n in ("video", "segmentation", "images"))
    val_data = ",".join(f"{tok}/val_{n}" for n in ("video", "segmentation", "images"))
    run([py, "finetune.py", "--stage=finetune-toy", f"--init_from={s1}", f"--data={seq_data}",
         f"--val_data={val_data}", f"--mix={mix}", f"--out_dir={s2}", f"--eval_interval={stage2['max_steps']}"]
        + common + [f"--{k}={v}" for k, v in stage2.items()]
        + [f"--micro_batch_size={p['stage2']['batch_size']}"], s2, s2 / "ckpt.pt")
    return s1, s2


def evaluate_models(out, models, p):
    """The paper's protocols (evaluate.py) on the held-out split, for each model; returns {name: results}."""
    vq = vqgan.load_pretrained(out / "vqgan")
    results = {}
    for name, path in models.items():
        model = load_model(path / "ckpt.pt")
        pictures = out / ("eval_" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))
        cfg = evaluate.EvalConfig(limit=p["eval_limit"], out=str(pictures), prompt_split="train")
        seq = evaluate.EvalConfig(limit=p["eval_limit"], seed=1)
        print(f"[run_toy] evaluating {name}", flush=True)
        results[name] = {
            "segmentation": evaluate.eval_segmentation(model, vq, out / "world", cfg),
            "video": evaluate.eval_video(model, vq, out / "world", cfg),
            "generation": evaluate.eval_generation(model, vq, out / "world", cfg),
            # held-out next-token loss on stage 2's kinds of sequence (16 images each)
            "perplexity": {k: evaluate.eval_perplexity(model, out / "tokens" / f"val_{k}", seq)
                           for k in ("video", "segmentation")},
        }
    return results


def summary_rows(results):
    """One row per model with the numbers issue 8 asks for (mIoU in %, PSNR in dB, loss in nats)."""
    rows = []
    for name, r in results.items():
        seq_loss = {f"{k}/{kind}": m["loss"] for k, pr in r["perplexity"].items() for kind, m in pr["model"].items()}
        rows.append(dict(model=name, seg_miou=r["segmentation"]["model"]["miou"],
                         video_psnr=r["video"]["model"]["psnr"], gen_psnr=r["generation"]["model"]["psnr"],
                         gen_fid=r["generation"]["model"]["fid"], seq_loss=sum(seq_loss.values()) / len(seq_loss)))
    first = next(iter(results.values()))
    rows.append(dict(model="VQ-GAN round trip of the truth (upper bound)",
                     seg_miou=first["segmentation"]["gt_rec"]["miou"], video_psnr=first["video"]["gt_rec"]["psnr"],
                     gen_psnr=first["generation"]["gt_rec"]["psnr"], gen_fid=first["generation"]["gt_rec"]["fid"]))
    rows.append(dict(model="repeat the last prompt frame", video_psnr=first["video"]["repeat_last"]["psnr"]))
    rows.append(dict(model="background everywhere (class 0)", seg_miou=first["segmentation"]["first_class"]["miou"]))
    return rows


def markdown(rows, title):
    cols = [("seg_miou", "segmentation mIoU (%) ↑", 1), ("video_psnr", "video PSNR (dB) ↑", 2),
            ("gen_psnr", "seg.→image PSNR (dB) ↑", 2), ("gen_fid", "seg.→image FID* ↓", 1),
            ("seq_loss", "held-out sequence loss ↓", 3)]
    lines = [f"### {title}", "", "| model | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        cells = [f"{r[k]:.{d}f}" if r.get(k) is not None else "-" for k, _, d in cols]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny budgets: a minute or two (CI)")
    ap.add_argument("--ablation", choices=["pretrain", "finetune"], help="Table 4 or Table 5 in miniature")
    ap.add_argument("--out", help="output folder (default out/toy, or out/toy-quick with --quick)")
    a = ap.parse_args()
    profile = "quick" if a.quick else "full"
    p, out = PROFILES[profile], Path(a.out or ("out/toy-quick" if a.quick else "out/toy"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if a.ablation == "pretrain":  # both stage-1 variants see the same number of tokens, then the same stage 2
        steps = p["ablation_stage2_steps"]
        models = {"single-image stage 1": train_models(out, p, stage2_tag="-ab-all", stage2_steps=steps)[1],
                  "random-sequence stage 1": train_models(out, p, random_stage1=True, stage1_tag="-randseq",
                                                          stage2_tag="-randseq", stage2_steps=steps)[1]}
        title = "Table 4 in miniature: stage 1 on single images vs on random 16-image sequences (same tokens)"
        seconds = {k: float((out / d / ".done").read_text().split()[0]) for k, d in
                   (("single", "stage1"), ("random", "stage1-randseq"))}
        notes = (f"Stage-1 wall time: single images {seconds['single']:.0f} s, random 16-image sequences "
                 f"{seconds['random']:.0f} s: {seconds['random'] / seconds['single']:.2f}x speedup. ")
    elif a.ablation == "finetune":  # Table 5: every row starts from the same stage 1
        models = {name: train_models(out, p, mix=mix, stage2_tag=f"-ab-{tag}",
                                     stage2_steps=p["ablation_stage2_steps"])[1]
                  for (name, mix), tag in zip(MIXTURES.items(), ("nat", "gen", "disc", "all", "all-rand"))}
        title = "Table 5 in miniature: stage-2 mixtures (natural / generative / discriminative / random)"
        notes = ""
    else:
        stage1, stage2 = train_models(out, p)
        models = {"stage 1 only": stage1, "stage 1 + stage 2 (LVM-Lite)": stage2}
        title, notes = "In-context tasks on held-out toy data", ""
    train_seconds = time.time() - t0
    results = evaluate_models(out, models, p)
    rows = summary_rows(results)
    name = f"results{'-' + a.ablation if a.ablation else ''}"
    wall = time.time() - t0
    text = markdown(rows, title) + (
        f"\n{notes}{profile} profile, wall time {wall / 60:.1f} min in this run ({train_seconds / 60:.1f} min before "
        "evaluation; steps finished by an earlier run are not counted). *FID with a small random feature network "
        "(toy scale): compare rows, not with the paper.\n")
    for model_name, r in results.items():  # the per-protocol tables, in the paper's layout
        for k in ("segmentation", "video", "generation"):
            text += "\n" + evaluate.markdown_table([r[k]], model_name)
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(dict(rows=rows, results=results, wall_seconds=wall,
                                                      profile=profile), indent=1, default=str))
    print("\n" + markdown(rows, title))
    print(f"wall time {wall / 60:.1f} min; tables: {out / (name + '.md')}")
    for r in results.values():
        for k in ("segmentation", "video", "generation"):
            print(f"picture: {r[k]['grid']}")


if __name__ == "__main__":
    main()
