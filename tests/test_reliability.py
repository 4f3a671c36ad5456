"""Reliability with real processes and real signals: exact resume after SIGTERM, SIGKILL at any
moment (also in the middle of an async save), damaged checkpoints, non-finite steps, and resuming
a checkpoint on another number of devices.

Every run is ``python -m resnet_jax.train`` in a subprocess on the CPU, with a tiny model
(cifar_resnet8 on digits, batch 32). The processes share a persistent JAX compilation cache so
that each start compiles little; it changes no numbers.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from cli_env import env_for, tensorboard_events

from resnet_jax.logbook import read_metrics

ROOT = pathlib.Path(__file__).resolve().parent.parent

BASE = [
    "--config=experiments/digits.py",
    "--config.model.name=cifar_resnet8",
    "--config.batch_size=32",
    "--config.log_every_steps=1",
    "--config.eval_every_epochs=100",  # evaluate only at the end
    "--config.progress_bar=false",
    "--config.plot_curves=false",  # matplotlib: 1-1.5 s of each short run
]
# 2N steps, interrupted after about N. Runs with the same number of steps compile the same train
# step (the schedule is part of it), so most runs below use TOTAL and hit the compilation cache.
TOTAL = 16
RUN = [*BASE, f"--config.num_steps={TOTAL}", "--config.checkpoint_every_steps=3"]
TRAIN_KEYS = ("train/loss", "train/top1_acc", "train/lr", "train/nonfinite_steps")


def start(cache: str, *args: str, devices: int = 1) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "resnet_jax.train", *args],
        cwd=ROOT,
        env=env_for(cache, devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(p: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"run did not finish in {timeout} s: {err[-3000:]}")
    return p.returncode, out, err


def run(cache: str, *args: str, devices: int = 1) -> tuple[int, str, str]:
    return finish(start(cache, *args, devices=devices))


def train_rows(wd) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(wd) if "train/loss" in r}


def wait_for_step(wd, p: subprocess.Popen, step: int, timeout: float = 180) -> int:
    """Waits until ``metrics.jsonl`` has a train row at ``step`` or later; returns the step seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            pytest.fail(f"run ended (status {p.returncode}) before step {step}: {p.stderr.read()[-3000:]}")
        rows = [r["step"] for r in read_metrics(wd) if "train/loss" in r]
        if rows and max(rows) >= step:
            return max(rows)
        time.sleep(0.01)
    p.kill()
    pytest.fail(f"no step {step} within {timeout} s")


def wait_for_checkpoint(wd, p: subprocess.Popen, step: int, timeout: float = 180) -> None:
    """Waits until a complete checkpoint of ``step`` or later exists (rows in ``metrics.jsonl``
    may be left over from a killed run until the restart truncates them; checkpoints are not)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            pytest.fail(f"run ended (status {p.returncode}) before step {step}: {p.stderr.read()[-3000:]}")
        if complete_steps(wd) and complete_steps(wd)[-1] >= step:
            return
        time.sleep(0.01)
    p.kill()
    pytest.fail(f"no checkpoint {step} within {timeout} s")


def complete_steps(wd) -> list[int]:
    d = pathlib.Path(wd) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def tmp_dirs(wd) -> list[str]:
    d = pathlib.Path(wd) / "checkpoints"
    try:
        return sorted(n for n in os.listdir(d) if ".orbax-checkpoint-tmp" in n)
    except FileNotFoundError:
        return []


def run_info(wd) -> dict:
    return json.loads((pathlib.Path(wd) / "run_info.json").read_text())


def restore(wd, step: int | None = None) -> tuple[int, dict]:
    """A run's checkpoint (the latest by default) as numpy arrays, restored by the Checkpointer."""
    import ml_collections

    from resnet_jax import data
    from resnet_jax.checkpointing import Checkpointer
    from resnet_jax.schedules import Durations
    from resnet_jax.train import Trainer

    config = ml_collections.ConfigDict(json.loads((pathlib.Path(wd) / "config.json").read_text()))
    info = data.get_info(config.dataset)
    trainer = Trainer(config, info, Durations.from_config(config, info.num_train))
    ckpt = Checkpointer(wd, read_only=True)
    try:
        step = ckpt.all_steps()[-1] if step is None else step
        state = jax.device_get(ckpt.restore(step, trainer.abstract_state))
    finally:
        ckpt.close()
    return step, state


