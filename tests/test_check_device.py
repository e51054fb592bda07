"""scripts/check_device.py: the comparison that decides whether an accelerator's audit matches the
CPU's, and the script end to end on the CPU (the suite never touches a GPU; conftest hides CUDA)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from check_device import differences, main  # noqa: E402

RESULT = {"n_tokens": 1000, "certified": True, "tier": "violated", "L": 117.25, "se": 1e-12,
          "p": math.nan, "z": math.inf, "rows": [{"parent": 3, "child": 7, "evidence": 0.87}],
          "gaps": {"codes": {"share": 0.085}}}


def changed(path: list, value) -> dict:
    import copy

    out = copy.deepcopy(RESULT)
    where = out
    for key in path[:-1]:
        where = where[key]
    where[path[-1]] = value
    return out


def test_identical_results_agree_and_nan_matches_nan():
    n, worst, wrong = differences(RESULT, changed(["L"], 117.25), 1e-7, 1e-9)
    assert wrong == [] and worst == 0.0 and n > 10


@pytest.mark.parametrize("path, value, where", [
    (["n_tokens"], 1001, "/n_tokens"),                    # a count is exact
    (["certified"], False, "/certified"),                  # a verdict too
    (["tier"], "certified", "/tier"),
    (["rows", 0, "child"], 8, "/rows[0]/child"),           # a row naming another latent
    (["L"], 117.25 * (1 + 1e-5), "/L"),                    # a float beyond rtol
    (["p"], 0.5, "/p"),                                    # NaN on one device only
    (["z"], 3.0, "/z"),                                    # inf on one device only
    (["gaps", "codes", "share"], 0.086, "/gaps/codes/share"),
])
def test_each_kind_of_difference_is_caught_with_its_path(path, value, where):
    _, _, wrong = differences(RESULT, changed(path, value), 1e-7, 1e-9)
    assert [w[0] for w in wrong] == [where]


def test_tolerances_and_structure():
    # within rtol of the larger magnitude, or within atol near zero: agreement
    assert differences(RESULT, changed(["L"], 117.25 * (1 + 1e-8)), 1e-7, 1e-9)[2] == []
    assert differences(RESULT, changed(["se"], 1e-12 + 5e-10), 1e-7, 1e-9)[2] == []
    # a lost row, a missing key: differences even where the rest agrees
    fewer = changed(["rows"], [])
    assert "/rows[len]" in [w[0] for w in differences(RESULT, fewer, 1e-7, 1e-9)[2]]
    missing = dict(RESULT)
    del missing["tier"]
    paths = [w[0] for w in differences(RESULT, missing, 1e-7, 1e-9)[2]]
    assert "/tier" in paths and "{keys}" in paths
    # True and 1 are not the same kind of value to a report reader
    assert differences({"a": True}, {"a": 1.0}, 1e-7, 1e-9)[2] == [("/a", True, 1.0)]


def test_a_cpu_self_check_passes_end_to_end(capsys):
    # two batch splits of the same float64 audit on the CPU: every count equal, every float close
    assert main(["--device", "cpu", "--tokens", "2048", "--reference-batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "same results" in out and out.count("0 differ (none)") == 4


def test_asking_for_cuda_where_there_is_none_says_so():
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cuda", "--tokens", "2048"])
    assert exit_info.value.code == 2
