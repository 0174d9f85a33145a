"""
Course assignments built from this repository: a student copy in which the functions of an assignment have their
bodies replaced by `raise NotImplementedError`, graded by the project's own tests.

    python course/course.py --list                                   # the assignments
    python course/course.py decoder --out ../lvm-lite-decoder        # a student copy for one assignment (or: all)
    python course/course.py --check decoder                          # its marked tests fail at the task, the others pass

A student copy is a fresh tree (no git history, so no solution to recover) with a handout HANDOUT_<name>.md per
assignment. Grading: `python -m pytest -q -m <name>` in the copy; each test that needs an unfinished function
fails with NotImplementedError("<name>: <what to implement>"), every other test passes. Signatures, docstrings
and the comments of each body are kept; the rest of the code is unchanged.
"""
import argparse
import ast
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository the student copies are made from

# Each assignment: its pytest marker is its key. functions: "file:qualified.name" -> what to implement.
ASSIGNMENTS = {
    "decoder": dict(
        title="The LLaMA decoder: RMSNorm, rotary embeddings, causal attention with a KV cache, SwiGLU",
        paper="2.1 (a decoder-only LLaMA over VQ-GAN tokens); LLaMA's blocks: RMSNorm, RoPE, SwiGLU",
        functions={
            "model.py:RMSNorm.forward": "x / sqrt(mean(x^2) + eps) * weight, computed in float32",
            "model.py:precompute_rope": "the cos/sin tables of rotary embeddings, in the rotate-half layout",
            "model.py:apply_rope": "rotate each pair (x_i, x_{i+d/2}) by its position's angle",
            "model.py:KVCache.update": "write k and v at input_pos into the cache, return the whole cache",
            "model.py:Attention.forward": "causal softmax(q k^T / sqrt(d)) v with RoPE, grouped heads and the "
                                          "key/value cache (generating: the mask says which cache slots each query sees)",
            "model.py:FeedForward.forward": "SwiGLU: w2(silu(w1 x) * w3 x)",
        },
        graded_by="logits equal to transformers' LlamaForCausalLM on the same weights; causality; cached "
                  "decoding equal to the full forward pass",
        milestone="with `data` done too, the toy world's stage-1 loss falls: "
                  "`python run_toy.py --quick` (its stage-1 log)"),
    "tokenizer": dict(
        title="The VQ-GAN tokenizer: nearest-code quantization, straight-through estimator, VQ losses",
        paper="2.1, the first equation: z_q = argmin_k ||z_ij - z_k||",
        functions={
            "vqgan.py:VectorQuantizer.nearest": "the index of the nearest codebook entry of each latent, row-major",
            "vqgan.py:VectorQuantizer.forward": "quantize, the codebook + commitment loss, the straight-through "
                                                "estimator",
        },
        graded_by="the codes of a released-layout checkpoint exactly (tests/fixtures), hand-computed losses, "
                  "gradients that pass straight through",
        milestone="a tokenizer trains on the toy world: `python run_toy.py --quick` prints its held-out PSNR"),
    "data": dict(
        title="The data of the two stages: the sequence builders and the next-token targets",
        paper="2.2 (single images, every one once per epoch), 2.3 (natural, discriminative, generative "
              "sequences), the second equation (the autoregressive loss over m = 1 .. L-1)",
        functions={
            "data.py:epoch_order": "a random order of all images, drawn anew for each epoch",
            "data.py:single_images": "images first .. first+count-1 of the stage-1 stream: each once per epoch",
            "data.py:natural_sequence": "n consecutive frames of one video",
            "data.py:discriminative_sequence": "n 'image, annotation' pairs of one dataset",
            "data.py:generative_sequence": "n 'annotation, image' pairs: the discriminative order inverted",
            "data.py:random_sequence": "n unrelated images (LVM's sequences, the ablation): n images of the stream",
            "train.py:rank_batch": "this process's slice of the step's batch, token ids checked",
            "train.py:micro_batches": "inputs and next-token targets (shifted by one, the last ignored)",
        },
        graded_by="sequences and targets of hand-built token files",
        milestone="with `decoder` done too, the toy world's stage-1 loss falls: "
                  "`python run_toy.py --quick` (its stage-1 log)"),
    "inference": dict(
        title="In-context inference: top-k / temperature sampling with the KV cache, palette read-out, mIoU",
        paper="2.1 (generation: top-K sampling at temperature T), 2.4 and A.2 (prompts; the segmentation "
              "map read by the nearest palette colour; mIoU)",
        functions={
            "sample.py:next_token_probabilities": "softmax(logits / T) over the top-k largest image codes",
            "sample.py:sample_next": "the argmax when T ~ 0, else a draw by the exponential race",
            "sample.py:generate": "prefill the cache, then one token per step; slide the window image by image",
            "metrics.py:colors_to_classes": "the nearest palette colour of each pixel",
            "metrics.py:confusion_matrix": "counts of (true class, predicted class) over the labelled pixels",
            "metrics.py:miou_from_confusion": "mean over the classes present of TP / (TP + FP + FN)",
        },
        graded_by="hand-built logits and maps; greedy cached generation equal to a naive full re-run loop",
        milestone="your own in-context samples: `python run_toy.py --quick`, then `python sample.py` on its "
                  "model (README, the toy world)"),
}


