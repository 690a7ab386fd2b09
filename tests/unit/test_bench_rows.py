"""The benchmarks' run plumbing: ``personalization.py --from-rows`` keeps each merged run's
settings; ``--part`` counts from 0."""

import json
import os
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.unit
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@pytest.fixture
def bench(monkeypatch):
    """The benchmark module (its import pins the thread variables to 1: restored after)."""
    for var in THREAD_VARS:
        monkeypatch.setenv(var, os.environ.get(var, "1"))
    import benchmarks.personalization as bench

    return bench


def _args(**kw):
    defaults = dict(rounds=3, steps=10, lr=1e-3, clusters=3, cluster_step=1.0)
    defaults |= dict(cluster_assign="direction", mix_lr=1.0, mix_eps=0.3, ifca="6:5:2")
    defaults |= dict(follow="cluster", bystanders=False, kinds="shakespeare", kind=[])
    defaults |= dict(blend=0.0, scored="report")
    return SimpleNamespace(**(defaults | kw))


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_merged_runs_record_their_own_settings_and_a_mixed_file_is_refused(tmp_path, bench):
    # Prepare: a run that wrote its settings (6 x 5, loss) and an older file without any
    row = {"seed": 0, "client": "c", "kind": "k", "ppl_base": 9.0}
    ran = bench.run_settings(_args(rounds=6, steps=5, cluster_assign="loss"))
    new = _write(tmp_path / "new.jsonl", [row | {"ppl_served": 5.0, "settings": ran}])
    old = _write(tmp_path / "old.jsonl", [row | {"ppl_local": 6.0}])
    # Execute
    rows, shared, runs = bench.load_runs([new, old], bench.run_settings(_args(rounds=6, steps=5)))
    # Assert: settings agree at the top only where both runs had them; each run keeps its own
    assert set(shared) == set(bench.SETTINGS) and (shared["rounds"], shared["steps"]) == (6, 5)
    assert shared["cluster_assign"] is None
    assert [r["settings_from"] for r in runs] == ["rows", "command line"]
    assert runs[0]["settings"]["cluster_assign"] == "loss" and runs[0]["methods"][-1] == "served"
    assert all("settings" not in r for r in rows)
    # a file whose rows came from runs with different settings is refused
    mixed = _write(tmp_path / "mixed.jsonl", [row | {"settings": ran}, row | {"settings": {}}])
    with pytest.raises(SystemExit, match="different settings"):
        bench.load_runs([mixed], ran)


def test_a_part_past_the_last_is_refused(bench):
    from benchmarks.common import part_of

    assert part_of("0/2") == (0, 2) and part_of("1/2") == (1, 2)
    with pytest.raises(SystemExit, match="0 to N-1"):
        part_of("2/2")  # with 1/2, it would leave the first pair unrun