def assert_states_identical(a: dict, b: dict) -> None:
    """Bitwise equality of two train states (params, BatchNorm statistics, optimizer state, step)."""
    assert set(a) == set(b) == {"params", "batch_stats", "opt_state", "step", "nonfinite"}
    la, ta = jax.tree_util.tree_flatten_with_path(a)
    lb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb
    assert len(la) > 20
    for (path, x), (_, y) in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        assert x.tobytes() == y.tobytes(), f"{jax.tree_util.keystr(path)} differs"


def assert_all_finite(state: dict) -> None:
    for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        assert np.all(np.isfinite(np.asarray(x))), jax.tree_util.keystr(path)


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error: ")]


# --- exact resume after SIGTERM, damaged checkpoints ---------------------------------------------


def damage(step_dir: pathlib.Path, how: str) -> None:
    """Truncates (to half) or deletes the array data files of one checkpoint."""
    files = [p for p in step_dir.rglob("*") if p.is_file() and "ocdbt.process_0" in str(p) and "/d/" in str(p)]
    assert files, list(step_dir.rglob("*"))
    for f in files:
        if how == "truncate":
            with open(f, "r+b") as fh:
                fh.truncate(f.stat().st_size // 2)
        else:
            f.unlink()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, jax_cache):
    """Four runs of the same command, two at a time:

    * A: TOTAL steps without interruption;
    * B: started with A, sent a real SIGTERM from here once it logged step 5 (the exit is timed),
      then started again on its workdir (B2);
    * D, with B2: a copy of A's workdir whose last checkpoint has truncated files and the one
      before it deleted files, started again.
    """
    a, b = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("preempted")
    d = tmp_path_factory.mktemp("damaged") / "run"
    r = {"a": a, "b": b, "d": d}
    pa = start(jax_cache, *RUN, f"--workdir={a}")
    pb = start(jax_cache, *RUN, f"--workdir={b}")
    try:
        r["seen"] = wait_for_step(b, pb, 5)
        t0 = time.monotonic()
        pb.send_signal(signal.SIGTERM)
        r["rc_b"], _, r["err_b"] = finish(pb, timeout=60)
        r["exit_s"] = time.monotonic() - t0
        rc_a, _, err_a = finish(pa)
    finally:
        for p in (pa, pb):
            if p.poll() is None:
                p.kill()
    assert rc_a == 0, err_a[-3000:]
    r["stopped_at"] = complete_steps(b)[-1] if complete_steps(b) else None
    if r["stopped_at"] is not None:  # as the SIGTERM left it (the restart may delete it later)
        r["stopped_files"] = sorted(os.listdir(b / "checkpoints" / str(r["stopped_at"])))
    r["tmp_after_sigterm"] = tmp_dirs(b)
    r["a_steps"] = complete_steps(a)
    shutil.copytree(a, d)
    if r["a_steps"] == [12, 15, 16]:
        damage(d / "checkpoints" / "16", "truncate")
        damage(d / "checkpoints" / "15", "delete")
    pb2 = start(jax_cache, *RUN, f"--workdir={b}")
    pd = start(jax_cache, *RUN, f"--workdir={d}")
    try:
        r["b2"] = finish(pb2)
        r["d2"] = finish(pd)
    finally:
        for p in (pb2, pd):
            if p.poll() is None:
                p.kill()
    return r


def test_sigterm_saves_a_complete_checkpoint_and_exits_0(runs):
    assert runs["rc_b"] == 0, runs["err_b"][-3000:]
    assert runs["exit_s"] < 30
    m = re.search(r"preempted: saved step (\d+)", runs["err_b"])
    assert m, runs["err_b"][-3000:]
    stopped = int(m.group(1))
    assert runs["seen"] <= stopped < TOTAL  # really interrupted, at the step it had reached
    assert runs["stopped_at"] == stopped  # the newest checkpoint after the SIGTERM
    assert {"_CHECKPOINT_METADATA", "commit_success.txt", "default"} <= set(runs["stopped_files"])
    assert runs["tmp_after_sigterm"] == []


