"""Load a relora-pipe export with transformers alone, and record or check its logits.

Run through scripts/hf/check_transformers.sh, which first exports the fixture model (a
random LLaMA on the T5 vocabulary) with relora-pipe's own code:

    python3 -m venv .venv-hf && .venv-hf/bin/pip install torch transformers
    PYTHON=.venv-hf/bin/python bash scripts/hf/check_transformers.sh          # check
    PYTHON=.venv-hf/bin/python bash scripts/hf/check_transformers.sh --write  # new fixture

Nothing of relora-pipe is imported here: `LlamaForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` read the directory as they would any checkpoint.
"""
import json
import sys

import torch
import transformers
from transformers import AutoTokenizer, LlamaForCausalLM

model_dir, fixture_path = sys.argv[1], sys.argv[2]
write = "--write" in sys.argv[3:]
inputs = json.load(open(f"{model_dir}/fixture_inputs.json"))

tok = AutoTokenizer.from_pretrained(model_dir)
text_ids = tok(inputs["text"])["input_ids"]
if text_ids != inputs["text_ids"]:
    sys.exit(f"AutoTokenizer gives {text_ids}\nrelora-pipe gave {inputs['text_ids']}")

model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
with torch.no_grad():
    logits = model(torch.tensor(inputs["sequences"])).logits.double()
out = {
    "transformers": transformers.__version__,
    "torch": torch.__version__,
    "sequences": inputs["sequences"],
    "probe_ids": inputs["probe_ids"],
    "probe_logits": logits[..., inputs["probe_ids"]].tolist(),
    "logsumexp": torch.logsumexp(logits, -1).tolist(),
    "argmax": logits.argmax(-1).tolist(),
    "text": inputs["text"],
    "text_ids": text_ids,
}
if write:
    with open(fixture_path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {fixture_path} (transformers {transformers.__version__}, torch {torch.__version__})")
    sys.exit(0)

old = json.load(open(fixture_path))
worst = 0.0
for key in ("probe_logits", "logsumexp"):
    a = torch.tensor(old[key], dtype=torch.float64)
    b = torch.tensor(out[key], dtype=torch.float64)
    worst = max(worst, ((a - b).abs() / b.abs().clamp(min=1.0)).max().item())
same_argmax = old["argmax"] == out["argmax"]
print(f"transformers {transformers.__version__} (fixture: {old['transformers']}): "
      f"largest difference {worst:.2e}, argmax {'equal' if same_argmax else 'DIFFERS'}, "
      f"tokenizer ids equal")
sys.exit(0 if worst <= 1e-5 and same_argmax else 1)
