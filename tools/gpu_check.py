"""Helpers of tools/gpu_check.sh: the attention matrix with its out-of-memory case, and summary.md.

    python tools/gpu_check.py matrix --preset seq-attention --seq-lens 2048,4096,8192 \
        --oom-above cuda --out M.toml
    python tools/gpu_check.py summary --tree results/reference/<kind> --out summary.md

`matrix` writes the preset at the given sequence lengths with one case in front sized so that a
single tensor of it exceeds the memory (`cuda`: the GPU's total memory; a number: bytes, e.g. the
address-space limit of a CPU dry run): an out-of-memory row on any GPU, reached in a second or two.
`summary` reads what the steps left in the tree (no torch, no pandas: it must run when they fail).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: this checkout's bench
    sys.path.insert(0, str(ROOT))

from bench.compat import tomllib  # noqa: E402
from bench.format import DASH, format_bytes, format_pct, md_table  # noqa: E402
from bench.paper import PAIRS, PROTOCOL  # noqa: E402
from bench.results import OK_STATUSES, number  # noqa: E402

OOM_MARGIN = 1.5  # the one tensor is 1.5x the memory: no allocator slack or luck makes it fit
OOM_MODEL = {"family": "transformer", "variant": "untied", "size": "debug", "depth": 1, "batch": 1,
             "config": {"attention": "relative"}}
FIVE_PERCENT = 0.05  # the goal for predicted vs torch_cuda (issue 13)


# -- matrix ---------------------------------------------------------------------------------------
def oom_seq_len(limit_bytes: int, *, n_head: int, batch: int = 1, mem_len: int = 0,
                margin: float = OOM_MARGIN) -> int:
    """The shortest T at which relative attention's positional scores, one float32 (B, H, T,
    T + mem_len) tensor made before any other large one, are `margin` times `limit_bytes`."""
    need = margin * limit_bytes / (4 * n_head * batch)  # T * (T + mem_len) elements per head
    return math.ceil((-mem_len + math.sqrt(mem_len**2 + 4 * need)) / 2)


def device_memory(spec: str) -> int:
    if spec != "cuda":
        value = int(spec)
        if value <= 0:
            raise ValueError(f"--oom-above must be positive bytes or 'cuda', got {spec!r}")
        return value
    import torch

    if not torch.cuda.is_available():
        raise ValueError("--oom-above cuda needs a CUDA device (give bytes instead)")
    return torch.cuda.get_device_properties(0).total_memory


def oom_sweep(limit_bytes: int) -> dict[str, Any]:
    from models import make_config

    config = make_config("transformer", OOM_MODEL["size"], **OOM_MODEL["config"])
    seq_len = oom_seq_len(limit_bytes, n_head=config.n_head, batch=OOM_MODEL["batch"],
                          mem_len=getattr(config, "mem_len", 0) or 0)
    return {**OOM_MODEL, "seq_len": seq_len}


def attention_matrix(preset: Mapping[str, Any], seq_lens: Sequence[int], oom: Mapping[str, Any],
                     sizes: Sequence[str] | None = None) -> dict[str, Any]:
    """The preset at `seq_lens` (and only `sizes`), the out-of-memory case first: the cases
    after it show that each runs in a fresh worker whatever the one before did."""
    sweeps = [s for s in preset["sweep"] if not sizes or s.get("size") in sizes]
    if not sweeps:
        raise ValueError(f"no sweep of {preset['name']} has a size among {list(sizes or [])}")
    return {
        "name": preset["name"],
        "description": (f"{preset['name']} at seq_len {', '.join(map(str, seq_lens))} (tools/gpu_check.sh), "
                        f"after one case sized past the memory (seq_len {oom['seq_len']}): "
                        f"{preset.get('description', '')}"),
        "settings": preset.get("settings", {}),
        "defaults": {**preset.get("defaults", {}), "seq_len": list(seq_lens)},
        "sweep": [dict(oom), *sweeps],
    }


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML for {value!r}")


def toml_text(matrix: Mapping[str, Any]) -> str:
    lines = [f"{k} = {toml_value(matrix[k])}" for k in ("name", "description")]
    for table in ("settings", "defaults"):
        lines += ["", f"[{table}]", *(f"{k} = {toml_value(v)}" for k, v in matrix[table].items())]
    for sweep in matrix["sweep"]:
        lines += ["", "[[sweep]]", *(f"{k} = {toml_value(v)}" for k, v in sweep.items())]
    return "\n".join(lines) + "\n"


def cmd_matrix(args: argparse.Namespace) -> int:
    from bench.spec import PRESET_DIR, load_matrix

    path = PRESET_DIR / f"{args.preset}.toml"
    if not path.is_file():
        raise ValueError(f"unknown preset {args.preset!r} ({path} does not exist)")
    preset = tomllib.loads(path.read_text())
    seq_lens = [int(t) for t in args.seq_lens.split(",") if t.strip()]
    if not seq_lens or min(seq_lens) < 1:
        raise ValueError(f"--seq-lens needs positive integers, got {args.seq_lens!r}")
    sizes = args.sizes.split(",") if args.sizes else None
    limit = device_memory(args.oom_above)
    matrix = attention_matrix(preset, seq_lens, oom_sweep(limit), sizes)
    out = Path(args.out)
    out.write_text(toml_text(matrix))
    cases = load_matrix(out).cases  # the file must load as the runner will load it
    print(f"{out}: {len(cases)} cases; the first ({cases[0].case_id}) is sized past "
          f"{format_bytes(limit)} ({limit} B)")
    return 0


# -- reading what the steps left ------------------------------------------------------------------
def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def read_steps(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def junit_counts(path: Path) -> dict[str, Any]:
    """Totals and failing tests of a pytest junit XML file (empty when there is none)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    totals = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is not None:
                message = (node.get("message") or node.text or "").strip().splitlines()
                name = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
                failed.append((tag, name, message[0][:160] if message else ""))
    skipped_reasons: dict[str, int] = {}
    for case in root.iter("testcase"):
        node = case.find("skipped")
        if node is not None:
            reason = (node.get("message") or "").strip()[:100]
            skipped_reasons[reason] = skipped_reasons.get(reason, 0) + 1
    return {**totals, "failed": failed, "skipped_reasons": skipped_reasons}


