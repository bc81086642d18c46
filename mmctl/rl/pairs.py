"""DPO's pairs as the loop sees them: made on-policy, encoded into rows with the reference's log-probabilities,
drawn into batches, scored on the validation pairs.

On-policy preference pairs with verified answers: ask the starting model training-split arithmetic problems
through its chat template, sample several answers per problem, check each against the exact answer, and pair a
correct answer (the model's own when it gave one, else the worked answer as the training data writes it) with
one of its wrong answers. Problems it always answers right teach nothing and give no pair.

The samples are a function of the seed and the model: the same recipe on the same model gives the same pairs.
"""

from __future__ import annotations

from mmctl.data.rl import Pair


def arithmetic_pairs(model, tok, n_problems: int, seed: int, samples: int = 4, temperature: float = 1.0,
                     max_new_tokens: int = 32, batch_size: int = 64) -> tuple[list[Pair], dict]:
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
                       SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                      seed=seed * 1_000_003 + start),
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
        pairs.append(Pair([{"role": "user", "content": p.question}], right[0] if right else p.working(), wrong[0]))
    stats = {"problems": len(problems), "samples_per_problem": samples, "sample_accuracy": correct / len(asks),
             "pairs": len(pairs), "pairs_with_the_models_own_correct_answer": own_chosen}
    return pairs, stats


def rows(pairs: list[Pair], tok, model, seq_len: int, pad_id: int, precision: str, device) -> dict:
    """Chosen and rejected rows (padded to seq_len + 1, the mask on the completion) and their summed
    log-probabilities under the reference model — the model as it is now, before any step."""
    import torch

    from mmctl.data import rl as rl_data
    from mmctl.data.sft import pad
    from mmctl.errors import UsageError
    from mmctl.rl.dpo import logps
    from mmctl.runtime import autocast

    encoded = [rl_data.encode(p, tok) for p in pairs]
    chosen = pad([c for c, _ in encoded], seq_len, pad_id)
    rejected = pad([r for _, r in encoded], seq_len, pad_id)
    empty = sum(not any(c) or not any(r) for c, r in zip(chosen.trained, rejected.trained, strict=True))
    if empty:  # a pair whose completion falls past the row would train on nothing (and count as a pair)
        longest = max(len(c.ids) - sum(c.mask) for c, _ in encoded)
        raise UsageError(f"train.seq_len: {seq_len} leaves no completion token in {empty} of {len(pairs)} pairs (the "
                         f"longest prompt has {longest} tokens): raise it, or shorten those prompts")
    rows = {"chosen": chosen, "rejected": rejected, "cut": chosen.cut + rejected.cut,
            "ref": torch.zeros(len(pairs), 2)}
    model.eval()
    with torch.no_grad(), autocast(precision, device):
        for i in range(0, len(pairs), 16):
            batch = tensors(rows, list(range(i, min(i + 16, len(pairs)))), device)
            rows["ref"][i:i + 16] = logps(model, batch).view(2, -1).T.cpu()
    return rows


def batches(rows: dict, seed: int, train_cfg, dist):
    """batches(step, rank) → micro-batches of pairs drawn as a function of (seed, step, pair)."""
    from mmctl.data.batches import row_batches

    return row_batches(len(rows["chosen"].ids), seed, train_cfg, dist, lambda picks: tensors(rows, picks, dist.device))


def tensors(rows: dict, picks: list[int], device) -> dict:
    """The picked pairs as one batch: chosen rows then rejected rows, cut to the longest real row."""
    import torch

    ids = [rows["chosen"].ids[i] for i in picks] + [rows["rejected"].ids[i] for i in picks]
    trained = [rows["chosen"].trained[i] for i in picks] + [rows["rejected"].trained[i] for i in picks]
    # a row ends with its completion, then padding: its length is the last trained target's position + 2
    lengths = [max((j for j, t in enumerate(row) if t), default=-1) + 2 for row in trained]
    width = max(*lengths, 2)  # (a prompt that fills the row leaves its completion no token: nothing to score)
    ref = rows["ref"][picks]
    return {"ids": torch.tensor([r[:width] for r in ids], device=device),
            "trained": torch.tensor([r[:width - 1] for r in trained], device=device, dtype=torch.float32),
            "ref": torch.cat([ref[:, 0], ref[:, 1]]).to(device), "real": sum(lengths) - len(lengths)}


def validation(cfg, model, rows: dict, device, precision: str) -> dict:
    """The validation pairs' DPO loss, reward accuracy and margin (empty without validation pairs)."""
    import torch

    from mmctl.rl.dpo import batch_loss
    from mmctl.runtime import autocast

    n = len(rows["chosen"].ids)
    if not n:
        return {}
    model.eval()
    loss = accuracy = margin = 0.0  # sums over the pairs
    with torch.no_grad(), autocast(precision, device):
        for i in range(0, n, 16):
            out = batch_loss(cfg, model, tensors(rows, list(range(i, min(i + 16, n))), device))
            loss += float(out.sum)
            accuracy += float(out.metrics["rewards/accuracies"][0])
            margin += float(out.metrics["rewards/margins"][0])
    return {"val_loss": loss / n, "val_rewards/accuracies": accuracy / n, "val_rewards/margins": margin / n}
