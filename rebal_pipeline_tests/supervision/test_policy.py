"""The drift policy's `supervision` section: weekly by default, monthly or quarterly, nothing else."""

import pytest
import yaml
from pydantic import ValidationError

from rebal_pipeline.core.policy import DEFAULT_POLICY_FILE, DriftPolicy, load_policy


def _document() -> dict:
    return yaml.safe_load(DEFAULT_POLICY_FILE.read_text(encoding="utf-8"))


def test_the_shipped_policy_reports_weekly():
    assert load_policy().supervision.frequency == "weekly"


def test_a_policy_without_the_section_reports_weekly():
    document = _document()
    del document["supervision"]
    assert DriftPolicy.model_validate(document).supervision.frequency == "weekly"


@pytest.mark.parametrize("frequency", ["monthly", "quarterly"])
def test_monthly_and_quarterly(frequency):
    assert DriftPolicy.model_validate({**_document(), "supervision": {"frequency": frequency}}).supervision.frequency \
        == frequency


@pytest.mark.parametrize("section", [{"frequency": "daily"}, {"frequency": "Weekly"}, {"frequency": "weekly", "day": 1}])
def test_anything_else_is_refused(section):
    with pytest.raises(ValidationError) as refused:
        DriftPolicy.model_validate({**_document(), "supervision": section})
    assert "supervision" in str(refused.value)
