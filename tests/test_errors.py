"""Bad input ends every rank quickly, non-zero, with one clear message (under real torchrun)."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import torchrun
from tiny_models import write_tiny_model

LIMIT_S = 30


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("bad")
    no_weights = root / "no-weights"
    no_weights.mkdir()
    shutil.copy(tiny_models["llama"] / "config.json", no_weights / "config.json")
    bad_json = root / "bad-json"
    shutil.copytree(tiny_models["llama"], bad_json)
    (bad_json / "config.json").write_text('{"model_type": "llama", num_hidden_layers: 4}')
    gpt2 = root / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    return {
        "llama": tiny_models["llama"],
        "no-weights": no_weights,
        "gpt2": gpt2,
        "two-layers": write_tiny_model("llama", root / "two-layers", layers=2),
        "six-layers": write_tiny_model("llama", root / "six-layers", layers=6),
        "bad-json": bad_json,
        "missing": root / "does-not-exist",
    }


CASES = [
    ("missing", 2, [], "does-not-exist does not exist"),
    ("no-weights", 2, [], "has no weights"),
    ("gpt2", 2, [], "model_type 'gpt2'"),
    ("llama", 2, ["--layers", "0:1,2:4"], "layers 1:2 belong to no stage"),
    ("llama", 2, ["--layers", "0:3,2:4"], "layers 2:3 are given twice"),
    ("llama", 2, ["--layers", "0:0,0:4"], "stage 0 (0:0) is empty"),
    ("llama", 2, ["--layers", "0:4"], "the plan has 1 stages (0:4) but 2 ranks were started"),
    ("two-layers", 3, [], "3 stages for a model with 2 layers"),
    ("six-layers", 7, [], "7 stages for a model with 6 layers"),
    ("bad-json", 2, [], "bad-json/config.json (in model folder"),
    ("llama", 2, ["--do-sample", "--top-p", "1.5"], "top_p=1.5 is out of range: it must be a number in (0, 1]"),
    ("llama", 2, ["--do-sample", "--temperature", "-1"], "temperature=-1.0 is out of range: it must be a number > 0"),
    ("llama", 2, ["--do-sample", "--top-k", "-1"], "top_k=-1 is out of range"),
    ("llama", 2, ["--repetition-penalty", "0"], "repetition_penalty=0.0 is out of range"),
    ("llama", 2, ["--max-new-tokens", "-3"], "max_new_tokens=-3 is out of range"),
]


@pytest.mark.parametrize("model, nproc, extra, message", CASES, ids=[f"{c[0]}-{c[1]}{''.join(c[2])}" for c in CASES])
def test_bad_input_fails_every_rank_with_one_message(bad_models, model, nproc, extra, message):
    run = torchrun(
        nproc,
        ["torch_pp", "generate", "--model", str(bad_models[model]), "--prompt", "hi", "--no-progress", *extra],
        module=True,
        timeout=90,
    )
    assert run.returncode != 0
    assert run.seconds < LIMIT_S, f"took {run.seconds:.1f}s"
    assert run.stdout == "", "nothing may reach stdout on failure"
    # Every rank hit the error; rank 0 alone reports it, once, without a Python traceback of ours.
    assert run.stderr.count(message) == 1, run.stderr[-3000:]
    assert run.stderr.count("torch_pp: error:") == 1
    ours = [line for line in run.stderr.splitlines() if "torch_pp/" in line and line.strip().startswith("File")]
    assert ours == [], ours