def num(row: Mapping[str, Any] | None, key: str) -> float | int | None:
    if row is None:
        return None
    value = row.get(key)
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = float(value)
        except ValueError:
            return None
    return number(value)


def ok(row: Mapping[str, Any] | None) -> bool:
    return row is not None and row.get("status") in OK_STATUSES


def reduction(base: float | None, deq: float | None) -> float | None:
    return None if not base or deq is None else 1.0 - deq / base


def mib(value: Any) -> str:
    v = number(value) if not isinstance(value, str) else num({"v": value}, "v")
    return DASH if v is None else f"{v / 2**20:.1f}"


def pct(value: Any) -> str:
    v = num({"v": value}, "v") if isinstance(value, str) else number(value)
    return DASH if v is None else f"{v:+.1%}"


# -- the sections of summary.md -------------------------------------------------------------------
def header_lines(tree: Path, env: Mapping[str, Any], mode: str, command: str, note: str) -> list[str]:
    kind = tree.name
    versions = env.get("versions") or {}
    cuda = env.get("cuda") or {}
    nvml = env.get("nvml") or {}
    lines = [f"# GPU check: {env.get('device_name') or kind} (`{kind}`)", ""]
    if mode == "dry":
        lines += ["**Dry run on the CPU** (small matrices, predicted where sizes are large): it tests "
                  "the script, not a GPU. Nothing here is a GPU measurement; do not commit it.", ""]
        if note:
            lines += [f"Why: {note}.", ""]
    git = env.get("git") or {}
    facts = [
        f"date {env.get('date', DASH)}",
        f"torch {versions.get('torch', DASH)} (CUDA {cuda.get('version') or DASH})",
        f"driver {nvml.get('driver') or DASH}",
    ]
    if cuda.get("total_memory_bytes"):
        facts.append(f"{format_bytes(cuda['total_memory_bytes'])} of GPU memory")
    facts.append(f"git {git.get('sha') or 'unknown here'}{' (dirty)' if git.get('dirty') else ''}")
    lines.append("; ".join(facts) + ".")
    if command:
        lines.append(f"Command: `{command}`.")
    return lines


