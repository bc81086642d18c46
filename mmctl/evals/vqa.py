"""Visual question answering: a VLM's greedy answers to questions about images, scored per question type with
chance beside each, the hallucination rate (saying "yes" to an object the image does not hold), and accuracy on
scenes with colour–kind pairs training never showed. align-vision scores its held-out shapes questions here."""

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


def evaluate(model, tok, held_out: dict) -> dict:
    """Accuracy per question type with chance beside it, the hallucination rate, and composition accuracy."""
    from mmctl.data.shapes import CHANCE
    from mmctl.evals.extract import normalize

    model.eval()
    scores: dict = {"per_type": {}}
    for part, examples in held_out.items():
        if not examples:
            continue
        said = answers(model, tok, [e.pixels for e in examples], [e.question for e in examples])
        right = [normalize(a).lower() == normalize(e.answer).lower() for a, e in zip(said, examples, strict=True)]
        if part == "composition":
            scores["composition_accuracy"] = sum(right) / len(right)
            continue
        for kind in CHANCE:
            mine = [r for r, e in zip(right, examples, strict=True) if e.type == kind]
            if mine:
                scores["per_type"][kind] = {"accuracy": sum(mine) / len(mine), "chance": CHANCE[kind], "n": len(mine)}
        absent = [a for a, e in zip(said, examples, strict=True) if e.type == "exists" and e.answer == "no"]
        scores["hallucination_rate"] = sum(a.lower() == "yes" for a in absent) / max(len(absent), 1)
        scores["accuracy"] = sum(right) / len(right)
    return scores
