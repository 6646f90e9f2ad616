import numpy as np
import pytest

from tanbr_ray.moe.metrics import f1_binary, glue_score, matthews, pearson_spearman, weighted_score


def test_accuracy_and_f1_mean_on_known_inputs():
    pred, y = [1, 0, 1, 1], [1, 0, 0, 1]
    assert glue_score("SST-2", pred, y) == pytest.approx(0.75)
    # tp=2 fp=1 fn=0 -> F1 = 4/5; QQP/MRPC average F1 and accuracy
    assert f1_binary(pred, y) == pytest.approx(0.8)
    assert glue_score("QQP", pred, y) == pytest.approx((0.8 + 0.75) / 2)


def test_matthews_and_correlations():
    assert matthews([1, 0, 1, 0], [1, 0, 1, 0]) == pytest.approx(1.0)
    assert matthews([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    assert glue_score("CoLA", [1, 1, 1], [1, 0, 1]) == 0.0  # constant prediction: MCC defined as 0
    x = np.array([0.0, 1.0, 2.0, 3.0])
    assert pearson_spearman(x, 2 * x + 1) == pytest.approx(1.0)
    assert glue_score("STS-B", x, x[::-1]) == pytest.approx(-1.0)


def test_weighted_score_and_bad_input():
    assert weighted_score({"A": 1.0, "B": 0.5}, {"A": 0.25, "B": 0.75}) == pytest.approx(0.625)
    with pytest.raises(ValueError, match="unknown task"):
        glue_score("SQuAD", [1], [1])
    with pytest.raises(ValueError, match="predictions"):
        glue_score("SST-2", [1, 0], [1])
