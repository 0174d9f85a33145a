"""
The paper's scaling and sampling studies in miniature, the long video, and a probe beyond the
paper, on the toy world: `python run_toy.py --ablation NAME` runs one. Each study gets the output
folder, run_toy's profile, the demo's stage-2 model folder and `toy`, run_toy's pipeline
(train_models, evaluate_models, summary_rows, markdown, run: passed in, so that imports point one
way), and returns (Markdown text, results, pictures).

    scale       Table 6: three model sizes at one budget, and stage 1 four times as long
    sampling    Figure 6: temperature, top-k and the number of prompt pairs
    long-video  Figure 12: a clip continued to four times the context with the sliding window
    mapping     a mapping only the prompt shows (a palette per group of pictures), learned in
                context, beside the demo's recognition of a trained task
"""
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

import evaluate
import vqgan
from infra import vqgan_checkpoint
from infra.checkpoint import load_model
from infra.images import save_panels, save_plot


def _models(out, p, model_dir):
    device = torch.device(p["device"])
    return (vqgan_checkpoint.load_pretrained(out / "vqgan", device),
            load_model(model_dir / "ckpt.pt", device))


def scale(out, p, _demo, toy):
    """Table 6 in miniature: three model sizes with the same steps and sequences (one budget of
    tokens), and the middle size with stage 1 four times as long. Held-out loss, one-shot mIoU and
    video PSNR of each."""
    steps, s1 = p["ablation_stage2_steps"], p["stage1"]["max_steps"]
    variants = {f"{size}, stage 1 x1": dict(size=size, tag="" if size == p["size"] else f"-{size}")
                for size in p["scale_sizes"]}
    variants[f"{p['size']}, stage 1 x4"] = dict(size=p["size"], tag="-x4", stage1_steps=4 * s1)
    models = {}
    for name, v in variants.items():
        stage1, models[name] = toy.train_models(out, p, size=v["size"], stage1_tag=v["tag"],
                                            stage2_tag=f"-ab-nat-disc{v['tag']}",
                                            stage2_steps=steps,
                                            stage1_steps=v.get("stage1_steps"))
        v["stage1_val"] = json.loads((stage1 / "metrics.jsonl").read_text()
                                     .splitlines()[-1]).get("val_loss")
        v["params"] = load_model(models[name] / "ckpt.pt", "cpu").num_params() / 1e6
    results = toy.evaluate_models(out, models, p, in_context=())
    rows = toy.summary_rows(results)
    names, ours = list(models), rows[:len(models)]
    plots = [save_plot(names, {"held-out sequence loss": [r["seq_loss"] for r in ours],
                               "stage-1 held-out loss": [variants[n]["stage1_val"] for n in names]},
                       out / "scale_loss.png", "model", 520, y_range=(0, 4), unit="",
                       title="held-out loss (nats)"),
             save_plot(names, {"one-shot mIoU (%)": [r["seg_miou"] for r in ours]},
                       out / "scale_miou.png", "model", 520, title="segmentation"),
             save_plot(names, {"model (dB)": [r["video_psnr"] for r in ours],
                               "repeat last frame": [rows[-2]["video_psnr"]] * len(ours)},
                       out / "scale_video.png", "model", 520, y_range=(10, 35), unit="",
                       title="video PSNR, 11 frames")]
    text = toy.markdown(rows, "Table 6 in miniature: model size and stage-1 length") + (
        f"\nStage 2: {steps} steps of the recipe's mixture for every model; stage 1: {s1} steps "
        f"(x1) or {4 * s1} (x4). Stage-1 held-out loss and parameters: " + "; ".join(
            f"{n}: {variants[n]['stage1_val']:.3f} nats, {variants[n]['params']:.2f} M"
            for n in names) + ".\n")
    return text, dict(results=results, variants=variants), [save_panels(plots,
                                                                        out / "scale.png")]


