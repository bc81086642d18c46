"""On-policy preference pairs with verified answers: ask the starting model training-split arithmetic problems
through its chat template, sample several answers per problem, check each against the exact answer, and pair a
correct answer (the model's own when it gave one, else the true answer as the training data writes it) with
one of its wrong answers. Problems it always answers right teach nothing and give no pair.

The samples are a function of the seed and the model: the same recipe on the same model gives the same pairs.
"""

from __future__ import annotations

from mmctl.data.rl import Pair


def arithmetic_pairs(model, tok, n_problems: int, seed: int, samples: int = 4, temperature: float = 1.0,
                     batch_size: int = 64) -> tuple[list[Pair], dict]:
    """(pairs, statistics) from `n_problems` training-split problems, `samples` answers each."""
    from mmctl.data.chat import prompt_ids, stop_ids
    from mmctl.data.synthetic import arithmetic_problems
    from mmctl.evals.extract import exact_match, extract
    from mmctl.generate import SamplingConfig, completion_text, generate

    problems = list(arithmetic_problems(n_problems, seed, split="train"))
    prompts = [prompt_ids([{"role": "user", "content": p.question}], tok) for p in problems]
    asks = [(i, k) for i in range(len(problems)) for k in range(samples)]
    answers: dict[int, list[str]] = {i: [] for i in range(len(problems))}
    was_training = model.training
    model.eval()
    for start in range(0, len(asks), batch_size):
        chunk = asks[start:start + batch_size]
        out = generate(model, [prompts[i] for i, _ in chunk],
                       SamplingConfig(max_new_tokens=8, temperature=temperature, seed=seed * 1_000_003 + start),
                       stop_token_ids=stop_ids(tok))
        for (i, _), completion in zip(chunk, out.completions, strict=True):
            answers[i].append(completion_text(tok, completion).strip())
    model.train(was_training)
    pairs, own_chosen, correct = [], 0, 0
    for i, p in enumerate(problems):
        right = [a for a in answers[i] if exact_match(extract(a, "last_number"), p.answer)]
        wrong = [a for a in answers[i] if a not in right]
        correct += len(right)
        if not wrong:
            continue
        own_chosen += bool(right)
        pairs.append(Pair([{"role": "user", "content": p.question}], right[0] if right else str(p.answer), wrong[0]))
    stats = {"problems": len(problems), "samples_per_problem": samples, "sample_accuracy": correct / len(asks),
             "pairs": len(pairs), "pairs_with_the_models_own_correct_answer": own_chosen}
    return pairs, stats
