#!/usr/bin/env python
"""Training-memory accounting for one small model, three ways, side by side.

Model: the SmolLM2-135M architecture (config from mmctl/presets/models/smollm2-135m.yaml), batch 1,
sequence length 512, fp32 weights and activations, AdamW, on CPU.

1. mmctl's prediction: `mmctl account smollm2-135m --seq-len 512 --batch 1 --precision fp32 --json`, once with
   `--attention flash` (the default) and once with `--attention eager`.
2. accelerate's estimator: `accelerate estimate-memory <dir with config.json> --library_name transformers
   --dtypes float32`. The CLI asks the Hugging Face Hub for the repo's metadata before it reads the config, so
   with a local directory (and no hub) it refuses; we then call the same code path in
   `accelerate.commands.estimate` with only that metadata lookup (`verify_on_hub`) stubbed out.
3. A measured training step: a fresh subprocess builds `AutoModelForCausalLM.from_config(...)` in fp32 (random
   init), `torch.optim.AdamW`, random ids of shape (1, 512) with labels = ids, and runs 2 steps of
   forward + backward + optimizer.step() + zero_grad(). Once with attn_implementation="sdpa" (transformers'
   default; on CPU a fused flash-style kernel that keeps no T×T scores) and once with "eager".
   - peak: RSS high-water mark (getrusage ru_maxrss) minus the RSS right before the model is built (after
     torch/transformers are imported);
   - per part: bytes of the live tensors themselves (parameters, .grad, AdamW state, tensors saved for
     backward as seen by torch.autograd.graph.saved_tensors_hooks), and the RSS at each phase boundary;
   - then, after the RSS peak has been read, a third identical step runs under torch.profiler with
     profile_memory=True to get the peak of live tensor bytes in torch's CPU allocator.

Run: `python benchmarks/account.py` (offline, about 2 minutes on 2 cores). `--quick` skips the eager run and
the profiled step. Prints markdown on stdout; `--json PATH` also writes the raw numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "mmctl" / "presets" / "models" / "smollm2-135m.yaml"
SEQ_LEN, BATCH, STEPS, THREADS = 512, 1, 2, 2
MB = 1e6  # decimal megabytes, as mmctl prints them
PHASES = ["model build + AdamW"] + [f"{ph}, step {i + 1}" for i in range(STEPS)
                                    for ph in ("forward", "backward", "optimizer.step", "zero_grad")]

ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
           TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))


def preset_config() -> dict:
    import yaml

    return yaml.safe_load(PRESET.read_text())["config"]


# --------------------------------------------------------------------------------------------- 3. measurement
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(attn: str, profile: bool) -> dict:
    """One fresh process: build the model, run STEPS training steps, return what was measured.

    With `profile`, one more identical step then runs under torch.profiler(profile_memory=True), after the RSS
    high-water mark of the STEPS steps has been read, so the profiler's own memory is not in the RSS peak.
    """
    import gc
    from collections import Counter

    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(THREADS)
    cfg = preset_config()
    config = AutoConfig.for_model(**cfg)
    V = cfg["vocab_size"]
    gc.collect()
    base_rss, base_max = _rss(), _maxrss()
    rss, hw = {}, {}  # RSS and RSS high-water at phase ends, relative to base_rss

    def checkpoint(name: str) -> None:
        rss[name], hw[name] = _rss() - base_rss, _maxrss() - base_rss

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    checkpoint("model build + AdamW")
    params = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    ids = torch.randint(0, V, (BATCH, SEQ_LEN))
    saved: dict[int, tuple[int, tuple]] = {}

    def pack(t):  # record each storage autograd keeps for backward (weights excluded); keep the tensor as is
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = (s.nbytes(), tuple(t.shape))
        return t

    def storages(ts) -> int:
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ts}.values())

    def train_step(n: int, mark=None) -> None:
        nonlocal grad_bytes, opt_bytes
        cp = mark or checkpoint
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        cp(f"forward, step {n}")
        loss.backward()
        cp(f"backward, step {n}")
        grad_bytes = storages(p.grad for p in model.parameters() if p.grad is not None)
        opt.step()
        cp(f"optimizer.step, step {n}")
        opt_bytes = storages(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
        opt.zero_grad(set_to_none=True)
        del loss
        cp(f"zero_grad, step {n}")

    grad_bytes = opt_bytes = 0
    for step in range(STEPS):
        train_step(step + 1)
    seconds = time.perf_counter() - t0
    peak_rss = _maxrss() - base_rss

    logits_bytes = sum(n for n, shape in saved.values() if shape and shape[-1] == V)  # log-softmax for the loss
    by_shape = Counter(str(shape) for _, shape in saved.values())
    out = {
        "attn": attn, "attn_implementation": model.config._attn_implementation, "dtype": str(model.dtype),
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in model.parameters()),
        "tied": model.lm_head.weight is model.model.embed_tokens.weight,
        "seconds": seconds, "base_rss": base_rss, "base_maxrss": base_max,
        "weights": sum(params.values()), "gradients": grad_bytes, "optimizer": opt_bytes,
        "activations": sum(n for n, _ in saved.values()) - logits_bytes, "logits": logits_bytes,
        "saved_storages": len(saved), "saved_by_shape": dict(by_shape),
        "rss": rss, "rss_highwater": hw, "peak_rss": peak_rss,
    }
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as tprofile

        # Live tensors when profiling starts: weights, AdamW states, buffers, the ids (grads are None now).
        live0 = storages(list(model.parameters()) + list(model.buffers()) + [ids] +
                         [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)])
        marks = []
        with tprofile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            train_step(STEPS + 1, mark=lambda name: marks.append((time.time_ns(), name)))
        out["profiler"] = _allocator_timeline(prof, live0, marks)
    return out


def _allocator_timeline(prof, live0: int, marks: list) -> dict:
    """Live tensor bytes in torch's CPU allocator during the profiled step: live0 + bytes allocated and not yet
    freed since profiling began (the profiler reports that running total with each allocation and free)."""
    allocs, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        n = stack.pop()
        stack.extend(n.children)
        if type(n.extra_fields).__name__ == "_ExtraFields_Allocation":
            allocs.append((n.start_time_ns, n.extra_fields.total_allocated))
    allocs.sort()
    peak_t, peak = max(allocs, key=lambda a: a[1])
    at_end, phase, prev = {}, None, 0
    for t, name in marks:  # phase ends, wall-clock ns (the profiler's clock is wall-clock ns too)
        before = [b for ts, b in allocs if ts <= t]
        at_end[name] = live0 + (before[-1] if before else 0)
        if phase is None and prev <= peak_t <= t:
            phase = name.split(",")[0]
        prev = t
    return {"live_at_start": live0, "peak": live0 + peak, "peak_phase": phase or "?", "at_end": at_end,
            "events": len(allocs)}


# ------------------------------------------------------------------------------------------ 2. accelerate
def accelerate_estimate(model_dir: str) -> dict:
    """accelerate's estimator via its Python API, the Hub metadata lookup stubbed (the only networked part)."""
    import contextlib
    import io
    from types import SimpleNamespace

    import accelerate
    import accelerate.commands.estimate as est

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    est.verify_on_hub = lambda repo, token=None: SimpleNamespace(library_name="transformers", config=cfg)
    args = SimpleNamespace(model_name=model_dir, library_name="transformers", dtypes=["float32"],
                           trust_remote_code=False)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        est.estimate_command(args)
    dtype, largest, total, training = est.gather_data(args)[0]
    return {"accelerate": accelerate.__version__, "table": buf.getvalue().rstrip(), "largest_layer": largest,
            "total": total, "training": training}


