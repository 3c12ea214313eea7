"""Join train_gpt2.py result folders made with the same run settings (model, layer, tokens, batch,
activation cache, absorption data) into one results.json, table and figure: the SAEs of the later
folders win where a name repeats, the seed groups (mean ± std) are formed over all of them, and
every SAE's absorption gap is taken anew against one baseline: the first folder's. The evaluation
and whole-run seconds are summed over the folders (which may have run side by side).

    python results/merge_results.py OUT IN1 IN2 ...
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import absorption  # noqa: E402
import c2r  # noqa: E402
import lm  # noqa: E402
import train_gpt2 as tg  # noqa: E402

out, ins = sys.argv[1], sys.argv[2:]
res = None
for folder in ins:
    r = json.load(open(os.path.join(folder, "results.json")))
    if res is None:
        res = r
        continue
    keys = {n: a["absorption"]["data_key"] for n, a in (res["saes"] | r["saes"]).items() if "absorption" in a}
    if r["run"] != res["run"] or r["scale"] != res["scale"] or len(set(keys.values())) > 1:
        raise SystemExit(f"{folder}: made with other settings or other absorption data than {ins[0]}")
    for k in ("saes", "configs"):
        res[k].update(r[k])
    res["timing"].update({n: t for n, t in r["timing"].items() if n in r["saes"]})
    for k in ("eval_s", "total_s"):
        res["timing"][k] += r["timing"][k]
cfgs = {n: c2r.Config(**c | dict(prefixes=tuple(c["prefixes"]))) for n, c in res["configs"].items()}
res["groups"] = tg.seed_groups(cfgs, res["saes"])
base = res["saes"][res["baseline"]]
for name, r in res["saes"].items():
    r.pop("vs_baseline", None)
    if name != res["baseline"] and "absorption" in r:
        r["vs_baseline"] = absorption.bootstrap_diff(r["absorption"], base["absorption"])
res["merged_from"] = ins
os.makedirs(out, exist_ok=True)
c2r.atomic_write(os.path.join(out, "results.json"), lambda p: Path(p).write_text(json.dumps(res, indent=2)))
print(tg.table(res))
lm.plot(res, os.path.join(out, "results.png"))