def test_resume_after_sigterm_is_bitwise_exact(runs):
    """Restarting the preempted run ends with the same parameters, BatchNorm statistics and
    optimizer state, bit for bit, and the same metrics for every step, as the uninterrupted run."""
    a, b, stopped = runs["a"], runs["b"], runs["stopped_at"]
    rc, out, err = runs["b2"]
    assert rc == 0, err[-3000:]
    assert run_info(b)["resumed_from"] == stopped
    assert f"resumed from {b / 'checkpoints' / str(stopped)} at step {stopped}" in err
    step_a, state_a = restore(a)
    step_b, state_b = restore(b)
    assert step_a == step_b == TOTAL
    assert int(state_b["step"]) == TOTAL
    assert not (a / "curves.png").exists()  # --config.plot_curves=false (tests/test_train.py: the default)
    assert_states_identical(state_a, state_b)
    rows_a, rows_b = train_rows(a), train_rows(b)
    assert sorted(rows_a) == sorted(rows_b) == list(range(1, TOTAL + 1))
    for s in range(1, TOTAL + 1):  # the steps after the resume, and those before it too
        assert {k: rows_b[s][k] for k in TRAIN_KEYS} == {k: rows_a[s][k] for k in TRAIN_KEYS}, s
    evals_a = [r for r in read_metrics(a) if "eval/loss" in r]
    evals_b = [r for r in read_metrics(b) if "eval/loss" in r]
    assert evals_a == evals_b and evals_a[-1]["step"] == TOTAL
    assert out.strip() and out.strip().splitlines()[-1].startswith("eval/loss=")


def test_damaged_checkpoints_fall_back_to_the_previous_one(runs):
    """The latest checkpoint with truncated files and the one before with deleted files: the
    restart names both, sets them aside, resumes from the one before, and still ends bitwise equal
    to the uninterrupted run."""
    a, wd = runs["a"], runs["d"]
    assert runs["a_steps"] == [12, 15, 16]
    rc, _, err = runs["d2"]
    assert rc == 0, err[-3000:]
    for s in (16, 15):
        assert re.search(rf"checkpoint {re.escape(str(wd / 'checkpoints' / str(s)))} is damaged", err), err[-3000:]
    assert run_info(wd)["resumed_from"] == 12
    aside = sorted(p.name.split("-")[0] for p in (wd / "checkpoints-damaged").iterdir())
    assert aside == ["15", "16"]
    _, state_a = restore(a)
    step, state = restore(wd)
    assert step == TOTAL
    assert_states_identical(state_a, state)


# --- SIGKILL at any moment -----------------------------------------------------------------------


def _all_stopped(pid: int) -> bool:
    """True once every thread of ``pid`` is stopped (or the process is gone)."""
    try:
        states = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
    except FileNotFoundError:
        return True
    return all(st in ("T", "t", "Z", "X") for st in states)