def run_accelerate(tmp: Path) -> dict:
    model_dir = tmp / "smollm2-135m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(preset_config(), indent=2))
    cli = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    cmd = [cli, "estimate-memory", str(model_dir), "--library_name", "transformers", "--dtypes", "float32"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=tmp)
    res = {"cli_cmd": " ".join(["accelerate"] + cmd[1:]), "cli_rc": p.returncode,
           "cli_error": (p.stderr.strip().splitlines() or [""])[-1]}
    if p.returncode == 0:
        res["cli_table"] = p.stdout.strip()
    api = _child(["--accelerate", str(model_dir)], tmp)
    res.update(api)
    res["how"] = ("the CLI" if p.returncode == 0 else "the Python API: `accelerate.commands.estimate."
                  "estimate_command` (and `gather_data` for the raw numbers) with `verify_on_hub` stubbed")
    res["model_dir_real"], res["model_dir"] = str(model_dir), "$TMP/smollm2-135m"
    res["cli_cmd"] = res["cli_cmd"].replace(str(model_dir), res["model_dir"])
    res["cli_error"] = res["cli_error"].replace(str(model_dir), res["model_dir"])
    return res


# ---------------------------------------------------------------------------------------------- 1. mmctl
def run_mmctl(attention: str, tmp: Path) -> dict:
    exe = Path(sys.executable).with_name("mmctl")
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "mmctl"]
    args = ["account", "smollm2-135m", "--seq-len", str(SEQ_LEN), "--batch", str(BATCH), "--precision", "fp32",
            "--attention", attention, "--json"]
    p = subprocess.run(base + args, capture_output=True, text=True, env=ENV, cwd=tmp, check=True)
    j = json.loads(p.stdout)
    return {"cmd": "mmctl " + " ".join(args), "training": j["memory"]["training"], "params": j["params"]["total"]}


