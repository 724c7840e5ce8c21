"""Loading benchmark: a ~3 GB random-weight Llama-shaped model (sharded safetensors) in 2 stages.

Per rank: weight share, peak RSS, load time (reading this rank's weights into place; the whole
start-up, agreements included, is reported too), and the time to simply read that rank's bytes
(both ranks read at once, as they load at once; the page cache is warm for both);
for comparison the peak RSS of single-process ``AutoModelForCausalLM.from_pretrained``.
Goals: peak RSS <= 1.15 x share + 0.6 GB; load time <= 1.3 x plain read time.

    python bench/bench_loading.py [--dir /tmp/tpp-3gb] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import dump, print_table, torchrun_cmd  # noqa: E402


def write_model(path: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (path / "config.json").is_file():
        return
    # ~0.75 B parameters, fp32: about 3 GB on disk.
    config = AutoConfig.for_model("llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                  num_hidden_layers=14, num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(path, max_shard_size="500MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "torch_pp_bench_3gb"))
    ap.add_argument("--json")
    args = ap.parse_args()
    folder = Path(args.dir)
    write_model(folder)
    total = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(torchrun_cmd(2, HERE / "_load_worker.py", folder, tmp), env=env, check=True)
        ranks = [json.loads((Path(tmp) / f"load{r}.json").read_text()) for r in (0, 1)]
        subprocess.run([sys.executable, str(HERE / "_load_worker.py"), str(folder), tmp, "--hf"], env=env, check=True)
        hf = json.loads((Path(tmp) / "hf.json").read_text())
    for r in ranks:
        r["rss_goal_bytes"] = 1.15 * r["share_bytes"] + 0.6e9
        r["rss_ok"] = r["peak_rss_bytes"] <= r["rss_goal_bytes"]
        r["load_over_read"] = r["load_s"] / r["read_s"]
    result = {"model_bytes": total, "stages": ranks, "hf_from_pretrained": hf}
    dump(result, args.json)
    print()
    rows = [[str(r["rank"]), f"{r['share_bytes'] / 1e9:.2f}", f"{r['peak_rss_bytes'] / 1e9:.2f}", f"{r['rss_goal_bytes'] / 1e9:.2f}",
             f"{r['load_s']:.2f}", f"{r['start_s']:.2f}", f"{r['read_s']:.2f}", f"{r['load_over_read']:.2f}"] for r in ranks]
    rows.append(["HF 1 proc", f"{total / 1e9:.2f}", f"{hf['peak_rss_bytes'] / 1e9:.2f}", "-", f"{hf['load_s']:.2f}", "-", "-", "-"])
    print_table(rows, ["rank", "share GB", "peak RSS GB", "RSS goal GB", "load s", "whole start s", "plain read s", "load/read (goal <= 1.3)"])


if __name__ == "__main__":
    main()
