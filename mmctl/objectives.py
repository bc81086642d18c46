"""What a phase of `mmctl align-vision` trains toward — its `objective` — one unit each: the module it trains,
how an example becomes a row, the loss and what each evaluation measures.

- `answer` (`Answer`): the VLM answers the question; the loss is on the answer's tokens (and, with
  `train_on_question`, the question's), never on an image slot (LLaVA's stages 1 and 2).
- `siglip` / `clip` (`Contrastive`): stage 0 — the ViT against a small text tower made for the phase, on captions
  (SigLIP's sigmoid loss or CLIP's InfoNCE; the LM and the projector take no part), reporting retrieval R@1.
- `cells` (`Cells`): stage 0 on the built-in shapes' own labels — linear heads read each grid cell's colour and
  kind and the count off the ViT's features (`mmctl/models/cells.py`), reporting their held-out accuracy.
"""

from __future__ import annotations

from mmctl.data import vqa
from mmctl.errors import UsageError
from mmctl.train.loop import LossOut


class Answer:
    """The VLM learns to answer: cross-entropy summed over the trained answer tokens."""

    def __init__(self, phase, model, tok, seed: int):
        self.phase, self.model, self.tok = phase, model, tok
        self.trained = model  # the module the loop trains (its frozen parts aside)

    def encode(self, example: vqa.Example) -> tuple[list[int], list[int]]:
        m = self.model
        return vqa.encode(example, self.tok, m.image_token_id, m.tokens_per_image, self.phase.train_on_question)

    def max_tokens(self) -> int | None:
        return self.model.language_model.cfg.max_position_embeddings

    @staticmethod
    def loss(model, batch: dict) -> LossOut:
        import torch.nn.functional as F

        from mmctl.models.vlm import IGNORE, labels_for

        vlm = getattr(model, "module", model)  # under DistributedDataParallel, the model it wraps
        labels = labels_for(batch["ids"], vlm.image_token_id, batch["trained"])
        logits = model(batch["ids"][:, :-1], batch["pixels"])
        total = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
        return LossOut(total, float((labels != IGNORE).sum()), batch["real"])

    def evaluate(self, val: vqa.Rows, example: vqa.Example, question: str, device, precision: str) -> dict:
        """The validation loss and the answer to `question` about one held-out `example`."""
        import torch

        from mmctl.evals import vqa as vqa_eval
        from mmctl.runtime import autocast

        self.model.eval()
        result = {}
        if val.ids:
            total = count = 0.0
            with torch.no_grad(), autocast(precision, device):
                for start in range(0, len(val.ids), 32):
                    out = self.loss(self.model, vqa.batch(val, list(range(start, min(start + 32, len(val.ids)))),
                                                          device))
                    total, count = total + float(out.sum), count + out.count
            result["val_loss"] = total / max(count, 1)
        answer = vqa_eval.answers(self.model, self.tok, [example.pixels], [question])[0]
        self.model.train()
        return {**result, "sample": f"{question} → {answer}"}


class Contrastive:
    """Stage 0: the ViT and a text tower made for this phase, pulled together on matching image–caption pairs."""

    def __init__(self, phase, model, tok, seed: int):
        import torch

        from mmctl.models.contrastive import Contrastive as Towers

        self.phase = phase
        torch.manual_seed(seed)
        self.trained = Towers(model.vision_tower, tok.vocab_size, phase.train.seq_len + 1,
                              loss=phase.objective).to(next(model.parameters()).device)
        self.tok = tok

    def encode(self, example: vqa.Example) -> tuple[list[int], list[int]]:
        if example.type != "caption":
            raise UsageError(f"a {self.phase.objective} phase pairs images with captions; its sources must be "
                             "captions (shapes with captions: true, or jsonl caption lines)")
        ids = self.tok.encode(example.answer)  # the caption alone, every token of it
        return ids, [1] * len(ids)

    def max_tokens(self) -> int | None:
        return None

    @staticmethod
    def loss(model, batch: dict) -> LossOut:
        """SigLIP's (or CLIP's) loss summed over the micro-batch's images, their captions the only positives."""
        from mmctl.models.contrastive import clip_loss, siglip_loss

        logits = model(batch["pixels"], batch["ids"], batch["valid"])
        objective = getattr(model, "module", model).loss  # (under DistributedDataParallel, the model it wraps)
        total = siglip_loss(logits) if objective == "siglip" else clip_loss(logits)
        return LossOut(total, float(len(logits)), batch["real"])

    def evaluate(self, val: vqa.Rows, example: vqa.Example, question: str, device, precision: str) -> dict:
        """R@1 image → caption and caption → image among (up to 256) held-out pairs, and their loss per image."""
        import torch

        from mmctl.models.contrastive import recall_at_1
        from mmctl.runtime import autocast

        if not val.ids:
            return {}
        self.trained.eval()
        with torch.no_grad(), autocast(precision, device):
            batch = vqa.batch(val, list(range(min(len(val.ids), 256))), device)
            logits = self.trained(batch["pixels"], batch["ids"], batch["valid"]).float()
            out = self.loss(self.trained, batch)
        self.trained.train()
        i2t, t2i = recall_at_1(logits)
        return {"val_loss": float(out.sum) / out.count, "val_r@1_image_to_text": i2t, "val_r@1_text_to_image": t2i}


class Cells:
    """Stage 0: the ViT learns the shapes' labels — per-cell colour and kind, and the count — through linear heads."""

    def __init__(self, phase, model, tok, seed: int):
        import torch

        from mmctl.data.shapes import COLOURS, KINDS, MOST
        from mmctl.models.cells import CellHeads

        self.phase = phase
        torch.manual_seed(seed)
        self.trained = CellHeads(model.vision_tower, model.vision.feature_layer, len(COLOURS) + 1, len(KINDS) + 1,
                                 MOST).to(next(model.parameters()).device)

    def encode(self, example: vqa.Example) -> tuple[list[int], list[int]]:
        """The scene's 19 labels in a row's place (`mmctl.data.shapes.labels`)."""
        from mmctl.data.shapes import labels

        if not example.scene:
            raise UsageError("a cells phase learns the built-in shapes' own labels; its sources must be kind: shapes")
        ids = labels(example.scene)
        return ids, [1] * len(ids)

    def max_tokens(self) -> int | None:
        return None

    @staticmethod
    def loss(model, batch: dict) -> LossOut:
        from mmctl.models.cells import loss

        return LossOut(loss(model(batch["pixels"]), batch["ids"]), float(len(batch["ids"])), batch["real"])

    def evaluate(self, val: vqa.Rows, example: vqa.Example, question: str, device, precision: str) -> dict:
        """The loss per image and the heads' accuracy on (up to 512) held-out images."""
        import torch

        from mmctl.models.cells import accuracy, loss
        from mmctl.runtime import autocast

        if not val.ids:
            return {}
        self.trained.eval()
        with torch.no_grad(), autocast(precision, device):
            batch = vqa.batch(val, list(range(min(len(val.ids), 512))), device)
            logits = self.trained(batch["pixels"])
            total = float(loss(logits, batch["ids"]))
        self.trained.train()
        return {"val_loss": total / len(batch["ids"]),
                **{f"val_{name}": value for name, value in accuracy(logits, batch["ids"]).items()}}


OBJECTIVES = {"answer": Answer, "siglip": Contrastive, "clip": Contrastive, "cells": Cells}
