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
   - a second subprocess per attention setting re-runs the same 2 steps under torch.profiler with
     profile_memory=True to get the peak of live tensor bytes held by torch's CPU allocator.

Run: `python benchmarks/account.py` (offline; ~2-3 minutes on 2 cores). `--quick` skips the eager and profiler
runs. Prints markdown on stdout; `--json PATH` also writes the raw numbers.
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
    """One fresh process: build the model, run STEPS training steps, return what was measured."""
    import gc
    import contextlib

    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(THREADS)
    cfg = preset_config()
    config = AutoConfig.for_model(**cfg)
    V = cfg["vocab_size"]
    gc.collect()
    base_rss, base_max = _rss(), _maxrss()

    prof = None
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as tprofile

        prof = tprofile(activities=[ProfilerActivity.CPU], profile_memory=True)
        prof.__enter__()
    mark = torch.profiler.record_function if profile else (lambda name: contextlib.nullcontext())

    rss, hw = {}, {}  # RSS and RSS high-water at phase boundaries, relative to base_rss

    def checkpoint(name: str) -> None:
        rss[name], hw[name] = _rss() - base_rss, _maxrss() - base_rss

    t0 = time.perf_counter()
    torch.manual_seed(0)
    with mark("model build + AdamW"):
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

    grad_bytes = opt_bytes = 0
    for step in range(STEPS):
        saved.clear()
        with mark(f"forward, step {step + 1}"):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = model(input_ids=ids, labels=ids).loss
        checkpoint(f"forward, step {step + 1}")
        with mark(f"backward, step {step + 1}"):
            loss.backward()
        checkpoint(f"backward, step {step + 1}")
        grad_bytes = sum({p.grad.untyped_storage().data_ptr(): p.grad.untyped_storage().nbytes()
                          for p in model.parameters() if p.grad is not None}.values())
        with mark(f"optimizer.step, step {step + 1}"):
            opt.step()
        checkpoint(f"optimizer.step, step {step + 1}")
        opt_bytes = sum(v.untyped_storage().nbytes() for st in opt.state.values() for v in st.values()
                        if torch.is_tensor(v))
        with mark(f"zero_grad, step {step + 1}"):
            opt.zero_grad(set_to_none=True)
            del loss
        checkpoint(f"zero_grad, step {step + 1}")
    seconds = time.perf_counter() - t0

    logits_bytes = sum(n for n, shape in saved.values() if shape and shape[-1] == V)  # log-softmax for the loss
    out = {
        "attn": attn, "attn_implementation": model.config._attn_implementation, "dtype": str(model.dtype),
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in model.parameters()),
        "tied": model.lm_head.weight is model.model.embed_tokens.weight,
        "seconds": seconds,
        "base_rss": base_rss, "base_maxrss": base_max,
        "weights": sum(params.values()), "gradients": grad_bytes, "optimizer": opt_bytes,
        "activations": sum(n for n, _ in saved.values()) - logits_bytes, "logits": logits_bytes,
        "saved_tensors": len(saved),
        "rss": rss, "rss_highwater": hw, "peak_rss": _maxrss() - base_rss,
    }
    if prof is not None:
        prof.__exit__(None, None, None)
        out["profiler"] = _allocator_timeline(prof)
    return out


