"""The `mmctl` command line: one short command per pipeline stage.

Each command parses its options, loads the recipe (flags become recipe overrides, so one validator checks
everything), and hands the config to its stage's `run()`. Heavy libraries are imported inside the commands so
`mmctl --help` stays instant. Failures the user can fix are `MmctlError`s: one line per problem on stderr and
the exit code of DESIGN §6; anything else is a bug and keeps its traceback (exit 1).
"""

from __future__ import annotations

import functools
import json
import os
import signal
from pathlib import Path

import typer

import mmctl
from mmctl.errors import Interrupted, MmctlError, UsageError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Build language and vision-language models from scratch, one reproducible stage at a time.",
)

# stage name → (module, config class): what `mmctl validate` reads a recipe's `stage:` against. `rl` is two units,
# chosen by the recipe's `algorithm:` (dpo when absent).
STAGES = {
    "account": ("mmctl.stages.account", "AccountRecipe"),
    "tokenize": ("mmctl.stages.tokenize", "TokenizeRecipe"),
    "pretrain": ("mmctl.stages.pretrain", "PretrainRecipe"),
    "sft": ("mmctl.stages.sft", "SFTRecipe"),
    "rl": {"dpo": ("mmctl.stages.dpo", "DPORecipe"), "grpo": ("mmctl.stages.grpo", "GRPORecipe")},
    "align-vision": ("mmctl.stages.align_vision", "AlignVisionRecipe"),
    "quantize": ("mmctl.stages.quantize", "QuantizeRecipe"),
    "eval": ("mmctl.stages.eval", "EvalRecipe"),
}
# commands that read flags, not a recipe
COMMANDS = {**STAGES, "generate": ("mmctl.stages.generate", "GenerateConfig"),
            "chat": ("mmctl.stages.chat", "ChatConfig"), "serve": ("mmctl.stages.serve", "ServeConfig")}

def _yaml_value(value) -> str:
    """A Python value as the text of a `--set` override (JSON is YAML; non-ASCII kept as is)."""
    return json.dumps(value, ensure_ascii=False)