def step_lines(steps: list[dict[str, str]], budget_total: float | None) -> list[str]:
    rows = [(s["step"], s["name"], s["status"], s["wall_s"], s["budget_s"], s["log"], s.get("note") or "")
            for s in steps]
    wall = sum(float(s["wall_s"] or 0) for s in steps)
    lines = ["## Steps", "", *md_table(["#", "step", "status", "wall s", "budget s", "log", "note"], rows)]
    total = f"{wall:.0f} s of steps" + (f" within a budget of {budget_total:.0f} s" if budget_total else "")
    lines += ["", f"Total: {total} (the summary step's own time is not in this table)."]
    not_ok = [s for s in steps if s["status"] not in ("ok", "skipped")]
    if not_ok:
        lines += ["", "Not ok: " + "; ".join(f"{s['name']} {s['status']}" for s in not_ok)
                  + " (the end of each log is in step-tails.txt)."]
    return lines


def gpu_path_lines(tree: Path, mode: str) -> list[str]:
    """Each GPU code path the issue names, and the rows that show it ran (or why not)."""
    validate = read_csv(tree / "instruments" / "instruments.csv")
    runs = {name: read_csv(tree / name / "results.csv") for name in ("gpu-validate", "paper", "seq-attention")}
    rows = [r for name in runs for r in runs[name]]
    dry = mode == "dry"
    checks: list[tuple[str, str, str]] = []

    def check(path: str, seen: bool, evidence: str, gpu_only: bool = True) -> None:
        verdict = "n/a (CPU)" if dry and gpu_only else "yes" if seen else "**no**"
        checks.append((path, verdict, evidence))

    cuda_rows = [r for r in rows if r.get("memory_source") == "torch_cuda"]
    cuda_validate = [r for r in validate if num(r, "cuda_peak_bytes") is not None]
    resets = [(a, b) for a, b in itertools.pairwise(validate)
              if a.get("model") == b.get("model") and a.get("phase") == "train" and b.get("phase") == "eval"
              and num(a, "cuda_peak_bytes") is not None and num(b, "cuda_peak_bytes") is not None]
    lower = sum(num(b, "cuda_peak_bytes") < num(a, "cuda_peak_bytes") for a, b in resets)
    check("torch_cuda: max allocated/reserved after reset_peak_memory_stats",
          bool(cuda_rows or cuda_validate) and lower == len(resets),
          f"{len(cuda_rows)} run rows with memory_source torch_cuda; in one process (validate) "
          f"{lower}/{len(resets)} eval steps peak below the train step before them (a peak not "
          "reset would carry over)")
    sampled = [r for r in validate if (num(r, "nvml_samples") or 0) > 0]
    sources = sorted({r.get("nvml_process_source") for r in validate if r.get("nvml_process_source")})
    nvml_rows = [r for r in rows if num(r, "nvml_process_bytes") is not None]
    check("NVML sampler thread (start/stop, process and device memory)", bool(sampled and nvml_rows),
          f"validate: {len(sampled)}/{len(validate)} cases sampled (median "
          f"{_median(num(r, 'nvml_samples') for r in sampled)} samples; process memory from "
          f"{', '.join(sources) or DASH}); {len(nvml_rows)} run rows (fresh workers) with "
          "nvml_process_bytes")
    windows = [num(r, "nvml_energy_window_s") for r in validate if num(r, "energy_j_per_token") is not None]
    energy_rows = [r for r in rows if num(r, "energy_j_per_token") is not None]
    in_validate = (f"validate: {len(windows)} cases, shortest window {min(windows):.2f} s"
                   if windows else "validate: no energy reading")
    check("NVML energy counter over windows of at least 1 s",
          bool(windows) and min(windows) >= 1.0,
          f"{in_validate}; {len(energy_rows)} run rows with energy_j_per_token")
    seq = runs["seq-attention"]
    ooms = [i for i, r in enumerate(seq) if r.get("status") == "oom"]
    after = seq[ooms[0] + 1:] if ooms else []
    check(f"out of memory on {'the CPU (address-space limit)' if dry else 'CUDA'} as a row",
          bool(ooms),
          f"`{seq[ooms[0]]['case_id']}`: {seq[ooms[0]].get('error', '')[:200]}" if ooms
          else f"no oom row among {len(seq)} seq-attention rows", gpu_only=False)
    fresh = [r for r in after if ok(r)]
    slack = [num(r, "reserved_bytes") / num(r, "peak_bytes") for r in fresh
             if num(r, "reserved_bytes") and num(r, "peak_bytes")]
    check("a fresh worker per case" + ("" if dry else " on CUDA"), bool(after) and len(fresh) == len(after),
          f"{len(fresh)}/{len(after)} cases after the oom row ok"
          + (f"; reserved/allocated at most {max(slack):.2f}x (a reused worker would carry the "
             "cache of the case before)" if slack else ""), gpu_only=False)
    rel = [num(r, "predicted_vs_cuda") for r in validate if num(r, "predicted_vs_cuda") is not None]
    within = sum(abs(x) <= FIVE_PERCENT for x in rel)
    check("predicted vs torch_cuda (validate, less the cuBLAS workspace)", bool(rel),
          f"{within}/{len(rel)} cases within 5%, largest miss {max(rel, key=abs):+.1%}"
          if rel else "no case has both numbers")
    lines = ["## GPU paths exercised", ""]
    if dry:
        lines += ["Dry run: the GPU paths cannot run on a CPU (n/a); the CPU sides of the same "
                  "steps did.", ""]
    return lines + md_table(["path", "seen", "evidence"], checks)


