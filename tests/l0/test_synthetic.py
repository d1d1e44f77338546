"""The bundled synthetic survey: deterministic, well-formed, feasible, validated."""

from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.sparse as sp

from sparselens.l0.synthetic import MEASURES, SyntheticSurvey, make_survey


@pytest.fixture(scope="module")
def survey() -> SyntheticSurvey:
    return make_survey()


def _same(a: SyntheticSurvey, b: SyntheticSurvey) -> bool:
    return (
        a.M.shape == b.M.shape
        and (a.M != b.M).nnz == 0
        and np.array_equal(a.y, b.y)
        and np.array_equal(a.w_true, b.w_true)
        and a.target_names == b.target_names
        and np.array_equal(a.groups, b.groups)
    )


def test_deterministic_from_the_seed(survey):
    assert _same(survey, make_survey(seed=0))
    other = make_survey(seed=1)
    assert not np.array_equal(other.w_true, survey.w_true)
    assert (other.M != survey.M).nnz > 0


def test_shapes_and_types(survey):
    assert isinstance(survey.M, sp.csr_array)
    assert survey.M.shape == (100, 2000)
    assert (survey.n_targets, survey.n_records) == (100, 2000)
    assert survey.y.shape == (100,) and survey.w_true.shape == (2000,)
    assert survey.groups.shape == (100,) and survey.groups.dtype == np.int64
    assert len(survey.target_names) == 100


def test_targets_are_exactly_the_true_totals(survey):
    np.testing.assert_array_equal(survey.y, survey.M @ survey.w_true)
    np.testing.assert_allclose(survey.y, survey.M.toarray() @ survey.w_true, rtol=1e-12)
    assert (survey.y > 0).all()


def test_distributions_follow_the_benchmark(survey):
    data = survey.M.data
    assert (data > 0).all()
    assert 0.09 < survey.M.nnz / (100 * 2000) < 0.11  # density 0.1
    assert abs(np.log(data).mean() - 1.5) < 0.02 and abs(np.log(data).std() - 0.25) < 0.02
    active = survey.w_true > 0
    assert active.sum() == 1000 and np.array_equal(np.flatnonzero(active), survey.active)
    logw = np.log(survey.w_true[active])
    assert abs(logw.mean() - 2.0) < 0.15 and abs(logw.std() - 1.0) < 0.1


def test_names_and_groups_look_like_a_survey(survey):
    assert len(set(survey.target_names)) == 100
    for j, name in enumerate(survey.target_names):
        region, measure = re.fullmatch(r"region_(\d+)/(\w+)", name).groups()
        assert int(region) == j // len(MEASURES)
        assert measure == survey.group_names[survey.groups[j]]
    assert set(survey.groups.tolist()) == set(range(len(MEASURES)))


def test_fewer_targets_are_a_prefix_of_more():
    small, big = make_survey(300, 12, seed=4), make_survey(300, 20, seed=4)
    assert (small.M != big.M[:12]).nnz == 0
    np.testing.assert_array_equal(small.w_true, big.w_true)


def test_parameters_shape_the_problem():
    s = make_survey(n_records=50, n_targets=7, density=1.0, active_fraction=0.2, seed=3)
    assert s.M.shape == (7, 50) and s.M.nnz == 350
    assert (s.w_true > 0).sum() == 10
    assert (make_survey(n_records=3, active_fraction=0.01).w_true > 0).sum() == 1


def test_write_round_trip(tmp_path):
    s = make_survey(40, 6, seed=2)
    mpath, tpath = s.write(tmp_path)
    M = sp.load_npz(mpath)
    assert (sp.csr_array(M) != s.M).nnz == 0
    lines = tpath.read_text().splitlines()
    assert lines[0] == "name,value,group" and len(lines) == 7
    name, value, group = lines[1].split(",")
    assert name == s.target_names[0] and float(value) == s.y[0] and group == "households"


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"n_records": 0}, ValueError, r"n_records must be an integer >= 1, got 0"),
        ({"n_targets": -3}, ValueError, r"n_targets must be an integer >= 1"),
        ({"n_records": 10.0}, TypeError, r"n_records must be an integer"),
        ({"density": 0.0}, ValueError, r"density must be a number > 0 and <= 1, got 0.0"),
        ({"density": 1.5}, ValueError, r"density must be a number > 0 and <= 1"),
        ({"density": float("nan")}, ValueError, r"density"),
        ({"active_fraction": 0}, ValueError, r"active_fraction must be a number > 0 and <= 1"),
        ({"active_fraction": "0.5"}, TypeError, r"active_fraction must be a number"),
        ({"seed": -1}, ValueError, r"seed must be an integer >= 0"),
        ({"seed": True}, TypeError, r"seed must be an integer"),
    ],
)
def test_validation(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        make_survey(**kwargs)
