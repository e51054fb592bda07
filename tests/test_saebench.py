"""report/saebench.py: the SAEBench-style JSON that result.save writes, one file per SAE, against
its schema (opt_hooks/report/saebench_schema.json), on hand-made and engine-made records."""
from __future__ import annotations

import copy
import dataclasses
import json

import jsonschema
import pytest
from test_report import make_result

from opt_hooks.report import TABLES_DIR, load_saebench_schema, saebench_file_name, saebench_output
from opt_hooks.report.saebench import EVAL_TYPE_ID, SUFFIX
from opt_hooks.result import AuditResult


def validator() -> jsonschema.Draft202012Validator:
    schema = load_saebench_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def test_save_writes_one_valid_saebench_file_per_sae(tmp_path):
    result = make_result()
    out = result.save(tmp_path / "out")
    written = sorted(out.glob(f"{TABLES_DIR}/*/*{SUFFIX}"))
    assert [p.parent.name for p in written] == sorted(result.layers)
    for path in written:
        hook = path.parent.name
        layer, data = result.layers[hook], json.loads(path.read_text())
        validator().validate(data)
        assert path.name == f"{hook}{SUFFIX}"  # no release in the record: the SAE id alone names it
        assert (data["eval_type_id"], data["sae_lens_id"], data["sae_lens_release_id"]) == (EVAL_TYPE_ID, hook, None)
        metrics = data["eval_result_metrics"]
        assert metrics["objective"]["L"] == layer.objective["L"] and metrics["objective"]["l1"] == layer.objective["l1"]
        assert metrics["gaps"]["codes_share"] == layer.gaps["codes"]["share"]
        assert metrics["gaps"]["codes_l0_after"] == layer.gaps["codes"]["l0_after"]
        assert {t: metrics["verdicts"][f"features_{t}"] for t in layer.tier_counts()} == layer.tier_counts()
        assert metrics["verdicts"]["C6_certified"] == 1 and metrics["verdicts"]["C5_violated"] == 0
        assert metrics["verdicts"]["C2_certified"] == 1 and metrics["verdicts"]["C2_violated"] == 1
        assert metrics["absorption"]["absorption_rows"] == len(layer.absorption)
        assert metrics["token_stats"] == {"n_tokens_streamed": 1000, "n_tokens_audit": 900, "n_tokens_held_out": 100,
                                          "dead_features": 1}
        details = {d["index"]: d for d in data["eval_result_details"]}
        assert list(details) == layer.flagged() == [7, 3, 11, 12]  # certified first, then by held-out gain
        assert details[3] == {
            "index": 3, "tier": "certified", "conditions": "C2,C4", "gain": layer.features[3].gain,
            "gain_se": layer.features[3].gain_se, "p_value": layer.features[3].p_value,
            "share": layer.features[3].share, "value": 0.01, "active_count": 43,
        }
        assert data["sae_cfg_dict"]["architecture"] == layer.architecture and data["sae_cfg_dict"]["d_sae"] == 24
        assert data["eval_config"]["alpha"] == 0.05 and data["eval_config"]["pair_map_rho_min"] == 0.1
    mapped = json.loads(written[0].read_text())["eval_result_unstructured"]
    assert mapped["absorption_trees"] == [{"parent": 3, "children": [7, 11]}, {"parent": 12, "children": [5]}]
    assert mapped["duplicate_groups"] == [[14, 15]] and mapped["antipodal_pairs"] == [[16, 17]]


def test_saebench_file_named_by_release_and_sae_id_as_saebench_names_them():
    result = make_result()
    result.meta["run"] = {"sae_release": "gpt2-small-res-jb", "seed": 3, "command": "opt-hooks report"}
    hook = "blocks.0.hook_resid_pre"
    assert saebench_file_name(result, hook) == "gpt2-small-res-jb_blocks.0.hook_resid_pre_eval_results.json"
    data = saebench_output(result, hook, epoch_millis=1_700_000_000_000)
    assert (data["sae_lens_release_id"], data["datetime_epoch_millis"]) == ("gpt2-small-res-jb", 1_700_000_000_000)
    assert (data["eval_config"]["seed"], data["eval_config"]["command"]) == (3, "opt-hooks report")
    result.layers[hook].sae_id = "layer_0/width_16k/canonical"  # slashes, as in Gemma Scope's ids
    assert saebench_file_name(result, hook) == "gpt2-small-res-jb_layer_0_width_16k_canonical_eval_results.json"


