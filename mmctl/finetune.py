"""What the fine-tuning stages (sft, dpo and grpo behind `mmctl rl`) share: which weights train — `method: full |
lora | qlora` — around a base checkpoint, what their checkpoints and fingerprints hold, and what they write at
the end: the merged chat model, and for adapters also the adapter in PEFT's format.

A fine-tuning recipe has the sections `run`, `base`, `method`, `lora`, `qlora`, `data` (its `sources` a mixture:
mmctl/data/mixture.py), `optim`, `train` and `eval` (a `SampleConfig`); the functions here read only those.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from mmctl.recipe import option

METHOD_HELP = ("full: every weight trains | lora: low-rank adapters on a frozen base | qlora: the same on a base "
               "quantized to 4 bits (needs bitsandbytes)")
LORA_HELP = "the adapters when method is lora or qlora (mmctl/models/lora.py)"
QLORA_HELP = "how the base is quantized when method is qlora (mmctl/quant/bnb.py)"


@dataclass
class SampleConfig:
    sample_prompt: str = option("What is 12 + 7?", "a user message answered greedily at each evaluation")
    sample_tokens: int = option(24, "tokens of that answer at most", ge=1, le=4096)


def inputs(cfg) -> dict[str, Path]:
    """The base checkpoint and every source file (what the manifest hashes); a base that is no checkpoint dir is
    named before anything is hashed."""
    from mmctl import hf

    hf.checkpoint_dir(cfg.base, "base")
    return {"base": Path(cfg.base),
            **{f"sources[{i}]": Path(s.path) for i, s in enumerate(cfg.data.sources) if s.path}}


def load(cfg, device):
    """(model, tokenizer) of the base checkpoint, checked against the rows it will train on."""
    from mmctl import checkpoints
    from mmctl.errors import UsageError
    from mmctl.quant import bnb

    if cfg.method == "qlora":
        bnb.require()  # before minutes of loading
    model, tok = checkpoints.load(Path(cfg.base), device=device)
    if cfg.train.seq_len > model.cfg.max_position_embeddings:
        raise UsageError(f"train.seq_len: {cfg.train.seq_len} exceeds the base model's context "
                         f"({model.cfg.max_position_embeddings})")
    return model, tok


def adapt(model, cfg, tok) -> None:
    """Make `model` train as `cfg.method` says, in place: nothing to do for full; adapters (and any trainable token
    rows) for lora; a 4-bit base and the same for qlora. Seeded: the adapters' A matrices are random (and dropout
    draws from the same seed)."""
    import torch

    from mmctl.models import lora
    from mmctl.quant import bnb

    torch.manual_seed(cfg.run.seed)
    if cfg.method == "qlora":
        bnb.to_4bit(model, cfg.qlora)
    if cfg.method in ("lora", "qlora"):
        lora.apply_lora(model, cfg.lora, lora.token_ids(tok, cfg.lora.trainable_tokens))
    model.train()


def fingerprint(cfg, job, **extra) -> dict:
    """What a checkpoint must have been trained with to be resumed: the base, the method, the data, the rows and
    whatever the stage adds (its loss's settings)."""
    from mmctl import recipe

    return {"base": job.dir.inputs["base"]["sha256"], "method": cfg.method, "lora": recipe.to_dict(cfg.lora),
            "qlora": recipe.to_dict(cfg.qlora), "data": recipe.to_dict(cfg.data), "train.seq_len": cfg.train.seq_len,
            "train.batch_size": cfg.train.batch_size, "run.seed": cfg.run.seed, **extra}


def exporter(cfg, model, tok):
    """A full fine-tune's training checkpoints hold the whole model: this makes them loadable by eval and
    generate (None for adapters, whose checkpoints hold the adapters only)."""
    if cfg.method != "full":
        return None

    def export(directory: Path) -> None:
        from mmctl import checkpoints, hf

        hf.write_files(directory, None, checkpoints.lm_files(model, tok, chat=True), tok.files())

    return export


def write(cfg, model, tok, job, last: dict, started: float) -> dict:
    """<out>/adapter/ (lora, qlora) and <out>/model/ — the merged model (a qlora base dequantized first), marked a
    chat model — as the job's products; returns the results every fine-tuning stage reports."""
    from mmctl import checkpoints
    from mmctl.models import lora
    from mmctl.quant import bnb

    params = parameter_counts(model)
    if cfg.method != "full":
        lora.save_adapter(model, job.product("adapter"), cfg.lora, base_model=cfg.base)
        bnb.to_dense(lora.merge(model))
    model.eval()
    checkpoints.save(model, job.product("model"), tok, chat=True)
    return {"final": last, "seconds": time.time() - started, "method": cfg.method, "params": params}


def parameter_counts(model) -> dict:
    """Trainable and total parameters; a 4-bit weight counts the values it stands for, not its packed bytes."""
    import math

    def count(p) -> int:
        state = getattr(p, "quant_state", None)
        return math.prod(state.shape) if state is not None else p.numel()

    trainable = sum(count(p) for p in model.parameters() if p.requires_grad)
    total = sum(count(p) for p in model.parameters())
    return {"trainable": trainable, "total": total, "trainable_fraction": trainable / total}


def pad_id(tok) -> int:
    """The id rows are padded with (and real tokens counted against): the pad token, else <|eos|>."""
    return tok.pad_id if tok.pad_id is not None else tok.eos_id


def sample_answer(model, tok, question: str, max_new_tokens: int) -> str:
    """"question → answer": the model's greedy reply to one user turn, through its chat template (what every
    fine-tuning stage shows at each evaluation)."""
    from mmctl.data.chat import prompt_ids, stop_ids
    from mmctl.generate import SamplingConfig, completion_text, generate

    answer = generate(model, [prompt_ids([{"role": "user", "content": question}], tok)],
                      SamplingConfig(max_new_tokens=max_new_tokens), stop_token_ids=stop_ids(tok))
    return f"{question} → {completion_text(tok, answer.completions[0])}"
