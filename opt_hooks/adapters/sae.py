"""An SAE-Lens SAE seen in theory units (THEORY.md section 1, docs/ARCHITECTURE.md "Units").

`SAEView` turns any supported sae_lens SAE (inference or training class) into the four things
the engine works with, all in the SAE's own internal space:

- x     (n, d): the activations after hook_z flattening and the SAE's run-time normalisation
                (`run_time_activation_norm_fn_in`), before any b_dec subtraction;
- atoms (K, d): W_dec rows scaled to unit norm;
- z     (n, K): the codes that multiply those unit atoms in the SAE's own decode;
- bias  (d,):   b_dec where the SAE's decode adds it (0 for a matching-pursuit SAE with
                `apply_b_dec_to_input` False, whose reconstruction has no bias),

so that r = x - bias - z @ atoms is exactly the SAE's reconstruction error before its output
de-normalisation (`hook_sae_recons`). A signed SAE (`signed`: sae_lens' AbsTopK, whose codes keep
their sign) is its doubled dictionary (THEORY.md section 9, opt_hooks/theory/signed.py): atoms
[d; -d] (2K, d) and codes [relu(z), relu(-z)] (n, 2K), the same reconstruction; and, for SAEs that
normalise each token at run time,

- w     (n,):   each token's weight w_n = s_n^2 (THEORY.md section 1), None otherwise.
 For every decoder except the TopK family with
`rescale_acts_by_decoder_norm` this means z = sae.encode(...) * ||W_dec[i]||; the TopK
family with that flag decodes `(f / ||W_dec||) @ W_dec`, so there z = f.

Decisions documented here because they change results:

- Zero-norm decoder rows have no direction. They are treated as dead features: atom 0, code 0
  (their decoder contribution is 0 anyway) and they are listed in `notes`.
- `normalize_activations` "layer_norm" and "constant_norm_rescale" are applied by the SAE to
  each token, and sae_lens trains on the de-normalised error: token n's squared error in the
  internal space counts s_n^2 times, s_n the token's scale (layer_norm: the unbiased std of the
  centred input, as sae_lens computes it; constant_norm_rescale: ||x_n|| / sqrt(d_in)). The
  view returns w_n = s_n^2 with every batch and the audit is of that weighted objective.
  (layer_norm's eps = 1e-5 sits in the normalising denominator only, so the training error is
  s_n r_n + eps x_norm: the weighted L matches sae_lens' loss to about eps / s_n relative.)
- `normalize_activations` "expected_average_only_in" and "covariance_whitening" are not applied
  by the SAE itself: sae_lens applies them outside the SAE while training and folds them into
  the weights at the end (or `SAE.from_pretrained` folds the published scaling factor). An
  SAE still carrying one of these modes is audited as it runs (`sae.encode` on raw
  activations), with a warning.
- lam: only the "standard" L1 penalty of sae_lens is the objective of THEORY.md. Its training
  loss is `sum((x_hat - x)**2) + l1_coefficient * sum_i f_i * ||W_dec[i]||` per token (see
  `StandardTrainingSAE.calculate_aux_loss`, lp_norm 1), so lam = l1_coefficient with no
  rescaling. Gated SAEs put their L1 on the gate path (relu(pi_gate) * ||W_dec||), JumpReLU
  on an L0 surrogate or tanh, the TopK family and matching pursuit have no penalty: for those
  lam is unknown (`lam_source` None) and the conditions that need lam are L1-surrogate statements.
  If a published norm scaling factor c was folded into a standard SAE, its training lam maps
  to lam / c in the folded units.
- scope: a standard (ReLU) SAE with no training record is assumed to be L1-trained, which is
  what sae_lens' "standard" architecture means, so its scope is exact; lam is then unknown
  and estimated by the engine.
- Matching pursuit SAEs (`MatchingPursuitSAE`, `MatchingPursuitTrainingSAE`) are tied: their
  encoder is a greedy pursuit over W_dec (`_encode_matching_pursuit`: each step takes the row
  of largest positive correlation with the residual and adds relu(<residual, W_dec[i]>) to its
  code, 0 where no correlation is positive), so their codes are nonnegative and the nonnegative
  problem of THEORY.md section 1 applies as it stands, with z = f * ||W_dec[i]||. Their decode
  adds b_dec only where `process_sae_in` subtracted it (`apply_b_dec_to_input`): without it the
  reconstruction has no bias, so the view's bias is 0 and the theory's free bias (C1's floor,
  C5) is one the SAE does not have (said in `notes`). No L1 term (an L0 budget through
  `residual_threshold` / `max_iterations`): lam unknown, scope "L1 surrogate (matching_pursuit)".
- AbsTopK SAEs (`AbsTopKSAE`, `AbsTopKTrainingSAE`) keep the k pre-activations of largest magnitude
  with their sign (no ReLU): signed codes, audited as the nonnegative problem on the 2K atoms
  (d_i, -d_i) (THEORY.md section 9). Like TopK they train the squared error under an L0 budget, no
  L1 term: lam unknown, scope "L1 surrogate (abstopk)". Their encode and decode are TopK's, so the
  map is TopK's (z = f ||W_dec[i]||, or f with `rescale_acts_by_decoder_norm`), with the sign kept.
- BatchTopK training SAEs pick codes per batch (top k * n_tokens over the whole batch), so
  their codes depend on which tokens share a batch; the view encodes each batch as
  `sae.encode` does and says so in `notes`.

Transcoders (THEORY.md section 8: sae_lens' Transcoder, SkipTranscoder, JumpReLUTranscoder,
JumpReLUSkipTranscoder) read x_n at `hook_name` and predict y_n at `hook_name_out`. The same
dictionary problem lives in their output space: atoms are the unit W_dec rows (d_out), the
bias is b_dec (d_out), and the view's x is the *target* the dictionary reconstructs,

    t_n = y_n - W_skip x_n        (y_n itself for a transcoder without skip),

so that r_n = t_n - b - z_n D is exactly `y_n - transcoder(x_n)`. A skip transcoder's batches
also carry x_n (`inputs`), which the skip condition C7 reads. Their input normalisation
(`normalize_activations`) only feeds the encoder: decode adds no de-normalisation, so the
squared error is unweighted (w_n = 1). sae_lens ships no transcoder training class, so lam comes
from `training_architecture_details["l1_coefficient"]` in the metadata or from the caller.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.saes.transcoder import SkipTranscoder, Transcoder

from opt_hooks.theory.signed import doubled_atoms, doubled_codes

SUPPORTED_ARCHITECTURES = (
    "standard", "gated", "jumprelu", "topk", "batchtopk", "matryoshka_batchtopk", "matching_pursuit", "abstopk",
)
# signed codes (the k pre-activations of largest magnitude, with their sign): the doubled dictionary
SIGNED_ARCHITECTURES = ("abstopk",)
# tied: encode is a pursuit over W_dec, and decode adds b_dec only where encode subtracts it
# (apply_b_dec_to_input)
PURSUIT_ARCHITECTURES = ("matching_pursuit",)
# sae_lens' transcoder classes; the plain ReLU ones train the L1 objective of THEORY.md section 8
TRANSCODER_ARCHITECTURES = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")
_L1_TRANSCODERS = ("transcoder", "skip_transcoder")

_UNSUPPORTED_REASONS = {
    "temporal": "its codes depend on earlier tokens through attention",
}

# Normalisation modes that sae_lens applies outside the SAE object (see module docstring).
_EXTERNAL_NORMALISATION = ("expected_average_only_in", "covariance_whitening")
# Modes whose training loss weights each token's squared error by its scale squared (see above).
_WEIGHTED_NORMALISATION = ("layer_norm", "constant_norm_rescale")

EXACT_SCOPE = "L1 objective (exact)"


class SAEView:
    """One SAE in theory units. Reads the SAE on every call: it may still be training."""

    def __init__(
        self,
        sae: SAE,
        *,
        hook_name: str | None = None,
        lam: float | None = None,
        release: str | None = None,
        sae_id: str | None = None,
        hook_name_out: str | None = None,
    ):
        _check_supported(sae)
        self.sae = sae
        metadata = sae.cfg.metadata
        self.is_transcoder = isinstance(sae, Transcoder)
        self.has_skip = isinstance(sae, SkipTranscoder)
        self.hook_name: str = hook_name or metadata.hook_name
        if not self.hook_name:
            raise ValueError(
                f"the {type(sae).__name__} has no hook name (sae.cfg.metadata.hook_name is empty); "
                "pass hook_name='blocks.0.hook_resid_pre' (the hook it was trained on), "
                "or give the SAEs as {hook_name: sae}"
            )
        broken = [name for name, parameter in sae.named_parameters() if not bool(torch.isfinite(parameter).all())]
        if broken:
            raise ValueError(
                f"{self.hook_name}: the SAE's {', '.join(broken)} hold NaN or inf values, so no verdict "
                "about it can be computed; check the SAE file (a diverged training run?)"
            )
        # where the dictionary's reconstruction is compared: the input hook, except for a transcoder
        self.hook_name_out: str = (hook_name_out or metadata.hook_name_out) if self.is_transcoder else self.hook_name
        if not self.hook_name_out:
            raise ValueError(
                f"{self.hook_name}: the {type(sae).__name__} names no output hook "
                "(sae.cfg.metadata.hook_name_out is empty); set sae.cfg.metadata.hook_name_out to the hook it "
                "predicts (for an MLP transcoder, 'blocks.L.hook_mlp_out')"
            )
        self.architecture: str = sae.cfg.architecture()
        self.training_architecture: str | None = metadata.training_architecture
        self.d_in: int = sae.cfg.d_in
        self.d_out: int = sae.cfg.d_out if self.is_transcoder else sae.cfg.d_in  # the atoms' width
        self.d_sae: int = sae.cfg.d_sae
        self.model_name: str | None = metadata.model_name
        self.hook_head_index: int | None = metadata.hook_head_index
        self.notes: list[str] = []

        self.release, self.sae_id, self.neuronpedia_id, norm_factor = _pretrained_identity(
            release, sae_id, metadata.neuronpedia_id
        )
        l1_coefficient, lp_norm = _l1_penalty(sae)
        self.scope = self._scope(lp_norm)
        self.lam, self.lam_source = self._lam(lam, l1_coefficient, norm_factor)
        self._note_conditions()

    @classmethod
    def from_pretrained(
        cls,
        release: str,
        sae_id: str,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        hook_name: str | None = None,
        lam: float | None = None,
    ) -> SAEView:
        """Load with `SAE.from_pretrained` and remember release / sae_id (sae_lens does not)."""
        sae = SAE.from_pretrained(release, sae_id, device=device, dtype=dtype)
        return cls(sae, hook_name=hook_name, lam=lam, release=release, sae_id=sae_id)

    # ---- what the SAE is -------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.sae.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of every returned tensor: float64 for a float64 SAE, float32 otherwise."""
        return torch.float64 if self.sae.W_dec.dtype == torch.float64 else torch.float32

    @property
    def is_exact(self) -> bool:
        return self.scope.endswith(EXACT_SCOPE)

    @property
    def signed(self) -> bool:
        """Whether the codes take either sign (AbsTopK): atoms and codes are the doubled dictionary's."""
        return self.architecture in SIGNED_ARCHITECTURES

    def skip_weight(self) -> torch.Tensor | None:
        """(d_out, d_in) a skip transcoder's W_skip (its batches carry the inputs x_n, for C7), else None."""
        return self.sae.W_skip.detach().to(self.dtype) if self.has_skip else None

    def decoder_norms(self) -> torch.Tensor:
        """(K,) ||W_dec[i]||."""
        with torch.no_grad():
            return self.sae.W_dec.detach().to(self.dtype).norm(dim=1)

    def dead_atoms(self) -> torch.Tensor:
        """(K,) bool: decoder rows of norm 0, treated as dead features with atom 0."""
        return self.decoder_norms() == 0

    def atoms(self) -> torch.Tensor:
        """(K, d) unit rows W_dec[i] / ||W_dec[i]||, a zero row staying 0; a signed SAE's doubled
        dictionary [d; -d] (2K, d)."""
        with torch.no_grad():
            w_dec = self.sae.W_dec.detach().to(self.dtype)
            norms = w_dec.norm(dim=1, keepdim=True)
            atoms = torch.where(norms > 0, w_dec / norms.clamp_min(torch.finfo(self.dtype).tiny), 0.0)
            return doubled_atoms(atoms) if self.signed else atoms

    @property
    def applies_bias(self) -> bool:
        """Whether the SAE's reconstruction adds b_dec: always, except for a matching-pursuit SAE
        with apply_b_dec_to_input False (its decode adds b_dec only where its encoder subtracted it)."""
        return self.architecture not in PURSUIT_ARCHITECTURES or bool(self.sae.cfg.apply_b_dec_to_input)

    def bias(self) -> torch.Tensor:
        """(d,) the theory's bias b: b_dec, or 0 where the SAE adds no bias (`applies_bias`)."""
        b_dec = self.sae.b_dec.detach().to(self.dtype)
        return b_dec if self.applies_bias else torch.zeros_like(b_dec)

    def units(
        self, acts: torch.Tensor, acts_out: torch.Tensor | None = None, feature_acts: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(x, z, w, inputs) of one batch, what the engine takes: `encode(acts)` for an SAE
        (inputs None); for a transcoder, acts at hook_name and acts_out at hook_name_out give the
        target t = y - W_skip x, the codes, w None and, for a skip transcoder, the inputs x.
        `feature_acts`: a spliced transcoder's own codes (`hook_sae_acts_post`), not encoded again."""
        if not self.is_transcoder:
            if acts_out is not None:
                raise ValueError(f"{self.hook_name}: an SAE reconstructs its own input; it takes no output activations")
            return (*self.encode(acts), None)
        if acts_out is None:
            raise ValueError(
                f"{self.hook_name}: a transcoder predicts {self.hook_name_out!r} from {self.hook_name!r}; "
                "give both activations, as (x, y) pairs"
            )
        rows = self.rows(acts)
        if feature_acts is None:
            with torch.no_grad(), _no_state_left(self.sae):
                feature_acts = self.sae.encode(rows)
        target = self.rows_out(acts_out, len(rows)).to(self.dtype)
        inputs = rows.to(self.dtype) if self.has_skip else None
        if inputs is not None:
            target = target - inputs @ self.skip_weight().T
        return target, self.codes(feature_acts), None, inputs

    def rows_out(self, acts_out: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """(n, d_out) a transcoder's target rows y_n from the activations at hook_name_out."""
        if acts_out.shape[-1] != self.d_out or (n is not None and acts_out.numel() != n * self.d_out):
            raise ValueError(
                f"{self.hook_name}: the transcoder predicts d_out={self.d_out} values for each of its "
                f"{n if n is not None else 'input'} rows, but the activations at {self.hook_name_out!r} have "
                f"shape {tuple(acts_out.shape)}; give the output hook it was trained on (metadata.hook_name_out)"
            )
        return acts_out.detach().reshape(-1, self.d_out).to(self.device, self.sae.dtype)

    # ---- activations -> theory units -------------------------------------------------------

    def encode(self, acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Hook activations of any leading shape -> (x (n, d), z (n, K), w (n,) or None),
        flattened over tokens.

        `acts` is what the hook carries: (..., d_in), or (..., n_heads, d_head) at hook_z.
        Runs `sae.encode` (in the SAE's own dtype, under no_grad) and leaves no per-call
        attribute behind on the SAE.
        """
        rows = self.rows(acts)
        with torch.no_grad(), _no_state_left(self.sae):
            # An inference hook_z SAE rearranges "... n_heads d_head -> ... (n_heads d_head)"
            # itself; a singleton head axis makes that a no-op on rows that are already flat.
            sae_in = rows[:, None, :] if self.sae.hook_z_reshaping_mode else rows
            feature_acts = self.sae.encode(sae_in)
        x, w = self.internal_input(rows)
        return x, self.codes(feature_acts), w

    def rows(self, acts: torch.Tensor) -> torch.Tensor:
        """(n, d_in) rows the SAE reads from hook activations, on the SAE's device and dtype."""
        d = self.d_in
        if self.hook_head_index is not None and (acts.ndim >= 4 or acts.shape[-1] != d):
            # An SAE trained on one head of hook_z/q/k/v (sae_lens' ActivationsStore selects it):
            # (batch, pos, n_heads, d_head), or those heads flattened as a TransformerBridge gives them.
            heads = acts if acts.ndim >= 4 else acts.unflatten(-1, (-1, d))
            acts = heads[..., self.hook_head_index, :]
        elif acts.ndim >= 3 and acts.shape[-1] != d and acts.shape[-2] * acts.shape[-1] == d:
            acts = acts.flatten(-2)  # hook_z: (..., n_heads, d_head) -> (..., n_heads * d_head)
        if acts.shape[-1] != d:
            raise ValueError(
                f"{self.hook_name}: the SAE has d_in={d} but the activations have width "
                f"{acts.shape[-1]} (shape {tuple(acts.shape)}). The SAE was trained on another "
                f"hook or model: attach it to a hook of width {d}, or use an SAE trained on "
                "this hook of this model"
            )
        return acts.detach().reshape(-1, d).to(self.device, self.sae.dtype)

    def internal_input(self, sae_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x (n, d), w (n,) or None) from the SAE's input as seen at its `hook_sae_input`
        (before normalisation)."""
        rows = sae_input.detach().reshape(-1, self.d_in).to(self.device, self.sae.dtype)
        with torch.no_grad(), _no_state_left(self.sae):
            x = self.sae.run_time_activation_norm_fn_in(rows).to(self.dtype)
        return x, self.token_weights(rows)

    def token_weights(self, rows: torch.Tensor) -> torch.Tensor | None:
        """(n,) w_n = s_n^2 of (n, d_in) input rows for a run-time normalising SAE, else None."""
        mode = self.sae.cfg.normalize_activations
        if mode == "layer_norm":  # s_n: sae_lens' x.std (unbiased) of the centred row
            rows = rows.double()
            scale = (rows - rows.mean(dim=-1, keepdim=True)).std(dim=-1)
        elif mode == "constant_norm_rescale":  # x_norm = x * sqrt(d) / ||x||, so s_n = ||x|| / sqrt(d)
            scale = rows.double().norm(dim=-1) / self.d_in**0.5
        else:
            return None
        return (scale**2).to(self.dtype)

    def codes(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """(n, K) z from `sae.encode` output (or `hook_sae_acts_post`): theory-unit codes; a signed
        SAE's (n, 2K) [relu(z), relu(-z)], the codes of its doubled dictionary."""
        if feature_acts.is_sparse:  # TopK training SAEs may return sparse COO codes
            feature_acts = feature_acts.to_dense()
        z = feature_acts.detach().reshape(-1, self.d_sae).to(self.dtype)
        norms = self.decoder_norms()
        if not getattr(self.sae.cfg, "rescale_acts_by_decoder_norm", False):
            z = z * norms
        dead = norms == 0
        z = z.masked_fill(dead, 0.0) if bool(dead.any()) else z
        return doubled_codes(z) if self.signed else z

    # ---- construction helpers --------------------------------------------------------------

    def _scope(self, lp_norm: float | None) -> str:
        if self.is_transcoder:
            kind = "skip transcoder" if self.has_skip else "transcoder"
            trained_l1 = self.training_architecture in (None, self.architecture)
            if self.architecture in _L1_TRANSCODERS and trained_l1 and lp_norm in (None, 1.0):
                return f"{kind}, {EXACT_SCOPE}"
            return f"{kind}, L1 surrogate ({self.architecture})"
        trained_standard = self.training_architecture in (None, "standard")
        if self.architecture == "standard" and trained_standard and lp_norm in (None, 1.0):
            return EXACT_SCOPE
        if self.architecture == "standard" and lp_norm not in (None, 1.0):
            return f"L1 surrogate (standard, lp_norm={lp_norm:g})"
        return f"L1 surrogate ({self.architecture})"

    def _lam(
        self, lam: float | None, l1_coefficient: float | None, norm_factor: float | None
    ) -> tuple[float | None, str | None]:
        if lam is not None:
            if not (math.isfinite(lam) and lam >= 0):
                raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
            return float(lam), "argument"
        if l1_coefficient is None or not self.is_exact:
            return None, None
        if norm_factor is not None and self.sae.cfg.normalize_activations == "none":
            self.notes.append(
                f"lam = l1_coefficient / norm_scaling_factor = {l1_coefficient:g} / {norm_factor:g}: "
                "SAE.from_pretrained folded the published scaling factor into the weights"
            )
            return l1_coefficient / norm_factor, "config"
        return l1_coefficient, "config"

    def _note_conditions(self) -> None:
        n_dead_rows = int(self.dead_atoms().sum())
        if n_dead_rows:
            self.notes.append(
                f"{n_dead_rows} decoder rows have norm 0: treated as dead features (atom 0, code 0)"
            )
        mode = self.sae.cfg.normalize_activations
        if self.is_transcoder:
            self.notes.append(
                f"transcoder: reads {self.hook_name}, predicts {self.hook_name_out}; the conditions are those "
                "of the dictionary in its output space (THEORY.md section 8)"
                + ("; C7 checks the skip connection W_skip" if self.has_skip else "")
                + ". Its code gap compares with the exact lasso codes for the target itself, which an encoder "
                "reading only the input may not reach: an upper bound of what better codes could gain"
            )
            if mode != "none":
                self.notes.append(
                    f"normalize_activations={mode!r} normalises the transcoder's input only; its output is not "
                    "de-normalised, so the squared error is unweighted"
                )
        elif mode in _WEIGHTED_NORMALISATION:
            self.notes.append(
                f"normalize_activations={mode!r}: audited on the SAE's own training objective, each token's "
                "squared error weighted by w_n = s_n^2 (its normalising scale squared, THEORY.md section 1)"
            )
        if mode in _EXTERNAL_NORMALISATION and not self.is_transcoder:
            message = (
                f"{self.hook_name}: normalize_activations={mode!r} is applied outside the SAE by "
                "sae_lens (during training) and has not been folded into these weights; the audit "
                "sees the SAE as sae.encode runs it, on raw activations. Fold it first "
                "(sae.fold_activation_norm_scaling_factor / sae.fold_activation_whitening) to audit "
                "the SAE in the space it was trained in"
            )
            if self.architecture in PURSUIT_ARCHITECTURES and mode == "covariance_whitening":
                message += (" (a matching-pursuit SAE cannot fold whitening: its encoder is tied to W_dec, "
                            "and sae_lens refuses to train one with it)")
            warnings.warn(message, UserWarning, stacklevel=3)
            self.notes.append(message)
        if self.architecture in PURSUIT_ARCHITECTURES:
            self._note_matching_pursuit()
        if self.signed:
            self.notes.append(
                "signed codes (abstopk: the k pre-activations of largest magnitude, with their sign): audited as "
                "the nonnegative problem on the doubled dictionary (d_i, -d_i) (THEORY.md section 9), one row per "
                "latent and sign (12+, 12−); C2 skips each latent's pair of signs and the pairs whose moved latent "
                "fires with both signs, and C3, the decoder gap and C6 turn a decoder row for both signs at once"
            )
        if self.architecture in ("batchtopk", "matryoshka_batchtopk"):
            self.notes.append(
                "BatchTopK codes are chosen per batch (top k * n_tokens over the whole batch), so "
                "they depend on which tokens share a batch"
            )

    def _note_matching_pursuit(self) -> None:
        self.notes.append(
            "matching pursuit: the codes come from a greedy pursuit over W_dec (a tied encoder: no W_enc or "
            "b_enc), each step adding relu(<residual, W_dec[i]>) to the latent of largest positive "
            "correlation, so they are nonnegative. No L1 term (an L0 budget: residual_threshold "
            f"{self.sae.cfg.residual_threshold:g}, max_iterations {self.sae.cfg.max_iterations or self.d_in}): "
            "the conditions are the L1 surrogate's, with lam estimated or unknown. Certificates keep the codes "
            "fixed; a change of W_dec or b_dec also moves the pursuit's codes (only a repair's validation, "
            "which re-encodes, measures that), and code scales or thresholds have no parameter to go into"
        )
        if not self.applies_bias:
            self.notes.append(
                "apply_b_dec_to_input is False: this matching-pursuit SAE's reconstruction has no bias (its "
                "decode adds b_dec only where its encoder subtracts it), so the bias is 0; C1's floor and "
                "C5's step move a free bias the SAE does not have, and a repair cannot write them into b_dec"
            )

    def __repr__(self) -> str:
        out = f", hook_name_out={self.hook_name_out!r}, d_out={self.d_out}" if self.is_transcoder else ""
        return (
            f"SAEView(hook_name={self.hook_name!r}{out}, architecture={self.architecture!r}, "
            f"d_in={self.d_in}, d_sae={self.d_sae}, scope={self.scope!r}, lam={self.lam!r})"
        )


def make_views(
    saes: SAE | SAEView | Sequence[SAE | SAEView] | Mapping[str, SAE | SAEView],
    hook_names: str | Sequence[str] | None = None,
) -> dict[str, SAEView]:
    """{key: SAEView} from an SAE, a list of SAEs, or {hook_name: SAE}.

    The key is the SAE's hook name. Several SAEs on one hook (widths, checkpoints, architectures
    compared in one forward pass) get keys that also name the SAE, `view_key`: "<hook>/<sae_id>",
    or "<hook>/sae<k>" (k its position in the list) where the sae_id is unknown or shared.
    `hook_names` (one per SAE, only for the SAE / list forms) overrides the hook names the SAEs
    carry in their metadata. Already-built SAEViews pass through unchanged.
    """
    if isinstance(saes, Mapping):
        if hook_names is not None:
            raise ValueError("hook_names is for an SAE or a list of SAEs; a dict already names its hooks")
        pairs = [(name, sae) for name, sae in saes.items()]
    else:
        items = [saes] if isinstance(saes, (SAE, SAEView)) else list(saes)
        if not items:
            raise ValueError("no SAEs given")
        names = [hook_names] if isinstance(hook_names, str) else hook_names
        if names is not None and len(names) != len(items):
            raise ValueError(f"{len(names)} hook_names for {len(items)} SAEs; give one per SAE")
        pairs = list(zip(names or [None] * len(items), items))

    built: list[SAEView] = []
    for name, sae in pairs:
        if isinstance(sae, SAEView):
            if name is not None and name != sae.hook_name:
                raise ValueError(f"SAEView for {sae.hook_name!r} given under the hook name {name!r}")
            view = sae
        elif isinstance(sae, SAE):
            view = SAEView(sae, hook_name=name)
        else:
            raise TypeError(f"expected a sae_lens SAE, got {type(sae).__name__}")
        if any(other.sae is view.sae and other.hook_name == view.hook_name for other in built):
            raise ValueError(f"the same SAE is given twice for the hook {view.hook_name!r}")
        built.append(view)
    return {view_key(view, position, built): view for position, view in enumerate(built)}


def view_key(view: SAEView, position: int, views: Sequence[SAEView]) -> str:
    """The result key of `view`, the `position`-th of `views`: its hook name, unless another SAE of
    `views` reads the same hook; then "<hook>/<sae_id>" (or "<hook>/sae<position>" when the sae_id is
    unknown or shared)."""
    same_hook = [other for other in views if other.hook_name == view.hook_name]
    if len(same_hook) == 1:
        return view.hook_name
    ids = [other.sae_id for other in same_hook]
    label = view.sae_id if view.sae_id and ids.count(view.sae_id) == 1 else f"sae{position}"
    return f"{view.hook_name}/{label}"


def _check_supported(sae: Any) -> None:
    if not isinstance(sae, SAE):
        raise TypeError(f"expected a sae_lens SAE, got {type(sae).__name__}")
    architecture = sae.cfg.architecture()
    if isinstance(sae, Transcoder):
        if architecture not in TRANSCODER_ARCHITECTURES:
            raise ValueError(
                f"transcoder architecture {architecture!r} is not supported; supported: {', '.join(TRANSCODER_ARCHITECTURES)}"
            )
        return
    if architecture not in SUPPORTED_ARCHITECTURES:
        reason = _UNSUPPORTED_REASONS.get(architecture, "it is not one of the architectures this adapter maps")
        raise ValueError(
            f"architecture {architecture!r} is not supported: {reason}. "
            f"Supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def _l1_penalty(sae: SAE) -> tuple[float | None, float | None]:
    """(l1_coefficient, lp_norm) of a standard L1 training penalty (an SAE's or a ReLU
    transcoder's), from the config or metadata."""
    if sae.cfg.architecture() not in ("standard", *_L1_TRANSCODERS):
        return None, None
    if hasattr(sae.cfg, "l1_coefficient"):  # a StandardTrainingSAE
        return float(sae.cfg.l1_coefficient), float(sae.cfg.lp_norm)
    details = sae.cfg.metadata.training_architecture_details or {}
    l1_coefficient = details.get("l1_coefficient")
    if l1_coefficient is None:
        return None, None
    return float(l1_coefficient), float(details.get("lp_norm", 1.0))


def _pretrained_identity(
    release: str | None, sae_id: str | None, neuronpedia_id: str | None
) -> tuple[str | None, str | None, str | None, float | None]:
    """(release, sae_id, neuronpedia_id, norm_scaling_factor) from sae_lens' pretrained directory.

    sae_lens keeps none of these on the SAE it loads (a 6.x config even drops the neuronpedia id
    that `from_pretrained` passes as an override), so: with release and sae_id, look them up;
    with only a neuronpedia id in the metadata (older configs keep it), find its release.
    """
    if not (release and sae_id) and not neuronpedia_id:
        return release, sae_id, neuronpedia_id, None
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release and sae_id:
        entry = directory.get(release)
        if entry is None or sae_id not in entry.saes_map:
            return release, sae_id, neuronpedia_id, None
        known_np = entry.neuronpedia_id.get(sae_id) or neuronpedia_id
        return release, sae_id, known_np, entry.norm_scaling_factor.get(sae_id)
    for entry in directory.values():
        for candidate_id, candidate_np in entry.neuronpedia_id.items():
            if candidate_np == neuronpedia_id:
                return entry.release, candidate_id, neuronpedia_id, entry.norm_scaling_factor.get(candidate_id)
    return release, sae_id, neuronpedia_id, None


@contextmanager
def _no_state_left(sae: SAE) -> Iterator[None]:
    """Undo the plain attributes a call sets on the SAE.

    sae_lens stores per-call state on the module: layer_norm keeps ln_mu / ln_std,
    constant_norm_rescale keeps x_norm_coeff (normally deleted by decode), and an inference
    hook_z SAE records d_head and swaps its reshape_fn_in on first use.
    """
    before = dict(sae.__dict__)
    try:
        yield
    finally:
        for name in [name for name in sae.__dict__ if name not in before]:
            del sae.__dict__[name]
        for name, value in before.items():
            if sae.__dict__.get(name) is not value:
                sae.__dict__[name] = value
