"""`mmctl generate`: sample from a checkpoint — streamed to the terminal, or as JSON with timings.

Prompts come from `--prompt` or a file (`--prompts`, one per line, or jsonl with a "prompt" field); many prompts
are decoded together as one left-padded batch. `--chat` wraps each prompt as a user turn through the
checkpoint's chat template. `--image PATH` asks a vision-language model (an align-vision output) each prompt
about the image, through its chat template. Decoding itself lives in `mmctl/generate.py`, shared with eval and RL.
`--draft DIR` decodes greedily with speculative decoding (`mmctl/speculative.py`): a small model with the same
tokenizer guesses `--draft-tokens` tokens at a time and the checkpoint checks them — the same tokens, in fewer
forwards of the large model; the acceptance rate is reported. A language model with plain layers decodes through
the fast step of `mmctl/models/fast_decode.py`; `--compile` runs that step through torch.compile.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mmctl.console import console
from mmctl.errors import DataError, UsageError
from mmctl.generate import SamplingConfig
from mmctl.recipe import option
from mmctl.stages import Options, StageResult


@dataclass
class GenerateConfig:
    checkpoint: str = option(None, "the checkpoint directory", required=True)
    prompts: list[str] = option(list, "the prompts")
    chat: bool = option(False, "wrap each prompt as a user turn with the checkpoint's chat template")
    image: str | None = option(None, "an image file each prompt asks about (a vision-language model; implies chat)")
    device: Literal["auto", "cpu", "cuda", "mps"] = option("auto", "auto: cuda, then mps, then cpu")
    sampling: SamplingConfig = option(SamplingConfig, "how tokens are picked (mmctl/generate.py)")
    draft: str | None = option(None, "a small checkpoint with the same tokenizer: speculative decoding (greedy)")
    draft_tokens: int = option(4, "speculative decoding: tokens the draft guesses per check", ge=1, le=64)
    compile: bool = option(False, "decode through torch.compile (a language model with plain layers): the first "
                                  "step compiles for 3-12 s, every later one is faster")

    def check(self) -> list[tuple[str, str]]:
        problems = [] if self.prompts else [("prompts", "missing required value: --prompt TEXT or --prompts FILE")]
        s = self.sampling
        if self.draft and (s.temperature or s.repetition_penalty != 1.0 or s.stop_strings or self.image):
            problems.append(("draft", "speculative decoding here is greedy, on text: drop --temperature, "
                                      "--repetition-penalty, --stop and --image (or --draft)"))
        if self.compile and self.draft:
            problems.append(("compile", "compiled decoding and speculative decoding do not combine: drop one"))
        return problems


def read_prompts(path: str) -> list[str]:
    """Prompts from a file: jsonl with a "prompt" field, or else one prompt per non-blank line."""
    from mmctl.data import jsonl

    file = Path(path)
    if file.suffix == ".jsonl":
        return [jsonl.field(record, "prompt", str, where) for where, record in jsonl.records(file)]
    if not file.is_file():
        raise DataError(f"{file}: prompts file not found")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{file}: not UTF-8 text (byte {e.start})") from None
    return [line for line in text.splitlines() if line.strip()]


def run(cfg: GenerateConfig, options: Options = Options()) -> StageResult:
    """Complete every prompt; a single prompt streams to stdout unless the results go there as JSON."""
    from mmctl import checkpoints, hf
    from mmctl.data.chat import prompt_ids, stop_ids
    from mmctl.generate import generate
    from mmctl.models import fast_decode
    from mmctl.runtime import Dist, announce, pick_device

    device = pick_device(cfg.device)
    model, tok = checkpoints.load(cfg.checkpoint, device=device, vision=True, quantized=True)
    if not fast_decode.fuse(model) and cfg.compile:
        raise UsageError(f"--compile: {cfg.checkpoint} is quantized or a vision-language model; compiled decoding "
                         "takes a language model with plain floating-point layers")
    pixels = None
    if cfg.image is not None:
        pixels, ids = _image_prompts(model, tok, cfg)
    elif cfg.chat:
        ids = [prompt_ids([{"role": "user", "content": p}], tok) for p in cfg.prompts]
    else:
        ids = [tok.encode(p) for p in cfg.prompts]
    chat = cfg.chat or cfg.image is not None
    stops = sorted(set(hf.eos_token_ids(cfg.checkpoint)) | set(stop_ids(tok) if chat else [tok.eos_id]))
    announce(Dist(device=device))  # once the prompts are known good: a refused run prints only its error
    if cfg.draft:
        return _speculative(cfg, model, tok, ids, stops)
    printer = _Streamer(tok, cfg.prompts[0]) if not options.json and len(ids) == 1 else None
    out = generate(model, ids, cfg.sampling, stop_token_ids=stops, decode=tok.decode,
                   on_tokens=printer.add if printer else None, pixels=pixels, compile=cfg.compile)
    if printer:
        printer.finish()
    completions = [_record(tok, p, i, c) for p, i, c in zip(cfg.prompts, ids, out.completions, strict=True)]
    return StageResult(None, {"completions": completions, "time_to_first_token_s": out.time_to_first_token,
                              "decode_tokens_per_s": out.decode_tokens_per_s,
                              **({"compile_s": out.compile_seconds} if cfg.compile else {})},
                       detail={"streamed": printer is not None})


def _record(tok, prompt: str, ids: list[int], completion) -> dict:
    return {"prompt": prompt, "completion": tok.decode(completion.ids, skip_special_tokens=True),
            "tokens": len(completion.ids), "prompt_tokens": len(ids), "finish_reason": completion.finish_reason}


def _speculative(cfg: GenerateConfig, model, tok, ids: list[list[int]], stops: list[int]) -> StageResult:
    """Each prompt on its own (batch 1), the draft guessing; the same tokens as plain greedy decoding."""
    from mmctl import checkpoints, speculative
    from mmctl.models import fast_decode
    from mmctl.models.vlm import VLM

    if isinstance(model, VLM):
        raise UsageError(f"--draft: {cfg.checkpoint} is a vision-language model; speculative decoding takes a "
                         "language model")
    draft, draft_tok = checkpoints.load(cfg.draft, device=model.device, quantized=True)
    fast_decode.fuse(draft)  # its one-token guesses through the fast step
    if draft_tok.sha256 != tok.sha256:
        raise UsageError(f"--draft: {cfg.draft} has another tokenizer than {cfg.checkpoint}; the draft's guesses "
                         "must be the target's tokens")
    runs = [speculative.generate(model, draft, i, cfg.sampling.max_new_tokens, cfg.draft_tokens, stops) for i in ids]
    completions = [_record(tok, p, i, r.completion) for p, i, r in zip(cfg.prompts, ids, runs, strict=True)]
    drafted, accepted = sum(r.drafted for r in runs), sum(r.accepted for r in runs)
    tokens, forwards = sum(len(r.completion.ids) for r in runs), sum(r.target_forwards for r in runs)
    seconds = sum(r.seconds for r in runs)
    decoded = tokens - len(runs)  # after each prompt's first token, which the prefill gives (as plain decoding counts)
    spec = {"draft": cfg.draft, "draft_tokens": cfg.draft_tokens, "drafted": drafted, "accepted": accepted,
            "acceptance_rate": accepted / drafted if drafted else None, "target_forwards": forwards,
            "tokens_per_target_forward": tokens / max(1, forwards)}
    return StageResult(None, {"completions": completions, "time_to_first_token_s": None,
                              "decode_tokens_per_s": decoded / seconds if seconds and decoded else None,
                              "speculative": spec}, detail={"streamed": False})


def _image_prompts(model, tok, cfg: GenerateConfig):
    """(pixels, ids): the image preprocessed for the model, once per prompt, and each prompt asked about it."""
    import torch

    from mmctl.data import images, vqa
    from mmctl.models.vlm import VLM

    if not isinstance(model, VLM):
        raise UsageError(f"--image: {cfg.checkpoint} is a language model; images go to a vision-language model "
                         "(an `mmctl align-vision` output)")
    pixels = images.pixels(images.load(cfg.image), model.vision.encoder.image_size)
    ids = [vqa.prompt(p, tok, model.image_token_id, model.tokens_per_image) for p in cfg.prompts]
    return torch.stack([pixels] * len(ids)), ids


class _Streamer:
    """Prints a single completion as it is decoded (multi-byte characters print whole)."""

    def __init__(self, tok, prompt: str):
        from mmctl.session import Detokenizer

        self.text, self.prompt = Detokenizer(tok), prompt

    def _prompt_once(self) -> None:  # printed with the first token, so a refused request prints nothing
        if self.prompt is not None:
            sys.stdout.write(self.prompt)
            self.prompt = None

    def add(self, new: list[int | None]) -> None:
        self._prompt_once()
        if new[0] is not None:
            sys.stdout.write(self.text.add(new[0]))
            sys.stdout.flush()

    def finish(self) -> None:
        self._prompt_once()
        sys.stdout.write("\n")
        sys.stdout.flush()


def render(result: StageResult) -> None:
    results = result.results
    if not result.detail["streamed"]:
        for c in results["completions"]:
            sys.stdout.write(c["prompt"] + c["completion"] + "\n")
    rate, spec = results["decode_tokens_per_s"], results.get("speculative")
    if spec:
        console.print(f"speculative: {spec['accepted']} of {spec['drafted']} draft tokens accepted "
                      f"({spec['acceptance_rate'] or 0:.0%}), {spec['tokens_per_target_forward']:.2f} tokens per "
                      f"target forward; decode " + (f"{rate:.1f} tokens/s" if rate else "—"))
        return
    compiled = results.get("compile_s")
    console.print(f"time to first token {results['time_to_first_token_s'] * 1000:.0f} ms; "
                  + (f"compile {compiled:.1f} s; " if compiled is not None else "")
                  + "decode " + (f"{rate:.1f} tokens/s" if rate else "—"))