def kill_mid_save(p: subprocess.Popen, wd, timeout: float = 120) -> list[str]:
    """SIGKILLs ``p`` while an async save is in flight: freezes it (SIGSTOP) the moment an
    incomplete step directory exists, and kills it if that directory is still incomplete.
    Returns the incomplete directories left behind."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and p.poll() is None:
        if tmp_dirs(wd):
            p.send_signal(signal.SIGSTOP)
            while p.poll() is None and not _all_stopped(p.pid):
                time.sleep(0.001)
            left = tmp_dirs(wd)
            if left:
                p.kill()
                p.wait()
                return left
            p.send_signal(signal.SIGCONT)
        time.sleep(0.001)
    pytest.fail(f"no save in flight within {timeout} s (status {p.poll()})")


@pytest.fixture(scope="module")
def nonfinite_runs(tmp_path_factory, jax_cache):
    """Two runs with a learning rate of 1e30, one stopping at the first non-finite step and one
    skipping such steps. Started early (by the SIGKILL test, whose processes run one at a time and
    leave a core free) and checked by test_nonfinite_stops_with_one_line_or_is_skipped."""
    tmp = tmp_path_factory.mktemp("nonfinite")
    common = [*BASE, "--config.learning_rate=1e30", "--config.checkpoint_every_steps=1"]
    runs = {
        "stop": (start(jax_cache, *common, "--config.num_steps=10", f"--workdir={tmp / 'stop'}"), tmp / "stop"),
        "skip": (
            start(
                jax_cache, *common, "--config.num_steps=6", "--config.skip_nonfinite=true", f"--workdir={tmp / 'skip'}"
            ),
            tmp / "skip",
        ),
    }
    yield runs
    for p, _ in runs.values():
        if p.poll() is None:
            p.kill()
            p.communicate()


@pytest.mark.usefixtures("nonfinite_runs")  # they run meanwhile, on the other core
def test_sigkill_at_any_moment_resumes_from_latest_complete_checkpoint(tmp_path, jax_cache):
    """Kills a run (checkpointing every step) three times: twice in the middle of an async save,
    once at an arbitrary moment. Every restart resumes from the newest complete checkpoint and
    warns about (and removes) the incomplete one; the last run finishes with status 0."""
    total = TOTAL
    args = [*BASE, f"--config.num_steps={total}", "--config.checkpoint_every_steps=1", f"--workdir={tmp_path}"]
    expected_resume, incomplete_before, caught = 0, [], 0
    for i, how in enumerate(("mid-save", "anytime", "mid-save")):
        p = start(jax_cache, *args)
        try:
            wait_for_checkpoint(tmp_path, p, expected_resume + 1)
            info = run_info(tmp_path)
            assert info["resumed_from"] == expected_resume, (i, info)
            if how == "mid-save":
                left = kill_mid_save(p, tmp_path)
                caught += 1
            else:
                time.sleep(0.137)
                p.kill()
                p.wait()
                left = tmp_dirs(tmp_path)
        finally:
            if p.poll() is None:
                p.kill()
        _, err = p.communicate()
        assert p.returncode == -signal.SIGKILL
        for name in incomplete_before:  # what the previous kill left was seen and removed
            assert re.search(rf"ignoring incomplete checkpoint \S*{re.escape(name)}", err), err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        if how == "mid-save":
            assert left, i
        expected_resume = complete_steps(tmp_path)[-1]
        assert expected_resume < total
        incomplete_before = left
    assert caught == 2
    rc, out, err = run(jax_cache, *args)
    assert rc == 0, err[-3000:]
    assert run_info(tmp_path)["resumed_from"] == expected_resume
    for name in incomplete_before:
        assert re.search(rf"ignoring incomplete checkpoint \S*{re.escape(name)}", err), err[-3000:]
    assert tmp_dirs(tmp_path) == []
    assert complete_steps(tmp_path)[-1] == total
    assert sorted(train_rows(tmp_path)) == list(range(1, total + 1))  # each step logged once
    step, state = restore(tmp_path)
    assert step == total and int(state["step"]) == total
    assert_all_finite(state)


# --- non-finite steps ----------------------------------------------------------------------------


def test_nonfinite_stops_with_one_line_or_is_skipped(nonfinite_runs):
    """A huge learning rate: the run stops with a one-line error naming the step and keeps its last
    good checkpoint; with ``skip_nonfinite`` it skips and counts such steps and finishes."""
    p_stop, stop_wd = nonfinite_runs["stop"]
    p_skip, skip_wd = nonfinite_runs["skip"]
    rc, _, err = finish(p_stop)
    assert rc != 0
    assert "Traceback" not in err, err[-3000:]
    lines = error_lines(err)
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err[-3000:]
    m = re.search(r"non-finite .* at step (\d+); the last good checkpoint \(step (\d+)\) is intact", lines[0])
    assert m and "skip_nonfinite" in lines[0], lines[0]
    bad, last = int(m.group(1)), int(m.group(2))
    assert 1 <= last < bad
    assert complete_steps(stop_wd)[-1] == last and tmp_dirs(stop_wd) == []
    step, state = restore(stop_wd)
    assert step == last and int(state["step"]) == last
    assert_all_finite(state)

    rc, _, err = finish(p_skip)
    assert rc == 0, err[-3000:]
    rows = [r for r in read_metrics(skip_wd) if "train/nonfinite_steps" in r]
    assert rows[-1]["step"] == 6 and rows[-1]["train/nonfinite_steps"] > 0
    assert "skipped step" in err
    assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
    step, state = restore(skip_wd)
    assert step == 6 and int(state["nonfinite"]) == rows[-1]["train/nonfinite_steps"]
    assert_all_finite(state)


# --- several processes, another number of devices ----------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def multi(tmp_path_factory, jax_cache):
    """The exact-resume command as two processes on 127.0.0.1 with 4 CPU devices each (8 in all);
    only process 1 is sent a SIGTERM, once step 4 was logged."""
    wd = tmp_path_factory.mktemp("multi")
    port = free_port()
    args = [*RUN, f"--workdir={wd}", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    procs = [start(jax_cache, *args, f"--process_id={i}", devices=4) for i in range(2)]
    try:
        wait_for_step(wd, procs[0], 4)
        t0 = time.monotonic()
        procs[1].send_signal(signal.SIGTERM)
        outs = [finish(p, timeout=60) for p in procs]
        exit_s = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return {"wd": wd, "outs": outs, "exit_s": exit_s, "steps": complete_steps(wd), "tmp": tmp_dirs(wd)}


def test_sigterm_to_one_process_of_a_multi_process_run(multi):
    """JAX's preemption service tells process 0 about process 1's SIGTERM: both stop at the same
    step, save it once (complete) and exit 0."""
    stops = []
    for rc, _, err in multi["outs"]:
        assert rc == 0, err[-3000:]
        m = re.search(r"preempted: saved step (\d+)", err)
        assert m, err[-3000:]
        stops.append(int(m.group(1)))
    assert multi["exit_s"] < 30
    assert stops[0] == stops[1] < TOTAL
    assert multi["steps"][-1] == stops[0] and multi["tmp"] == []
    # One set of metrics (process 0 writes them), a row per step up to the stop.
    logged = [r["step"] for r in read_metrics(multi["wd"]) if "train/loss" in r]
    assert logged == list(range(1, stops[0] + 1))
    info = run_info(multi["wd"])
    assert info["devices"] == 8 and info["processes"] == 2


def test_checkpoint_from_8_devices_resumes_on_1_and_on_4_sharded(multi, runs, tmp_path, jax_cache):
    """The 2-process, 8-device run had the losses of the uninterrupted 1-device run A; its
    checkpoint resumes on 1 device, and on 4 with FSDP-style sharded parameters: both continue
    with the losses of run A."""
    stopped = multi["steps"][-1]
    w1, w4 = tmp_path / "one", tmp_path / "four"
    shutil.copytree(multi["wd"], w1)
    shutil.copytree(multi["wd"], w4)
    p1 = start(jax_cache, *RUN, f"--workdir={w1}", devices=1)
    p4 = start(jax_cache, *RUN, "--config.shard_params=true", f"--workdir={w4}", devices=4)
    try:
        done = [(finish(p1), w1, 1), (finish(p4), w4, 4)]
    finally:
        for p in (p1, p4):
            if p.poll() is None:
                p.kill()
    for (rc, _, err), wd, n in done:
        assert rc == 0, err[-3000:]
        info = run_info(wd)
        assert info["resumed_from"] == stopped and info["devices"] == n and info["processes"] == 1
        assert sorted(train_rows(wd)) == list(range(1, TOTAL + 1))
    r1, r4, r8, ra = train_rows(w1), train_rows(w4), train_rows(multi["wd"]), train_rows(runs["a"])
    before = range(1, stopped + 1)
    after = range(stopped + 1, TOTAL + 1)
    # Not rewritten: the rows up to the stop were copied with the workdir; the resumed runs keep
    # them as they were (they neither truncate nor log those steps again).
    for r in (r1, r4):
        assert [r[s] for s in before] == [r8[s] for s in before]
    # The 2-process run itself trained as the 1-device run A did (BatchNorm over the global batch).
    np.testing.assert_allclose(
        [r8[s]["train/loss"] for s in before], [ra[s]["train/loss"] for s in before], rtol=1e-4, atol=1e-5
    )
    # The rows the resumed runs wrote themselves continue those of the uninterrupted run A.
    for r in (r1, r4):
        np.testing.assert_allclose([r[s]["train/loss"] for s in after], [ra[s]["train/loss"] for s in after], rtol=1e-4)
        np.testing.assert_allclose([r[s]["train/lr"] for s in after], [ra[s]["train/lr"] for s in after], rtol=1e-6)
        assert [r[s]["train/nonfinite_steps"] for s in after] == [ra[s]["train/nonfinite_steps"] for s in after]
    _, s1 = restore(w1)
    _, s4 = restore(w4)
    _, sa = restore(runs["a"])
    for other in (s1, s4):
        assert jax.tree_util.tree_structure(other) == jax.tree_util.tree_structure(sa)
        flat = (jax.tree_util.tree_flatten_with_path(s)[0] for s in (other, sa))
        for (path, x), (_, y) in zip(*flat, strict=True):
            np.testing.assert_allclose(
                np.asarray(x), np.asarray(y), rtol=1e-3, atol=1e-5, err_msg=jax.tree_util.keystr(path)
            )


# --- a preemption at an eval step ----------------------------------------------------------------

# The trainer, with a real SIGTERM sent to itself when its evaluate is called for the N-th time
# (argv[1]): a preemption notice that arrives while an eval pass runs.
SIGTERM_AT_EVAL = """
import os, signal, sys
import resnet_jax.train as T
n, calls, evaluate = int(sys.argv.pop(1)), [0], T.Trainer.evaluate
def interrupted(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGTERM)
    return evaluate(self, *args, **kwargs)
