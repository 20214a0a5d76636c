"""The conda-forge recipe (v1 format): valid against the recipe JSON schema, and its version,
requirements and run constraints (the extras) agree with pyproject.toml in conda-forge's
package names. Not build-verified here (no conda builder or channel): the README says so."""

from __future__ import annotations

import json

import pack_lib
import pytest
from conftest import service_absent

RECIPE = pack_lib.ROOT / "packaging" / "conda-forge" / "recipe.yaml"


@pytest.mark.slow  # ~0.7 s: the schema is large
def test_recipe_is_valid_against_the_schema():
    try:
        import jsonschema
        import yaml
    except ImportError:
        service_absent("jsonschema and pyyaml are not installed (pip install 'pipefarm[packaging]')")

    if not pack_lib.CONDA_SCHEMA.is_file():
        service_absent(f"the recipe schema is not at {pack_lib.CONDA_SCHEMA}")
    schema = json.loads(pack_lib.CONDA_SCHEMA.read_text())
    recipe = yaml.safe_load(RECIPE.read_text())
    jsonschema.validate(recipe, schema)
    bad = dict(recipe, build={**recipe["build"], "noarch": ["python"]})
    with pytest.raises(jsonschema.ValidationError):  # the schema does check
        jsonschema.validate(bad, schema)


def test_recipe_agrees_with_pyproject():
    import yaml

    assert pack_lib.mismatches("conda") == []
    recipe = yaml.safe_load(RECIPE.read_text())
    assert recipe["context"]["python_min"] == pack_lib.python_min()
    assert recipe["about"]["license"] == pack_lib.pyproject()["license"]
    assert "pipefarm = pipefarm.cli:main" in recipe["build"]["python"]["entry_points"]
