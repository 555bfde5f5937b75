"""The drift chart: a PNG of a fixed size whatever the data, the same bytes for the same bands."""

from __future__ import annotations

import pytest

from rebal_pipeline.comms.chart import CHART_HEIGHT_PX, CHART_WIDTH_PX, drift_chart
from rebal_pipeline.workflow.package import PackageBand
from rebal_pipeline_tests.comms.fixtures import make_package
from rebal_pipeline_tests.comms.reading import png_size


def test_the_chart_is_a_png_of_fixed_size_and_deterministic():
    bands = make_package().bands
    png = drift_chart(bands)
    assert png_size(png) == (CHART_WIDTH_PX, CHART_HEIGHT_PX) == (1280, 640)
    assert drift_chart(bands) == png
    assert b"Software" not in png[:200]


def test_the_size_does_not_depend_on_the_number_of_classes():
    one = [PackageBand(asset_class="equity", target_weight=1.0, band=0.03, current_weight=0.9, drift=-0.1)]
    many = [PackageBand(asset_class=f"class_{i}", target_weight=0.1, band=0.02, current_weight=0.1 + i / 100,
                        drift=i / 100) for i in range(10)]
    assert png_size(drift_chart(one)) == png_size(drift_chart(many)) == (CHART_WIDTH_PX, CHART_HEIGHT_PX)
    with pytest.raises(ValueError):
        drift_chart([])
