"""The public API: every exported name exists, is documented, and nothing private leaks."""

import importlib

import pytest

import kltune
import kltune.functional

MODULES = [
    "kltune",
    "kltune.functional",
    "kltune.diagnostics",
    "kltune.plots",
    "kltune.preferences",
]


@pytest.mark.parametrize("module_name", MODULES)
def test_every_exported_name_exists_and_has_a_docstring(module_name: str) -> None:
    module = importlib.import_module(module_name)
    for name in module.__all__:
        obj = getattr(module, name)
        assert not name.startswith("_")
        if callable(obj):
            assert obj.__doc__ and obj.__doc__.strip(), f"{module_name}.{name} has no docstring"


def test_all_is_sorted_and_unique() -> None:
    for module in (kltune, kltune.functional):
        assert list(module.__all__) == sorted(set(module.__all__))


def test_the_blocks_of_the_design_are_exported() -> None:
    for name in (
        "Policy",
        "Reference",
        "RewardFn",
        "Baseline",
        "KLController",
        "PPOObjective",
        "RolloutBuffer",
        "Rollout",
        "train",
        "ppo_iteration",
    ):
        assert name in kltune.__all__
