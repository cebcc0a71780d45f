#!/usr/bin/env python3
"""Write the README's paper-cpu result tables from the report stages' cache entries.

The tables are never typed by hand: this script reads `table.md` of each report stage of
pipelines/paper-cpu.yaml from the cache (after `relora-pipe run pipelines/paper-cpu.yaml`),
and replaces the block between the README's paper-cpu markers with them, naming the commit
each report was made at (from its manifest) and the command that produced it.

    python3 scripts/readme_tables.py [--bin target/release/relora-pipe] [--check]

--check exits 1 when the README's block differs from what the cache holds. Uses the cache
that relora-pipe uses ($RELORA_CACHE, else ./cache).
"""
import argparse
import json
import os
import subprocess
import sys

PIPELINE = "pipelines/paper-cpu.yaml"
TABLES = [
    ("table2", "Table 2: each method's learning rate chosen on the validation split, seeds 0, 1, 2 on the test split"),
    ("table3", "Table 3, seed 0, test split"),
    ("table-frozen", "ReLoRA with its frozen W in fewer bits, seed 0, test split"),
]
BEGIN = "<!-- paper-cpu tables: begin (written by scripts/readme_tables.py; do not edit) -->"
END = "<!-- paper-cpu tables: end -->"


def show(binary, stage):
    out = subprocess.run([binary, "show", PIPELINE, stage, "--json"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"relora-pipe show {stage} failed:\n{out.stderr}")
    return json.loads(out.stdout)


def head_commit():
    out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def all_cached(binary):
    """(cached, total) stages of the pipeline under the keys of the code checked out now."""
    out = subprocess.run([binary, "plan", PIPELINE, "--json"], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"relora-pipe plan failed:\n{out.stderr}")
    plan = json.loads(out.stdout)
    return sum(s["state"] == "cached" for s in plan), len(plan)


def block(binary):
    cached, total = all_cached(binary)
    if cached != total:
        sys.exit(f"only {cached} of {total} stages are cached under this code's keys; run "
                 f"`relora-pipe run {PIPELINE}` first")
    parts, commits = [], set()
    for stage, what in TABLES:
        entry = show(binary, stage)
        if entry["state"] != "cached" or not entry["manifest"]:
            sys.exit(f"`{stage}` is not in the cache ({entry['state']}); run "
                     f"`relora-pipe run {PIPELINE} --jobs 2` first")
        manifest = entry["manifest"]
        commits.add(manifest.get("environment", {}).get("commit", "unknown"))
        with open(os.path.join(entry["path"], "outputs", "table.md")) as f:
            table = f.read().strip()
        # Our heading levels sit one below the README's section.
        table = "\n".join("#" + l if l.startswith("## ") else l for l in table.splitlines())
        parts.append(f"{table}\n\n<sub>{what}: report entry `{manifest['key'][:16]}`.</sub>")
    made = ", ".join(sorted(commits))
    head = (f"Produced by `relora-pipe run {PIPELINE}`, then `python3 scripts/readme_tables.py`. "
            f"All {total} stages are cached under the keys of the code at commit {head_commit()} "
            f"(keys cover the code, so these are the numbers this code computes); the report "
            f"stages' manifests record commit {made}"
            + (" (`-dirty`: with uncommitted edits)." if "dirty" in made else "."))
    return "\n".join([BEGIN, "", head, "", "\n\n".join(parts), "", END])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/relora-pipe")
    ap.add_argument("--readme", default="README.md")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    with open(args.readme) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        sys.exit(f"{args.readme} has no paper-cpu markers ({BEGIN} ... {END})")
    start, end = text.index(BEGIN), text.index(END) + len(END)
    new = text[:start] + block(args.bin) + text[end:]
    if args.check:
        sys.exit(0 if new == text else 1)
    with open(args.readme, "w") as f:
        f.write(new)
    print(f"{args.readme}: paper-cpu tables written")


if __name__ == "__main__":
    main()
