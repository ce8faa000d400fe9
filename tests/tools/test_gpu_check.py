"""tools/gpu_check.sh and its helper: the GPU session script, tested in its dry run on the CPU.

The script runs as it would on a GPU image: PIP_NO_INDEX=1, and every distribution such an image
lacks (this environment's beyond the closure of IMAGE_PACKAGES: submitit, tox, ruff, ...) made
unimportable in every process it starts (tests/tools/import_guard). The full dry run is `slow`
(minutes on two shared cores); the fast tests run a subset of its steps.
"""

from __future__ import annotations

import ast
import csv
import importlib.metadata as metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_check.sh"
GUARD = Path(__file__).parent / "import_guard"
KIND = "dry-run-cpu"
# What the CUDA image holds for us (issue 13), the build tools pip needs, and their requirements.
IMAGE_PACKAGES = ("torch", "transformers", "pandas", "matplotlib", "nvidia-ml-py", "pytest",
                  "pytest-benchmark", "tqdm", "setuptools", "pip", "wheel")
OWN = ("bench", "models", "baselines", "tests", "tools")
# What each step leaves under results/reference/<kind>/ (the baseline beside it).
STEP_FILES = {
    "env": ["env/deqbench-env.json", "env/nvidia-smi-q.txt", "env/pip-freeze.txt"],
    "validate": ["instruments/instruments.csv", "instruments/summary.md"],
    "gpu-validate": ["gpu-validate/results.csv", "gpu-validate/env.json"],
    "baseline": [f"../../baselines/{KIND}.json"],
    "paper": ["paper/results.csv"],
    "attention": ["seq-attention/matrix.toml", "seq-attention/results.csv"],
    "pytest": ["pytest-gpu/junit.xml"],
    "summary": ["summary.md", "steps.tsv"],
}
DEVICE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # what the device machine sends back


def helper() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the environment of a CUDA image --------------------------------------------------------------
def image_distributions() -> set[str]:
    """IMAGE_PACKAGES and everything they require (extras aside), as installed here."""
    installed = {canonicalize_name(d.metadata["Name"]): d for d in metadata.distributions()}
    allowed: set[str] = set()
    todo = [canonicalize_name(n) for n in IMAGE_PACKAGES]
    while todo:
        name = todo.pop()
        if name in allowed:
            continue
        allowed.add(name)
        for text in (installed[name].requires or []) if name in installed else []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return allowed


def blocked_modules() -> set[str]:
    """Top-level modules that only distributions outside the image's provide."""
    allowed = image_distributions() | {"deq-bench"}
    return {module for module, dists in metadata.packages_distributions().items()
            if not any(canonicalize_name(d) in allowed for d in dists)}


def image_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEQBENCH_", "PYTEST_"))}
    env |= {
        "PYTHON": sys.executable,
        "PIP_NO_INDEX": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(GUARD), env.get("PYTHONPATH")])),
        "DEQBENCH_IMPORT_GUARD_BLOCK": ",".join(sorted(blocked_modules())),
        "DEQBENCH_IMPORT_GUARD_LOG": str(tmp_path / "blocked-imports.log"),
        "TMPDIR": str(tmp_path),
        **extra,
    }
    return env


def editable_here() -> bool:
    """Is this interpreter's deq-bench an editable install of this checkout (so that the install
    step reinstalls exactly what is there)?"""
    for dist in metadata.distributions():  # not distribution(): the build's egg-info in the
        if canonicalize_name(dist.metadata["Name"] or "") != "deq-bench":  # checkout shadows it
            continue
        info = json.loads(dist.read_text("direct_url.json") or "{}")
        if info.get("dir_info", {}).get("editable") and info.get("url") == ROOT.as_uri():
            return True
    return False


