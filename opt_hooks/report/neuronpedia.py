"""Links to Neuronpedia feature dashboards.

SAE-Lens's registry (`pretrained_saes.yaml`) gives each published SAE a `neuronpedia` field
of the form "<model>/<sae>", e.g. "gpt2-small/0-res-jb" for release "gpt2-small-res-jb",
id "blocks.0.hook_resid_pre". `opt_hooks.adapters.sae` looks it up
from the release and SAE id and the engine stores it as `LayerResult.neuronpedia_id`; the
dashboard of feature k is https://www.neuronpedia.org/<model>/<sae>/<k>, and a quick list shows
several features (of one SAE or several) on one page.
"""
from __future__ import annotations

import json
from urllib.parse import quote

NEURONPEDIA = "https://www.neuronpedia.org"


def sae_url(np_id: str) -> str:
    """The Neuronpedia page of a whole SAE ("<model>/<sae>")."""
    model, sae = _split(np_id)
    return f"{NEURONPEDIA}/{quote(model)}/{quote(sae)}"


def feature_url(np_id: str, feature: int) -> str:
    """The Neuronpedia dashboard of one feature."""
    return f"{sae_url(np_id)}/{int(feature)}"


def _split(np_id: str) -> tuple[str, str]:
    parts = np_id.split("/")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"a Neuronpedia id has the form '<model>/<sae>', got {np_id!r}")
    return parts[0], parts[1]


def quick_list_url(name: str, features: list[tuple[str, int]]) -> str:
    """A Neuronpedia quick list: one page with the dashboards of `features`, (np_id, index)
    pairs that may span SAEs (https://www.neuronpedia.org/quick-list/?name=...&features=[...],
    each feature {"modelId": <model>, "layer": <sae>, "index": "<k>"}, the JSON URL-encoded as
    sae_lens' `get_neuronpedia_quick_list` writes it)."""
    entries = []
    for np_id, feature in features:
        model, sae = _split(np_id)
        entries.append({"modelId": model, "layer": sae, "index": str(int(feature))})
    listed = json.dumps(entries, separators=(",", ":"))
    return f"{NEURONPEDIA}/quick-list/?name={quote(name, safe='')}&features={quote(listed, safe='')}"
