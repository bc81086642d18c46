"""An lm-evaluation-harness model for mmctl checkpoints (the optional `mmctl[eval]` extra).

Implements lm-eval 0.4's `TemplateLM` interface (lm_eval/api/model.py, as its HFLM does) on mmctl's own code
rather than a second copy of it: log-likelihoods from `mmctl.evals.scoring` (left-padded batches, so scores do not
depend on the batch size), rolling windows from `mmctl.evals.perplexity`, completions from `mmctl.generate`.

lm_eval 0.4.13 finds `--model NAME` only in its own registry (no plugin entry points), so importing this module
registers the class as "mmctl", and running it runs the harness's own CLI with every flag unchanged:

    python -m mmctl.evals.lm_eval_adapter --model mmctl --model_args pretrained=CKPT --tasks TASKS [flags]

From Python: `import mmctl.evals.lm_eval_adapter`, then `lm_eval.simple_evaluate(model="mmctl", ...)`.
model_args: `pretrained` (an mmctl or local HF checkpoint dir, required), `batch_size` (default 8; wins over
`--batch_size`), `max_length` (tokens per window; default the model's context), `device` (default cuda if present).

Leaves out: chat templates (`--apply_chat_template`), `--batch_size auto`, several processes (data parallel),
and beam search or per-request seeds in `generate_until` (greedy unless `do_sample: true`).
"""

from __future__ import annotations

import json
import logging
import sys
from collections import defaultdict

from mmctl.errors import MmctlError, UsageError

try:
    # lm_eval registers its built-in models only when its registry is still empty: import them before ours
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ModuleNotFoundError as e:
    if e.name is None or e.name.split(".")[0] != "lm_eval":
        raise  # lm_eval is there but broken: its own error says more
    missing = UsageError("lm_eval is not installed; install the extra: pip install 'mmctl[eval]'")
    if __name__ != "__main__":
        raise missing from None
    print(f"error: {missing}", file=sys.stderr)
    sys.exit(missing.exit_code)

log = logging.getLogger(__name__)

MAX_GEN_TOKS = 256  # lm-eval's default when a task sets no max_gen_toks (HFLM's max_gen_toks)


@register_model("mmctl")
class MmctlLM(TemplateLM):
    """An mmctl checkpoint (model + tokenizer) answering the harness's three request types."""

    def __init__(self, pretrained: str | None = None, batch_size: int | str = 8, max_length: int | str | None = None,
                 device: str | None = None):
        super().__init__()
        from mmctl import checkpoints
        from mmctl.models import fast_decode

        if not pretrained:
            raise UsageError("model_args: pretrained=CKPT (an mmctl or local HF checkpoint dir) is required")
        self._device = pick_device(device)
        self.model, self.tok = checkpoints.load(pretrained, device=self._device, quantized=True)
        fast_decode.fuse(self.model)  # generate_until decodes through the fast step where the model allows
        self.batch_size = to_int(batch_size, "batch_size")
        if self.batch_size < 1:
            raise UsageError(f"model_args: batch_size must be at least 1, got {self.batch_size}")
        context = self.model.cfg.max_position_embeddings
        self.max_length = to_int(max_length, "max_length") if max_length is not None else context
        if not 1 < self.max_length <= context:
            raise UsageError(f"model_args: max_length {self.max_length} must be in 2..{context} (the model's context)")

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> MmctlLM:
        # The harness passes its own batch_size (the CLI's default is 1) and device beside model_args, and by
        # default a key in both is a TypeError: here what model_args names wins.
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**(extra | arg_dict))

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> MmctlLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @property
    def eot_token_id(self) -> int:
        # mmctl separates documents with <|eos|> and adds no BOS, so it is also the prefix of an empty context
        return self.tok.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        from mmctl.evals.scoring import loglikelihoods

        scores = loglikelihoods(self.model, [(context, continuation) for _, context, continuation in requests],
                                batch_size=self.batch_size, max_length=self.max_length)
        return [(s.logprob, s.greedy) for s in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from mmctl.evals.perplexity import rolling_requests
        from mmctl.evals.scoring import loglikelihoods

        # stride = the window: lm-eval's disjoint windows (get_rolling_token_windows with context_len=1), where
        # every later window still sees a full context
        pairs, owners = [], []
        for i, request in enumerate(requests):
            (text,) = request.args
            for pair in rolling_requests(self.tok_encode(text), self.prefix_token_id, self.max_length,
                                         self.max_length):
                pairs.append(pair)
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, score in zip(owners, loglikelihoods(self.model, pairs, batch_size=self.batch_size,
                                                       max_length=self.max_length), strict=True):
            totals[owner] += score.logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from mmctl.generate import completion_text, generate

        # one sampling setup per batch: group requests by their generation kwargs, longest prompts together
        groups = defaultdict(list)
        for i, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(i)
        results: list[str | None] = [None] * len(requests)
        for indices in groups.values():
            sampling, until = self.sampling(requests[indices[0]].args[1])
            # as HFLM: the prompt keeps its last tokens so that it and max_new_tokens fit the window; an empty
            # one starts after <|eos|>, as a document does
            prompts = {i: (self.tok_encode(requests[i].args[0]) or [self.prefix_token_id])
                       [-(self.max_length - sampling.max_new_tokens):] for i in indices}
            order = sorted(indices, key=lambda i: -len(prompts[i]))
            for b in range(0, len(order), self.batch_size):
                batch = order[b:b + self.batch_size]
                out = generate(self.model, [prompts[i] for i in batch], sampling, stop_token_ids=[self.eot_token_id],
                               decode=self.tok.decode)
                for i, completion in zip(batch, out.completions, strict=True):
                    results[i] = completion_text(self.tok, completion, until)
        return results

    def sampling(self, gen_kwargs: dict):
        """A task's generation_kwargs → (SamplingConfig, stop strings), with HF `generate`'s names and defaults."""
        from mmctl.generate import SamplingConfig

        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        # lm-eval's default of 256 new tokens can exceed a small model's whole context: keep one prompt token
        new = min(int(kwargs.pop("max_gen_toks", MAX_GEN_TOKS)), self.max_length - 1)
        sample = bool(kwargs.pop("do_sample", False))  # without it a temperature means nothing, as in HF
        temperature = float(kwargs.pop("temperature", 1.0))
        config = SamplingConfig(max_new_tokens=new, temperature=temperature if sample else 0.0,
                                top_k=int(kwargs.pop("top_k", None) or 0), top_p=float(kwargs.pop("top_p", None) or 1),
                                repetition_penalty=float(kwargs.pop("repetition_penalty", 1.0)), stop_strings=until)
        if kwargs:
            log.warning("mmctl: ignoring generation kwargs it does not support: %s", ", ".join(sorted(kwargs)))
        return config, until


def pick_device(device: str | None) -> str:
    """The device to load on. The harness's CLI passes cuda:0 unless told otherwise, also on machines without
    CUDA, so (as HFLM) an unavailable CUDA device falls back to what `auto` picks."""
    import torch

    from mmctl import runtime

    if device and device.startswith("cuda") and not torch.cuda.is_available():
        device = None
    return runtime.pick_device(device)


def to_int(value: int | str, name: str) -> int:
    try:  # model_args arrive as strings, or ints once lm_eval has parsed them
        return int(value)
    except ValueError:
        raise UsageError(f"model_args: {name} must be a whole number, got {value!r}") from None


def main() -> None:
    """The harness's own CLI, with "mmctl" registered; mmctl's errors print as one line with their exit code."""
    from lm_eval.__main__ import cli_evaluate

    try:
        cli_evaluate()
    except MmctlError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