T.Trainer.evaluate = interrupted
T.main(sys.argv)
"""


def tensorboard_purges(wd) -> list[int]:
    """The purge steps (SessionLog START events) of ``wd``'s TensorBoard event files."""
    from tensorboardX.proto import event_pb2

    start = event_pb2.SessionLog.START
    return [e.step for e in tensorboard_events(wd) if e.HasField("session_log") and e.session_log.status == start]


def test_a_preemption_at_an_eval_step_loses_no_eval(tmp_path, jax_cache):
    """Evals at steps 8 and 16 (of 16). A SIGTERM during the eval of step 8 saves step 8 without
    it; the resume (with another seed: warned of and recorded) runs that eval first, then is
    stopped during the final one; the next start (with remat on) finishes the final eval, and a
    start after that logs nothing again. Each eval step has one row, and TensorBoard is told to drop the steps after
    each resume point."""
    wd = tmp_path / "run"
    args = [*RUN, "--config.eval_every_epochs=0.18", f"--workdir={wd}"]  # 45 steps an epoch: every 8

    def interrupted(n: int, *extra: str) -> tuple[int, str]:
        p = subprocess.run(
            [sys.executable, "-c", SIGTERM_AT_EVAL, str(n), *args, *extra],
            cwd=ROOT,
            env=env_for(jax_cache),
            capture_output=True,
            text=True,
            timeout=300,
        )
        return p.returncode, p.stderr

    rc, err = interrupted(1)
    assert rc == 0 and "preempted: saved step 8" in err, err[-3000:]
    rc, err = interrupted(2, "--config.seed=1")
    assert rc == 0 and "preempted: saved step 16" in err, err[-3000:]
    assert "step 8 was saved without its eval (preempted): evaluating it now" in err, err[-3000:]
    assert "resuming step 8 with other settings than the run's last start: seed 0 -> 1" in err, err[-3000:]
    for remat in ("true", "false"):  # (remat: the same parameters; a run out of memory resumes with it)
        rc, _, err = run(jax_cache, *args, "--config.seed=1", f"--config.model.remat={remat}")
        assert rc == 0 and "remat" not in err, err[-3000:]
    evals = [r for r in read_metrics(wd) if "eval/loss" in r]
    assert [r["step"] for r in evals] == [8, 16], evals
    assert all(np.isfinite(r["eval/loss"]) for r in evals)
    assert sorted(train_rows(wd)) == list(range(1, TOTAL + 1))
    assert run_info(wd)["setting_changes"] == [{"step": 8, "seed": [0, 1]}]
    assert sorted(set(tensorboard_purges(wd))) == [1, 9, 17]


