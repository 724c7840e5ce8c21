"""The embedded SmolLM2-135M-Instruct under real torchrun: 2 stages equal single-process transformers."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import TEST_DEVICE, WORKERS, torchrun
from torch_pp.default_model import FOLDER_NAME

PROMPT = "What is the capital of France? Answer in one sentence."


@pytest.fixture(scope="module")
def smol_run(torch_pp_cache):
    """Two ranks start at once on a cold cache: both want the conversion, one does it."""
    env = {"TORCH_PP_CACHE": str(torch_pp_cache)}
    run = torchrun(
        2,
        ["torch_pp", "generate", "--prompt", PROMPT, "--chat", "--max-new-tokens", "24", "--output", "json", "--no-progress",
         "--dtype", "float32"],
        module=True, env=env, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-5000:]
    return run, torch_pp_cache / FOLDER_NAME


def test_conversion_happened_once_into_one_folder(smol_run):
    _, folder = smol_run
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file() and (folder / "chat_template.jinja").is_file()
    leftovers = [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{FOLDER_NAME}-")]
    assert leftovers == [], f"temporary conversion folders left behind: {leftovers}"


def test_two_stages_equal_single_process_transformers(smol_run):
    run, folder = smol_run
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, "--output json prints exactly one line on rank 0's stdout"
    result = json.loads(lines[0])
    assert set(result) == {"text", "token_ids", "prompt_tokens", "ttft_s", "decode_tokens_per_s", "placement", "stages",
                           "speculation"}
    assert result["speculation"]["calls"] == 0
    assert result["placement"] == {"layers": "0:15,15:30", "by": "memory"}  # (kept placements are off in the tests)

    tok = AutoTokenizer.from_pretrained(folder)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(TEST_DEVICE).eval()
    inputs = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    inputs = {k: v.to(TEST_DEVICE) for k, v in inputs.items()}
    want = ref.generate(**inputs, max_new_tokens=24, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    assert result["prompt_tokens"] == inputs["input_ids"].shape[1]
    assert result["token_ids"] == want
    assert result["text"] == tok.decode(want, skip_special_tokens=True)

    # Readable English, and the right answer.
    text = result["text"]
    assert "Paris" in text, text
    words = re.findall(r"[A-Za-z]+", text)
    assert len(words) >= 4 and sum(w.lower() in {"the", "of", "is", "france", "capital", "paris"} for w in words) >= 3, text

    stages = result["stages"]
    assert [s["rank"] for s in stages] == [0, 1]
    assert [s["layers"] for s in stages] == [[0, 15], [15, 30]]
    # On CPUs the LM head (49,152 rows, a fifth of the weights) is split by default: half on each stage.
    assert [s.get("head_rows") for s in stages] == [24576, 24576]
    assert all(s["device"].split(":")[0] == TEST_DEVICE and s["dtype"] == "float32" and s["peak_memory_bytes"] > 0 for s in stages)
    assert result["ttft_s"] > 0 and result["decode_tokens_per_s"] > 0


def test_compute_balance_moves_layers_off_rank0_with_the_same_tokens(smol_run, torch_pp_cache):
    """With the whole LM head on rank 0 (not split), compute balance gives rank 0 fewer layers; the
    tokens are those of the default run, whose head is split."""
    run, _ = smol_run
    balanced = torchrun(
        2,
        ["torch_pp", "generate", "--prompt", PROMPT, "--chat", "--max-new-tokens", "24", "--output", "json",
         "--balance", "compute", "--no-split-head", "--no-progress", "--dtype", "float32"],
        module=True, env={"TORCH_PP_CACHE": str(torch_pp_cache)}, timeout=300,
    )
    assert balanced.returncode == 0, balanced.stderr[-3000:]
    result = json.loads(balanced.stdout.strip().splitlines()[-1])
    assert [s["layers"] for s in result["stages"]] == [[0, 11], [11, 30]]  # rank 0 also multiplies the LM head
    assert result["placement"] == {"layers": "0:11,11:30", "by": "compute"}
    assert all("head_rows" not in s for s in result["stages"])
    assert result["token_ids"] == json.loads(run.stdout.strip().splitlines()[-1])["token_ids"]


def test_the_next_run_starts_from_the_placement_this_run_measured(smol_run, torch_pp_cache, tmp_path):
    """The quick start's job twice with one placements folder: the first keeps what its decode steps
    measured, the second is placed by it, with the same tokens."""
    run, _ = smol_run
    env = {"TORCH_PP_CACHE": str(torch_pp_cache), "TORCH_PP_PLACEMENTS": str(tmp_path)}
    cmd = ["torch_pp", "generate", "--prompt", PROMPT, "--chat", "--max-new-tokens", "24", "--min-new-tokens", "24",
           "--output", "json", "--no-progress", "--dtype", "float32"]  # (the answer alone is 7 steps: under the 16 a run needs)
    results, kept = [], []
    for _ in range(2):
        again = torchrun(2, cmd, module=True, env=env, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        results.append(json.loads(again.stdout.strip().splitlines()[-1]))
        kept.append([json.loads(p.read_text()) for p in tmp_path.glob("*.json")])
    assert len(kept[0]) == 1 and kept[0][0]["measured_under"] == "0:15,15:30", kept
    assert kept[0][0]["steps"] == 23  # 24 tokens: 23 decode steps
    assert [r["placement"] for r in results] == [{"layers": "0:15,15:30", "by": "memory"},
                                                 {"layers": kept[0][0]["plan"], "by": "measured"}]
    assert set(kept[1][0]["tried_ms_per_step"]) >= {"0:15,15:30", kept[0][0]["plan"]}  # one file, both runs' paces
    assert len(results[0]["token_ids"]) == 24 and results[0]["token_ids"] == results[1]["token_ids"]
    first = json.loads(run.stdout.strip().splitlines()[-1])["token_ids"]
    assert results[0]["token_ids"][:len(first) - 1] == first[:-1]  # up to the end-of-sequence it may not take yet


def test_text_output_streams_on_rank0_only(smol_run, torch_pp_cache):
    run = torchrun(
        2,
        ["torch_pp", "generate", "--prompt", PROMPT, "--chat", "--max-new-tokens", "12", "--no-progress"],
        module=True, env={"TORCH_PP_CACHE": str(torch_pp_cache)}, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Paris" in run.stdout
    assert run.stdout.count("Paris") == 1, "only rank 0 writes to stdout"
    assert "tokens/s" in run.stderr


def test_a_non_zero_rank_can_convert(tmp_path):
    """transformers' save_pretrained skips writing on ranks != 0; the conversion must not depend on it."""
    run = torchrun(2, [str(WORKERS / "convert_worker.py")], env={"TORCH_PP_CACHE": str(tmp_path / "c"), "OUT": str(tmp_path)}, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads((tmp_path / "convert.json").read_text())
    assert rows[0] == rows[1]
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(rows[0])


def test_first_screen_reads_cleanly(tmp_path):
    """The README's main command on a cold cache: one bar per step, no warnings a user cannot act on."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "TORCH_PP_CACHE": str(tmp_path / "cache"), "TORCH_PP_VENV": sys.prefix,
           "MASTER_PORT": str(__import__("conftest").free_port())}
    env.pop("OMP_NUM_THREADS", None)
    run = subprocess.run(["bash", str(ROOT / "launch" / "demo.sh"), "--chat", "--prompt", PROMPT, "--max-new-tokens", "8"],
                         capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Paris" in run.stdout
    screen = run.stderr.replace("\r", "\n")
    assert "warning" not in screen.lower(), screen[-3000:]
    assert "OMP_NUM_THREADS" not in screen
    bars = {line.split(":")[0] for line in screen.splitlines() if "%|" in line}
    assert bars == {"converting SmolLM2-135M-Instruct.Q4_1.gguf to safetensors (once)", "rank 0"}, bars


GROUNDED = ("Repeat this sentence exactly, word for word: The quick brown fox jumps over the lazy dog "
            "while the farmer watches from the old wooden gate.")


@pytest.mark.parametrize("how", ["--prompt-lookup", "--draft-model"])
def test_generate_speculates_with_the_tokens_of_plain_decoding(smol_run, torch_pp_cache, smol_reference, how):
    """``--prompt-lookup K`` and ``--draft-model DIR`` (here the model itself: every proposal of
    its own accepted) on 2 stages: the tokens of plain transformers, and the counts in the JSON."""
    _, folder = smol_run
    _, tok, ref = smol_reference
    arg = "6" if how == "--prompt-lookup" else str(folder)
    run = torchrun(2, ["torch_pp", "generate", "--prompt", GROUNDED, "--chat", "--max-new-tokens", "32", "--output", "json",
                       "--no-progress", "--dtype", "float32", how, arg],
                   module=True, env={"TORCH_PP_CACHE": str(torch_pp_cache)}, timeout=300)
    assert run.returncode == 0, run.stderr[-5000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    inputs = tok.apply_chat_template([{"role": "user", "content": GROUNDED}], add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)
    want = ref.generate(**inputs, max_new_tokens=32, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    assert result["token_ids"] == want
    spec = result["speculation"]
    assert spec["calls"] == 1 and spec["accepted"] > 0 and spec["acceptance"] == spec["accepted"] / spec["proposed"], spec
    if how == "--draft-model":
        assert spec["acceptance"] > 0.9, spec  # the model drafting for itself


def test_bad_speculation_flags_are_refused_before_anything_starts():
    run = torchrun(2, ["torch_pp", "generate", "--prompt", "x", "--prompt-lookup", "0"], module=True, timeout=60)
    assert run.returncode == 1 and "--prompt-lookup 0 is out of range" in run.stderr
    run = torchrun(2, ["torch_pp", "generate", "--prompt", "x", "--prompt-lookup", "3", "--draft-model", "d"], module=True,
                   timeout=60)
    assert run.returncode == 1 and "give one of them" in run.stderr
