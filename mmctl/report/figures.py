"""The report's figures: first their data, pulled from the runs' logs and manifests (`series`, what the tests pin),
then the pictures (matplotlib, drawn off-screen into PNG files)."""

from __future__ import annotations

import math
from pathlib import Path

from mmctl.report.runs import StageRun

TRAINING = ("pretrain", "sft", "rl", "align-vision")


def series(runs: list[StageRun]) -> dict:
    """Every figure's data, by figure, then by run name (runs without the data are left out; points whose values
    are not finite numbers are skipped)."""
    from mmctl.report.tables import quantize_rows

    out = {"loss": {}, "optimizer": {}, "grpo": {}, "dpo": {}, "vision": {}, "quantize": {}, "account": {}}
    for run in runs:
        train = run.training()
        if run.stage in TRAINING and train:
            tokens_at = {r["step"]: r.get("tokens") for r in train}
            validation = [{**r, "tokens": _tokens(tokens_at, r["step"])} for r in run.validation()]
            out["loss"][run.name] = {"train": _points(train, "tokens", "loss"),
                                     "val": _points(validation, "tokens", "val_loss")}
            out["optimizer"][run.name] = {"lr": _points(train, "step", "lr"),
                                          "grad_norm": _points(train, "step", "grad_norm")}
        if run.stage == "rl" and any("reward" in r for r in train):
            out["grpo"][run.name] = {"reward": _points(train, "step", "reward"), "kl": _points(train, "step", "kl"),
                                     "completion_length": _points(train, "step", "completions/mean_length")}
        if run.stage == "rl" and any("rewards/margins" in r for r in train):
            out["dpo"][run.name] = {"margin": _points(train, "step", "rewards/margins"),
                                    "accuracy": _points(train, "step", "rewards/accuracies")}
        evaluation = run.results.get("evaluation")
        per_type = evaluation.get("per_type") if isinstance(evaluation, dict) else None
        if run.stage == "align-vision" and isinstance(per_type, dict):
            blind = evaluation.get("question_only")
            blind = blind.get("per_type") if isinstance(blind, dict) else None
            blind = blind if isinstance(blind, dict) else {}
            out["vision"][run.name] = {t: (v.get("accuracy"), v.get("chance"), blind.get(t))
                                       for t, v in per_type.items() if isinstance(v, dict)}
        rows = quantize_rows(run.results)[0] if run.stage == "quantize" else []
        if rows:
            out["quantize"][run.name] = [(r.get("name"), r["bytes"], r["perplexity"]) for r in rows
                                         if _finite(r.get("bytes")) and _finite(r.get("perplexity"))]
        throughput, memory = (run.results.get(k) if isinstance(run.results.get(k), dict) else {}
                              for k in ("throughput", "memory"))
        if _finite(throughput.get("measured_tok_s")) and _finite(throughput.get("tok_s_at_peak")):
            out["account"][run.name] = {
                "tok_s": (throughput["tok_s_at_peak"], throughput["measured_tok_s"]),
                "memory": (memory.get("predicted_peak_bytes"), memory.get("measured_peak_rss_bytes"))}
    return {name: data for name, data in out.items() if data}