@pytest.mark.parametrize(
    "error, damaged",
    [("RESOURCE_EXHAUSTED: Out of memory allocating 8.0G", False), ("Truncated stream", True), ("Truncated", "all")],
)
def test_a_full_device_or_a_storage_hiccup_sets_no_checkpoint_aside(tmp_path, monkeypatch, error, damaged):
    """A newest step that fails to restore for want of memory (or an unavailable storage) stops
    the start with one line and moves nothing; one whose files fail is set aside and the previous
    step resumes (the damaged checkpoints above). When no step restores, the line names the
    newest step's problem (the one a resume wanted) and nothing is moved either."""
    import orbax.checkpoint as ocp

    from resnet_jax.checkpointing import Checkpointer
    from resnet_jax.errors import UserError

    state = {"w": np.arange(3.0, dtype=np.float32)}
    ckpt = Checkpointer(tmp_path, async_save=False)
    for s in (1, 2):
        ckpt.save(s, state, force=True)
    restore = Checkpointer.restore

    def failing(self, step, abstract_state):
        if step == 2 or damaged == "all":
            raise RuntimeError(f"{error} in step {step}")
        return restore(self, step, abstract_state)

    monkeypatch.setattr(Checkpointer, "restore", failing)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, jax.device_put(state))
    try:
        if damaged == "all":
            with pytest.raises(UserError, match=r"\(the latest, \S*/checkpoints/2: Truncated in step 2\)"):
                ckpt.restore_latest(abstract)
            assert complete_steps(tmp_path) == [1, 2] and not (tmp_path / "checkpoints-damaged").exists()
        elif damaged:
            restored, step = ckpt.restore_latest(abstract)
            assert step == 1 and np.array_equal(restored["w"], state["w"])
            assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints-damaged").iterdir()] == ["2"]
        else:
            with pytest.raises(UserError, match=r"cannot restore .*/2 now \(RESOURCE_EXHAUSTED.*nothing was moved"):
                ckpt.restore_latest(abstract)
            assert complete_steps(tmp_path) == [1, 2] and not (tmp_path / "checkpoints-damaged").exists()
    finally:
        ckpt.close()


