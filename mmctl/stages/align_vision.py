"""`mmctl align-vision`: a vision-language model from a chat LM and a ViT, trained in phases on image–text data.

LLaVA's recipe on the one training loop: the VLM (`mmctl/models/vlm.py`) is the base chat model plus a ViT and a
projector made fresh from the recipe's `vision:` section. Training runs in `phases`, each with its own data,
steps and learning rate, and its own set of trained modules with their learning-rate scales — LLaVA's stage 1
trains the projector alone on captions (the LM and the encoder frozen: align the image tokens to what the LM
already reads), stage 2 the projector and the LM on questions (visual instruction tuning). A ViT made from
scratch can be trained in any phase, but through one-token answers it collapses (recipes/tiny/align-vision.yaml
says how: `objective: cells` teaches it the shapes' labels first; `siglip` / `clip` train it on captions). Each
phase's checkpoints live in `<out>/phases/<name>/`; an interrupted run resumes in the phase where it stopped
(finished phases restore their trained weights from their last checkpoint). The loss is on the answer's tokens
only, never on an image slot.

At the end, the held-out shapes questions (fresh images) are answered greedily: accuracy per question type,
chance beside it, the hallucination rate (saying "yes" to an absent object), and accuracy on the colour–kind
pairs training never showed; and a linear probe reads the same labels off the frozen ViT (`evals/probe.py`).
Writes `<out>/model/`: with the `mlp` projector a Llava checkpoint dir with its processor (transformers loads
it); with `pixel_shuffle` or `linear`, mmctl's own layout (same tensor names).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mmctl import recipe
from mmctl.artifacts import name_problem
from mmctl.console import console
from mmctl.data import vqa
from mmctl.data.vqa import ImageSource
from mmctl.errors import UsageError
from mmctl.evals import vqa as vqa_eval
from mmctl.models.vlm import VisionSection
from mmctl.recipe import option
from mmctl.runtime import RunConfig
from mmctl.stages import Job, Options, StageResult
from mmctl.train.loop import TrainConfig
from mmctl.train.optim import OptimConfig

STAGE = "align-vision"
MODULES = ("vision_tower", "multi_modal_projector", "language_model")


@dataclass
class Phase:
    name: str = option(None, "names the phase (its checkpoints: <out>/phases/<name>/)", required=True)
    sources: list[ImageSource] = option(list, "its data, mixed (fields: kind, path, split, items, captions, "
                                              "image_column, weight; mmctl/data/vqa.py)")
    trainable: dict = option({"multi_modal_projector": 1.0}, "module → learning-rate scale for the "
                             "modules this phase trains (vision_tower, multi_modal_projector, language_model); "
                             "the others are frozen")
    objective: Literal["answer", "siglip", "clip", "cells"] = option(
        "answer", "answer: the VLM learns to answer (loss on the answer's tokens) | siglip / clip: contrastive "
                  "pretraining of the ViT against a small text tower on captions (stage 0; no LM) | cells: the ViT "
                  "learns the built-in shapes' labels — each cell's colour and kind, the count (stage 0; no LM)")
    train_on_question: bool = option(False, "also train on the question's tokens (never the image's)")
    val_fraction: float = option(0.02, "share of the images held out for the validation loss", ge=0, lt=1)
    optim: OptimConfig = option(OptimConfig, "AdamW and the schedule of this phase")
    train: TrainConfig = option(TrainConfig, "steps, batch (examples), seq_len (≥ the longest row), precision")

    def check(self) -> list[tuple[str, str]]:
        problems = [] if self.sources else [("sources", "missing required value: at least one source")]
        if problem := name_problem(self.name):
            problems.append(("name", problem))
        unknown = sorted(set(self.trainable) - set(MODULES))
        if unknown or not self.trainable:
            problems.append(("trainable", f"train at least one of {', '.join(MODULES)}" + (
                f" (unknown: {', '.join(map(str, unknown))})" if unknown else "")))
        elif not all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0
                     for v in self.trainable.values()):
            problems.append(("trainable", "each learning-rate scale must be a positive number"))
        elif self.objective != "answer" and set(self.trainable) != {"vision_tower"}:
            problems.append(("trainable", f"a {self.objective} phase trains the vision_tower only (with its "
                                          "heads; the LM and projector are not used)"))
        return problems


@dataclass
class VQAEvalConfig:
    items: int = option(600, "held-out shapes questions (fresh images) answered at the end, per type", ge=6,
                       le=100_000)
    composition_items: int = option(120, "questions about scenes with a colour–kind pair training never showed",
                                     ge=0, le=100_000)
    sample_question: str = option("How many shapes are there?", "asked about one held-out image at each evaluation")


@dataclass
class AlignVisionRecipe:
    run: RunConfig = option(RunConfig("out/align-vision"), "output directory (model/, phases/<name>/checkpoints/, "
                                                           "metrics.jsonl, manifest.json), seed and device")
    base: str = option(None, "the language model: a chat model dir (an sft output)", required=True)
    vision: VisionSection = option(VisionSection, "the ViT, the projector and which ViT layer it reads")
    phases: list[Phase] = option(list, "the training phases, in order (fields: name, sources, trainable, "
                                       "train_on_question, val_fraction, optim, train)")
    eval: VQAEvalConfig = option(VQAEvalConfig, "the final per-type evaluation")

    def check(self) -> list[tuple[str, str]]:
        problems = [] if self.phases else [("phases", "missing required value: at least one phase")]
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            problems.append(("phases", "two phases share a name"))
        return problems


def inputs(cfg: AlignVisionRecipe) -> dict[str, Path]:
    from mmctl import hf

    hf.checkpoint_dir(cfg.base, "base")
    return {"base": Path(cfg.base), **{f"phases[{i}].sources[{j}]": Path(s.path) for i, p in enumerate(cfg.phases)
                                       for j, s in enumerate(p.sources) if s.path},
            **({"vision.pretrained": Path(cfg.vision.pretrained)} if cfg.vision.pretrained else {})}


def run(cfg: AlignVisionRecipe, options: Options = Options()) -> StageResult:
    """Train the VLM phase by phase, evaluate it per question type, write <out>/model/."""
    return Job(STAGE, cfg, options, inputs(cfg), distributed=True).run(align)


def align(cfg: AlignVisionRecipe, job: Job) -> dict:
    import torch

    from mmctl import checkpoints
    from mmctl.models import vlm
    from mmctl.runtime import pick_precision
    from mmctl.tokenizer.bpe import IMAGE

    lm, tok = checkpoints.load(Path(cfg.base), device=job.device)
    if tok.token_id(IMAGE) is None:
        raise UsageError(f"{cfg.base}: the tokenizer has no {IMAGE} token for the image's place")
    torch.manual_seed(cfg.run.seed)
    model = vlm.VLM(cfg.vision, lm, tok.token_id(IMAGE)).to(job.device)
    precision = pick_precision(cfg.phases[0].train.precision, job.device)
    held_out = _heldout(cfg, model.vision.encoder.image_size)
    phases = [_phase(cfg, i, model, tok, held_out, job, precision) for i in range(len(cfg.phases))]  # data first
    job.begin([(f"phases/{p.name}/checkpoints", train.steps) for p, (_, train, _) in zip(cfg.phases, phases,
                                                                                         strict=True)])
    if job.main:
        _module_table(model, cfg)
    last, offset = {}, 0
    for phase, (parts, train, _) in zip(cfg.phases, phases, strict=True):
        for name in MODULES:
            getattr(model, name).requires_grad_(name in phase.trainable)
        last = job.train(parts, train, phase.optim, precision, f"phases/{phase.name}/checkpoints",
                         log=lambda record, phase=phase, offset=offset: job.log(
                             {**record, "phase": phase.name, "step": offset + record["step"],
                              "phase_step": record["step"]}))
        offset += train.steps
    if not job.main:
        return {}
    own = [(phase.name, val) for phase, (_, _, val) in zip(cfg.phases, phases, strict=True)
           if phase.objective == "answer" and any(source.kind != "shapes" for source in phase.sources)]
    if own and own[-1][1]:  # the user's own data: its held-out share is what the model is scored on
        scores, _ = vqa_eval.evaluate(model, tok, own[-1][1])
        scores["data"] = f"the held-out share of phase {own[-1][0]}'s sources"
    else:
        scores, _ = vqa_eval.evaluate(model, tok, held_out["per_type"], held_out["composition"])
        scores["data"] = "shapes" + (" (the phases' own sources hold no held-out examples: val_fraction 0)"
                                     if own else "")
    if any(source.kind == "shapes" for phase in cfg.phases for source in phase.sources):
        from mmctl.evals.probe import probe  # what the encoder holds, beside what the VLM answers

        scores["probe"] = probe(model.vision_tower, cfg.vision.feature_layer, model.vision.encoder.image_size,
                                seed=cfg.run.seed)
    checkpoints.save_vlm(model, job.product("model"), tok)
    return {"final": last, "evaluation": scores, "tokens_per_image": model.tokens_per_image,
            "params": {m: sum(p.numel() for p in getattr(model, m).parameters()) for m in MODULES},
            "format": "llava" if cfg.vision.projector.kind == "mlp" else "mmctl"}


def _phase(cfg, i: int, model, tok, held_out, job, precision: str):
    """(One phase's loop parts — its objective's module, rows, loss, evaluation, fingerprint —, its TrainConfig,
    steps counted from epochs when it sets them, and its held-out examples.)"""
    from mmctl.objectives import OBJECTIVES
    from mmctl.train.loop import Parts, for_rows

    phase = cfg.phases[i]
    objective = OBJECTIVES[phase.objective](phase, model, tok, cfg.run.seed + 31 * i)
    train_rows, val_rows, val = _rows(cfg, i, model, objective)
    if job.main:
        console.print(f"phase {phase.name}: {len(train_rows.ids):,} examples ({len(val_rows.ids)} held out), trains "
                      + ", ".join(f"{m} (lr × {s:g})" for m, s in phase.trainable.items()))
    fingerprint = {"base": job.dir.inputs["base"]["sha256"], "vision": recipe.to_dict(cfg.vision),
                   "phases": [recipe.to_dict(p) for p in cfg.phases[: i + 1]], "run.seed": cfg.run.seed}
    evaluate = lambda step: objective.evaluate(val_rows, held_out["per_type"][0], cfg.eval.sample_question,  # noqa: E731
                                               job.device, precision)
    parts = Parts(objective.trained, _batches(cfg, i, train_rows, job.dist), objective.loss, evaluate=evaluate,
                  fingerprint=fingerprint, lr_scales={f"{m}.": float(s) for m, s in phase.trainable.items()})
    return parts, for_rows(phase.train, len(train_rows.ids)), val


def _rows(cfg, i: int, model, objective):
    """The phase's examples, mixed (by image: data/mixture.py), encoded by its objective into train and
    validation rows; and the validation examples themselves."""
    import torch

    from mmctl.data.mixture import mix

    phase, size = cfg.phases[i], model.vision.encoder.image_size
    context = objective.max_tokens()
    if context is not None and phase.train.seq_len > context:
        raise UsageError(f"phases[{i}].train.seq_len: {phase.train.seq_len} exceeds the language model's context "
                         f"({context})")
    train, val = mix(phase.sources, lambda s, j: vqa.read(s, cfg.run.seed + 1000 * i + j, size),
                     cfg.run.seed + 7919 * i, phase.val_fraction, key=vqa.key)
    parts = []
    for part in (train, val):
        try:
            encoded = [objective.encode(e) for e in part]
        except UsageError as e:
            raise UsageError(f"phases[{i}]: {e}") from None
        longest = max((len(ids) for ids, _ in encoded), default=0)
        if longest > phase.train.seq_len + 1:
            raise UsageError(f"phases[{i}].train.seq_len: {phase.train.seq_len} is shorter than the longest row "
                             f"({longest} tokens with the image's)")
        pixels = torch.stack([e.pixels for e in part]) if part else torch.zeros(0)
        parts.append(vqa.Rows([ids for ids, _ in encoded], [m for _, m in encoded], pixels))
    if not parts[0].ids:
        raise UsageError(f"phases[{i}]: no training example left after the validation share")
    return parts[0], parts[1], val


def _batches(cfg, i: int, rows, dist):
    """batches(step, rank) → micro-batches drawn as a function of (seed, phase, step, row)."""
    from mmctl.data.batches import row_batches

    return row_batches(len(rows.ids), cfg.run.seed + 7919 * i, cfg.phases[i].train, dist,
                       lambda picks: vqa.batch(rows, picks, dist.device))


def _heldout(cfg, size: int) -> dict:
    """Fresh shapes questions and composition questions (held-out colour–kind pairs), at the ViT's image size."""
    per_type, composition = vqa.builtin(cfg.eval.items, cfg.eval.composition_items, size)
    return {"per_type": per_type, "composition": composition}


