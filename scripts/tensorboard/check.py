#!/usr/bin/env python3
"""Read relora-pipe's TensorBoard event files with TensorBoard's own reader and compare every
scalar with the stage's metrics.jsonl.

    python3 scripts/tensorboard/check.py "$(relora-pipe tensorboard pipelines/quickstart.yaml)"

The folder holds one link per stage (what `relora-pipe tensorboard` makes); each points to
the events folder beside the stage's outputs. Needs `pip install tensorboard`. For stages
that ran in one attempt (a resumed stage's events start at its resume step); a stage that
continues its init's run is compared from its own first step on.
"""
import json
import os
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

FIELDS = [
    ("train/loss", "loss"),
    ("train/learning_rate", "lr"),
    ("train/grad_norm", "grad_norm"),
    ("train/tokens", "tokens"),
    ("eval/loss", "eval_loss"),
    ("eval/perplexity", "perplexity"),
]


def main():
    root = sys.argv[1]
    runs = sorted(os.listdir(root))
    assert runs, f"no runs in {root}"
    for run in runs:
        events = os.path.realpath(os.path.join(root, run))
        with open(os.path.join(events, "..", "outputs", "metrics.jsonl")) as f:
            metrics = [json.loads(line) for line in f]
        acc = EventAccumulator(events, size_guidance={"scalars": 0})
        acc.Reload()
        tags = acc.Tags()["scalars"]
        # A stage that continues its init's run (init_mode: continue) carries the init's
        # history at the top of its metrics.jsonl; its events start at its own first step.
        first = acc.Scalars("train/loss")[0].step
        assert any(m["step"] == first for m in metrics), f"{run}: step {first} not in metrics"
        for tag, field in FIELDS:
            want = [(m["step"], m[field]) for m in metrics if field in m and m["step"] >= first]
            got = [(e.step, e.value) for e in acc.Scalars(tag)] if tag in tags else []
            assert [s for s, _ in got] == [s for s, _ in want], \
                f"{run} {tag}: steps {[s for s, _ in got][:5]}… against {[s for s, _ in want][:5]}…"
            # The events hold f32 values (TensorBoard's simple_value), metrics.jsonl f64.
            worst = max((abs(g - w) / max(abs(w), 1e-30) for (_, g), (_, w) in zip(got, want)),
                        default=0.0)
            assert worst < 1e-6, f"{run} {tag}: off by {worst:.2e} relative"
        print(f"{run}: {len(acc.Scalars('train/loss'))} steps; loss, learning rate, gradient "
              f"norm, tokens and {len(acc.Scalars('eval/loss')) if 'eval/loss' in tags else 0} "
              f"evaluations match metrics.jsonl")
    print(f"TensorBoard read {len(runs)} runs")


if __name__ == "__main__":
    main()
