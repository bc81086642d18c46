"""What the fine-tuning stages (sft, rl) share: which weights train — `method: full | lora | qlora` — the run
around their own data and loss (open the run dir, fingerprint, resume, train on the one loop), and what they
write at the end: the merged chat model, and for adapters also the adapter in PEFT's format."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmctl.recipe import option

METHOD_HELP = ("full: every weight trains | lora: low-rank adapters on a frozen base | qlora: the same on a base "
               "quantized to 4 bits (needs bitsandbytes)")
LORA_HELP = "the adapters when method is lora or qlora (mmctl/models/lora.py)"
QLORA_HELP = "how the base is quantized when method is qlora (mmctl/quant/bnb.py)"


@dataclass
class EvalSection:
    sample_prompt: str = option("What is 12 + 7?", "a user message answered greedily at each evaluation")
    sample_tokens: int = option(24, "tokens of that answer at most", ge=1)


def open_run(cfg, stage: str, shardable: bool = False):
    """(run dir, process group) of a fine-tuning recipe; its inputs are the base checkpoint and every source file.
    `shardable`: FSDP may shard the model (`train_and_write`'s)."""
    from mmctl import recipe
    from mmctl.artifacts import Run
    from mmctl.runtime import pick_device, setup_distributed

    dist = setup_distributed(pick_device(cfg.run.device), shardable)
    inputs = {"base": Path(cfg.base),
              **{f"sources[{i}]": Path(s.path) for i, s in enumerate(cfg.data.sources) if s.path}}
    return Run(Path(cfg.run.out), stage, recipe.to_dict(cfg, stage), inputs=inputs, seed=cfg.run.seed,
               lock=dist.main), dist


def train_and_write(cfg, model, tok, run_dir, dist, options, *, batches, loss_fn, evaluate, precision,
                    loss_config: dict | None = None, shardable: bool = False) -> dict:
    """The part of a fine-tuning stage after its data: fingerprint the frozen weights, resume what can be resumed,
    train on the one loop, write the outputs (on the main process); returns the results so far. A checkpoint
    resumes only a run of the same base, method, data, rows and `loss_config`. `shardable`: FSDP may shard the
    model (mmctl/train/loop.py's `train`)."""
    import time

    from mmctl import recipe
    from mmctl.train import checkpoint
    from mmctl.train.loop import resumable, train, with_frozen

    out = Path(cfg.run.out)
    model.train()
    fingerprint = with_frozen(model, {"base": run_dir.inputs["base"]["sha256"], "method": cfg.method,
                                      "lora": recipe.to_dict(cfg.lora), "qlora": recipe.to_dict(cfg.qlora),
                                      "data": recipe.to_dict(cfg.data), "train.seq_len": cfg.train.seq_len,
                                      "train.batch_size": cfg.train.batch_size, "run.seed": cfg.run.seed,
                                      **({"loss": loss_config} if loss_config else {})})
    if options.fresh and dist.main:
        checkpoint.prune(out / "checkpoints", keep=0)
    dist.barrier()
    resume = resumable(out / "checkpoints", fingerprint, options.force_resume)
    if dist.main:
        run_dir.start(keep_metrics_through=int(resume.name.split("-")[1]) if resume else None)
    start = time.time()
    export = (lambda d: export_checkpoint(model, tok, d)) if cfg.method == "full" else None  # whole-model checkpoints
    last = train(model, cfg=cfg.train, optim=cfg.optim, batches=batches, loss_fn=loss_fn, out=out, log=run_dir.log,
                 evaluate=evaluate, export=export, fingerprint=fingerprint, force_resume=options.force_resume,
                 precision=precision, dist=dist, shardable=shardable)
    if not dist.main:
        return {}
    params = parameter_counts(model)
    write_outputs(model, tok, out, cfg.method, cfg.lora, cfg.base)
    return {"final": last, "seconds": time.time() - start, "method": cfg.method, "params": params}


def load(base: Path, method: str, device, seq_len: int):
    """(model, tokenizer) of the base checkpoint, checked against the rows it will train on."""
    from mmctl.errors import UsageError
    from mmctl.models import transformer
    from mmctl.quant import bnb

    if method == "qlora":
        bnb.require()  # before minutes of loading
    model, tok = transformer.load_with_tokenizer(base, device=device)
    if seq_len > model.cfg.max_position_embeddings:
        raise UsageError(f"train.seq_len: {seq_len} exceeds the base model's context "
                         f"({model.cfg.max_position_embeddings})")
    return model, tok


def adapt(model, method: str, lora_cfg, qlora_cfg) -> None:
    """Make `model` train as `method` says, in place: nothing to do for full; adapters for lora; a 4-bit base
    and adapters for qlora. Seed torch first: the adapters' A matrices are random."""
    from mmctl.models import lora
    from mmctl.quant import bnb

    if method == "qlora":
        bnb.to_4bit(model, qlora_cfg)
    if method in ("lora", "qlora"):
        lora.apply_lora(model, lora_cfg)


def parameter_counts(model) -> dict:
    """Trainable and total parameters; a 4-bit weight counts the values it stands for, not its packed bytes."""
    import math

    def count(p) -> int:
        state = getattr(p, "quant_state", None)
        return math.prod(state.shape) if state is not None else p.numel()

    trainable = sum(count(p) for p in model.parameters() if p.requires_grad)
    total = sum(count(p) for p in model.parameters())
    return {"trainable": trainable, "total": total, "trainable_fraction": trainable / total}


def write_outputs(model, tok, out: Path, method: str, lora_cfg, base: str) -> None:
    """<out>/adapter/ (lora, qlora) and <out>/model/: the merged model (a qlora base dequantized first), marked
    a chat model."""
    from mmctl.models import lora, transformer
    from mmctl.quant import bnb

    if method != "full":
        lora.save_adapter(model, out / "adapter", lora_cfg, base_model=base)
        bnb.to_dense(lora.merge(model))
    model.eval()
    transformer.save_checkpoint(model, out / "model", tok, chat=True)


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


def export_checkpoint(model, tok, directory: Path) -> None:
    """A full fine-tune's training checkpoints hold the whole model: make them loadable by eval and generate."""
    from mmctl.models import hf
    from mmctl.models.transformer import checkpoint_files

    hf.write_files(directory, None, checkpoint_files(model, tok, chat=True), tok.files())
