"""Run under torchrun (2 ranks) by test_arch_sweep: every causal-LM model_type of the installed
transformers, as a tiny random model, through 2 stages against single-process transformers.

Rank 0 builds each tiny model (skipping, with transformers' own error, any that transformers
cannot build or run itself), saves it with ``save_pretrained`` (checkpoint conversions are
exercised) and publishes the list; then every rank starts a pipeline on each folder in turn.
Rank 0 writes ``$OUT/sweep.json``: model_type -> {"status": "same"|"different"|"refused"|"failed"|"skipped", "detail"}.
"""

import json
import os
import sys
import warnings

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import torch_pp  # noqa: E402
from tiny_models import sweep_config  # noqa: E402
from torch_pp.errors import TorchPPError  # noqa: E402
from torch_pp.net.transport import Transport  # noqa: E402

warnings.filterwarnings("ignore")
OUT = os.environ["OUT"]
NEW = 6
LIMIT = 5_000_000  # a tiny model has well under a million parameters
transport = Transport.from_env()
rank = transport.rank
report, wanted = {}, {}
ids = torch.tensor([[5, 17, 42, 99, 7, 3, 64, 21]])

if rank == 0:
    folders, refusal_only = [], []
    for mt in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        try:
            config = sweep_config(mt)
            with torch.device("meta"):
                params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
            if params > LIMIT:  # fields this sweep does not know how to shrink: check the refusal on the config alone
                path = os.path.join(OUT, "models", mt)
                config.save_pretrained(path)
                save_file({"unused": torch.zeros(1)}, os.path.join(path, "model.safetensors"))  # a folder start() accepts
                refusal_only.append(mt)
                folders.append(mt)
                continue
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() >= 2:
                        p.normal_(0.0, 0.2)
            model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
            want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
            path = os.path.join(OUT, "models", mt)
            model.save_pretrained(path)
        except Exception as exc:  # noqa: BLE001 - transformers itself cannot build or run this tiny config
            report[mt] = {"status": "skipped", "detail": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
            continue
        wanted[mt] = want[0, ids.shape[1]:].tolist()
        folders.append(mt)
    transport.publish("sweep", json.dumps(folders))
    for mt in refusal_only:  # no weights: start() must refuse it before reading any
        wanted[mt] = None
else:
    folders = json.loads(transport.fetch("sweep", timeout_s=1800))

for mt in folders:
    path = os.path.join(OUT, "models", mt)
    try:
        pipe = torch_pp.start(path, transport=transport, progress=False, device="cpu", dtype="float32")
    except TorchPPError as exc:
        if rank == 0:
            named = f"model_type {json.load(open(os.path.join(path, 'config.json')))['model_type']!r}" in str(exc)
            # a model written without weights that got as far as loading was accepted, not refused
            report[mt] = {"status": "refused" if named or wanted[mt] is not None else "too big", "detail": str(exc)}
        continue
    if pipe.is_driver and wanted[mt] is None:
        report[mt] = {"status": "too big", "detail": "accepted a model the sweep could not shrink (no weights written)"}
        pipe.close()
    elif pipe.is_driver:
        try:
            got = pipe.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
            same = got[0, ids.shape[1]:].tolist() == wanted[mt]
            report[mt] = {"status": "same" if same else "different", "detail": "" if same else f"{got[0].tolist()} vs {wanted[mt]}"}
        except Exception as exc:  # noqa: BLE001 - recorded: the test says which type failed how
            report[mt] = {"status": "failed", "detail": f"{type(exc).__name__}: {str(exc)[:300]}"}
        pipe.close()

if rank == 0:
    with open(os.path.join(OUT, "sweep.json"), "w") as f:
        json.dump(report, f, indent=1)
transport.close()