def _median(values: Iterable[float | None]) -> str:
    vals = sorted(v for v in values if v is not None)
    return DASH if not vals else f"{vals[len(vals) // 2]:.0f}"


def validate_lines(tree: Path) -> list[str]:
    rows = read_csv(tree / "instruments" / "instruments.csv")
    if not rows:
        return ["## Instruments (validate_gpu)", "", "No instruments.csv: the validate step did not write one."]
    table = [(f"{r['model']} {r['phase']}", r.get("check", DASH), pct(r.get("predicted_vs_cuda")),
              pct(r.get("predicted_vs_cuda_raw")), mib(r.get("cuda_peak_bytes")),
              mib(r.get("cuda_preexisting_bytes")), mib(r.get("reserved_minus_allocated_bytes")),
              mib(r.get("nvml_minus_reserved_bytes")), mib(r.get("cuda_context_bytes")),
              _fmt_float(r.get("energy_j_per_token"), ".2e"))
             for r in rows]
    return ["## Instruments (validate_gpu: debug size, one process)", "",
            *md_table(["case", "check", "predicted vs cuda", "raw", "allocated MiB", "pre-existing MiB",
                       "reserved − alloc MiB", "NVML − reserved MiB", "context MiB", "J/token"], table)]


def _fmt_float(value: Any, spec: str) -> str:
    v = num({"v": value}, "v")
    return DASH if v is None else format(v, spec)


def paper_lines(tree: Path) -> list[str]:
    rows = read_csv(tree / "paper" / "results.csv")
    head = ["## The paper's pairs, measured (seq 150, batch 15, core mode, one training step)", ""]
    if not rows:
        return [*head, "No paper results.csv: the paper step did not write one."]
    table = []
    for pair in PAIRS:
        base = _protocol_row(rows, pair.baseline_model, pair.size, pair.baseline_depth)
        deq = _protocol_row(rows, pair.deq_model, pair.size, None)
        if base is None and deq is None:
            continue
        cells = [pair.label, f"{pair.baseline_gb:.1f} → {pair.deq_gb:.1f} GB ({format_pct(pair.reduction)})"]
        for key in ("peak_bytes", "reserved_bytes", "nvml_process_bytes", "predicted_cuda_bytes"):
            cells.append(_pair_cell(base, deq, key))
        table.append(cells)
    lines = [*head, *md_table(["pair", "paper", "allocated (torch_cuda)", "reserved", "NVML process",
                               "predicted (512 B blocks)"], table)]
    source = sorted({r.get("memory_source") or DASH for r in rows})
    failed = [r for r in rows if not ok(r)]
    lines += ["", f"Each cell: baseline → DEQ (reduction). peak_bytes source: {', '.join(source)}."]
    if failed:
        lines += ["Not ok: " + "; ".join(f"{r['case_id']} {r['status']}" for r in failed)]
    return lines


def _protocol_row(rows: list[dict[str, str]], model: str, size: str, depth: int | None) -> dict | None:
    hits = [r for r in rows if r.get("model") == model and r.get("size") == size
            and r.get("phase") == "train" and r.get("mode") == PROTOCOL["mode"]
            and num(r, "seq_len") == PROTOCOL["seq_len"] and num(r, "batch") == PROTOCOL["batch"]
            and (depth is None or num(r, "depth") == depth)]
    return hits[-1] if hits else None


def _pair_cell(base: dict | None, deq: dict | None, key: str) -> str:
    def side(row: dict | None) -> tuple[str, float | None]:
        if row is None:
            return "not run", None
        if not ok(row):
            return row.get("status") or DASH, None
        value = num(row, key)
        return format_bytes(value), value

    (btext, b), (dtext, d) = side(base), side(deq)
    if b is None and d is None and base is not None and deq is not None and ok(base) and ok(deq):
        return DASH
    return f"{btext} → {dtext} ({format_pct(reduction(b, d))})"