def run_script(tmp_path: Path, *args: str, env: dict[str, str] | None = None,
               timeout: float = 900) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), "--out", str(out), *args], cwd=tmp_path,
                          env=env or image_env(tmp_path), capture_output=True, text=True,
                          timeout=timeout)
    unpacked = tmp_path / "unpacked"
    if (out / "gpu-check.tar.gz").exists():
        with tarfile.open(out / "gpu-check.tar.gz") as tar:
            tar.extractall(unpacked, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return proc, unpacked / "results" / "reference" / KIND


def steps_of(tree: Path) -> dict[str, dict[str, str]]:
    with (tree / "steps.tsv").open(newline="") as fh:
        return {row["name"]: row for row in csv.DictReader(fh, delimiter="\t")}


def assert_returnable(out: Path) -> None:
    """What the device machine sends back: at most 8 files, 16 MiB each, 2 folders deep, plain
    names."""
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= 8, files
    for path in files:
        assert len(path.relative_to(out).parts) <= 3 and DEVICE_NAME.match(path.name), path
        assert path.stat().st_size <= 16 * 2**20, path


def assert_no_blocked_imports(tmp_path: Path) -> None:
    """None of our modules imported a package the image lacks (a library's optional import,
    which it survives, is the library's business)."""
    log = tmp_path / "blocked-imports.log"
    lines = log.read_text().splitlines() if log.exists() else []
    ours = [line for line in lines
            if line.split("\t")[1].startswith(str(ROOT)) and "site-packages" not in line.split("\t")[1]]
    assert not ours, "imports of packages a CUDA image lacks:\n" + "\n".join(ours)


# -- the dry run ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_dry_run_every_step_leaves_its_file(tmp_path):
    install = () if editable_here() else ("--no-install",)
    # --budget-scale 3: two shared, loaded cores run it 2-3x slower than the 180 s it is sized for
    proc, tree = run_script(tmp_path, "--dry-run", "--budget-scale", "3", *install)
    steps = steps_of(tree)
    failed = {name: s["status"] for name, s in steps.items() if s["status"] not in ("ok", "skipped")}
    explain_cut = failed.pop("explain", None)  # the real explain predicts ~45 cases: minutes here
    assert not failed, f"{failed}\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}"
    assert proc.returncode == (1 if explain_cut else 0), proc.stdout[-2000:]
    assert steps["install"]["status"] == ("skipped" if install else "ok")
    for step, files in STEP_FILES.items():
        for name in files:
            assert (tree / name).is_file(), f"step {step} left no {name}"
    assert_no_blocked_imports(tmp_path)
    assert_returnable(tmp_path / "out")
    assert (tmp_path / "out" / "summary.md").read_text() == (tree / "summary.md").read_text()

    with (tree / "seq-attention" / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["status"] == "oom" and "allocate" in rows[0]["error"]
    assert [r["status"] for r in rows[1:]] == ["ok"] * (len(rows) - 1) and len(rows) > 1
    baseline = json.loads((tree / STEP_FILES["baseline"][0]).read_text())
    assert list(baseline["cases"]) == ["trellisnet/debug/core/eval/T128/B4/L16"]
    junit = (tree / "pytest-gpu" / "junit.xml").read_text()
    assert 'errors="0"' in junit and 'failures="0"' in junit  # every GPU test module imported
    summary = (tree / "summary.md").read_text()
    assert "Dry run on the CPU" in summary and "| out of memory on the CPU" in summary
    total = sum(float(s["wall_s"] or 0) for s in steps.values())
    assert total <= 3 * 180, total


def test_install_and_env_need_no_index_and_no_package_beyond_the_image(tmp_path):
    if importlib.util.find_spec("submitit"):  # a dependency of the project, not on the image
        assert "submitit" in blocked_modules()
    install = () if editable_here() else ("--no-install",)
    # budgets x4: what is tested is the install and env, not how fast a loaded CPU imports torch
    proc, tree = run_script(tmp_path, "--dry-run", "--steps", "install,env", "--budget-scale", "4",
                            *install)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    steps = steps_of(tree)
    assert [s["status"] for s in steps.values()] == ["skipped" if install else "ok", "ok", "ok"]
    assert list(steps) == ["install", "env", "summary"]
    for name in STEP_FILES["env"] + STEP_FILES["summary"]:
        assert (tree / name).is_file(), name
    env = json.loads((tree / "env" / "deqbench-env.json").read_text())
    assert env["device"] == "cpu" and env["cuda"]["available"] is False  # CUDA hidden in a dry run
    assert_no_blocked_imports(tmp_path)
    assert_returnable(tmp_path / "out")


def test_no_module_imports_a_package_the_image_lacks_at_import_time():
    """Module-level imports of everything the script imports or collects (its own `import x`
    statements; lazy imports and importorskip are the runtime guard's business)."""
    blocked, found = blocked_modules(), []
    for folder in OWN:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.parse(path.read_text()).body:
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.module
                         and not node.level else [])
                found += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in blocked]
    assert not found, found