# ------------------------------------------------------------------------------------------------ driver
def _child(argv: list[str], cwd: Path) -> dict:
    p = subprocess.run([sys.executable, str(Path(__file__).resolve())] + argv, capture_output=True, text=True,
                       env=ENV, cwd=cwd)
    if p.returncode != 0:
        sys.stderr.write(p.stderr)
        raise SystemExit(f"child {argv} failed with exit code {p.returncode}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def mb(x) -> str:
    return "—" if x is None else f"{x / MB:,.1f}"


def report(r: dict) -> str:
    mf, me, acc, ms, mE = (r["mmctl_flash"]["training"], r["mmctl_eager"]["training"], r["accelerate"],
                           r["measured_sdpa"], r.get("measured_eager"))
    a = acc["training"]  # accelerate's parts: model, gradients, optimizer, step; its "Training using Adam" = max
    runs = [("sdpa", ms)] + ([("eager", mE)] if mE else [])
    L = []
    head = ["MB (10^6 bytes)", "mmctl, --attention flash", "mmctl, --attention eager", "accelerate estimate-memory",
            "measured, sdpa", "measured, eager"]
    L.append("| " + " | ".join(head) + " |")
    L.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")

    def row(name, f, e, ac, key=None, cell=None):
        cell = cell or (lambda m: mb(m[key]))
        L.append(f"| {name} | {f} | {e} | {ac} | {cell(ms)} | {cell(mE) if mE else 'not run'} |")

    row("weights", mb(mf["weights"]), mb(me["weights"]), mb(a["model"]), "weights")
    row("gradients", mb(mf["gradients"]), mb(me["gradients"]), mb(a["gradients"]), "gradients")
    row("optimizer states", mb(mf["optimizer"]), mb(me["optimizer"]), mb(a["optimizer"]), "optimizer")
    row("activations", mb(mf["activations"]), mb(me["activations"]), "not counted", "activations")
    row("logits (fp32 log-softmax for the loss)", mb(mf["logits"]), mb(me["logits"]), "not counted", "logits")
    row("activations + logits", mb(mf["activations"] + mf["logits"]), mb(me["activations"] + me["logits"]),
        "not counted", cell=lambda m: mb(m["activations"] + m["logits"]))
    row("**peak**", f"**{mb(mf['peak'])}**", f"**{mb(me['peak'])}**", f"**{mb(max(a.values()))}**",
        cell=lambda m: f"**{mb(m['peak_rss'])}**")
    if "profiler" in ms:
        row("peak of live tensor bytes (profiler)", "", "", "",
            cell=lambda m: f"{mb(m['profiler']['peak'])} ({m['profiler']['peak_phase']})" if "profiler" in m
            else "not run")
    L.append("")
    L.append("- mmctl: `memory.training.*` from `--json`; its peak is weights + AdamW states + the larger of "
             "(activations + 2 × logits) at the start of the backward and the gradients at the optimizer step.")
    L.append("- accelerate: `estimate_training_usage(total_size, \"float32\")` = model, gradients, optimizer "
             "(2× model) and \"step\" (4× model); \"Training using Adam\" is the largest of these, i.e. 4× the "
             "weights; activations are not modelled.")
    L.append("- measured parts: bytes of the live tensors — parameters (the tied embedding / LM head once), "
             "`.grad` after backward, AdamW `exp_avg` + `exp_avg_sq` + `step` after `optimizer.step()`, and the "
             "storages autograd saved for backward in the forward pass (caught with "
             "`torch.autograd.graph.saved_tensors_hooks`; parameters excluded; the `[..., vocab]` log-softmax "
             "counted as logits).")
    L.append(f"- measured peak: RSS high-water mark (`ru_maxrss`) over {STEPS} steps minus the RSS just before "
             "the model was built (torch and transformers already imported).")
    if "profiler" in ms:
        L.append(f"- peak of live tensor bytes: a step {STEPS + 1}, identical to step {STEPS}, run in the same "
                 "process under `torch.profiler.profile(profile_memory=True)` after the RSS peak was read; live "
                 "bytes = tensors live when profiling began (weights, AdamW states, buffers, ids) + the "
                 "allocator's running total of bytes allocated and not yet freed since then.")
    L.append("")
    L.append("RSS at the end of each phase, MB above the pre-build RSS, with the high-water mark so far "
             "in brackets:")
    L.append("")
    L.append("| after | " + " | ".join(f"{n}: RSS [high-water]" for n, _ in runs) + " |")
    L.append("|---|" + "---:|" * len(runs))
    for ph in ms["rss"]:
        L.append(f"| {ph} | " + " | ".join(f"{mb(m['rss'][ph])} [{mb(m['rss_highwater'][ph])}]" for _, m in runs)
                 + " |")
    prof_runs = [(n, m) for n, m in runs if "profiler" in m]
    if prof_runs:
        L.append("")
        L.append(f"Live tensor bytes (profiler), MB, at the end of each phase of step {STEPS + 1}:")
        L.append("")
        L.append("| after | " + " | ".join(n for n, _ in prof_runs) + " |")
        L.append("|---|" + "---:|" * len(prof_runs))
        L.append("| start of the step | " + " | ".join(mb(m["profiler"]["live_at_start"]) for _, m in prof_runs)
                 + " |")
        for ph in prof_runs[0][1]["profiler"]["at_end"]:
            L.append(f"| {ph} | " + " | ".join(mb(m["profiler"]["at_end"][ph]) for _, m in prof_runs) + " |")
        L.append("| **peak** | " + " | ".join(f"**{mb(m['profiler']['peak'])}** ({m['profiler']['peak_phase']})"
                                             for _, m in prof_runs) + " |")
    L.append("")
    L.append(f"accelerate's own table ({acc['how']}):")
    L.append("")
    L.append("```")
    for line in (acc.get("cli_table") or acc["table"]).splitlines():  # the temp dir's name, width kept
        if acc["model_dir_real"] in line and line[:1] == "│":
            inner = line[1:-1]
            line = "│" + inner.strip().replace(acc["model_dir_real"], acc["model_dir"]).center(len(inner)) + "│"
        L.append(line.replace(acc["model_dir_real"], acc["model_dir"]))
    L.append("```")
    L.append("")
    L.append("Run details:")
    L.append("")
    L.append(f"- mmctl: `{r['mmctl_flash']['cmd']}` and the same with `--attention eager` "
             f"(N = {r['mmctl_flash']['params']:,} parameters).")
    L.append(f"- accelerate {acc['accelerate']}: `{acc['cli_cmd']}` exited {acc['cli_rc']}"
             + (f" with `{acc['cli_error'][:200]}`" if acc["cli_rc"] else "") + f"; numbers from {acc['how']}.")
    for n, m in runs:
        L.append(f"- measured, {n}: torch {m['torch']}, transformers {m['transformers']}, "
                 f"attn_implementation={m['attn_implementation']}, {m['dtype']}, {m['threads']} threads, "
                 f"{m['params']:,} parameters (LM head tied: {m['tied']}), {m['saved_storages']} saved storages "
                 f"per forward, {STEPS} steps in {m['seconds']:.1f} s, pre-build RSS {mb(m['base_rss'])} MB.")
    L.append(f"- total wall time {r['seconds']:.0f} s.")
    return "\n".join(L)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="sdpa only, no profiled step")
    ap.add_argument("--json", metavar="PATH", help="also write the raw numbers here")
    ap.add_argument("--measure", choices=["sdpa", "eager"], help=argparse.SUPPRESS)
    ap.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--accelerate", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.measure:  # child: one measured run
        print(json.dumps(measure(args.measure, args.profile)))
        return
    if args.accelerate:  # child: accelerate's Python API
        print(json.dumps(accelerate_estimate(args.accelerate)))
        return

    t0 = time.perf_counter()
    r = {}
    with tempfile.TemporaryDirectory(prefix="mmctl-account-bench-") as d:
        tmp = Path(d)
        r["mmctl_flash"] = run_mmctl("flash", tmp)
        r["mmctl_eager"] = run_mmctl("eager", tmp)
        r["accelerate"] = run_accelerate(tmp)
        for attn in (["sdpa"] if args.quick else ["sdpa", "eager"]):
            r[f"measured_{attn}"] = _child(["--measure", attn] + ([] if args.quick else ["--profile"]), tmp)
    r["seconds"] = time.perf_counter() - t0
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    print(report(r))


if __name__ == "__main__":
    main()
