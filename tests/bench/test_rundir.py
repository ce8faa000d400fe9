"""The run folder's lock, fingerprint and row files (bench.rundir), without running a case."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bench import rundir
from bench.errors import RunDirError
from bench.results import read_results

ROOT = Path(__file__).resolve().parents[2]


def _holder(run_dir: Path):
    """A process on this host that holds the folder's lock until its stdin closes."""
    code = textwrap.dedent(f"""
        import sys
        from bench.rundir import RunLock
        lock = RunLock.acquire({str(run_dir)!r}, "deqbench run --preset quick")
        print("locked", flush=True)
        sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_held_lock_names_its_holder_and_dies_with_it(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(RunDirError) as err:
            rundir.RunLock.acquire(tmp_path, "deqbench run --resume")
        message = str(err.value)
        assert f"pid {holder.pid} on " in message and "since 20" in message
        assert "(deqbench run --preset quick)" in message and "another --out" in message
        assert "\n" not in message
    finally:
        holder.kill()  # SIGKILL: no clean-up of any kind
        holder.wait()
    with rundir.RunLock.acquire(tmp_path, "next"):  # the kernel dropped the dead holder's lock
        assert json.loads((tmp_path / rundir.LOCK).read_text())["pid"] == os.getpid()
    assert (tmp_path / rundir.LOCK).read_text() == ""  # released cleanly: no holder left behind


def test_the_text_of_a_dead_holder_does_not_block(tmp_path):
    (tmp_path / rundir.LOCK).write_text(json.dumps(
        {"pid": 2**22 + 12345, "host": "elsewhere", "command": "x", "since": "2020-01-01"}))
    lock = rundir.RunLock.acquire(tmp_path)
    lock.release()


def test_resume_check_names_what_differs_and_how_to_go_on(tmp_path):
    ids = ["a/T8", "a/T16", "b/T8"]
    started = rundir.fingerprint(ids, {"repeats": 5, "instruments": ()}, {"device": "cpu"}, "a")
    (tmp_path / "env.json").write_text(json.dumps({"command": "deqbench run --only a", "run": started}))
    rundir.check_resume(tmp_path, rundir.fingerprint(ids, {"repeats": 5, "instruments": []},
                                                     {"device": "cpu"}, "a"))
    with pytest.raises(RunDirError) as err:
        rundir.check_resume(tmp_path, rundir.fingerprint(ids[:2], {"repeats": 1, "instruments": ()},
                                                         {"device": "cpu"}, "T"))
    message = str(err.value)
    assert "the cases (3 there with --only 'a', 2 now with --only 'T')" in message
    assert "[settings] repeats (5 there, 1 now)" in message
    assert "`deqbench run --only a` plus --resume" in message and "another --out" in message
    with pytest.raises(RunDirError, match="--memory-limit"):
        rundir.check_resume(tmp_path, rundir.fingerprint(ids, {"repeats": 5, "instruments": ()},
                                                         {"device": "cpu", "memory_limit": 10**6}, "a"))


def _row(case_id, **values):
    return {"case_id": case_id, "status": "ok", **values}


def test_rows_land_in_matrix_order_once_each_whatever_order_they_come_in(tmp_path):
    order = ["c1", "c2", "c3", "c4"]
    results = rundir.Results(tmp_path, order)
    for case_id in ("c2", "c4", "c1"):
        results.add(_row(case_id, params=int(case_id[1])))
    results.add(_row("c4", status="oom"))  # a retried case replaces its row
    df = read_results(tmp_path)
    assert df["case_id"].tolist() == ["c1", "c2", "c4"]
    assert df.set_index("case_id").loc["c4", "status"] == "oom"
    assert sorted(rundir.read_rows(tmp_path)) == ["c1", "c2", "c4"]
    assert len(list((tmp_path / rundir.ROWS).iterdir())) == 3  # no temporary file left


def test_recover_rebuilds_a_results_csv_torn_anywhere_from_the_row_files(tmp_path):
    order = [f"c{i}" for i in range(6)]
    results = rundir.Results(tmp_path, order)
    for i, case_id in enumerate(order[:5]):
        results.add(_row(case_id, params=i, solver_trace={"forward": {"trace": [1.0, 0.1]}}))
    csv = tmp_path / "results.csv"
    text = csv.read_text()
    cut = text.index('"{', text.index("c2,"))  # inside c2's quoted solver_trace
    csv.write_text(text[:cut + 5] + text[text.index("c4,"):] + "c5,to")  # c3 gone, c5 half
    recovered = rundir.Results.recover(tmp_path, order)
    assert sorted(recovered.rows) == order[:5]
    df = read_results(tmp_path)
    assert df["case_id"].tolist() == order[:5] and df["params"].tolist() == [0, 1, 2, 3, 4]
    assert df.loc[2, "solver_trace"] == '{"forward": {"trace": [1.0, 0.1]}}'


def test_recover_adopts_the_rows_of_a_folder_from_before_row_files(tmp_path):
    from bench.results import append_row

    append_row(tmp_path, _row("c2", params=7, step_s_median=0.25, nfe_forward=8,
                              overrides={"d_model": 8}, error="a, \"quoted\" note"))
    append_row(tmp_path, _row("c1", status="timeout"))
    before = (tmp_path / "results.csv").read_text().splitlines()
    recovered = rundir.Results.recover(tmp_path, ["c1", "c2"])
    assert recovered.rows["c2"]["params"] == 7 and recovered.rows["c2"]["step_s_median"] == 0.25
    after = (tmp_path / "results.csv").read_text().splitlines()
    assert after == [before[0], before[2], before[1]]  # the same text, in matrix order now
    assert sorted(rundir.read_rows(tmp_path)) == ["c1", "c2"]


def test_a_row_file_is_replaced_whole_by_concurrent_writers(tmp_path):
    """Several processes writing one case's row at once: one whole row survives, never a
    torn or a second one."""
    code = textwrap.dedent(f"""
        import sys
        from bench.rundir import write_row
        for i in range(200):
            write_row({str(tmp_path)!r}, {{"case_id": "c", "status": "ok", "params": int(sys.argv[1]) * 1000 + i}})
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(n)], cwd=ROOT) for n in range(3)]
    deadline = time.monotonic() + 60
    seen = set()
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        rows = rundir.read_rows(tmp_path)  # never fails, never half a row
        if rows:
            seen.add(rows["c"]["params"])
    assert all(p.wait(60) == 0 for p in procs)
    assert list(rundir.read_rows(tmp_path)) == ["c"]
    assert [p.name for p in (tmp_path / rundir.ROWS).iterdir()] == [rundir.row_file(tmp_path, "c").name]


def test_a_lock_kept_by_a_child_of_a_dead_holder_says_so(tmp_path):
    child_pid = tmp_path / "child.pid"
    code = textwrap.dedent(f"""
        import os, time
        from bench.rundir import RunLock
        lock = RunLock.acquire({str(tmp_path / "run")!r}, "deqbench run")
        if os.fork() == 0:  # a forked child shares the locked file description
            os.close(1), os.close(2)
            open({str(child_pid)!r}, "w").write(str(os.getpid()))
            time.sleep(60)
            os._exit(0)
        while not os.path.exists({str(child_pid)!r}):
            time.sleep(0.01)
        os._exit(0)  # the holder ends; its child keeps the lock
    """)
    (tmp_path / "run").mkdir()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    try:
        with pytest.raises(RunDirError, match="a process that has ended: a process it started still holds"):
            rundir.RunLock.acquire(tmp_path / "run")
    finally:
        os.kill(int(child_pid.read_text()), 9)
