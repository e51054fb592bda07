"""Links to Neuronpedia feature dashboards.

SAE-Lens's registry (`pretrained_saes.yaml`) gives each published SAE a `neuronpedia` field
of the form "<model>/<sae>", e.g. "gpt2-small/0-res-jb" for release "gpt2-small-res-jb",
id "blocks.0.hook_resid_pre". `opt_hooks.adapters.sae` looks it up
from the release and SAE id and the engine stores it as `LayerResult.neuronpedia_id`; the
dashboard of feature k is https://www.neuronpedia.org/<model>/<sae>/<k>.
"""
from __future__ import annotations

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
