"""The typed options (cptquant/options.py): each part checks its values once, when it is made, and its fields'
documentation is the command line's help text."""

from __future__ import annotations

import dataclasses

import pytest

from cptquant.commands import options as cli_options
from cptquant.errors import CptqError
from cptquant.options import (
    AllocationOptions,
    AnalysisOptions,
    CalibrationOptions,
    QuantizationOptions,
    help_of,
)

PARTS = (CalibrationOptions, AllocationOptions, QuantizationOptions)


@pytest.mark.parametrize("make, message", [
    (lambda: CalibrationOptions(calib_samples=2), "--calib-samples 2 is too small; use at least 8"),
    (lambda: CalibrationOptions(seq_len=4), "--seq-len 4 is too short"),
    (lambda: AllocationOptions(sparsity=(1.5,)), "strictly between 0 and 1"),
    (lambda: AllocationOptions(bit_widths=(3, 8)), "bit widths [3, 8] must be chosen from 16, 8, 4"),
    (lambda: AllocationOptions(granularity="head"), "granularity 'head'"),
    (lambda: AllocationOptions(cca="kcca"), "CCA variant 'kcca'"),
    (lambda: AllocationOptions(curvature="exact"), "curvature 'exact'"),
    (lambda: AllocationOptions(lm_loss="mse"), "--lm-loss 'mse'"),
    (lambda: AllocationOptions(target_bits=6.0, max_size_mb=1.0), "not both"),
    (lambda: AllocationOptions(max_size_mb=float("inf")), "maximum size inf MB must be a positive number"),
    (lambda: AllocationOptions(target_bits=9, bit_widths=(8, 4)), "--target-bits 9 is outside [4, 8]"),
    (lambda: QuantizationOptions(block_size=24), "block size 24 is not a power of two >= 16"),
    (lambda: QuantizationOptions(clip="max"), "--clip must be one of auto, absmax, mse, not 'max'"),
    (lambda: QuantizationOptions(zero_points="some"), "--zero-points must be one of auto, always, never"),
])
def test_each_part_refuses_a_bad_value_when_made(make, message):
    with pytest.raises(CptqError) as caught:
        make()
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_changed_part_is_checked_again_and_the_parts_are_frozen():
    options = AnalysisOptions.from_fields(calib_samples=16, target_bits=5, block_size=64)
    assert (options.calibration.calib_samples, options.allocation.target_bits,
            options.quantization.block_size) == (16, 5, 64)
    assert options.replaced(seed=3).calibration.seed == 3 and options.calibration.seed == 0
    with pytest.raises(CptqError, match="not both"):
        options.replaced(max_size_mb=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.allocation.target_bits = 2  # type: ignore[misc]
    with pytest.raises(TypeError, match="no field 'bits'"):
        AnalysisOptions.from_fields(bits=4)


def test_every_field_is_documented_and_the_cli_says_the_same():
    documented = {f.name for part in PARTS for f in dataclasses.fields(part)}
    assert all(help_of(part, f.name) for part in PARTS for f in dataclasses.fields(part))
    names = {f.name: part for part in PARTS for f in dataclasses.fields(part)}
    flags = {name.upper(): name for name in documented}
    for constant, name in flags.items():
        typer_option = getattr(cli_options, constant)
        assert typer_option.help == help_of(names[name], name), constant


@pytest.mark.parametrize("in_features, requested, block", [(384, 32, 32), (16, 32, 16), (48, 32, 16), (96, 64, 32),
                                                           (64, 128, 64)])
def test_a_layer_takes_the_largest_block_up_to_the_requested_that_divides_it(in_features, requested, block):
    """RoFormer's sinusoidal position table is 16 wide per head: blocks of 16 there, not a refused plan."""
    from cptquant.layer_graph import ROLE_LINEAR, Layer, LayerGraph
    from cptquant.options import fitting_block_size
    from cptquant.plan import uniform_plan, validate_plan
    from cptquant.quant.storage import FORMAT_QDQ, WeightShape, weight_nbytes

    assert fitting_block_size(in_features, requested) == block
    graph = LayerGraph("tiny", 1, [Layer(name="fc", role=ROLE_LINEAR, block=0, in_features=in_features, out_features=8)])
    plan = uniform_plan(graph, 4, block_size=requested)
    assert plan.layers["fc"].block_size == block
    validate_plan(plan, graph)  # refused before: "block size 32 does not divide its input size 16"
    shape = WeightShape(in_features, 8)  # priced at the block the plan gives it
    assert weight_nbytes(shape, 4, requested, True, FORMAT_QDQ) == weight_nbytes(shape, 4, block, True, FORMAT_QDQ)