def _finite(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _points(records: list[dict], x: str, y: str) -> list[tuple]:
    return [(r[x], r[y]) for r in records if _finite(r.get(x)) and _finite(r.get(y))]


def _tokens(tokens_at: dict, step: int):
    """The tokens trained by `step` (a validation record's step is a logged training step, or the one before)."""
    earlier = [s for s in tokens_at if s <= step]
    return tokens_at[max(earlier)] if earlier else None


LABELLED = 40  # points of the quantization figure that get their method's name


def draw(data: dict, attention: dict, out: Path) -> list[tuple[str, str]]:
    """Write one PNG per figure into `out`; returns (title, file name) in the report's order."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name: str, title: str):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append((title, name))

    if "loss" in data:
        fig, axes = _grid(plt, len(data["loss"]))
        for ax, (run, d) in zip(axes, data["loss"].items(), strict=False):
            ax.plot(*zip(*d["train"], strict=True), label="train")
            if d["val"]:
                ax.plot(*zip(*d["val"], strict=True), "o-", label="validation")
            ax.set(title=run, xlabel="tokens", ylabel="loss")
            ax.legend()
        save(fig, "loss.png", "Training and validation loss against tokens")
    if "optimizer" in data:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for run, d in data["optimizer"].items():
            if d["lr"]:
                axes[0].plot(*zip(*d["lr"], strict=True), label=run)
            if d["grad_norm"]:
                axes[1].plot(*zip(*d["grad_norm"], strict=True), label=run)
        axes[0].set(title="learning rate", xlabel="step")
        axes[1].set(title="gradient norm (before clipping)", xlabel="step", yscale="log")
        axes[0].legend(fontsize=7)
        save(fig, "optimizer.png", "Learning rate and gradient norm")
    for kind, title in (("grpo", "GRPO: reward, KL to the reference, completion length"),
                        ("dpo", "DPO: reward margin and preference accuracy")):
        if kind in data:
            keys = list(next(iter(data[kind].values())))
            fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6))
            for ax, key in zip(axes, keys, strict=True):
                for run, d in data[kind].items():
                    if d[key]:
                        ax.plot(*zip(*d[key], strict=True), label=run)
                ax.set(title=key.replace("_", " ") + ("" if any(d[key] for d in data[kind].values()) else
                                                      " (not logged)"), xlabel="step")
            save(fig, f"{kind}.png", title)
    if "vision" in data:
        fig, axes = _grid(plt, len(data["vision"]))
        for ax, (run, per_type) in zip(axes, data["vision"].items(), strict=False):
            names = list(per_type)
            ax.bar(names, [per_type[n][0] if _finite(per_type[n][0]) else 0 for n in names], label="accuracy")
            ax.scatter(names, [per_type[n][1] if _finite(per_type[n][1]) else float("nan") for n in names],
                       color="black", marker="_", s=400, label="chance", zorder=3)
            if any(_finite(per_type[n][2]) for n in names):
                ax.scatter(names, [per_type[n][2] if _finite(per_type[n][2]) else float("nan") for n in names],
                           color="tab:red", marker="x", s=60, label="question-only (another image)", zorder=4)
            ax.set(title=run, ylim=(0, 1), ylabel="accuracy")
            ax.legend()
        save(fig, "vision.png", "The VLM's accuracy per question type, with chance and the question-only baseline")
    if "quantize" in data:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for rows in data["quantize"].values():
            ax.scatter([size / 2**20 for _, size, _ in rows], [ppl for _, _, ppl in rows])
            for name, size, ppl in rows[:LABELLED]:  # (a label per point: past a few dozen they are unreadable)
                ax.annotate(name, (size / 2**20, ppl), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel="MiB on disk", ylabel="held-out perplexity", title="quantization: size against perplexity")
        save(fig, "quantize.png", "Quantization: size on disk against perplexity")
    if "account" in data:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        runs = list(data["account"])
        for ax, key, unit, scale in ((axes[0], "tok_s", "tokens/s", 1), (axes[1], "memory", "MiB", 2**20)):
            predicted = [(data["account"][r][key][0] or 0) / scale for r in runs]
            measured = [(data["account"][r][key][1] or 0) / scale for r in runs]
            x = range(len(runs))
            ax.bar([i - 0.2 for i in x], predicted, 0.4, label="predicted (account's formulas)")
            ax.bar([i + 0.2 for i in x], measured, 0.4, label="measured")
            ax.set_xticks(list(x), runs)
            ax.set(ylabel=unit, title="throughput (predicted: account's FLOPs per token at the measured matmul peak)"
                   if key == "tok_s" else "peak memory (measured: process RSS)")
            ax.legend(fontsize=7)
        save(fig, "account.png", "mmctl account's predictions against what training measured")
    for run, maps in attention.get("language", {}).items():
        save(_attention_grid(plt, maps), f"attention-{run}.png", f"Attention of {run} on its sample prompt "
             "(rows: layers, columns: heads; each row of a map is a token looking back)")
    if attention.get("vision"):
        name, examples = next(iter(attention["vision"].items()))
        save(_vision_overlay(plt, examples), f"attention-{name}.png",
             f"Where {name} looks: attention from its answer to the image's patches, per layer")
    return written


def _grid(plt, n: int):
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat)


MAX_PANELS = 8  # layers and heads drawn at most (the first ones): a 32 × 32 grid is not a picture anyone reads


def _attention_grid(plt, maps: dict):
    weights, tokens = maps["weights"], [repr(t)[1:-1] for t in maps["tokens"]]
    layers, heads = (min(n, MAX_PANELS) for n in weights.shape[:2])
    fig, axes = plt.subplots(layers, heads, figsize=(1.6 * heads + 1.5, 1.6 * layers + 1), squeeze=False)
    for i in range(layers):
        for j in range(heads):
            ax = axes[i][j]
            ax.imshow(weights[i, j].numpy(), cmap="viridis", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(f"layer {i}", fontsize=8)
            if i == 0:
                ax.set_title(f"head {j}", fontsize=8)
    fig.suptitle(" ".join(tokens)[:160], fontsize=8)
    return fig


def _vision_overlay(plt, examples: list[dict]):
    import numpy as np

    layers = examples[0]["grid"].shape[0]
    fig, axes = plt.subplots(len(examples), layers + 1, figsize=(2.2 * (layers + 1), 2.5 * len(examples)),
                             squeeze=False)
    for row, ex in zip(axes, examples, strict=True):
        image = np.asarray(ex["image"].convert("RGB"))
        row[0].imshow(image)
        row[0].set_title(f"{ex['question']}\n→ {ex['answer']!r} (truth {ex['expected']!r})", fontsize=7)
        for layer in range(layers):
            ax = row[layer + 1]
            ax.imshow(image)
            grid = ex["grid"][layer].numpy()
            ax.imshow(grid / max(grid.max(), 1e-9), cmap="magma", alpha=0.55,
                      extent=(0, image.shape[1], image.shape[0], 0), interpolation="nearest")
            ax.set_title(f"layer {layer}", fontsize=7)
        for ax in row:
            ax.axis("off")
    return fig
