"""`mmctl align-vision`: a vision-language model from a chat LM and a ViT, trained in phases on image–text data.

LLaVA's recipe on the one training loop: the VLM (`mmctl/models/vlm.py`) is the base chat model plus a ViT and a
projector made fresh from the recipe's `vision:` section. Training runs in `phases`, each with its own data,
steps and learning rate, and its own set of trained modules with their learning-rate scales — LLaVA's stage 1
trains the projector alone on captions (the LM and the encoder frozen: align the image tokens to what the LM
already reads), stage 2 the projector and the LM on questions (visual instruction tuning). A ViT made from
scratch can be trained in any phase, but through one-token answers it collapses (recipes/tiny/align-vision.yaml
says how and keeps it frozen; `objective: siglip` trains it on its own). Each phase's checkpoints live in
`<out>/phases/<name>/`; an interrupted run resumes in the phase where it stopped (finished phases restore their
trained weights from their last checkpoint). The loss is on the answer's tokens only, never on an image slot.

At the end, the held-out shapes questions (fresh images) are answered greedily: accuracy per question type,
chance beside it, the hallucination rate (saying "yes" to an absent object), and accuracy on the colour–kind
pairs training never showed. Writes `<out>/model/`: with the `mlp` projector a Llava checkpoint dir with its
processor (transformers loads it); with `pixel_shuffle` or `linear`, mmctl's own layout (same tensor names).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mmctl import recipe
from mmctl.console import console
from mmctl.data import vqa
from mmctl.errors import UsageError
from mmctl.evals import vqa as vqa_eval
from mmctl.models.vlm import VisionSection
from mmctl.recipe import option
from mmctl.runtime import RunConfig
from mmctl.stages import Options, StageResult
from mmctl.train.loop import TrainConfig
from mmctl.train.optim import OptimConfig

STAGE = "align-vision"
MODULES = ("vision_tower", "multi_modal_projector", "language_model")


@dataclass
class AlignRun(RunConfig):
    out: str = option("out/align-vision", "output directory: model/, phases/<name>/checkpoints, metrics.jsonl, "
                                          "manifest.json")


@dataclass
class VisionSource:
    kind: Literal["shapes", "jsonl", "datasets"] = option(
        None, "shapes (built in) | jsonl ({image, question, answer} or {image, caption} lines) | datasets (a "
              "save_to_disk dir: an image column, caption or question + answer)", required=True)
    path: str | None = option(None, "jsonl: the file (image paths are relative to it); datasets: the dir")
    items: int | None = option(None, "shapes: how many to make; jsonl, datasets: read at most this many", ge=1,
                               le=10**7)
    captions: bool = option(False, "shapes: captions (\"Describe the image.\") instead of questions")
    split: str = option("train", "datasets: the split")
    image_column: str = option("image", "datasets: the column holding the image (or its path)")

    def check(self) -> list[tuple[str, str]]:
        if self.kind != "shapes":
            return [] if self.path else [("path", f"missing required value: a {self.kind} source needs a path")]
        if self.path:
            return [("path", "a shapes source is built in and takes no path")]
        return [] if self.items else [("items", "missing required value: how many shapes items to make")]


@dataclass
class Phase:
    name: str = option(None, "names the phase (its checkpoints: <out>/phases/<name>/)", required=True)
    sources: list[VisionSource] = option(list, "its data, mixed (fields: kind, path, items, captions)")
    trainable: dict = option({"multi_modal_projector": 1.0}, "module → learning-rate scale for the "
                             "modules this phase trains (vision_tower, multi_modal_projector, language_model); "
                             "the others are frozen")
    objective: Literal["answer", "siglip", "clip"] = option(
        "answer", "answer: the VLM learns to answer (loss on the answer's tokens) | siglip / clip: contrastive "
                  "pretraining of the ViT against a small text tower on captions (stage 0; no LM)")
    train_on_question: bool = option(False, "also train on the question's tokens (never the image's)")
    val_fraction: float = option(0.02, "share of the examples held out for the validation loss", ge=0, lt=1)
    optim: OptimConfig = option(OptimConfig, "AdamW and the schedule of this phase")
    train: TrainConfig = option(TrainConfig, "steps, batch (examples), seq_len (≥ the longest row), precision")

    def check(self) -> list[tuple[str, str]]:
        problems = [] if self.sources else [("sources", "missing required value: at least one source")]
        unknown = sorted(set(self.trainable) - set(MODULES))
        if unknown or not self.trainable:
            problems.append(("trainable", f"train at least one of {', '.join(MODULES)}" + (
                f" (unknown: {', '.join(map(str, unknown))})" if unknown else "")))
        elif not all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0
                     for v in self.trainable.values()):
            problems.append(("trainable", "each learning-rate scale must be a positive number"))
        elif self.objective != "answer" and set(self.trainable) != {"vision_tower"}:
            problems.append(("trainable", f"a {self.objective} phase trains the vision_tower only (with its text "
                                          "tower; the LM and projector are not used)"))
        return problems


@dataclass
class EvalSection:
    items: int = option(600, "held-out shapes questions (fresh images) answered at the end, per type", ge=6)
    composition_items: int = option(120, "questions about scenes with a colour–kind pair training never showed",
                                     ge=0)
    sample_question: str = option("How many shapes are there?", "asked about one held-out image at each evaluation")


@dataclass
class AlignVisionConfig:
    run: AlignRun = option(AlignRun, "output directory, seed and device")
    base: str = option(None, "the language model: a chat model dir (an sft output)", required=True)
    vision: VisionSection = option(VisionSection, "the ViT, the projector and which ViT layer it reads")
    phases: list[Phase] = option(list, "the training phases, in order (fields: name, sources, trainable, "
                                       "train_on_question, val_fraction, optim, train)")
    eval: EvalSection = option(EvalSection, "the final per-type evaluation")

    def check(self) -> list[tuple[str, str]]:
        problems = [] if self.phases else [("phases", "missing required value: at least one phase")]
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            problems.append(("phases", "two phases share a name"))
        return problems


def run(cfg: AlignVisionConfig, options: Options = Options()) -> StageResult:
    """Train the VLM phase by phase, evaluate it per question type, write <out>/model/."""
    import torch

    from mmctl.artifacts import Run
    from mmctl.models import transformer, vlm
    from mmctl.runtime import pick_device, pick_precision, setup_distributed
    from mmctl.tokenizer.bpe import IMAGE

    dist = setup_distributed(pick_device(cfg.run.device))
    inputs = {"base": Path(cfg.base), **{f"phases[{i}].sources[{j}]": Path(s.path) for i, p in
                                         enumerate(cfg.phases) for j, s in enumerate(p.sources) if s.path},
              **({"vision.pretrained": Path(cfg.vision.pretrained)} if cfg.vision.pretrained else {})}
    run_dir = Run(Path(cfg.run.out), STAGE, recipe.to_dict(cfg, STAGE), inputs=inputs, seed=cfg.run.seed,
                  lock=dist.main)
    if not options.force and run_dir.up_to_date():
        return StageResult(run_dir.out, run_dir.results(), up_to_date=True)
    lm, tok = transformer.load_with_tokenizer(Path(cfg.base), device=dist.device)
    image_id = tok.token_id(IMAGE)
    if image_id is None:
        raise UsageError(f"{cfg.base}: the tokenizer has no {IMAGE} token for the image's place")
    torch.manual_seed(cfg.run.seed)
    model = vlm.VLM(cfg.vision, lm, image_id).to(dist.device)
    precision = pick_precision(cfg.phases[0].train.precision, dist.device)
    if options.fresh and dist.main:
        _prune(run_dir.out, cfg)
    dist.barrier()
    if dist.main:
        run_dir.start(keep_metrics_through=_resume_point(run_dir.out, cfg))
        _module_table(model, cfg)
    held_out = _heldout(cfg, model.vision.encoder.image_size)
    offset, last = 0, {}
    for i, phase in enumerate(cfg.phases):
        last = _train_phase(cfg, i, model, tok, run_dir, dist, options, precision, offset, held_out)
        offset += phase.train.steps
    if not dist.main:
        return StageResult(run_dir.out, {})
    scores, _ = vqa_eval.evaluate(model, tok, held_out["per_type"], held_out["composition"])
    out = run_dir.out / "model"
    vlm.save_vlm(model, out, tok)
    results = {"final": last, "evaluation": scores, "tokens_per_image": model.tokens_per_image,
               "params": {m: sum(p.numel() for p in getattr(model, m).parameters()) for m in MODULES},
               "format": "llava" if cfg.vision.projector.kind == "mlp" else "mmctl"}
    run_dir.finish(results, device=dist.device)
    return StageResult(run_dir.out, results)


def _train_phase(cfg, i: int, model, tok, run_dir, dist, options, precision: str, offset: int, held_out) -> dict:
    """One phase on the one loop: freeze what it does not train, build its rows, train (or restore a finished
    phase's weights from its last checkpoint)."""
    from mmctl.train.loop import train

    phase = cfg.phases[i]
    for name in MODULES:
        getattr(model, name).requires_grad_(name in phase.trainable)
    train_rows, val_rows = _rows(cfg, i, model, tok)
    fingerprint = {"base": run_dir.inputs["base"]["sha256"], "vision": recipe.to_dict(cfg.vision),
                   "phases": [recipe.to_dict(p) for p in cfg.phases[: i + 1]], "run.seed": cfg.run.seed}
    if dist.main:
        console.print(f"phase {phase.name}: {len(train_rows.ids):,} examples ({len(val_rows.ids)} held out), trains "
                      + ", ".join(f"{m} (lr × {s:g})" for m, s in phase.trainable.items()))

    def log(record: dict) -> None:
        run_dir.log({**record, "phase": phase.name, "step": offset + record["step"], "phase_step": record["step"]})

    if phase.objective == "answer":
        trained, loss_fn = model, loss

        def evaluate(step: int) -> dict:
            return _evaluation(model, tok, val_rows, held_out, cfg, dist.device, precision)
    else:  # stage 0: the ViT against a text tower made for this phase
        import torch

        from mmctl.models.contrastive import Contrastive

        torch.manual_seed(cfg.run.seed + 31 * i)
        trained = Contrastive(model.vision_tower, tok.vocab_size, phase.train.seq_len + 1,
                              loss=phase.objective).to(dist.device)
        loss_fn = contrastive_loss

        def evaluate(step: int) -> dict:
            return _retrieval(trained, val_rows, dist.device, precision)

    return train(trained, cfg=phase.train, optim=phase.optim, batches=_batches(cfg, i, train_rows, dist),
                 loss_fn=loss_fn, out=run_dir.out / "phases" / phase.name, log=log, fingerprint=fingerprint,
                 evaluate=evaluate, lr_scales={f"{m}.": float(s) for m, s in phase.trainable.items()},
                 force_resume=options.force_resume, precision=precision, dist=dist)


def _rows(cfg, i: int, model, tok):
    """The phase's examples, encoded, shuffled with the seed and split into train and validation rows."""
    import random

    import torch

    phase, size = cfg.phases[i], model.vision.encoder.image_size
    context = model.language_model.cfg.max_position_embeddings
    if phase.objective == "answer" and phase.train.seq_len > context:
        raise UsageError(f"phases[{i}].train.seq_len: {phase.train.seq_len} exceeds the language model's context "
                         f"({context})")
    examples = []
    for j, s in enumerate(phase.sources):
        if s.kind == "shapes":
            examples += vqa.shapes(s.items, cfg.run.seed + 1000 * i + j, "train", size, captions=s.captions)
        elif s.kind == "jsonl":
            examples += vqa.read_jsonl(s.path, size, s.items)
        else:
            examples += vqa.read_dataset(s.path, s.split, size, s.items, s.image_column)
    random.Random(f"align-vision:{cfg.run.seed}:{i}").shuffle(examples)
    n_val = round(len(examples) * phase.val_fraction)
    parts = []
    if phase.objective != "answer" and any(e.type != "caption" for e in examples):
        raise UsageError(f"phases[{i}]: a {phase.objective} phase pairs images with captions; its sources must be "
                         "captions (shapes with captions: true, or jsonl caption lines)")
    for part in (examples[n_val:], examples[:n_val]):
        if phase.objective == "answer":
            encoded = [vqa.encode(e, tok, model.image_token_id, model.tokens_per_image, phase.train_on_question)
                       for e in part]
        else:  # the caption alone, every token of it
            encoded = [(ids, [1] * len(ids)) for ids in (tok.encode(e.answer) for e in part)]
        longest = max((len(ids) for ids, _ in encoded), default=0)
        if longest > phase.train.seq_len + 1:
            what = (f"row ({longest - 1} tokens with {model.tokens_per_image} image tokens)"
                    if phase.objective == "answer" else f"caption ({longest} tokens)")
            raise UsageError(f"phases[{i}].train.seq_len: {phase.train.seq_len} is shorter than the longest {what}")
        pixels = torch.stack([e.pixels for e in part]) if part else torch.zeros(0)
        parts.append(vqa.Rows([ids for ids, _ in encoded], [m for _, m in encoded], pixels))
    if not parts[0].ids:
        raise UsageError(f"phases[{i}]: no training example left after the validation share")
    return parts[0], parts[1]


def _batches(cfg, i: int, rows, dist):
    """batches(step, rank) → micro-batches drawn as a function of (seed, phase, step, row)."""
    from mmctl.data.batches import pick_row
    from mmctl.train.loop import micro_batches

    per_micro, accum = micro_batches(cfg.phases[i].train, dist.world)
    n, seed = len(rows.ids), cfg.run.seed + 7919 * i

    def batches(step: int, rank: int) -> list[dict]:
        firsts = [(rank * accum + m) * per_micro for m in range(accum)]
        return [vqa.batch(rows, [pick_row(seed, step, r, n) for r in range(f, f + per_micro)], dist.device)
                for f in firsts]

    return batches


def loss(model, batch: dict):
    """Cross-entropy summed over the trained answer tokens (image slots and padding never count)."""
    import torch.nn.functional as F

    from mmctl.models.vlm import IGNORE, labels_for
    from mmctl.train.loop import LossOut

    vlm = getattr(model, "module", model)  # under DistributedDataParallel, the model it wraps
    labels = labels_for(batch["ids"], vlm.image_token_id, batch["trained"])
    logits = model(batch["ids"][:, :-1], batch["pixels"])
    total = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return LossOut(total, float((labels != IGNORE).sum()), batch["real"])


def contrastive_loss(model, batch: dict):
    """SigLIP's (or CLIP's) loss summed over the micro-batch's images, their captions the only positives."""
    from mmctl.models.contrastive import clip_loss, siglip_loss
    from mmctl.train.loop import LossOut

    logits = model(batch["pixels"], batch["ids"], batch["valid"])
    objective = getattr(model, "module", model).loss  # (under DistributedDataParallel, the model it wraps)
    total = siglip_loss(logits) if objective == "siglip" else clip_loss(logits)
    return LossOut(total, float(len(logits)), batch["real"])


def _retrieval(model, val, device, precision: str) -> dict:
    """R@1 image → caption and caption → image among (up to 256) held-out pairs, and their loss per image."""
    import torch

    from mmctl.models.contrastive import recall_at_1
    from mmctl.runtime import autocast

    if not val.ids:
        return {}
    model.eval()
    with torch.no_grad(), autocast(precision, device):
        batch = vqa.batch(val, list(range(min(len(val.ids), 256))), device)
        logits = model(batch["pixels"], batch["ids"], batch["valid"]).float()
        out = contrastive_loss(model, batch)
    model.train()
    i2t, t2i = recall_at_1(logits)
    return {"val_loss": float(out.sum) / out.count, "val_r@1_image_to_text": i2t, "val_r@1_text_to_image": t2i}


def _evaluation(model, tok, val, held_out: dict, cfg, device, precision: str) -> dict:
    """The validation loss and the answer to the sample question about one held-out image."""
    import torch

    from mmctl.runtime import autocast

    model.eval()
    result = {}
    if val.ids:
        total = count = 0.0
        with torch.no_grad(), autocast(precision, device):
            for start in range(0, len(val.ids), 32):
                out = loss(model, vqa.batch(val, list(range(start, min(start + 32, len(val.ids)))), device))
                total, count = total + float(out.sum), count + out.count
        result["val_loss"] = total / max(count, 1)
    example = held_out["per_type"][0]
    answer = vqa_eval.answers(model, tok, [example.pixels], [cfg.eval.sample_question])[0]
    model.train()
    return {**result, "sample": f"{cfg.eval.sample_question} → {answer}"}


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


def _resume_point(out: Path, cfg) -> int | None:
    """The global step the run resumes from (its metrics are kept up to it), or None for a fresh start."""
    from mmctl.train import checkpoint

    offset = 0
    found = None
    for phase in cfg.phases:
        done = checkpoint.complete(out / "phases" / phase.name / "checkpoints")
        if not done:
            break
        step = int(done[0].name.split("-")[1])
        found = offset + step
        if step < phase.train.steps:
            break
        offset += phase.train.steps
    return found


def _prune(out: Path, cfg) -> None:
    from mmctl.train import checkpoint

    for phase in cfg.phases:
        checkpoint.prune(out / "phases" / phase.name / "checkpoints", keep=0)


def render(result: StageResult) -> None:
    from rich.table import Table

    r = result.results
    scores = r["evaluation"]
    table = Table(title=f"held-out shapes questions ({r['tokens_per_image']} image tokens per image)",
                  title_justify="left")
    for column in ("question type", "accuracy", "chance", "n"):
        table.add_column(column, justify="left" if column == "question type" else "right")
    for kind, s in scores["per_type"].items():
        table.add_row(kind, f"{s['accuracy']:.2f}", f"{s['chance']:.2f}", str(s["n"]))
    console.print(table)
    console.print(vqa_eval.summary(scores))
    console.print(f"model: {result.out / 'model'} ({r['format']} layout)")
