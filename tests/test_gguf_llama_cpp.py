"""The real client: the demo run exported to GGUF and answered by llama.cpp (llama-cpp-python).

Marked ``gguf`` and deselected by default; ``make test-gguf`` installs the ``gguf-check`` extra (builds
llama-cpp-python from its sdist) and runs it. It trains the demo run once (minutes on CPU) unless
``ADAPTERS_GGUF_RUN`` names a finished demo run to reuse.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.gguf

CASES = [("lora", "f16"), ("merged", "f16"), ("merged", "q8_0")]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    pytest.importorskip("llama_cpp", reason="the gguf-check extra is not installed (make test-gguf installs it)")
    if os.environ.get("ADAPTERS_GGUF_RUN"):
        return Path(os.environ["ADAPTERS_GGUF_RUN"])
    from adapters.config import load_recipe
    from adapters.training.run import train

    out = tmp_path_factory.mktemp("gguf_demo")
    recipe, path = load_recipe(
        "gemma3-270m-demo",
        {"output_root": str(out), "run_name": "gguf", "eval_base": False, "quant_probe": False, "report_to": "none"},
    )
    return train(recipe, path)


@pytest.mark.parametrize("mode,outtype", CASES)
def test_llama_cpp_answers_equal_the_adapters_on_20_test_rows(demo_run, tmp_path, mode, outtype):
    from adapters.publish.export import export_gguf

    rep = export_gguf(
        demo_run, mode=mode, outtype=outtype, to=tmp_path / "g", n_probes=20, probe_split="test", min_agreement=1.0
    )
    v = rep["verification"]
    print(json.dumps({k: v[k] for k in ("n", "agree_count", "exact_match_llama_cpp", "exact_match_transformers")}))
    assert v["n"] == 20 and v["agree_count"] == 20, v["disagreements"]
    assert v["tokenization_agreement"] == 1.0 and v["gguf_chat_template_is_runs"]
    assert rep["verdict"] == "pass"
