import math

import pytest
import torch

from normlab import sweep
from normlab.data import load_classification
from normlab.nn import batchnorm
from normlab.store import RunStore
from normlab.train import TrainConfig, train_classifier
from normlab.train.batched import group_key, train_classifiers


@pytest.fixture(scope="module")
def digits():
    return load_classification("digits")


def tiny(**changes) -> TrainConfig:
    settings = {
        "dataset": "digits",
        "hidden": (32, 32),
        "epochs": 2,
        "eval_every": 4,
        "lr": 0.1,
    }
    settings.update(changes)
    return TrainConfig(**settings)


def reference_batchnorm():
    """Return a context in which BatchNorm runs the pure-PyTorch path that batched mirrors."""
    return batchnorm.batch_norm_backend("reference")


def assert_same_result(batched_result, single_result):
    assert batched_result.status == single_result.status
    assert batched_result.steps == single_result.steps
    assert batched_result.diverged_step == single_result.diverged_step
    assert batched_result.step_loss == single_result.step_loss
    assert batched_result.history == single_result.history
    assert batched_result.final.keys() == single_result.final.keys()
    for name, value in single_result.final.items():
        other = batched_result.final[name]
        assert other == value or (math.isnan(other) and math.isnan(value)), name


# lr, seed, init_scale, weight_decay; lr 100 diverges within a few steps
MIXED_RUNS = [
    (0.1, 0, 1.0, 0.0),
    (1.0, 1, 0.1, 0.0),
    (100.0, 0, 1.0, 0.0),
    (0.01, 2, 10.0, 1e-3),
    (0.316228, 3, 1.0, 0.0),
]


@pytest.mark.parametrize("norm", ["batchnorm", "none"])
def test_batched_equals_one_by_one(digits, norm):
    configs = [
        tiny(norm=norm, lr=lr, seed=seed, init_scale=scale, weight_decay=decay)
        for lr, seed, scale, decay in MIXED_RUNS
    ]
    with reference_batchnorm():
        results = train_classifiers(configs, digits)
        expected = [train_classifier(config, digits) for config in configs]
    assert [r.status for r in expected].count("diverged") == 1
    assert expected[2].diverged_step < 5
    for result, single in zip(results, expected):
        assert_same_result(result, single)


def test_batched_all_runs_diverge(digits):
    configs = [
        tiny(norm="none", lr=lr, seed=seed) for lr, seed in [(100.0, 0), (300.0, 1)]
    ]
    results = train_classifiers(configs, digits)
    for config, result in zip(configs, results):
        assert result.status == "diverged"
        assert_same_result(result, train_classifier(config, digits))


def test_batched_other_settings_equal(digits):
    # momentum None (a cumulative average), act-norm order, tanh, SGD without momentum,
    # and a training split whose last batch has one sample
    configs = [
        tiny(
            norm="batchnorm",
            norm_momentum=None,
            order="act-norm",
            activation="tanh",
            momentum=0.0,
            train_size=129,
            eval_every=3,
            lr=lr,
            seed=seed,
        )
        for lr, seed in [(0.05, 4), (0.5, 5)]
    ]
    with reference_batchnorm():
        results = train_classifiers(configs, digits)
        expected = [train_classifier(config, digits) for config in configs]
    assert expected[0].steps == 4
    for result, single in zip(results, expected):
        assert_same_result(result, single)


def test_batched_close_under_default_backend(digits):
    configs = [tiny(lr=lr, seed=seed) for lr, seed in [(0.1, 0), (0.03, 1)]]
    results = train_classifiers(configs, digits)
    for config, result in zip(configs, results):
        single = train_classifier(config, digits)
        assert result.steps == single.steps
        assert result.step_loss == pytest.approx(single.step_loss, rel=1e-4, abs=1e-5)
        assert result.final["val_acc"] == pytest.approx(
            single.final["val_acc"], abs=0.01
        )


