"""DPP diversity (R_div): closed-form values, the det-ratio identity, and the real MiniLM."""
import math

import numpy as np
import pytest

from rewards.diversity import (
    dpp_diversity,
    dpp_log_contributions,
    embed_texts,
    l2_normalise,
    packaged_minilm_dir,
)

ETA = 1e-2


def test_orthogonal_candidates_keep_everything():
    # K = I, L = (1 + η) I, so s_i = 1 + η for every candidate.
    values = dpp_log_contributions(np.eye(3), ETA)
    assert values == pytest.approx([math.log(1 + ETA)] * 3)


def test_identical_candidates_get_almost_nothing():
    # K = J (all ones), L = J + ηI, L⁻¹ = (I − J/(G+η))/η, so
    # s = 1/(L⁻¹)_ii = η (G+η) / (G+η−1); for G = 2: 0.01 · 2.01 / 1.01.
    e = np.tile([[0.6, 0.8]], (2, 1))
    expected = math.log(ETA * (2 + ETA) / (1 + ETA))
    assert dpp_log_contributions(e, ETA) == pytest.approx([expected, expected])


def test_two_vectors_at_a_known_angle():
    # L = [[1+η, c], [c, 1+η]]; Schur complement s = (1+η) − c²/(1+η). With c = 0.5:
    e = np.array([[1.0, 0.0], [0.5, math.sqrt(0.75)]])
    s = (1 + ETA) - 0.25 / (1 + ETA)
    assert dpp_log_contributions(e, ETA) == pytest.approx([math.log(s)] * 2)


def test_duplicates_score_lowest_and_the_odd_one_out_highest():
    e = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.7, 0.7]])
    v = dpp_log_contributions(e, ETA)
    # The duplicated pair is (nearly) explained by each other: s = η(2+η)/(1+η) each.
    assert v[0] == pytest.approx(v[1]) == pytest.approx(math.log(ETA * (2 + ETA) / (1 + ETA)))
    assert v[0] < v[3] < v[2] or v[0] < v[2] < v[3]
    assert min(v[2], v[3]) > v[0] + 2.0  # a large gap, not rounding noise


def test_matches_the_determinant_ratio_definition():
    rng = np.random.default_rng(0)
    e = l2_normalise(rng.normal(size=(5, 8)))
    big_l = e @ e.T + ETA * np.eye(5)
    _, logdet = np.linalg.slogdet(big_l)
    expected = []
    for i in range(5):
        keep = [j for j in range(5) if j != i]
        _, logdet_minor = np.linalg.slogdet(big_l[np.ix_(keep, keep)])
        expected.append(logdet - logdet_minor)        # log det(L) / det(L_{-i})
    assert dpp_log_contributions(e, ETA) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_scale_invariance_single_candidate_and_zero_rows():
    rng = np.random.default_rng(1)
    e = rng.normal(size=(3, 4))
    scaled = e * np.array([[2.0], [0.1], [7.0]])
    assert dpp_log_contributions(scaled) == pytest.approx(dpp_log_contributions(e))
    assert dpp_log_contributions(np.ones((1, 4))) == pytest.approx([math.log(1 + ETA)])
    # An all-zero embedding has nothing of its own: s = η, and no NaN anywhere.
    v = dpp_log_contributions(np.array([[1.0, 0.0], [0.0, 0.0]]), ETA)
    assert np.all(np.isfinite(v)) and v[1] == pytest.approx(math.log(ETA))
    assert dpp_log_contributions(np.zeros((0, 4))).shape == (0,)


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        dpp_log_contributions(np.eye(2), eta=0.0)
    with pytest.raises(ValueError):
        dpp_log_contributions(np.ones(3))


class FakeEncoder:
    """Maps each text to a fixed vector, unnormalised, to check embed_texts' contract."""

    def __init__(self, table):
        self.table = table

    def encode(self, sentences):
        return np.array([self.table[s] for s in sentences])


def test_embed_texts_normalises_and_checks_shape():
    enc = FakeEncoder({"a": [3.0, 4.0], "b": [0.0, 2.0]})
    e = embed_texts(["a", "b"], enc)
    assert e == pytest.approx(np.array([[0.6, 0.8], [0.0, 1.0]]))
    assert embed_texts([], enc).shape[0] == 0

    class Broken:
        def encode(self, sentences):
            return np.zeros(3)

    with pytest.raises(ValueError):
        embed_texts(["a", "b"], Broken())


def test_dpp_diversity_with_fake_encoder():
    enc = FakeEncoder({"x": [1.0, 0.0], "y": [0.0, 5.0]})
    assert dpp_diversity(["x", "x"], enc) == pytest.approx([math.log(ETA * 2.01 / 1.01)] * 2)
    assert dpp_diversity(["x", "y"], enc) == pytest.approx([math.log(1 + ETA)] * 2)


def test_packaged_minilm_dir_points_at_model_files():
    d = packaged_minilm_dir()
    assert (d / "modules.json").is_file() and (d / "model.safetensors").is_file()


def test_real_minilm_paraphrases_and_duplicates():
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(packaged_minilm_dir()), device="cpu")
    a = "The knight opened the old iron gate at dawn."
    a_para = "At sunrise the knight pushed open the ancient iron gate."
    other = "The stock market fell sharply after the bank raised interest rates."
    e = embed_texts([a, a_para, other], model)
    cos = e @ e.T
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0)
    assert cos[0, 1] > cos[0, 2] + 0.3   # paraphrase much closer than an unrelated text

    group = [a, a, a_para, other]
    v = dpp_diversity(group, model)
    assert v[0] == pytest.approx(v[1], abs=1e-6)
    assert max(v[0], v[1]) < min(v[2], v[3])   # the duplicates score lowest
    assert v[2] < v[3]                         # the paraphrase of a is less novel than `other`