def function_body(tree, qualname):
    """(first line, last line, indent) of the body of function `qualname` (e.g. RMSNorm.forward), after its
    docstring."""
    node, parts = tree, qualname.split(".")
    for part in parts:
        node = next((n for n in ast.iter_child_nodes(node) if isinstance(n, (ast.FunctionDef, ast.ClassDef))
                     and n.name == part), None)
        if node is None:
            raise ValueError(f"{qualname} not found")
    body = node.body[1:] if ast.get_docstring(node) is not None else node.body
    if not body:
        raise ValueError(f"{qualname} has nothing to strip besides its docstring")
    return body[0].lineno, node.end_lineno, body[0].col_offset


def strip(source, functions, assignment):
    """The source with each function's body (not its signature, docstring or full-line comments) replaced by
    `raise NotImplementedError("<assignment>: implement <name>: <what>")`."""
    lines, tree = source.split("\n"), ast.parse(source)
    spans = sorted(((*function_body(tree, name), name, what) for name, what in functions.items()), reverse=True)
    for first, last, indent, name, what in spans:  # from the bottom up, so earlier line numbers stay valid
        comments = [line for line in lines[first - 1:last] if line.strip().startswith("#")]
        message = f"{assignment}: implement {name}: {what}".replace('"', "'")
        lines[first - 1:last] = comments + [" " * indent + f'raise NotImplementedError("{message}")']
    return "\n".join(lines)


def handout(name, a):
    rows = "\n".join(f"| `{f}` | {what} |" for f, what in a["functions"].items())
    return (f"# Assignment `{name}`: {a['title']}\n\nPaper: {a['paper']}.\n\n| function | what to implement |\n"
            f"|---|---|\n{rows}\n\nEach body raises `NotImplementedError` until you write it; signatures, "
            f"docstrings and comments say what it must do.\n\nGrade it: `python -m pytest -q -m {name}` (graded "
            f"by {a['graded_by']}). Every other test passes already.\n\nMilestone: {a['milestone']}.\n")


def repository_files():
    """The repository's files: git's tracked files, or (in a copy without git) every file but caches and outputs."""
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode == 0:
        return listed.stdout.split()
    skip = {"__pycache__", ".pytest_cache", "out", "data"}
    return [str(p.relative_to(ROOT)) for p in sorted(ROOT.rglob("*")) if p.is_file() and not (
        skip & set(p.relative_to(ROOT).parts) or any(part.startswith(".venv") for part in p.parts))]


