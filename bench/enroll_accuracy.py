"""Enrolment from a few samples: accuracy on the new source and the change on the old ones.

For each chosen generator of an artifacts file (from bench/verdict_quality.py): train the default
attributor without it (its test split of the other classes held out), enrol it from its first N
samples (N = 10, 50), then measure on data neither step saw: the generator's other samples (how
many are named as it, and how many get it as verdict) and the old classes' test split (accuracy
before and after). Figures, not pass/fail.

    python bench/enroll_accuracy.py --artifacts /tmp/quality/artifacts.h5 --space freq \\
        --generators gan-tconv-ns,flow-realnvp [--epochs 15]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", required=True)
    parser.add_argument("--space", default="freq")
    parser.add_argument("--generators", required=True)
    parser.add_argument("--shots", default="10,50")
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()

    from manifpt_cli.artifacts import load_artifacts
    from manifpt_cli.enroll import NewSource, enroll_sources
    from manifpt_cli.inputs import artifact_training_set
    from manifpt_cli.openset import batched_outputs
    from manifpt_cli.research.evaluate import predict
    from manifpt_cli.spaces import Space
    from manifpt_cli.train import TrainConfig, fit, stratified_split
    from manifpt_cli.verdicts import VerdictRule

    started = time.perf_counter()
    data = artifact_training_set(load_artifacts(args.artifacts, Space(args.space)))
    names = data.samples.label_names
    results = {}
    for generator in args.generators.split(","):
        known = data.without_class(generator)
        rest, test = stratified_split(known.samples.labels, 0.2, 0)
        model, metadata, _ = fit(known.subset(rest), TrainConfig(epochs=args.epochs))
        old_test = known.subset(test)
        before = float((batched_outputs(model, old_test.inputs)[0].argmax(1) == old_test.samples.labels).mean())
        new_rows = np.flatnonzero(data.samples.labels == names.index(generator))
        for shots in (int(n) for n in args.shots.split(",")):
            used, unseen = new_rows[:shots], new_rows[shots:]
            source = NewSource(generator, data.inputs[used], data.distances[used])
            scored, enrolled = enroll_sources(copy.deepcopy(model), metadata, [source])
            rule = VerdictRule(enrolled)
            label = enrolled["classes"].index(generator)
            found = predict(scored, data.subset(unseen))
            score = found.scores[rule.score]
            verdicts = [rule.decide(enrolled["classes"][p], s, []) for p, s in zip(found.predicted, score)]
            after = float((batched_outputs(scored, old_test.inputs)[0].argmax(1) == old_test.samples.labels).mean())
            results[f"{generator} @ {shots}"] = {
                "new_source_accuracy": float((found.predicted == label).mean()),
                "new_source_verdict": sum(v == generator for v in verdicts) / len(verdicts),
                "new_source_unknown": sum(v == "unknown" for v in verdicts) / len(verdicts),
                "old_accuracy_before": before,
                "old_accuracy_after": after,
                "new_test_images": int(len(unseen)),
                "old_test_images": int(len(test)),
            }
            print(generator, shots, json.dumps(results[f"{generator} @ {shots}"]), flush=True)
    print(
        json.dumps({"results": results, "machine": platform.machine(), "seconds": round(time.perf_counter() - started)})
    )


if __name__ == "__main__":
    main()
