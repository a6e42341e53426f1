"""The quality-against-time harness: run specifications are parsed and validated up front."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

from quality_vs_time import RunSpec  # noqa: E402


def test_run_spec_parses_fields_tuples_and_preset():
    spec = RunSpec.parse("p2: patch_size=2 channel_mults=1,2 lr=3e-4 preset=tiny", "cpu")
    assert spec == RunSpec("p2", "tiny", {"patch_size": 2, "channel_mults": (1, 2), "lr": 3e-4})
    assert RunSpec.parse("base", "cpu") == RunSpec("base", "cpu", {})


@pytest.mark.parametrize(
    "text, match",
    [
        ("bad name: lr=1", "name must be"),
        ("x: lr", "not key=value"),
        ("x: learning_rate=1", "unknown field"),
        ("x: lr=fast", "unknown field or bad value"),
        ("x: weighting=min_snr prediction=mean", "min_snr"),  # Config.validate, before training
        ("x: patch_size=0", "patch_size"),
    ],
)
def test_run_spec_rejects_bad_input(text, match):
    with pytest.raises(ValueError, match=match):
        RunSpec.parse(text, "cpu")
