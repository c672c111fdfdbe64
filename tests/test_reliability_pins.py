"""Cases of issue #13 that already behaved and must stay so: untrusted YAML, verbs on unfinished or missing runs,
no pickle loads in the package."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from adapters.cli import main
from adapters.config import RecipeError, load_recipe

PACKAGE = Path(__file__).resolve().parents[1] / "adapters"


def test_yaml_python_tag_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f'learning_rate: 1e-4\nrun_name: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(RecipeError, match=rf"{re.escape(str(recipe))}:2:\d+: invalid YAML"):
        load_recipe(recipe)
    assert not marker.exists()


@pytest.mark.parametrize("status", ["running", "interrupted", "failed", "diverged"])
@pytest.mark.parametrize(
    "verb", [["eval"], ["merge"], ["generate", "--prompt", "x"], ["push", "--repo-id", "me/x", "--dry-run"]]
)
def test_verbs_refuse_an_unfinished_run_in_one_line(tmp_path, capsys, verb, status):
    run = tmp_path / "outputs" / "r"
    run.mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"status": status, "config": {}}))
    rc = main([verb[0], str(run), *verb[1:]])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert f"status is '{status}', not 'complete'" in err[0] and "manifest.json" in err[0]


@pytest.mark.parametrize("verb", [["eval"], ["merge"], ["export", "--to", "x"], ["generate", "--prompt", "x"]])
def test_verbs_refuse_a_missing_run_in_one_line(tmp_path, capsys, verb):
    rc = main([verb[0], str(tmp_path / "nope"), *[a if a != "x" else str(tmp_path / "x") for a in verb[1:]]])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "not a run directory" in err[0], err


def test_package_never_unpickles():
    """No pickle import, and every torch.load passes weights_only=True (checkpoints are safetensors + json)."""
    for f in PACKAGE.rglob("*.py"):
        text = f.read_text()
        assert not re.search(r"^\s*(import pickle|from pickle|import dill|import cloudpickle)", text, re.M), f
        for call in re.findall(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in call, f"{f}: torch.load({call})"