def test_batched_same_seed_same_numbers(digits):
    configs = [tiny(lr=lr, seed=seed) for lr, seed in [(0.1, 0), (1.0, 1), (100.0, 2)]]
    first = train_classifiers(configs, digits)
    second = train_classifiers(configs, digits)
    for a, b in zip(first, second):
        assert_same_result(a, b)


def test_batched_leaves_global_rng_alone(digits):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_classifiers([tiny(seed=1), tiny(seed=2)], digits)
    assert torch.equal(torch.rand(3), expected)


def test_batched_wall_time_is_shared(digits):
    results = train_classifiers([tiny(seed=1), tiny(seed=2, lr=100.0)], digits)
    assert results[0].wall_time > 0
    assert results[0].wall_time == results[1].wall_time


def test_group_key_same_for_batched_fields():
    base = tiny()
    key = group_key(base)
    assert key is not None
    for changes in (
        {"lr": 2.0},
        {"seed": 7},
        {"init_scale": 0.1},
        {"weight_decay": 0.1},
    ):
        assert group_key(base.replace(**changes)) == key, changes


def test_group_key_differs_for_shared_fields():
    base = tiny()
    for changes in (
        {"norm": "none"},
        {"hidden": (16,)},
        {"epochs": 3},
        {"momentum": 0.5},
        {"norm_momentum": 0.2},
        {"batch_size": 32},
        {"diverge_loss": 10.0},
    ):
        assert group_key(base.replace(**changes)) != group_key(base), changes


@pytest.mark.parametrize(
    "changes",
    [
        {"dropout": 0.1},
        {"model": "cnn", "norm": "batchnorm"},
        {"optimizer": "adam"},
        {"norm": "layernorm"},
        {"norm": "torch-batchnorm"},
        {"norm": "weightnorm"},
    ],
)
def test_group_key_none_when_not_batchable(changes):
    assert group_key(tiny(**changes)) is None


def test_mixed_group_is_rejected(digits):
    with pytest.raises(ValueError, match="hidden"):
        train_classifiers([tiny(), tiny(hidden=(16, 16))], digits)
    with pytest.raises(ValueError, match="cannot be batched"):
        train_classifiers([tiny(dropout=0.1)], digits)


def test_empty_group_returns_nothing(digits):
    assert train_classifiers([], digits) == []


def test_sweep_batches_mlp_runs(digits, tmp_path):
    # the sweep trains batchable configs with the group trainer, even a group of one
    configs = [
        TrainConfig(hidden=(16, 16), epochs=1, eval_every=3, lr=lr, seed=seed, train_size=200)
        for lr in (0.05, 0.2)
        for seed in (0, 1)
    ] + [TrainConfig(hidden=(16, 16), epochs=1, eval_every=3, norm="none", train_size=200)]
    units = sweep.plan_units(configs)
    assert [(u.grouped, len(u.configs)) for u in units] == [(True, 4), (True, 1)]
    with RunStore(tmp_path / "runs.db") as store, reference_batchnorm():
        records = sweep.run_sweep(configs, store, digits, progress=False)
        for config in configs:
            alone = train_classifier(config, digits)
            stored = records[config.key()]
            assert stored.status == alone.status
            assert stored.step_loss == alone.step_loss
            assert stored.final == alone.final


def test_process_pool_sweep_batches_like_in_process(digits, tmp_path):
    # groups trained in pool workers store what an in-process sweep stores
    configs = [
        TrainConfig(hidden=(16, 16), epochs=1, eval_every=3, lr=lr, seed=seed, train_size=200)
        for lr in (0.05, 0.2, 1.0)
        for seed in (0, 1)
    ]
    with RunStore(tmp_path / "one.db") as store:
        expected = sweep.run_sweep(configs, store, digits, progress=False)
    with sweep.open_executor("process", workers=2, threads=1) as executor, \
            RunStore(tmp_path / "pool.db") as store:
        pooled = sweep.run_sweep(configs, store, digits, progress=False, executor=executor)
    assert set(pooled) == set(expected)
    for key, record in expected.items():
        assert pooled[key].status == record.status
        assert pooled[key].step_loss == record.step_loss
        assert pooled[key].final == record.final