def sampling(out, p, demo, toy):
    """Figure 6 in miniature: temperature, top-k and prompt pairs swept one at a time from the
    paper's setting (temperature 1, top-k 100, one pair), on segmentation -> image (PSNR, FID*) and
    on segmentation (mIoU). The model: stage 2 as the demo's, but on Table 5's mixture with
    "annotation, image" pairs too (the demo's recipe never teaches segmentation -> image)."""
    model_dir = toy.train_models(out, p, mix=toy.MIXTURES["natural+generative+discriminative"],
                                 stage2_tag="-sampling")[1]
    vq, model = _models(out, p, model_dir)
    sweeps = {"temperature": [0.1, 0.4, 0.7, 1.0],
              "top_k": [10, 30, 100, vq.config["num_embeddings"]], "prompt_pairs": [1, 2, 4, 6]}
    base, cache, table = dict(temperature=1.0, top_k=100, prompt_pairs=1), {}, {}
    for knob, values in sweeps.items():
        for v in values:
            setting = dict(base, **{knob: v})
            key = tuple(setting.values())
            if key not in cache:
                cfg = evaluate.EvalConfig(limit=p["queries"], prompt_split="train", **setting)
                generation = evaluate.eval_generation(model, vq, out / "world", cfg)["model"]
                segmentation = evaluate.eval_segmentation(model, vq, out / "world", cfg)["model"]
                cache[key] = dict(fid=generation["fid"], psnr=generation["psnr"],
                                  miou=segmentation["miou"])
            table.setdefault(knob, []).append(cache[key])
    plots, lines = [], ["### Figure 6 in miniature: sampling and prompts", ""]
    top = max(x["fid"] for r in table.values() for x in r)
    axes = {"miou": ("segmentation mIoU (%)", {}),
            "psnr": ("seg.->image PSNR (dB)", dict(y_range=(0, 30), unit="")),
            "fid": ("seg.->image FID* (lower is better)",
                    dict(y_range=(0, 1.2 * top or 1.0), unit=""))}
    for row, (label, axis) in axes.items():  # the paper's figure: a panel per knob, a row each
        for knob, values in sweeps.items():
            plots.append(save_plot(values, {label: [x[row] for x in table[knob]]},
                                   out / f"sampling_{row}_{knob}.png", knob, 360, title=knob,
                                   **axis))
    for knob, values in sweeps.items():
        r = table[knob]
        cells = lambda key, d: " | ".join(f"{x[key]:.{d}f}" for x in r)
        lines += [f"| {knob} | " + " | ".join(map(str, values)) + " |",
                  "|---" * (len(values) + 1) + "|",
                  f"| segmentation mIoU (%) ↑ | {cells('miou', 1)} |",
                  f"| seg.→image FID* ↓ | {cells('fid', 3)} |",
                  f"| seg.→image PSNR (dB) ↑ | {cells('psnr', 2)} |", ""]
    text = "\n".join(lines) + (
        f"\n{p['queries']} held-out queries per point, the other two knobs at temperature 1, "
        "top-k 100, one prompt pair. The model: stage 2 of the demo's length on videos and both "
        "orders of the pairs (natural:2, generative:1, discriminative:2). *FID with a small random "
        "feature network: compare points.\n")
    return text, table, [save_panels(plots, out / "sampling.png", columns=3)]


def long_video(out, p, demo, toy):
    """Figure 12 in miniature: held-out clips continued from 5 frames to four times the model's
    context (16 frames), the window sliding image by image; PSNR per frame against repeating the
    last frame, the copyable cells right, and the frames."""
    frames, world = 4 * 16, out / "world-long"
    toy.run([sys.executable, str(toy.ROOT / "toy" / "toyworld.py"), "--out", str(world), "--seed", "0",
             "--num_images=0", "--num_val_images=0", "--num_videos=0",
             f"--num_val_videos={p['long_videos']}", f"--frames={frames}"], world)
    vq, model = _models(out, p, demo)
    cfg = evaluate.EvalConfig(clip_frames=frames, out=str(out / "eval_long_video"),
                              grid_frame_step=3, grid_rows=6)
    r = evaluate.eval_video(model, vq, world, cfg)
    m, last = r["model"], r["repeat_last"]
    ticks = [t + 6 if t % 8 == 2 else "" for t in range(frames - 5)]
    plots = [save_plot(ticks, {"model (dB)": m["psnr_per_frame"],
                               "repeat the last frame (dB)": last["psnr_per_frame"]},
                       out / "long_video_psnr.png", "frame (1-5: prompt; past 16: beyond the "
                       "context)", 640, y_range=(10, 40), unit="", title="PSNR per frame"),
             save_plot(ticks, {"copyable cells right (%)": m["copyable_right_per_frame"]},
                       out / "long_video_copy.png", "frame", 640, title="copyable cells")]
    spans = {"frames 6-16": (0, 11), "17-32": (11, 27), "33-64": (27, frames - 5),
             "all": (0, frames - 5)}
    mean = lambda v, a, b: sum(v[a:b]) / (b - a)
    text = (f"### Figure 12 in miniature: {r['queries']} held-out clips continued from 5 frames "
            f"to {frames} (four contexts)\n\n| | " + " | ".join(spans) + " |\n"
            + "|---" * (len(spans) + 1) + "|\n")
    for name, values, d in (("model PSNR (dB)", m["psnr_per_frame"], 2),
                            ("repeat the last frame (dB)", last["psnr_per_frame"], 2),
                            ("copyable cells right (%)", m["copyable_right_per_frame"], 1)):
        text += f"| {name} | " + " | ".join(f"{mean(values, a, b):.{d}f}"
                                           for a, b in spans.values()) + " |\n"
    text += ("\nPaper protocol (temperature 1, top-k 100). Picture: every third frame, the truth "
             "above the sampled clip.\n")
    frames_picture = Path(r["grid"]).replace(out / "long_video_frames.png")
    return text, r, [save_panels(plots, out / "long_video.png"), frames_picture]