def attention_lines(tree: Path) -> list[str]:
    rows = read_csv(tree / "seq-attention" / "results.csv")
    head = ["## Attention and sequence length (explicit Transformer, training step)", ""]
    if not rows:
        return [*head, "No seq-attention results.csv: the attention step did not write one."]
    series: dict[tuple[str, str, str], dict[int, dict]] = {}
    oom_rows = [r for r in rows if r.get("status") == "oom" and r.get("case_id", "").endswith("attention=relative")
                and num(r, "depth") == 1]
    for r in rows:
        if r in oom_rows[:1]:
            continue
        attention = (json.loads(r["overrides"]) if r.get("overrides") else {}).get("attention", "relative")
        series.setdefault((r["size"], attention, r.get("depth") or ""), {})[int(num(r, "seq_len"))] = r
    lengths = sorted({t for s in series.values() for t in s})
    table = []
    for (size, attention, depth), by_t in series.items():
        cells = [f"{size} L{depth}", attention]
        for t in lengths:
            r = by_t.get(t)
            if r is None:
                cells.append(DASH)
            elif not ok(r):
                cells.append(r.get("status") or DASH)
            else:
                cells.append(f"{format_bytes(num(r, 'peak_bytes'))} ({format_bytes(num(r, 'predicted_cuda_bytes'))})")
        cells.append(_growth(by_t))
        table.append(cells)
    lines = [*head, *md_table(["model", "attention", *(f"T={t}" for t in lengths), "growth"], table),
             "", "Each cell: peak allocated (predicted); growth: the log-log slope of the peak over the "
             "longest two lengths measured (1 linear, 2 quadratic)."]
    if oom_rows:
        r = oom_rows[0]
        lines += [f"Sized past the memory: `{r['case_id']}` → {r['status']} "
                  f"({(r.get('error') or '')[:120]})."]
    return lines


def _growth(by_t: Mapping[int, dict]) -> str:
    points = sorted((t, num(r, "peak_bytes")) for t, r in by_t.items() if ok(r) and num(r, "peak_bytes"))
    if len(points) < 2:
        return DASH
    (t1, p1), (t2, p2) = points[-2], points[-1]
    return f"{math.log(p2 / p1) / math.log(t2 / t1):.2f}"


RUN_STEPS = {"gpu-validate": "gpu-validate", "paper": "paper", "seq-attention": "attention",
             "paper-audit": "explain"}  # run directory -> the step that made it


def run_lines(tree: Path) -> list[str]:
    """Per run: cases done of the matrix, statuses, predicted vs allocated, and the time a case
    costs beyond its own measurement (a fresh worker's start: process, imports, CUDA context)."""
    lines = ["## Runs", ""]
    walls = {s["name"]: num(s, "wall_s") for s in read_steps(tree / "steps.tsv")}
    for name, step in RUN_STEPS.items():
        rows = read_csv(tree / name / "results.csv")
        if not rows:
            continue
        statuses: dict[str, int] = {}
        for r in rows:
            statuses[r.get("status") or "?"] = statuses.get(r.get("status") or "?", 0) + 1
        total = read_json(tree / name / "env.json").get("matrix", {}).get("cases")
        pairs = [(num(r, "predicted_cuda_bytes"), num(r, "peak_bytes")) for r in rows
                 if ok(r) and r.get("memory_source") == "torch_cuda"]
        misses = [p / c - 1 for p, c in pairs if p and c]
        line = (f"- `{name}`: {len(rows)}{f' of {total}' if total else ''} cases, "
                + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())))
        if misses:
            line += (f"; predicted (512 B blocks) vs allocated as it is: median {_median_pct(misses)}, "
                     f"largest {max(misses, key=abs):+.1%}")
        inside = [num(r, "elapsed_s") for r in rows if num(r, "elapsed_s") is not None]
        if walls.get(step) and inside:
            per_case = walls[step] / len(rows)
            line += (f"; {per_case:.1f} s of the step's wall per case, {sum(inside) / len(inside):.1f} s "
                     "of it measuring (elapsed_s)")
        lines.append(line)
    check = tree / "gpu-validate" / "check.txt"
    if check.is_file():
        last = [line for line in check.read_text().splitlines() if line.strip()]
        lines.append(f"- deqbench check against the committed baseline: {last[-1] if last else DASH}")
    baseline = tree.parent.parent / "baselines" / f"{tree.name}.json"
    if baseline.is_file():
        cases = read_json(baseline).get("cases", {})
        lines.append(f"- baseline: `results/baselines/{tree.name}.json`, {len(cases)} cases")
    explain = tree / "paper-audit"
    if explain.is_dir():
        files = sorted(p.name for p in explain.iterdir())
        lines.append(f"- explain (`paper-audit/`): {', '.join(files) or 'empty'}")
    return lines if len(lines) > 2 else []