SET_HELP = "Override a recipe field: --set section.field=value (repeatable; the value is read as YAML)."


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mmctl {mmctl.__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Build language and vision-language models from scratch, one reproducible stage at a time."""


class Terminated(Exception):
    """SIGTERM outside the training loop (which turns it into a checkpoint and exit 75)."""


def _terminate(signum, frame):
    raise Terminated


def reports_errors(fn):
    """Turn failures the user can act on into one line each and the exit code of DESIGN §6: MmctlError as it
    says, an operating-system error on a file (disk full, read-only, no permission) as exit 3, Ctrl-C as 130
    and SIGTERM as 143 — every temporary file already removed by the code that was writing it."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        signal.signal(signal.SIGTERM, _terminate)
        try:
            return fn(*args, **kwargs)
        except Interrupted as e:  # a clean, resumable stop is not an error
            from rich.markup import escape

            from mmctl.console import console

            console.print(f"[yellow]{escape(e.problems[0])}[/yellow]", soft_wrap=True, highlight=False)
            raise typer.Exit(e.exit_code) from None
        except MmctlError as e:
            _print_errors(e.problems)
            raise typer.Exit(e.exit_code) from None
        except OSError as e:
            if e.errno is None:
                raise
            _print_errors([f"{e.filename or 'mmctl'}: {e.strerror}" + (f" ({e.filename2})" if e.filename2 else "")])
            raise typer.Exit(3) from None
        except KeyboardInterrupt:
            _print_errors(["interrupted (Ctrl-C); nothing unfinished was published"])
            raise typer.Exit(130) from None
        except Terminated:
            _print_errors(["terminated (SIGTERM); nothing unfinished was published"])
            raise typer.Exit(143) from None

    return wrapper


def _print_errors(problems: list[str]) -> None:
    from rich.markup import escape

    from mmctl.console import console

    for problem in problems:  # escaped: a problem may quote text like [a, b] that is not markup
        console.print(f"[red]error:[/red] {escape(problem)}", soft_wrap=True, highlight=False)


@app.command()
@reports_errors
def validate(
    recipe_path: Path = typer.Argument(..., metavar="RECIPE", help="A recipe YAML file."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Check a recipe without running it: every problem at once, one line each (exit 2)."""
    from mmctl import recipe
    from mmctl.console import console

    data, _ = recipe.parse(recipe.read(recipe_path), str(recipe_path))
    stage = data.get("stage")
    if not isinstance(stage, str) or stage not in STAGES:
        raise UsageError(f"{recipe_path}: stage: expected one of {', '.join(STAGES)} (the command the recipe is "
                         f"for), got {stage!r}")
    module, cfg = _load(stage, str(recipe_path), set_)
    _check_inputs(module, cfg, recipe_path)
    console.print(f"ok: {recipe_path} is a valid `mmctl {stage}` recipe")


def _check_inputs(module, cfg, recipe_path) -> None:
    """The recipe's inputs exist and are of their kind (a checkpoint dir, a tokenize output): what the stage would
    find first, found before it runs — each problem one line naming the recipe (exit 3)."""
    from mmctl.errors import DataError

    try:
        found = module.inputs(cfg) if hasattr(module, "inputs") else {}
    except MmctlError as e:
        raise type(e)(*(f"{recipe_path}: {p}" for p in e.problems)) from None
    missing = [f"{recipe_path}: {name}: {path} not found" for name, path in found.items() if not Path(path).exists()]
    if missing:
        raise DataError(*missing)


RECIPE_ARG = typer.Argument(..., metavar="RECIPE", help="The stage's recipe (YAML).")
SET = typer.Option([], "--set", help=SET_HELP)
DRY_RUN = typer.Option(False, "--dry-run", help="Print the resolved recipe and stop.")
FORCE = typer.Option(False, "--force", help="Re-run even if the output is up to date.")
JSON = typer.Option(False, "--json", help="Print the results as one JSON object on stdout.")
FRESH = typer.Option(False, "--fresh", help="Discard the checkpoints in the output directory and start from step 0.")
FORCE_RESUME = typer.Option(False, "--force-resume", help="Resume even though the model or data changed since the "
                                                          "checkpoint.")


def fields(cls, prefix: str = "", **flags: str):
    """Give a command one option per recipe field: `--name` for each `name="field.path"` of class `cls`, typed and
    documented by the field itself (its doc is the flag's help, so the two cannot drift). The command receives the
    options given as `overrides` (`prefix.field.path=value`, what `--set` takes): one validator checks them all."""
    import inspect

    from mmctl import recipe

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != "overrides"]
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
                 for name, path in flags.items() for annotation, default in [_option(name, *recipe.field(cls, path))]]

        @functools.wraps(command)
        def wrapper(*args, overrides=(), **kwargs):
            given = {name: (f"{prefix}.{path}" if prefix else path, kwargs.pop(name)) for name, path in flags.items()}
            overrides = [*overrides, *((f"{path}={_yaml_value(v)}", "--" + name.replace("_", "-"))
                                       for name, (path, v) in given.items() if v not in (None, []))]
            return command(*args, overrides=overrides, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=[*own, *added])
        return wrapper

    return decorate


def _option(name: str, typ, default, doc: str):
    """(annotation, typer.Option) of a flag for a field of type `typ`: given or not (None: the recipe's value,
    else the field's default), checked by the recipe like any value."""
    import types
    import typing

    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        typ = next(a for a in typing.get_args(typ) if a is not type(None))
    flag = "--" + name.replace("_", "-")
    if typing.get_origin(typ) is list:
        return list[str], typer.Option([], flag, help=doc + " (repeatable)")
    if typ is bool:
        return bool | None, typer.Option(None, f"{flag}/--no-{flag[2:]}", help=doc, show_default=False)
    if typing.get_origin(typ) is typing.Literal:
        typ = str
    return typ | None, typer.Option(None, flag, help=doc, show_default=False)


def _report(result, as_json: bool, render, always_render: bool = False) -> None:
    """The end of every stage command: "up to date", or the results (tables on stderr, or JSON on stdout)."""
    from mmctl.console import console, emit_json

    if as_json:
        emit_json(result.results)
    elif always_render or not result.up_to_date:
        render(result)
    if result.out is not None:
        written = result.out / "manifest.json"
        console.print(f"up to date: {written} (--force re-runs)" if result.up_to_date else f"wrote: {written}")


def _account_recipe():
    from mmctl.stages.account import AccountRecipe

    return AccountRecipe


@app.command()
@reports_errors
@fields(_account_recipe(), seq_len="train.seq_len", batch="train.batch_size", tokens="train.tokens",
        gpu="hardware.gpu", num_gpus="hardware.num_gpus", mfu="hardware.mfu", precision="train.precision",
        zero="train.zero", activation_checkpointing="train.activation_checkpointing", attention="train.attention")
def account(
    target: str | None = typer.Argument(
        None, help="A preset name (llama-7b), a Hugging Face config.json or a directory holding one (a "
                   "checkpoint), an account recipe, or a training recipe (its model, context and micro-batch)."),
    set_: list[str] = SET,
    explain: bool = typer.Option(False, "--explain", help="Show each number's formula and source."),
    verify: bool = typer.Option(False, "--verify", help="Check against transformers on the meta device and "
                                                        "torch's FlopCounterMode (needs torch)."),
    list_: bool = typer.Option(False, "--list", help="List the model and hardware presets."),
    as_json: bool = JSON, dry_run: bool = DRY_RUN, force: bool = FORCE, overrides: list[str] = (),
) -> None:
    """Parameters, FLOPs, memory, training time and scaling for a model: `mmctl account llama-7b`."""
    from mmctl.stages import Options
    from mmctl.stages import account as stage

    if list_:
        return stage.list_presets()
    if target is None:
        raise UsageError("account: give a preset name, a config.json, or a recipe (or --list)")
    cfg = stage.load_config(target, [*overrides, *set_])
    if dry_run:
        return _print_resolved(cfg, "account")
    result = stage.run(cfg, Options(force=force, json=as_json), verify=verify)
    _report(result, as_json, lambda r: stage.render(r, explain), always_render=True)  # the tables are the point
    if stage.disagrees(result):
        raise typer.Exit(1)


def _stage_command(name: str, help: str, *, device: bool = True, training: bool = False, resumes: bool = False,
                   body=None) -> None:
    """Register `mmctl NAME RECIPE`: the options every stage command shares (--set, --dry-run, --force, --json; a
    stage that runs a model: --device; a training stage: --fresh, --force-resume; another stage that resumes
    unfinished work: --fresh), then `_run_stage`."""
    import inspect

    def command(recipe_path: Path = RECIPE_ARG, set_: list[str] = SET, dry_run: bool = DRY_RUN,
                force: bool = FORCE, as_json: bool = JSON, fresh: bool = FRESH, force_resume: bool = FORCE_RESUME,
                overrides: list[str] = (), **extra) -> None:
        if body is not None and body(str(recipe_path), [*overrides, *set_], as_json, **extra):
            return
        options = {"fresh": fresh, "force_resume": force_resume} if training else {"fresh": fresh} if resumes else {}
        _run_stage(name, str(recipe_path), [*overrides, *set_], dry_run, force=force, json=as_json, **options)

    params = list(inspect.signature(command, eval_str=True).parameters.values())
    hidden = set() if training else {"force_resume"} if resumes else {"fresh", "force_resume"}
    keep = [p for p in params if p.kind is not p.VAR_KEYWORD and p.name not in hidden]
    if body is not None:
        keep += [p for p in inspect.signature(body, eval_str=True).parameters.values()][3:]
    command.__signature__ = inspect.Signature(keep)
    command.__doc__ = help
    if device:
        from mmctl.runtime import RunConfig

        command = fields(RunConfig, "run", device="device")(command)
    app.command(name)(reports_errors(command))


def _sft_inspect(recipe_path: str, overrides: list[str], as_json: bool,
                 inspect: bool = typer.Option(False, "--inspect", help="Show the first batch's rows token by token "
                                                                      "(role, conversation, trained or not) and exit."),
                 rows: int = typer.Option(2, "--rows", min=1, help="With --inspect: how many rows.")) -> bool:
    """`mmctl sft --inspect`: the rows, not a run (True when it was asked for)."""
    if not inspect:
        return False
    from mmctl.console import emit_json
    from mmctl.stages import sft as stage

    inspection = stage.inspect(_load("sft", recipe_path, overrides)[1], rows)
    if as_json:
        emit_json({**inspection, "rows": [{"row": r["row"], "tokens": [vars(t) for t in r["tokens"]]}
                                          for r in inspection["rows"]]})
    else:
        stage.render_inspection(inspection)
    return True


_stage_command("tokenize", "Train a byte-level BPE tokenizer and encode corpora into verified token shards; a "
               "killed or interrupted run continues from its last finished shard.", device=False, resumes=True)
_stage_command("pretrain", "Train a Llama-style decoder from scratch; resumes from the newest checkpoint in the "
                           "output directory.", training=True)
_stage_command("sft", "Fine-tune a checkpoint on conversations (full, LoRA or QLoRA), the loss on the assistant's "
                      "tokens; resumes.", training=True, body=_sft_inspect)
_stage_command("rl", "Preference optimisation (DPO) or RL with verifiable rewards (GRPO) of a chat model — the "
                     "recipe's `algorithm` — full, LoRA or QLoRA; resumes.", training=True)
_stage_command("align-vision", "Train a vision-language model — a ViT and a projector in front of a chat model — in "
                               "phases on image–text data; per-question-type accuracy on held-out images; resumes.",
               training=True)
_stage_command("quantize", "Post-training quantization (round-to-nearest, GPTQ, NF4, LLM.int8()) by several methods "
                           "at once: one checkpoint each, and a table of size, perplexity, task scores and decode "
                           "speed against the unquantized model.")


def _eval_recipe():
    from mmctl.stages.eval import EvalRecipe

    return EvalRecipe


@app.command("eval")
@reports_errors
@fields(_eval_recipe(), limit="eval.limit", samples="eval.samples", batch_size="eval.batch_size", out="run.out",
        chat="eval.chat", device="run.device")
def eval_(
    targets: list[str] = typer.Argument(..., metavar="RECIPE | CHECKPOINT...",
                                        help="An eval recipe, or one or more checkpoint directories (a `model/` "
                                             "dir, or a training checkpoint `checkpoints/step-N`)."),
    task: list[str] = typer.Option([], "--task", help="A built-in task (arithmetic, arithmetic-mc, stories-mc, "
                                                      "stories-ppl, story-questions, shapes-vqa), ppl / mc / gen / vqa "
                                                      "with --data, or a task YAML file."),
    data: str | None = typer.Option(None, "--data", help="The task data for --task ppl / mc / gen / vqa."),
    set_: list[str] = SET, dry_run: bool = DRY_RUN, force: bool = FORCE, as_json: bool = JSON,
    overrides: list[str] = (),
) -> None:
    """Score checkpoints on perplexity, multiple choice and generation tasks; several checkpoints side by side."""
    from mmctl.stages import eval as stage

    is_recipe = len(targets) == 1 and targets[0].endswith((".yaml", ".yml"))
    head = [] if is_recipe else [f"checkpoints={_yaml_value(targets)}"]
    if task:
        head.append(f"tasks={_yaml_value([stage.task_from_flag(t, data) for t in task])}")
    elif data:
        raise UsageError("--data needs --task (ppl, mc or gen)")
    # (a recipe says what its directory is for; a command line that names another one's is refused, not replaced)
    _run_stage("eval", targets[0] if is_recipe else None, [*head, *overrides, *set_], dry_run, force=force,
               json=as_json, replace=is_recipe or force)


def _config(command: str):
    import importlib

    module, name = COMMANDS[command]
    return getattr(importlib.import_module(module), name)


SAMPLING = {"max_new_tokens": "sampling.max_new_tokens", "temperature": "sampling.temperature",
            "top_k": "sampling.top_k", "top_p": "sampling.top_p", "repetition_penalty": "sampling.repetition_penalty",
            "stop": "sampling.stop_strings", "seed": "sampling.seed"}
CHECKPOINT = typer.Argument(..., metavar="CHECKPOINT", help="A checkpoint directory.")


@app.command()
@reports_errors
@fields(_config("generate"), **SAMPLING, chat="chat", image="image", draft="draft", draft_tokens="draft_tokens",
        compile="compile", device="device")
def generate(
    checkpoint: str = CHECKPOINT,
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="A prompt (repeatable)."),
    prompts: str | None = typer.Option(None, "--prompts", help="A file of prompts: one per line, or jsonl with "
                                                                "a \"prompt\" field."),
    as_json: bool = JSON, overrides: list[str] = (),
) -> None:
    """Sample from a checkpoint (KV cache; batched prompts are left-padded); output streams to the terminal."""
    from mmctl.stages import generate as stage

    texts = list(prompt) + (stage.read_prompts(prompts) if prompts else [])
    given = [f"checkpoint={_yaml_value(checkpoint)}", f"prompts={_yaml_value(texts)}"]
    _run_stage("generate", None, [*given, *overrides], False, json=as_json)


@app.command()
@reports_errors
@fields(_config("chat"), **SAMPLING, system="system", image="image", device="device")
def chat(checkpoint: str = CHECKPOINT, overrides: list[str] = ()) -> None:
    """Talk to a checkpoint: each line a message, the reply streamed; /help lists the commands (/reset, /system,
    /image). Piped stdin: one message a line, the replies on stdout."""
    from mmctl.stages import chat as stage

    stage.run(_load("chat", None, [f"checkpoint={_yaml_value(checkpoint)}", *overrides])[1])


@app.command()
@reports_errors
@fields(_config("serve"), host="host", port="port", name="name", device="device", batch_size="batch_size",
        queue="queue", max_tokens="max_tokens", max_request_bytes="max_request_bytes")
def serve(checkpoint: str = CHECKPOINT, overrides: list[str] = ()) -> None:
    """Serve a checkpoint over OpenAI's HTTP API (/v1/chat/completions, /v1/completions, /v1/models), batching
    concurrent requests; on localhost unless --host says otherwise."""
    from mmctl.stages import serve as stage

    stage.run(_load("serve", None, [f"checkpoint={_yaml_value(checkpoint)}", *overrides])[1])


@app.command()
@reports_errors
def report(
    run_dirs: list[Path] = typer.Argument(..., metavar="RUN_DIR...", help="Stage output dirs, or dirs holding them "
                                                                          "(a recipes dir's out/)."),
    out: Path = typer.Option(Path("report"), "--out", help="Where report.md and its figures go."),
    floors: Path | None = typer.Option(None, "--floors", help="A floors file: numbers the runs must clear "
                                                              "(exit 3 when one is missed)."),
    attention: bool = typer.Option(True, "--attention/--no-attention", help="Draw the trained models' attention "
                                                                             "(loads them; a few seconds)."),
    as_json: bool = JSON,
) -> None:
    """Summarise a pipeline's runs from their files (nothing re-runs): report.md with figures, the evaluation side
    by side, the VLM per question type, quantization, attention maps."""
    from mmctl import report as stage

    stage.run(run_dirs, out, floors, attention, as_json)


def _load(stage: str, recipe_path: str | None, overrides: list[str]):
    """(the stage's module, its config from the recipe — or from flags alone — with the overrides applied and
    checked)."""
    import importlib

    from mmctl import recipe

    data, source = (recipe.parse(recipe.read(recipe_path), str(recipe_path)) if recipe_path is not None
                    else ({}, recipe.Source("(command line)", {}, set())))
    units = COMMANDS[stage]
    if isinstance(units, dict):  # the unit the recipe's (or an override's) `algorithm` names
        given = dict(recipe.parse_override(o[0] if isinstance(o, tuple) else o) for o in overrides)
        chosen = given.get("algorithm", data.get("algorithm"))
        chosen = next(iter(units)) if chosen is None else chosen
        if chosen not in units:
            raise UsageError(f"{source.where('algorithm')}: algorithm: {chosen!r} is not one of {', '.join(units)}")
        units = units[chosen]
    module = importlib.import_module(units[0])
    return module, recipe.build(getattr(module, units[1]), data, source, overrides, stage=stage)


def _run_stage(stage: str, recipe_path: str | None, overrides: list[str], dry_run: bool, **options) -> None:
    """parse → load the recipe → stage.run → report: what every stage command does."""
    from mmctl.stages import Options

    module, cfg = _load(stage, recipe_path, overrides)
    if dry_run:
        return _print_resolved(cfg, stage)
    result = module.run(cfg, Options(**options))
    if int(os.environ.get("RANK", "0")) == 0:  # in a multi-process run, rank 0 reports
        _report(result, options.get("json", False), module.render)


def _print_resolved(cfg, stage: str) -> None:
    from mmctl import recipe
    from mmctl.console import console

    typer.echo(recipe.dump(cfg, stage), nl=False)
    console.print(f"dry run: the recipe is valid; `mmctl {stage}` would run it")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