def _allocator_timeline(prof) -> dict:
    """Peak of torch's CPU-allocator live bytes (allocated since profiling began) and the value at phase ends."""
    tree = prof.profiler.kineto_results.experimental_event_tree()
    allocs, marks, stack = [], [], list(tree)
    while stack:
        n = stack.pop()
        stack.extend(n.children)
        ef = n.extra_fields
        if type(ef).__name__ == "_ExtraFields_Allocation":
            allocs.append((n.start_time_ns, ef.total_allocated))
        elif n.name in PHASES:
            marks.append((n.start_time_ns, n.end_time_ns, n.name))
    allocs.sort()
    peak_t, peak = max(allocs, key=lambda a: a[1])
    at_end = {}
    for start, end, name in sorted(marks):
        before = [b for t, b in allocs if t <= end]
        at_end[name] = before[-1] if before else 0
    phase = next((name for start, end, name in marks if start <= peak_t <= end), "?")
    return {"peak": peak, "peak_phase": phase, "at_end": at_end, "events": len(allocs)}


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
    res["model_dir"] = "<tmp>/smollm2-135m"
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
    a = acc["training"]  # accelerate's dict: model, gradients, optimizer, step (peak = max of them)
    L = []
    head = ["part (MB = 1e6 bytes)", "mmctl --attention flash", "mmctl --attention eager",
            "accelerate estimate-memory", "measured, sdpa", "measured, eager"]
    L.append("| " + " | ".join(head) + " |")
    L.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")

    def row(name, f, e, ac, s, ea):
        L.append(f"| {name} | {f} | {e} | {ac} | {s} | {ea} |")

    g = (lambda k: mb(mE[k])) if mE else (lambda k: "not run")
    row("weights", mb(mf["weights"]), mb(me["weights"]), mb(a["model"]), mb(ms["weights"]), g("weights"))
    row("gradients", mb(mf["gradients"]), mb(me["gradients"]), mb(a["gradients"]), mb(ms["gradients"]),
        g("gradients"))
    row("optimizer states (AdamW)", mb(mf["optimizer"]), mb(me["optimizer"]), mb(a["optimizer"]),
        mb(ms["optimizer"]), g("optimizer"))
    row("activations (saved for backward)", mb(mf["activations"]), mb(me["activations"]), "not counted",
        mb(ms["activations"]), g("activations"))
    row("logits (log-softmax kept for the loss)", mb(mf["logits"]), mb(me["logits"]), "not counted",
        mb(ms["logits"]), g("logits"))
    row("activations + logits", mb(mf["activations"] + mf["logits"]), mb(me["activations"] + me["logits"]),
        "not counted", mb(ms["activations"] + ms["logits"]),
        mb(mE["activations"] + mE["logits"]) if mE else "not run")
    row("**peak**", f"**{mb(mf['peak'])}**", f"**{mb(me['peak'])}**", f"**{mb(max(a.values()))}**",
        f"**{mb(ms['peak_rss'])}**", f"**{mb(mE['peak_rss'])}**" if mE else "not run")
    pr = lambda m: (f"{mb(m['profiler']['peak'])} (in {m['profiler']['peak_phase']})"  # noqa: E731
                    if m and "profiler" in m else "not run")
    row("peak live tensor bytes (torch profiler)", "", "", "", pr(ms), pr(mE))
    L.append("")
    L.append("Measured per-part rows are bytes of the live tensors (parameters; `.grad`; AdamW `exp_avg`, "
             "`exp_avg_sq`, `step`; storages that autograd saved for backward in the last forward, parameters "
             "excluded, the `[..., vocab]` log-softmax counted as logits). Measured peak = RSS high-water mark "
             "over both steps minus the RSS just before the model was built.")
    L.append("")
    L.append("RSS at phase ends, MB above the pre-build RSS (high-water mark in brackets):")
    L.append("")
    runs = [("sdpa", ms)] + ([("eager", mE)] if mE else [])
    L.append("| after | " + " | ".join(f"{n} RSS [high-water]" for n, _ in runs) + " | " +
             " | ".join(f"{n} live tensors (profiler)" for n, m in runs if "profiler" in m) + " |")
    L.append("|---|" + "---:|" * (len(runs) + sum("profiler" in m for _, m in runs)))
    for ph in ms["rss"]:
        cells = [f"{mb(m['rss'][ph])} [{mb(m['rss_highwater'][ph])}]" for _, m in runs]
        cells += [mb(m["profiler"]["at_end"].get(ph)) for _, m in runs if "profiler" in m]
        L.append(f"| {ph} | " + " | ".join(cells) + " |")
    L.append("")
    L.append("accelerate's own table (`" + acc["how"] + "`):")
    L.append("")
    L.append("```")
    L.append(acc.get("cli_table") or acc["table"])
    L.append("```")
    L.append("")
    L.append("Run details:")
    L.append("")
    L.append(f"- mmctl: `{r['mmctl_flash']['cmd']}` and `{r['mmctl_eager']['cmd']}` "
             f"(N = {r['mmctl_flash']['params']:,} params).")
    L.append(f"- accelerate {acc['accelerate']}: `{acc['cli_cmd']}` → exit {acc['cli_rc']}"
             + (f" (`{acc['cli_error'][:160]}`)" if acc["cli_rc"] else "") + f"; numbers from {acc['how']}.")
    for n, m in runs:
        L.append(f"- measured {n}: torch {m['torch']}, transformers {m['transformers']}, "
                 f"attn_implementation={m['attn_implementation']}, {m['dtype']}, {m['threads']} threads, "
                 f"{m['params']:,} params (lm_head tied: {m['tied']}), {m['saved_tensors']} saved storages, "
                 f"{STEPS} steps in {m['seconds']:.1f} s; pre-build RSS {mb(m['base_rss'])} MB.")
    L.append(f"- total wall time {r['seconds']:.0f} s.")
    return "\n".join(L)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="sdpa only, no profiler runs")
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
        acc = run_accelerate(tmp)
        acc["how"] = ("the CLI" if acc["cli_rc"] == 0 else
                      "accelerate.commands.estimate.estimate_command / gather_data with verify_on_hub stubbed")
        r["accelerate"] = acc
        for attn in (["sdpa"] if args.quick else ["sdpa", "eager"]):
            m = _child(["--measure", attn], tmp)
            if not args.quick:
                m["profiler"] = _child(["--measure", attn, "--profile"], tmp)["profiler"]
            r[f"measured_{attn}"] = m
    r["seconds"] = time.perf_counter() - t0
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    print(report(r))


if __name__ == "__main__":
    main()