def _median_pct(values: list[float]) -> str:
    vals = sorted(values)
    return f"{vals[len(vals) // 2]:+.1%}"


def pytest_lines(tree: Path) -> list[str]:
    counts = junit_counts(tree / "pytest-gpu" / "junit.xml")
    if not counts:
        return ["## pytest -m gpu", "", "No junit.xml: pytest did not finish writing one (see its log)."]
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    lines = ["## pytest -m gpu", "",
             f"{counts['tests']} tests: {passed} passed, {counts['failures']} failed, "
             f"{counts['errors']} errors, {counts['skipped']} skipped."]
    for tag, name, message in counts["failed"][:12]:
        lines.append(f"- {tag}: `{name}`: {message}")
    if len(counts["failed"]) > 12:
        lines.append(f"- … {len(counts['failed']) - 12} more in pytest-gpu/junit.xml")
    for reason, n in sorted(counts["skipped_reasons"].items(), key=lambda kv: -kv[1])[:3]:
        lines.append(f"- skipped {n}: {reason}")
    return lines


def commit_lines(kind: str, mode: str) -> list[str]:
    lines = ["## Unpack and commit", ""]
    if mode == "dry":
        return [*lines, "A dry run: nothing to commit (its kind `dry-run-cpu` keeps it apart)."]
    return [*lines, "At the repository root:", "", "```bash",
            "tar -xzf gpu-check.tar.gz   # -> results/reference/" + kind + "/, results/baselines/" + kind + ".json",
            f"for d in results/reference/{kind}/{{gpu-validate,paper,seq-attention}}; do deqbench report $d; done",
            f"git add results/reference/{kind} results/baselines/{kind}.json",
            "```", "",
            "`deqbench report` draws the figures and report.md on any machine, from results.csv alone "
            "(the GPU's minutes are not spent on them). results/reference/README.md describes the layout."]


def summary_text(tree: Path, *, mode: str, budget_total: float | None = None, command: str = "",
                 note: str = "") -> str:
    env = read_json(tree / "env" / "deqbench-env.json")
    sections = [
        header_lines(tree, env, mode, command, note),
        step_lines(read_steps(tree / "steps.tsv"), budget_total),
        gpu_path_lines(tree, mode),
        validate_lines(tree),
        paper_lines(tree),
        attention_lines(tree),
        run_lines(tree),
        pytest_lines(tree),
        commit_lines(tree.name, mode),
    ]
    return "\n\n".join("\n".join(s) for s in sections if s) + "\n"


def cmd_summary(args: argparse.Namespace) -> int:
    tree = Path(args.tree)
    if not tree.is_dir():
        raise ValueError(f"--tree {tree} is not a directory")
    text = summary_text(tree, mode=args.mode, budget_total=args.budget_total, command=args.command,
                        note=args.note)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/gpu_check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="subcommand", required=True)
    p = sub.add_parser("matrix", help="the attention matrix with its out-of-memory case in front")
    p.add_argument("--preset", default="seq-attention")
    p.add_argument("--seq-lens", required=True, help="comma-separated, e.g. 2048,4096,8192")
    p.add_argument("--sizes", help="only the preset's sweeps of these sizes (default all)")
    p.add_argument("--oom-above", required=True, help="'cuda' (the GPU's total memory) or bytes")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_matrix)
    p = sub.add_parser("summary", help="summary.md from what the steps left in the tree")
    p.add_argument("--tree", required=True, help="results/reference/<kind> as the steps wrote it")
    p.add_argument("--out", required=True)
    p.add_argument("--mode", choices=("gpu", "dry"), default="gpu")
    p.add_argument("--budget-total", type=float)
    p.add_argument("--command", default="", help="the command line that ran the check")
    p.add_argument("--note", default="")
    p.set_defaults(func=cmd_summary)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"gpu_check.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