def make_copy(names, out):
    """Write the student copy for the assignments `names` to out (which must not exist)."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists: choose a new --out")
    files = repository_files()
    for f in files:
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, out / f)
    for name in names:
        by_file = {}
        for spec, what in ASSIGNMENTS[name]["functions"].items():
            file, qualname = spec.split(":")
            by_file.setdefault(file, {})[qualname] = what
        for file, functions in by_file.items():
            (out / file).write_text(strip((out / file).read_text(), functions, name))
        (out / f"HANDOUT_{name}.md").write_text(handout(name, ASSIGNMENTS[name]))
    return out


def check(name):
    """On a fresh student copy for `name`: every test marked `name` fails (or errors in its set-up) with that
    assignment's NotImplementedError, and every other test passes. Tests marked `fast` (the opt-in compiled
    decoding, built on every assignment) are graded by none and left out, and so are the slow tests. Returns the
    seconds each half took."""
    import xml.etree.ElementTree as ET
    with tempfile.TemporaryDirectory() as tmp:
        copy = make_copy([name], Path(tmp) / "copy")

        def run(marks, report):
            t0 = time.time()
            subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", marks, f"--junitxml={report}"], cwd=copy,
                           capture_output=True, text=True)
            cases = list(ET.parse(report).getroot().iter("testcase"))
            outcome = lambda c: next((f"{e.tag}: {e.get('message')}" for e in c if e.tag in ("failure", "error")),
                                     "skipped" if c.find("skipped") is not None else "passed")
            return {f"{c.get('classname')}::{c.get('name')}": outcome(c) for c in cases}, time.time() - t0

        # the default suite's tests (slow ones have their own command and grade no function)
        marked, t_marked = run(f"{name} and not fast and not slow", Path(tmp) / "marked.xml")
        others, t_others = run(f"not {name} and not fast and not slow", Path(tmp) / "others.xml")
    expected = f"NotImplementedError: {name}: implement "
    wrong = [f"  {t}: {o[:200]}" for t, o in marked.items() if expected not in o]
    wrong += [f"  {t}: {o[:200]}" for t, o in others.items() if o != "passed"]
    if not marked or wrong:
        raise SystemExit(f"{name}: {len(wrong)} tests break the rule (marked: fail with its NotImplementedError; "
                         "others: pass):\n" + "\n".join(wrong[:20]))
    print(f"{name}: {len(marked)} marked tests fail with its NotImplementedError ({t_marked:.0f} s); the other "
          f"{len(others)} pass ({t_others:.0f} s)")
    return t_marked, t_others


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("assignment", nargs="?", choices=[*ASSIGNMENTS, "all"], help="what the student copy leaves out")
    p.add_argument("--out", help="folder of the student copy (must not exist)")
    p.add_argument("--list", action="store_true", help="list the assignments")
    p.add_argument("--check", metavar="NAME", choices=[*ASSIGNMENTS, "all"], help="check one assignment (or all)")
    a = p.parse_args(argv)
    if a.check and (a.assignment or a.out):
        p.error("--check NAME grades a copy of its own: give it no assignment and no --out")
    if a.out and not a.assignment:
        p.error("--out is the folder of a student copy: name its assignment, e.g. "
                "python course/course.py data --out DIR")
    if a.list or not (a.assignment or a.check):
        for name, spec in ASSIGNMENTS.items():
            print(f"{name:10s} {spec['title']}\n{'':10s} {', '.join(spec['functions'])}")
        return
    if a.check:
        for name in ASSIGNMENTS if a.check == "all" else [a.check]:
            check(name)
        return
    if not a.out:
        p.error("give --out, the folder for the student copy")
    names = list(ASSIGNMENTS) if a.assignment == "all" else [a.assignment]
    try:
        print(f"wrote {make_copy(names, a.out)}: " + ", ".join(f"HANDOUT_{n}.md" for n in names))
    except FileExistsError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
