"""opt_hooks: which SAE features are provably non-optimal, with certificates.

    import opt_hooks as oh
    result = oh.audit(model, saes, dataset, n_tokens=200_000)
    result.layers["blocks.8.hook_resid_pre"].flagged()

See docs/API.md for the public surface and docs/THEORY.md for the conditions.
"""
from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Names are resolved on first use, so that `import opt_hooks.theory` (pure tensor maths)
# does not import TransformerLens and SAE-Lens through this package.
_EXPORTS = {
    "audit": "opt_hooks.api",
    "audit_activations": "opt_hooks.api",
    "monitor": "opt_hooks.api",
    "Monitor": "opt_hooks.api",
    "AuditOptions": "opt_hooks.engine",
    "AuditResult": "opt_hooks.result",
    "compare": "opt_hooks.comparison",
    "CertificateCheck": "opt_hooks.records",
    "FeatureRow": "opt_hooks.records",
    "LayerResult": "opt_hooks.records",
    "PairRow": "opt_hooks.records",
    "repair": "opt_hooks.repair_run",
    "repair_activations": "opt_hooks.repair_run",
    "RepairOptions": "opt_hooks.repair_run",
    "RepairResult": "opt_hooks.repair_run",
    "TrainingAudits": "opt_hooks.training",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'opt_hooks' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
