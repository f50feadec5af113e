"""Property test: random and mutated recipes through loader, schema and compiler never crash.

Every input ends either in a plan or in a lorarecipe error with a message; ``fuzz/run.py`` runs the
same property for ≥ 10,000 examples.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings

from tests.helpers.fuzzing import check_recipe_never_crashes, recipes_text

FOLDER = Path(__file__).parent


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(recipes_text)
def test_random_and_mutated_recipes_end_in_a_plan_or_a_located_error(text: str) -> None:
    check_recipe_never_crashes(text, FOLDER)