@pytest.mark.parametrize("present", [True, False])
def test_explain_runs_where_the_tree_has_it_and_is_skipped_where_not(tmp_path, present):
    env = image_env(tmp_path, DEQBENCH=f"{sys.executable} -m tests.tools.fake_deqbench",
                    FAKE_EXPLAIN="present" if present else "absent")
    proc, tree = run_script(tmp_path, "--dry-run", "--steps", "explain", "--budget-scale", "4",
                            env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    step = steps_of(tree)["explain"]
    if present:
        assert step["status"] == "ok"
        argv = (tree / "paper-audit" / "explain.csv").read_text()
        assert "--no-progress" in argv and "--out" in argv  # the options its --help lists
        assert ("--preset paper-audit" in argv) == (ROOT / "bench/presets/paper-audit.toml").exists()
    else:
        assert step["status"] == "skipped" and "no deqbench explain" in step["note"]
        assert not (tree / "paper-audit").exists()


@pytest.mark.parametrize(("behaviour", "status", "rc"), [("slow", "cut at budget", "124"),
                                                         ("stubborn", "killed at budget", "137")])
def test_a_step_past_its_budget_is_ended_with_its_processes_and_the_next_step_runs(
        tmp_path, behaviour, status, rc):
    env = image_env(tmp_path, DEQBENCH=f"{sys.executable} -m tests.tools.fake_deqbench",
                    FAKE_EXPLAIN=behaviour)
    proc, tree = run_script(tmp_path, "--dry-run", "--steps", "explain", "--budget", "explain=9",
                            env=env, timeout=120)
    steps = steps_of(tree)
    assert proc.returncode == 1 and steps["summary"]["status"] == "ok", proc.stdout[-2000:]
    explain = steps["explain"]
    assert (explain["status"], explain["rc"]) == (status, rc)
    # INT at its budget less the grace for KILL (5 s): 4 s; then KILL 5 s later if deaf to INT
    assert float(explain["wall_s"]) < (9.5 if behaviour == "stubborn" else 6), explain
    pid = int((tree / "paper-audit" / "pid").read_text())
    assert not alive(pid)  # the step's own children went with it
    assert f"explain {status}" in (tree / "summary.md").read_text()


def alive(pid: int, wait_s: float = 5.0) -> bool:
    """Still running after `wait_s` (a killed process is a zombie until its new parent reaps it)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        if state == "Z":
            return False
        time.sleep(0.1)
    return True


def test_a_step_left_without_time_does_not_start(tmp_path):
    proc, tree = run_script(tmp_path, "--dry-run", "--steps", "explain", "--budget", "explain=4")
    assert proc.returncode == 1
    assert steps_of(tree)["explain"]["status"] == "no time left"


@pytest.mark.parametrize("args", [
    ["--steps", "env,bogus"], ["--budget-scale", "0"], ["--budget-scale", "x"],
    ["--budget", "paper"], ["--budget", "nosuch=10"], ["--budget", "paper=0"], ["--frobnicate"],
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, args):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), "--out", str(out), *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 2 and not out.exists()
    assert proc.stderr.startswith("gpu_check: error: ") and proc.stderr.count("\n") == 1, proc.stderr


# -- the helper -----------------------------------------------------------------------------------
def test_the_oom_case_allocates_more_than_the_memory_in_its_first_large_tensor():
    from bench.measure import Workload, measure

    gc = helper()
    limit = 20_000_000
    sweep = gc.oom_sweep(limit)
    seq_len = sweep["seq_len"]
    # relative attention's positional scores, (B, H, T, T) float32: the margin over the limit
    head = 4  # the debug Transformer's n_head
    assert 4 * head * seq_len**2 >= gc.OOM_MARGIN * limit > 4 * head * (seq_len - 1) ** 2
    workload = Workload(model="transformer", size=sweep["size"], batch=sweep["batch"],
                        depth=sweep["depth"], seq_len=seq_len,
                        overrides=tuple(sweep["config"].items()))
    assert measure(workload, ["predicted"])["predicted_bytes"] > 2 * limit  # and what follows it
    t = gc.oom_seq_len(10**9, n_head=8, batch=2, mem_len=150)  # with 150 memory positions
    assert 4 * 8 * 2 * t * (t + 150) >= gc.OOM_MARGIN * 10**9 > 4 * 8 * 2 * (t - 1) * (t + 149)


def test_the_attention_matrix_puts_the_oom_case_first_then_the_preset_at_its_lengths(tmp_path):
    from bench.spec import load_matrix, load_preset

    gc = helper()
    out = tmp_path / "m.toml"
    assert gc.main(["matrix", "--seq-lens", "2048,8192", "--oom-above", "1000000000",
                    "--out", str(out)]) == 0
    cases = load_matrix(out).cases
    preset = load_preset("seq-attention")
    assert cases[0].seq_len == gc.oom_sweep(10**9)["seq_len"] and cases[0].depth == 1
    expected = [c for c in preset.cases if c.seq_len in (2048, 8192)]
    assert list(cases[1:]) == expected and len(expected) == 8
    assert load_matrix(out).settings == preset.settings
    assert gc.main(["matrix", "--seq-lens", "64", "--sizes", "nosuch", "--oom-above", "1",
                    "--out", str(out)]) == 2


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        writer.writerows(rows)


GB = 10**9


def paper_row(model: str, size: str, depth: int | None, peak: int, **extra) -> dict:
    return {"case_id": f"{model}/{size}", "model": model, "size": size, "depth": depth or "",
            "phase": "train", "mode": "core", "seq_len": 150, "batch": 15, "status": "ok",
            "memory_source": "torch_cuda", "peak_bytes": peak, **extra}


def test_summary_reads_the_gpu_columns(tmp_path):
    """A tree as a GPU run leaves it (rows written here): every GPU path is seen, the paper's
    pairs show allocated, reserved and NVML side by side, the attention growth is its slope."""
    tree = tmp_path / "results" / "reference" / "nvidia-test"
    write_csv(tree / "instruments" / "instruments.csv", [
        {"model": "transformer", "phase": "train", "check": "pass", "cuda_peak_bytes": 9 * 2**20,
         "predicted_vs_cuda": 0.03, "nvml_samples": 40, "nvml_process_source": "process",
         "energy_j_per_token": 1e-4, "nvml_energy_window_s": 1.02, "cuda_context_bytes": 500 * 2**20},
        {"model": "transformer", "phase": "eval", "check": "fail", "cuda_peak_bytes": 3 * 2**20,
         "predicted_vs_cuda": -0.07, "nvml_samples": 12, "nvml_process_source": "process",
         "energy_j_per_token": 5e-5, "nvml_energy_window_s": 1.5},
    ])
    write_csv(tree / "paper" / "results.csv", [
        paper_row("trellisnet", "paper-ptb", 60, 8 * GB, reserved_bytes=10 * GB,
                  nvml_process_bytes=11 * GB, predicted_cuda_bytes=8 * GB, energy_j_per_token=0.1),
        paper_row("deq-trellisnet", "paper-ptb", None, 2 * GB, reserved_bytes=4 * GB,
                  nvml_process_bytes=5 * GB, predicted_cuda_bytes=2 * GB, nvml_note=""),
    ])
    attention = [{"case_id": "transformer/debug/T115000/L1/attention=relative", "size": "debug",
                  "depth": 1, "seq_len": 115000, "status": "oom", "overrides": '{"attention": "relative"}',
                  "error": "OutOfMemoryError: CUDA out of memory. Tried to allocate 200.00 GiB"}]
    for attn, power in (("sdpa", 1), ("relative", 2)):
        for t in (2048, 4096, 8192):
            peak = 10**6 * (t // 1024) ** power
            attention.append({"case_id": f"transformer/paper-small/T{t}/L4/attention={attn}",
                              "size": "paper-small", "depth": 4, "seq_len": t, "status": "ok",
                              "overrides": json.dumps({"attention": attn}), "peak_bytes": peak,
                              "reserved_bytes": peak + 2**21, "memory_source": "torch_cuda"})
    for row in attention:
        row["elapsed_s"] = 2.0
    write_csv(tree / "seq-attention" / "results.csv", attention)
    (tree / "steps.tsv").write_text("step\tname\tstatus\trc\twall_s\tbudget_s\tlog\tnote\n"
                                    "1\tenv\tok\t0\t3.0\t15\tlogs/01-env.log\t\n"
                                    "2\tpaper\tcut at budget\t124\t90.0\t90\tlogs/06-paper.log\t\n"
                                    "3\tattention\tok\t0\t35.0\t60\tlogs/08-attention.log\t\n")
    text = helper().summary_text(tree, mode="gpu", budget_total=480)

    paths = dict(re.findall(r"^\| ([^|]+?) \| (yes|\*\*no\*\*|n/a \(CPU\)) \|", text, re.M))
    assert set(paths.values()) == {"yes"} and len(paths) == 6, paths
    assert "1/2 cases within 5%, largest miss -7.0%" in text
    assert "1/1 eval steps peak below the train step" in text
    ptb = next(line for line in text.splitlines() if line.startswith("| 60-layer TrellisNet"))
    assert ("8.00 GB → 2.00 GB (75.0%)" in ptb and "10.00 GB → 4.00 GB (60.0%)" in ptb
            and "11.00 GB → 5.00 GB (54.5%)" in ptb), ptb
    growth = {m[0]: float(m[1]) for m in re.findall(r"\| paper-small L4 \| (\w+) \|.*\| ([\d.]+) \|", text)}
    assert growth == {"sdpa": 1.0, "relative": 2.0}
    assert "Not ok: paper cut at budget" in text and "Total: 128 s of steps within a budget of 480 s" in text
    assert "`seq-attention`: 7 cases, 6 ok, 1 oom" in text
    assert "5.0 s of the step's wall per case, 2.0 s of it measuring" in text
    assert "tar -xzf gpu-check.tar.gz" in text and "results/baselines/nvidia-test.json" in text
