#!/usr/bin/env python
"""The tiny VLM's ablation: what each design choice of recipes/tiny/align-vision.yaml is worth, measured.

Each variant is the tiny recipe with one change (`--set` overrides), its questions phase trained for `--steps`
steps (the recipe's 600 by default) from the same pretrained model with the same seed, and scored on the same
600 held-out shapes questions:
  baseline          the recipe: the ViT taught the scenes' labels first (the `cells` stage 0), then frozen; 9
                    tokens per image (16-px patches, mlp projector), last ViT layer, loss on the answer
  random-vit        no stage 0: the questions phase in front of the ViT at its random initialization
  earlier-layer     the projector reads ViT hidden state 1 (after the first block) instead of the last
  pixel-shuffle     8-px patches (36) folded 2 × 2 by pixel_shuffle: 9 tokens again, each from 4 patches
  mlp-36-tokens     8-px patches through the mlp projector: 36 tokens per image
  question-loss     the loss also on the question's tokens (never the image's)
  stage-0-siglip    a SigLIP stage 0 instead (300 steps, captions, ViT against a text tower), then the ViT frozen
  vit-trained       the ViT trained too, at a tenth of the learning rate
  no-vit-mixing     the projector reads hidden state 0: each patch's own embedding, before any attention
Run from the repository root after `make -C recipes/tiny out/pretrain/manifest.json`: `python
benchmarks/vision_ablation.py [--steps N] [--only NAME ...] [--threads T]`; prints a markdown table (accuracy per
question type, tokens per image, seconds per step). Each variant writes recipes/tiny/out/ablation/<steps>-steps/<name>/.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny"
SIGLIP = ('[{name: siglip, objective: siglip, sources: [{kind: shapes, items: 6000, captions: true}], '
          'trainable: {vision_tower: 1.0}, optim: {lr: 1.0e-3, min_lr: 1.0e-4, warmup_steps: 30, weight_decay: 0.0}, '
          'train: {steps: 300, batch_size: 64, seq_len: 64, precision: bf16, log_every: 50, eval_every: 300, '
          'checkpoint_every: 300}}, {QUESTIONS}]')
VARIANTS = {
    "baseline": [],
    "earlier-layer": ["vision.feature_layer=1"],
    "pixel-shuffle": ["vision.encoder.patch_size=8", "vision.projector.kind=pixel_shuffle"],
    "mlp-36-tokens": ["vision.encoder.patch_size=8"],
    "random-vit": ["RANDOM"],
    "question-loss": ["phases[-1].train_on_question=true"],
    "stage-0-siglip": ["SIGLIP"],
    "vit-trained": ["phases[-1].trainable={multi_modal_projector: 1.0, language_model: 1.0, vision_tower: 0.1}"],
    "no-vit-mixing": ["vision.feature_layer=0"],
}


def questions_phase(steps: int) -> str:
    """The recipe's questions phase as flow YAML, with `steps`."""
    import yaml

    phase = yaml.safe_load((TINY / "align-vision.yaml").read_text())["phases"][-1]
    phase["train"]["steps"] = steps
    phase["train"]["eval_every"] = phase["train"]["checkpoint_every"] = steps
    return json.dumps(phase)


def run(name: str, steps: int, threads: int) -> dict:
    out = TINY / "out" / "ablation" / f"{steps}-steps" / name
    sets = [f"run.out={out}", f"phases[-1].train.steps={steps}", f"phases[-1].train.eval_every={steps}",
            f"phases[-1].train.checkpoint_every={steps}"]
    for change in VARIANTS[name]:
        if change == "SIGLIP":
            sets = [f"run.out={out}", "phases=" + SIGLIP.replace("{QUESTIONS}", questions_phase(steps))]
        elif change == "RANDOM":
            sets = [f"run.out={out}", f"phases=[{questions_phase(steps)}]"]
        else:
            sets.append(change)
    argv = [sys.executable, "-m", "mmctl", "align-vision", "align-vision.yaml", "--json"]
    for s in sets:
        argv += ["--set", s]
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=TINY, capture_output=True, text=True,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": str(threads)})
    if done.returncode != 0:
        raise SystemExit(f"{name}: exit {done.returncode}\n{done.stderr[-2000:]}")
    results = json.loads(done.stdout)
    return {"name": name, "seconds": time.perf_counter() - start, **results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--only", nargs="*", default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    types = ("count", "colour", "shape", "position", "relation", "exists")
    print(f"| variant ({args.steps} steps) | tokens / image | " + " | ".join(types)
          + " | hallucination | unseen pairs | wall s |")
    print("|---|---|" + "---|" * (len(types) + 3), flush=True)
    for name in args.only:  # each row as it is measured
        r = run(name, args.steps, args.threads)
        e = r["evaluation"]
        print(f"| {r['name']} | {r['tokens_per_image']} | "
              + " | ".join(f"{e['per_type'][t]['accuracy']:.2f}" for t in types)
              + f" | {e.get('hallucination_rate', float('nan')):.2f}"
              f" | {e.get('composition_accuracy', float('nan')):.2f} | {r['seconds']:.0f} |", flush=True)
    print("| chance | | " + " | ".join(f"{e['per_type'][t]['chance']:.2f}" for t in types) + " | | | |")


if __name__ == "__main__":
    main()