def mapping(out, p, demo, toy):
    """In-context learning of a mapping only the prompt shows: the demo's model fine-tuned further
    on videos and per-group palette segmentation, scored on held-out palettes with 1, 2, 4 and 7
    prompt pairs, beside the demo model's recognition curve (a trained task)."""
    # a further fine-tune of the demo's model: it already answers an image with its map, cell by
    # cell; what it must learn here is to take the colours from the prompt
    learner = toy.train_models(out, p, stage2_tag="-mapping", stage2_steps=p["mapping_steps"],
                               pairs=("recoloured",), stage2_init=demo)[1]
    vq, model = _models(out, p, learner)
    cfg = evaluate.EvalConfig(limit=min(200, 8 * p["queries"]), out=str(out / "eval_mapping"))
    learned = evaluate.eval_mapping(model, vq, out / "world", cfg)
    demo_model = _models(out, p, demo)[1]
    untrained = evaluate.eval_mapping(demo_model, vq, out / "world", replace(cfg, out=None))
    ks = learned["prompt_pairs"]
    recognition = evaluate.eval_curve(demo_model, vq, out / "world",
                                      evaluate.EvalConfig(limit=p["queries"], prompt_split="train"),
                                      counts=ks)
    plot = save_plot(ks, {"learning (new palettes)": learned["miou"],
                          "recognition (trained task)": recognition["miou"],
                          "demo model, new palettes": untrained["miou"],
                          "shown": learned["shown"], "oracle": [learned["oracle"]] * len(ks)},
                     out / "mapping_curve.png", "prompt pairs", 620,
                     title="segmentation mIoU (%)")
    row = lambda name, v: f"| {name} | " + " | ".join(f"{x:.1f}" for x in v) + " |"
    four = ks.index(4) if 4 in ks else -1
    text = "\n".join([
        "### In-context learning of a mapping only the prompt shows", "",
        "| prompt pairs | " + " | ".join(map(str, ks)) + " |", "|---" * (len(ks) + 1) + "|",
        row("classes the prompt shows (% of shape pixels)", learned["shown"]),
        row("**learning**: mIoU on held-out palettes (%)", learned["miou"]),
        row("its answer-token accuracy (%)", learned["token_accuracy"]),
        row("the demo's model on held-out palettes", untrained["miou"]),
        row("**recognition**: the demo's model, fixed palette", recognition["miou"]), "",
        f"Oracle (the truth's VQ-GAN round trip read by the palette): {learned['oracle']:.1f}% "
        f"mIoU. Learning, 1 to {ks[four]} pairs: {learned['miou'][four] - learned['miou'][0]:+.1f} "
        f"points; at {ks[four]} pairs {100 * learned['miou'][four] / learned['oracle']:.0f}% of "
        f"the oracle. {learned['queries']} held-out queries, greedy answers (recognition: "
        f"{recognition['queries']} queries, temperature 1, top-k 100). The learner: the demo's "
        f"model fine-tuned {p['mapping_steps']} more steps, half videos, half recoloured pairs of "
        "one palette group each.", ""])
    return (text, dict(learning=learned, demo_model=untrained, recognition=recognition),
            [plot, learned["grid"]])


STUDIES = {"scale": scale, "sampling": sampling, "long-video": long_video, "mapping": mapping}
