"""Visual question answering: a VLM's greedy answers to questions about images, scored per question type with
chance beside each, the hallucination rate (saying "yes" to an object the image does not hold), and accuracy on
scenes with colour–kind pairs training never showed. align-vision scores its held-out shapes questions here, and
`mmctl eval --task shapes-vqa` (or `--task vqa --data FILE.jsonl`) does the same for any VLM checkpoint."""

from __future__ import annotations


def answers(model, tok, pixels: list, questions: list[str], batch_size: int = 64) -> list[str]:
    """Each question's greedy answer (special tokens dropped, stripped) about its image."""
    import torch

    from mmctl.data import vqa
    from mmctl.data.chat import stop_ids
    from mmctl.generate import SamplingConfig, completion_text, generate

    out = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start:start + batch_size]
        prompts = [vqa.prompt(q, tok, model.image_token_id, model.tokens_per_image) for q in chunk]
        done = generate(model, prompts, SamplingConfig(max_new_tokens=8), stop_token_ids=stop_ids(tok),
                        pixels=torch.stack(pixels[start:start + batch_size]))
        out += [completion_text(tok, c).strip() for c in done.completions]
    return out


def evaluate(model, tok, examples: list, composition: list = (), batch_size: int = 64) -> tuple[dict, list[dict]]:
    """(scores, samples): accuracy overall and per question type with chance beside it (types without a known
    chance are scored too), the hallucination rate on "no" questions of the `exists` type, the accuracy on
    `composition` examples, and the question-only baseline — the same questions each asked about another
    example's image (Goyal et al. 2017: what the answers owe to the question alone); one sample per example
    (question, answer, prediction, right)."""
    from mmctl.data.shapes import CHANCE
    from mmctl.evals.extract import normalize

    model.eval()
    scores: dict = {"per_type": {}}
    samples: list[dict] = []
    for part, items in (("per_type", examples), ("composition", list(composition))):
        if not items:
            continue
        said = answers(model, tok, [e.pixels for e in items], [e.question for e in items], batch_size)
        right = [normalize(a).lower() == normalize(e.answer).lower() for a, e in zip(said, items, strict=True)]
        samples += [{"question": e.question, "type": e.type, "answer": e.answer, "prediction": a, "correct": r,
                     **({"composition": True} if part == "composition" else {})}
                    for e, a, r in zip(items, said, right, strict=True)]
        if part == "composition":
            scores["composition_accuracy"] = sum(right) / len(right)
            continue
        for kind in dict.fromkeys([*CHANCE, *(e.type for e in items)]):  # the shapes types first, in order
            mine = [r for r, e in zip(right, items, strict=True) if e.type == kind]
            if mine:
                scores["per_type"][kind] = {"accuracy": sum(mine) / len(mine), "chance": CHANCE.get(kind),
                                            "n": len(mine)}
        if len(items) > 1:  # the baseline that proves it looks: each question about the next example's image
            blind = answers(model, tok, [e.pixels for e in items[1:] + items[:1]], [e.question for e in items],
                            batch_size)
            hits = [normalize(a).lower() == normalize(e.answer).lower() for a, e in zip(blind, items, strict=True)]
            scores["question_only"] = {"accuracy": sum(hits) / len(hits), "per_type": {
                kind: sum(h for h, e in zip(hits, items, strict=True) if e.type == kind) / s["n"]
                for kind, s in scores["per_type"].items()}}
        absent = [a for a, e in zip(said, items, strict=True) if e.type == "exists" and e.answer == "no"]
        if absent:
            scores["hallucination_rate"] = sum(normalize(a).lower() == "yes" for a in absent) / len(absent)
        scores["accuracy"] = sum(right) / len(right)
    return scores, samples


def metrics(scores: dict) -> dict:
    """`evaluate`'s scores as eval's flat metrics: accuracy, then `<type>` with `<type>_chance`, the rest."""
    out = {"accuracy": scores["accuracy"]}
    for kind, s in scores["per_type"].items():
        out[kind] = s["accuracy"]
        if s["chance"] is not None:
            out[f"{kind}_chance"] = s["chance"]
    out |= {k: scores[k] for k in ("hallucination_rate", "composition_accuracy") if k in scores}
    return out | ({"question_only_accuracy": scores["question_only"]["accuracy"]} if "question_only" in scores else {})


def summary(scores: dict) -> str:
    """One line: overall accuracy, the hallucination rate, composition accuracy (those measured)."""
    parts = [f"all: {scores['accuracy']:.2f}"]
    if "hallucination_rate" in scores:
        parts.append(f"hallucination (yes to an absent object): {scores['hallucination_rate']:.2f}")
    if "composition_accuracy" in scores:
        parts.append(f"unseen colour–kind pairs: {scores['composition_accuracy']:.2f}")
    if "question_only" in scores:
        parts.append(f"question-only (asked about another image): {scores['question_only']['accuracy']:.2f}")
    return "; ".join(parts)