def test_best_is_the_highest_eval_top1_and_survives_the_retention(tmp_path):
    """Orbax keeps the latest ``keep`` checkpoints and the best by eval top-1; 'best' resolves to
    that one (not to the latest evaluated step), 'latest' to the newest, and a step that neither
    policy keeps is gone. Real checkpoints, written synchronously."""
    from resnet_jax.checkpointing import Checkpointer, resolve_step
    from resnet_jax.errors import UserError

    state = {"w": np.arange(3.0, dtype=np.float32)}
    ckpt = Checkpointer(tmp_path, keep=2, async_save=False)
    for step, acc in ((1, 0.5), (2, 0.9), (3, None), (4, 0.7), (5, None)):
        ckpt.save(step, state, metrics={} if acc is None else {"eval/top1_acc": acc}, force=True)
    ckpt.close()
    assert resolve_step(tmp_path, "best") == 2
    assert resolve_step(tmp_path, "latest") == 5 and resolve_step(tmp_path, None) == 5
    assert resolve_step(tmp_path, 4) == 4
    with pytest.raises(UserError, match=r"no checkpoint at step 1; kept steps: \[2, 4, 5\]"):
        resolve_step(tmp_path, "1")
    # An eval that got every example wrong is still an eval: 'best' is that step.
    ckpt = Checkpointer(tmp_path / "zero", keep=3, async_save=False)
    ckpt.save(1, state, metrics={"eval/top1_acc": 0.0}, force=True)
    ckpt.save(2, state, metrics={}, force=True)
    ckpt.close()
    assert resolve_step(tmp_path / "zero", "best") == 1
