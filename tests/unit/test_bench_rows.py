"""The benchmarks' run plumbing: ``personalization.py --from-rows`` keeps each merged run's
settings; ``--part`` counts from 0; ``loop_sweep.py`` pairs each value with local-only."""

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


def test_the_loop_sweep_pairs_each_value_with_local_only_and_picks_the_lowest(bench):
    from benchmarks.loop_sweep import summarize, value_rows

    # Prepare: two clients of two kinds; value 0.5 serves lower on both, 0.25 on one
    def rows(a, b, blend):
        settings = {"rounds": 6, "clusters": 5, "cluster_assign": "loss", "blend": blend}
        return [
            {"seed": 7, "client": c, "kind": k, "ppl_served": v, "served": n, "settings": settings}
            for c, k, v, n in (("x", "k1", a, "local"), ("y", "k2", b, "cluster:2"))
        ]

    local = [{"seed": 7, "client": c, "ppl_local": ppl} for c, ppl in (("x", 10.0), ("y", 20.0))]
    by_value = {"0.0": rows(10.0, 20.0, 0.0), "0.25": rows(9.0, 21.0, 0.25)}
    by_value["0.5"] = rows(9.0, 18.0, 0.5)
    # Execute
    got = summarize(by_value, local)
    # Assert: ratios to local-only, paired wins over value 0, what was served, the pick
    quarter, half = got["values"]["0.25"], got["values"]["0.5"]
    assert quarter["all"]["better_than_first"] == 1 and half["all"]["better_than_first"] == 2
    assert quarter["all"]["worst_served_over_local"] == pytest.approx(1.05)
    assert half["k2"]["served_over_local"] == pytest.approx(0.9)
    assert half["all"]["served_counts"] == {"cluster": 1, "local": 1}
    assert got["pick"] == "0.5"
    # 6 rounds of the tuning, the global and 5 cluster adapters, and the blend where it is on
    assert got["validation_passes"] == {"0.0": 42, "0.25": 48, "0.5": 48}
    # a client without a local-only row, and a rows file without its value, are refused
    with pytest.raises(SystemExit, match=r"no local-only row for \[\(7, 'y'\)\]"):
        summarize(by_value, local[:1])
    with pytest.raises(SystemExit, match="VALUE=ROWS"):
        value_rows("blend", "results/b.jsonl")
    # a schedule whose rounds x steps is not local-only's 30 steps is refused; 0 and 0.0 are one
    assert value_rows("schedule", "10:3=r.jsonl") == ("10:3", "r.jsonl")
    assert value_rows("blend", "0=r.jsonl") == ("0.0", "r.jsonl")
    with pytest.raises(SystemExit, match="R x S = 30"):
        value_rows("schedule", "10:5=r.jsonl")


def test_each_clients_ratio_to_local_only_is_also_given_over_seeds(bench):
    # Prepare: one client 10% worse on one seed and 10% better on the other, one always 3% worse
    rows = [
        {"seed": s, "client": c, "kind": "k", "ppl_base": 9.0, "ppl_local": 5.0, "served": "local"}
        | {"ppl_served": 5.0 * ratio}
        for s, c, ratio in ((0, "a", 1.1), (1, "a", 1 / 1.1), (0, "b", 1.03), (1, "b", 1.03))
    ]
    # Execute
    summary = bench.summarize(rows, [0, 1])["all"]
    # Assert: the worst single row is a's 1.1; over seeds a is even and b is the worst
    assert summary["worst_served_over_local"] == pytest.approx(1.1)
    by_client = summary["served_over_local_by_client"]
    assert by_client["a"]["mean"] == pytest.approx(1.0) and by_client["b"]["ci95"] is not None
    assert summary["worst_client_served_over_local"] == pytest.approx(1.03)


def test_the_served_adapter_is_also_weighed_against_the_loop_without_the_fleet(bench):
    # Prepare: the loop alone beats served on one of two clients, local-only on neither
    rows = [
        {"seed": 0, "client": c, "kind": "k", "ppl_base": 9.0, "ppl_local": 6.0, "served": "blend"}
        | {"ppl_alone": alone, "ppl_served": 5.0}
        for c, alone in (("a", 5.5), ("b", 4.5))
    ]
    # Execute
    summary = bench.summarize(rows, [0])["all"]
    # Assert: served wins half its pairs against the loop alone, all against local-only
    assert summary["win_served_vs_alone"] == 0.5 and summary["win_served_vs_local"] == 1.0
    assert summary["win_vs_local"]["alone"] == 1.0