def _module_table(model, cfg) -> None:
    from rich.table import Table

    table = Table(title="modules by phase (lr scale, or frozen)", title_justify="left")
    table.add_column("module")
    table.add_column("parameters", justify="right")
    for phase in cfg.phases:
        table.add_column(phase.name, justify="right")
    for m in MODULES:
        n = sum(p.numel() for p in getattr(model, m).parameters())
        table.add_row(m, f"{n:,}", *[f"× {phase.trainable[m]:g}" if m in phase.trainable else "frozen"
                                     for phase in cfg.phases])
    console.print(table)


def render(result: StageResult) -> None:
    from rich.table import Table

    r = result.results
    scores = r["evaluation"]
    data = scores.get("data", "shapes")
    title = "held-out shapes questions" if data.startswith("shapes") else data
    table = Table(title=f"{title} ({r['tokens_per_image']} image tokens per image)", title_justify="left")
    blind = scores.get("question_only", {}).get("per_type", {})
    for column in ("question type", "accuracy", "question-only", "chance", "n"):
        table.add_column(column, justify="left" if column == "question type" else "right")
    for kind, s in scores["per_type"].items():
        chance = "" if s["chance"] is None else f"{s['chance']:.2f}"
        table.add_row(kind, f"{s['accuracy']:.2f}", f"{blind[kind]:.2f}" if kind in blind else "", chance,
                      str(s["n"]))
    console.print(table)
    console.print(vqa_eval.summary(scores))
    if "probe" in scores:
        p = scores["probe"]
        console.print(f"linear probe on the ViT's features (held-out scenes): cell colour {p['cell_colour']:.2f}, "
                      f"cell shape {p['cell_shape']:.2f}, count {p['count']:.2f}")
    console.print(f"model: {result.out / 'model'} ({r['format']} layout)")