def test_saebench_eval_id_belongs_to_the_record():
    """Saving one result twice gives one eval id; another layer or another run gets another."""
    result = make_result()
    ids = {hook: saebench_output(result, hook)["eval_id"] for hook in result.layers}
    assert ids == {hook: saebench_output(make_result(), hook)["eval_id"] for hook in result.layers}
    assert len(set(ids.values())) == 2
    result.meta["n_tokens"] = 2000
    assert saebench_output(result, "blocks.0.hook_resid_pre")["eval_id"] != ids["blocks.0.hook_resid_pre"]


def test_saebench_absorption_metrics_are_null_without_a_pair_map():
    result = make_result()
    hook = "blocks.1.hook_resid_pre"
    result.layers[hook] = dataclasses.replace(result.layers[hook], pair_map={"available": False})
    data = saebench_output(result, hook)
    validator().validate(data)
    assert set(data["eval_result_metrics"]["absorption"].values()) == {None}


def test_saebench_metrics_are_null_where_the_audit_has_no_number():
    """Without lam: no L1 term, no code gap (THEORY.md section 5), lam null in the config."""
    result = make_result()
    hook = "blocks.1.hook_resid_pre"
    layer = result.layers[hook]
    result.layers[hook] = dataclasses.replace(
        layer, lam=None, objective={**layer.objective, "l1": None},
        gaps={name: gap for name, gap in layer.gaps.items() if name != "codes"})
    data = saebench_output(result, hook)
    validator().validate(data)
    gaps = data["eval_result_metrics"]["gaps"]
    assert gaps["codes_share"] is None and not [k for k in gaps if k.startswith("codes_") and k != "codes_share"]
    assert gaps["bias_share"] == layer.gaps["bias"]["share"]
    assert data["eval_result_metrics"]["objective"]["l1"] is None and data["eval_config"]["lam"] is None


@pytest.mark.parametrize(
    "break_it",
    [
        lambda d: d.pop("eval_id"),
        lambda d: d.update(eval_id="run-1"),
        lambda d: d.update(eval_type_id="core"),
        lambda d: d.update(datetime_epoch_millis=-1),
        lambda d: d.update(datetime_epoch_millis=1.7e12 + 0.5),
        lambda d: d["eval_result_metrics"].pop("verdicts"),
        lambda d: d["eval_result_metrics"]["objective"].update(parts={"mse": 0.2}),  # metrics are flat
        lambda d: d["eval_result_metrics"]["gaps"].update(codes_share="2%"),
        lambda d: d["eval_result_metrics"]["gaps"].pop("codes_share"),
        lambda d: d["eval_result_details"][0].update(tier="satisfied"),
        lambda d: d["eval_result_details"][1].pop("gain"),
        lambda d: d["sae_cfg_dict"].pop("d_sae"),
        lambda d: d["eval_config"].pop("alpha"),
        lambda d: d.update(extra_field=1),
    ],
)
def test_saebench_schema_rejects_broken_files(break_it):
    data = json.loads(json.dumps(saebench_output(make_result(), "blocks.0.hook_resid_pre")))
    validator().validate(data)
    broken = copy.deepcopy(data)
    break_it(broken)
    with pytest.raises(jsonschema.ValidationError):
        validator().validate(broken)


def test_saebench_file_of_an_engine_audit_validates(tmp_path):
    """End to end from the engine (an absorbed planted world): the file validates and carries the
    layer's objective, gaps, verdicts and absorption trees."""
    from opt_hooks.synthetic import absorbed_audit, mixed_world

    layer = absorbed_audit(mixed_world(0), 0.2, n_audit=4000, n_held_out=3000, seed=0).layer
    result = AuditResult(layers={"absorbed": layer}, meta={"n_tokens": 7000})
    out = result.save(tmp_path / "out")
    data = json.loads((out / TABLES_DIR / "absorbed" / f"absorbed{SUFFIX}").read_text())
    validator().validate(data)
    metrics = data["eval_result_metrics"]
    assert metrics["objective"]["L"] == layer.objective["L"]
    assert metrics["gaps"]["bias_share"] == layer.gaps["bias"]["share"]
    assert metrics["verdicts"]["features_certified"] == layer.tier_counts()["certified"]
    assert metrics["absorption"]["absorption_trees"] == len(layer.absorption_trees()) > 0
    assert len(data["eval_result_details"]) == len(layer.flagged())
