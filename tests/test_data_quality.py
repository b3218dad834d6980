"""The hashed-n-gram quality classifier and its pipeline stage."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from afm.data.document import Document
from afm.data.quality import (
    FeatureConfig,
    QualityFilter,
    QualityModel,
    accuracy,
    build_training_set,
    default_positives,
    features,
    fit,
)
from afm.data.stages import Drop

from .test_data_stages import PARAGRAPHS, word_salad


@pytest.fixture(scope="module")
def split():
    texts, labels = build_training_set(default_positives(800, max_bytes=4_000_000), seed=0)
    cut = len(texts) * 3 // 4
    return (texts[:cut], labels[:cut]), (texts[cut:], labels[cut:])


@pytest.fixture(scope="module")
def model(split):
    (texts, labels), _ = split
    return fit(texts, labels)


def test_held_out_accuracy(model, split):
    _, (texts, labels) = split
    acc = accuracy(model, texts, labels)
    print(f"quality model: held-out accuracy {acc:.4f} on {len(texts)} documents "
          f"({sum(labels)} good, {len(labels) - sum(labels)} synthetic bad)")
    assert acc >= 0.95


def test_scores_rank_unseen_text_sensibly(model):
    # An English news paragraph (no docstring, no code) against bad text built from its own words.
    good = model.score(PARAGRAPHS["en"])
    assert 0.0 <= good <= 1.0
    assert good >= 0.5 > model.score(word_salad())
    assert model.score("Home | About us | Contact\nLogin | Register | Cart (0)\n© 2021 Foo Inc. All rights reserved.") < 0.1
    assert model.score("a8#k2 ^^x z9q!! ~~ p0p0 lk;j asdf 9(8) &&& qq zx#") < 0.1


def test_training_set_is_deterministic_and_balanced():
    positives = [PARAGRAPHS["en"], "def f(x):\n    return x + 1\n", "Another good sentence here, with words."]
    a = build_training_set(positives, seed=3)
    assert a == build_training_set(positives, seed=3) and a != build_training_set(positives, seed=4)
    assert sorted(a[1]) == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError):
        build_training_set([])


def test_features_are_hashed_buckets():
    config = FeatureConfig(buckets=1 << 12)
    idx = features("The cat sat on the mat.", config)
    assert idx.dtype == np.int64 and (np.diff(idx) > 0).all() and 0 <= idx.min() and idx.max() < 1 << 12
    assert len(features("", config)) == 1  # the length bucket: every text has a feature
    assert np.array_equal(idx, features("THE CAT SAT ON THE MAT.", config))  # case-folded
    with pytest.raises(ValueError):
        FeatureConfig(buckets=1000)


def test_fit_validates_labels():
    with pytest.raises(ValueError):
        fit(["a", "b"], [1, 1])
    with pytest.raises(ValueError):
        fit(["a", "b"], [1, 2])


def test_save_and_load_round_trip(model, split, tmp_path):
    path = model.save(tmp_path / "quality.npz")
    assert path.stat().st_size < 4_000_000
    assert [p.name for p in tmp_path.iterdir()] == ["quality.npz"]  # no temporary file left
    loaded = QualityModel.load(path)
    texts = split[1][0][:50]
    assert np.allclose(loaded.scores(texts), model.scores(texts), atol=1e-6)
    assert loaded.config == model.config


def test_quality_filter_stage(model, tmp_path):
    path = model.save(tmp_path / "q.npz")
    for stage in (QualityFilter(path, threshold=0.5), QualityFilter(model, threshold=0.5)):
        good = stage(Document(id="g", text=PARAGRAPHS["en"], source="t"))
        assert isinstance(good, Document) and good.meta["quality"] >= 0.5
        assert stage(Document(id="b", text=word_salad(), source="t")) == Drop("quality:low")
    by_path = QualityFilter(path, field="q2")
    by_path(Document(id="g", text="warm the model", source="t"))
    assert len(pickle.dumps(by_path)) < 1000  # the loaded model stays behind
    copy = pickle.loads(pickle.dumps(by_path))
    assert copy(Document(id="g", text=PARAGRAPHS["en"], source="t")).meta["q2"] == pytest.approx(model.score(PARAGRAPHS["en"]), abs=1e-4)
