"""Memory of the two references on the embedded model: a frozen deep copy against LoRA-off.

    python benchmarks/reference_memory.py

Reports the bytes of parameters each reference adds and the process's resident
memory (RSS) after building each, in separate processes so they do not share memory.
"""

import json
import subprocess
import sys

CHILD = """
import json, resource, sys, torch
import kltune
from peft import LoraConfig, get_peft_model
torch.set_num_threads(1)
kind = sys.argv[1]
model, tokenizer = kltune.load_model("embedded")
if kind == "lora":
    model = get_peft_model(model, LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
policy = kltune.Policy(model, tokenizer)
before = sum(p.numel() * p.element_size() for p in policy.parameters())
reference = kltune.FrozenReference(policy) if kind == "copy" else kltune.AdapterOffReference(policy)
ref_model = getattr(reference, "model", None)
extra = 0 if ref_model is None else sum(p.numel() * p.element_size() for p in ref_model.parameters())
rollout = policy.rollout(["The movie was"] * 4, max_new_tokens=8, generator=torch.Generator().manual_seed(0))
reference.logprobs(rollout)
rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"reference": kind, "policy_param_MB": before / 2**20, "reference_extra_param_MB": extra / 2**20, "peak_rss_MB": rss_mb}))
"""

rows = []
for kind in ("copy", "lora"):
    out = subprocess.run(
        [sys.executable, "-c", CHILD, kind], capture_output=True, text=True, check=True
    )
    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
print("| reference | policy params (MB) | extra params for π_ref (MB) | peak RSS (MB) |")
print("| --- | ---: | ---: | ---: |")
for r in rows:
    name = (
        "FrozenReference (deep copy)"
        if r["reference"] == "copy"
        else "AdapterOffReference (LoRA r=16 off)"
    )
    print(
        f"| {name} | {r['policy_param_MB']:.0f} | {r['reference_extra_param_MB']:.0f} | {r['peak_rss_MB']:.0f} |"
    )
