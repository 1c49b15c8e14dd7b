"""Reliability: random SIGKILLs during collection and meta-init saves, random corruptions of every artifact, fuzzed
manifests.

* kills: a forked child arms a random labelled kill point (hf_subset_select.faults: random among the labels, with a
  random shard index) and collects (or saves θ*); after the SIGKILL the directory must not load as anything but the
  uninterrupted result, and the rerun must end with tensors bit for bit the uninterrupted run's. Some trials kill
  twice in a row (a kill during the resumed run) before the rerun.
* corruptions: one file of a cache (manifest.json, cache.safetensors), a selection JSON, or a meta-init
  (meta_init.json, adapter_model.safetensors, adapter_config.json) gets a bit flip, a truncation, a run of replaced
  bytes, a deletion, or (JSON files) one value changed to another value that still parses; loading must raise the
  library's error. A load that succeeds with content different from the original is a silent load.
* fuzz: the cache manifest, the selection JSON, the meta-init manifest and a CollectConfig dict, each mutated 1-3
  times by a seeded generator (keys dropped, values replaced by null / "x" / -1 / 2**70 / NaN / nested junk / another
  type), must load or raise the documented error, never another exception, never a hang (each case is timed).

Usage: python recipes/benchmarks/reliability.py --output docs/results/reliability.json [--quick]
"""

from __future__ import annotations

import copy
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import warnings
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness.cli import benchmark_parser, limit_threads  # noqa: E402
from harness.results import write_results  # noqa: E402

NUM_SHARDS = 5  # 36 rows, 8 per shard
SHARD_LABELS = ["shard_computed", "shard_data_written", "shard_written", "merge_loaded"]
FILE_LABELS = ["replace:cache.safetensors", "cache_data_written", "replace:manifest.json", "manifest_written"]
META_LABELS = [
    "meta_init_saved",
    "meta_init_moved:1",
    "meta_init_moved:2",
    "meta_init_moved:3",
    "replace:meta_init.json",
]


# --------------------------------------------------------------------------- the workload
def _data():
    from hf_subset_select import tag_sources, tag_target_eval
    from hf_subset_select.demo.toy import toy_text_dataset

    train = tag_sources(
        {
            "add": toy_text_dataset("add", 12, seed=1),
            "sub": toy_text_dataset("sub", 10, seed=2),
            "rev": toy_text_dataset("rev", 8, seed=3),
        },
        target="add",
    )
    return train, tag_target_eval(toy_text_dataset("add", 6, seed=99), name="add_eval")


def _theta(seed: int = 0):
    from hf_subset_select.demo.toy import add_lora, make_tiny_causal_lm, perturb_lora

    return perturb_lora(add_lora(make_tiny_causal_lm("gpt2", seed=0)), seed=seed + 1)


def _collect(out: str):
    from hf_subset_select import CollectConfig, GradientCollector
    from hf_subset_select.demo.toy import make_tokenizer

    train, target = _data()
    config = CollectConfig(proj_dim=64, proj_type="rademacher", batch_size=4, shard_size=8)
    return GradientCollector(config, train, target, make_tokenizer()).collect(
        _theta(), output_dir=out, disable_tqdm=True
    )


def _save_meta(out: str, seed: int) -> None:
    from hf_subset_select.collect.meta_init import save_meta_init

    save_meta_init(_theta(seed), out, sources={"add": 12}, target_source="add", global_step=3)


def _digest(cache) -> str:
    from hf_subset_select.io_utils import fingerprint_tensors

    named = [("features", cache.features), ("outputs", cache.outputs), ("ids", cache.example_ids)]
    named += [("split", cache.split), ("source", cache.source_index)]
    return fingerprint_tensors(named)


def _armed(label: str, target, *args) -> None:
    from hf_subset_select import faults

    faults.arm(label)
    target(*args)


def _run_killed(label: str, target, *args) -> int:
    child = multiprocessing.get_context("fork").Process(target=_armed, args=(label, target, *args))
    child.start()
    child.join(timeout=300)
    return child.exitcode


# --------------------------------------------------------------------------- kills
def _random_label(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.5:
        return f"{rng.choice(SHARD_LABELS)}:{rng.randrange(NUM_SHARDS)}"
    if kind < 0.6:
        name = rng.choice(["json", "safetensors"])
        return f"replace:shard-{rng.randrange(NUM_SHARDS):06d}.{name}"
    if kind < 0.8:
        return rng.choice(FILE_LABELS)
    return rng.choice(META_LABELS)


def kill_trials(n: int, rng: random.Random, root: str) -> dict[str, Any]:
    from hf_subset_select.collect.cache import GradientCache, GradientCacheError
    from hf_subset_select.collect.meta_init import (
        MetaInitManifestError,
        load_meta_init,
        trainable_fingerprint,
    )
    from hf_subset_select.demo.toy import make_tiny_causal_lm

    reference = _digest(_collect(os.path.join(root, "ref")))
    fps = {s: trainable_fingerprint(_theta(s)) for s in (1, 2)}
    stats = {
        "kills": 0,
        "kills_recovered_equal": 0,
        "kill_points_not_reached": 0,
        "killed_dirs_loading_wrong": 0,
    }
    by_label: dict[str, int] = {}
    trial = 0
    while stats["kills"] < n:
        trial += 1
        out = os.path.join(root, f"k{trial}")
        labels = [_random_label(rng)]
        meta = labels[0] in META_LABELS
        if not meta and rng.random() < 0.25:
            labels.append(_random_label(rng))
            while labels[1] in META_LABELS:
                labels[1] = _random_label(rng)
        if meta:
            _save_meta(out, seed=1)  # an earlier θ* the save replaces
        trial_kills = 0
        for label in labels:
            code = _run_killed(label, _save_meta if meta else _collect, out, *((2,) if meta else ()))
            if code != -signal.SIGKILL:
                stats["kill_points_not_reached"] += 1
                continue
            stats["kills"] += 1
            trial_kills += 1
            by_label[label.split(":")[0]] = by_label.get(label.split(":")[0], 0) + 1
            # the killed directory loads as nothing, or as a complete correct result
            try:
                if meta:
                    fp = trainable_fingerprint(
                        load_meta_init(out, base_model=make_tiny_causal_lm("gpt2", seed=0))
                    )
                    ok = fp in (fps[1], fps[2])
                else:
                    ok = _digest(GradientCache.load(out)) == reference
            except (GradientCacheError, MetaInitManifestError):
                ok = True
            stats["killed_dirs_loading_wrong"] += not ok
        if meta:
            _save_meta(out, seed=2)
            base = make_tiny_causal_lm("gpt2", seed=0)
            equal = trainable_fingerprint(load_meta_init(out, base_model=base)) == fps[2]
        else:
            equal = _digest(_collect(out)) == reference
        stats["kills_recovered_equal"] += trial_kills if equal else 0  # one rerun recovers the trial's kills
        shutil.rmtree(out, ignore_errors=True)
    stats["kills_by_label"] = dict(sorted(by_label.items()))
    return stats


# --------------------------------------------------------------------------- corruptions
def _mutate_json_value(data: Any, rng: random.Random) -> Any:
    """Change one leaf to another value that still parses (a number moved, a string changed, a bool flipped)."""
    paths = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + [k])
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, path + [i])
        else:
            paths.append(path)

    walk(data, [])
    path = rng.choice(paths)
    parent = data
    for p in path[:-1]:
        parent = parent[p]
    old = parent[path[-1]]
    if isinstance(old, bool):
        new = not old
    elif isinstance(old, int):
        new = old + rng.choice([-1, 1, 7])
    elif isinstance(old, float):
        new = old * 1.5 + 0.25
    elif isinstance(old, str):
        new = old[:-1] + ("0" if not old.endswith("0") else "1") if old else "x"
    else:
        new = 0
    parent[path[-1]] = new
    return data


def corrupt(path: str, kind: str, rng: random.Random) -> None:
    if kind == "delete":
        os.remove(path)
        return
    raw = bytearray(open(path, "rb").read())
    if kind == "bit_flip":
        raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        raw = raw[: rng.randrange(len(raw))]
    elif kind == "replace_bytes":
        start = rng.randrange(len(raw))
        for i in range(start, min(len(raw), start + rng.randint(1, 16))):
            raw[i] = (raw[i] + rng.randint(1, 255)) % 256  # always a different byte
    elif kind == "json_value":
        raw = bytearray(json.dumps(_mutate_json_value(json.loads(raw), rng), indent=2).encode())
    open(path, "wb").write(bytes(raw))


def corruption_trials(n: int, rng: random.Random, root: str) -> dict[str, Any]:
    from hf_subset_select import FirstOrderEstimator, SelectConfig, SourceSelection, select_sources
    from hf_subset_select.collect.cache import GradientCache, GradientCacheError
    from hf_subset_select.collect.meta_init import (
        MetaInitManifestError,
        load_meta_init,
        trainable_fingerprint,
    )
    from hf_subset_select.demo.synthetic import make_synthetic_cache
    from hf_subset_select.demo.toy import make_tiny_causal_lm
    from hf_subset_select.select.selection import SelectionFileError

    cache_dir, meta_dir, sel_path = (os.path.join(root, n_) for n_ in ("cache", "meta", "selection.json"))
    ref_cache = _collect(cache_dir)
    _save_meta(meta_dir, seed=1)
    synthetic = make_synthetic_cache(2, 1, 1, dim=12, examples_per_source=16, seed=0)
    ref_sel = select_sources(
        FirstOrderEstimator(synthetic), method="linear", config=SelectConfig(num_subsets=50)
    )
    ref_sel.save(sel_path)
    ref_fp = trainable_fingerprint(_theta(1))
    ref_manifest = json.load(open(os.path.join(cache_dir, "manifest.json")))

    def load_cache(d):
        c = GradientCache.load(d)
        same = _digest(c) == _digest(ref_cache) and {k: v for k, v in c.manifest.items()} == ref_manifest
        return same

    def load_sel(p):
        return SourceSelection.load(p) == ref_sel

    def load_meta(d):
        return (
            trainable_fingerprint(load_meta_init(d, base_model=make_tiny_causal_lm("gpt2", seed=0))) == ref_fp
        )

    targets = [
        ("cache", cache_dir, "manifest.json", load_cache, GradientCacheError),
        ("cache", cache_dir, "cache.safetensors", load_cache, GradientCacheError),
        ("selection", None, sel_path, load_sel, SelectionFileError),
        ("meta_init", meta_dir, "meta_init.json", load_meta, MetaInitManifestError),
        ("meta_init", meta_dir, "adapter_model.safetensors", load_meta, MetaInitManifestError),
        ("meta_init", meta_dir, "adapter_config.json", load_meta, MetaInitManifestError),
    ]
    stats = {
        "corruptions": 0,
        "corruptions_detected": 0,
        "silent_loads_of_corrupt_files": 0,
        "unexpected": [],
    }
    table: dict[str, dict[str, int]] = {}
    for i in range(n):
        artifact, directory, name, loader, error = targets[i % len(targets)]
        kinds = ["bit_flip", "truncate", "replace_bytes", "delete"] + (
            ["json_value"] if name.endswith(".json") else []
        )
        kind = rng.choice(kinds)
        scratch = os.path.join(root, f"c{i}")
        if directory is None:
            os.makedirs(scratch)
            shutil.copy(name, os.path.join(scratch, "s.json"))
            path = target = os.path.join(scratch, "s.json")
        else:
            shutil.copytree(directory, scratch)
            path, target = os.path.join(scratch, name), scratch
        corrupt(path, kind, rng)
        stats["corruptions"] += 1
        row = table.setdefault(f"{artifact}/{os.path.basename(name)}/{kind}", {"n": 0, "detected": 0})
        row["n"] += 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                same = loader(target)
            stats["silent_loads_of_corrupt_files"] += 1  # a corrupt file loaded at all (equal or not)
            row.setdefault("loaded_equal" if same else "loaded_different", 0)
            row["loaded_equal" if same else "loaded_different"] += 1
        except error:
            stats["corruptions_detected"] += 1
            row["detected"] += 1
        except Exception as exc:  # counted, and the type recorded
            stats["unexpected"].append(f"{artifact}/{name}/{kind}: {type(exc).__name__}: {exc}"[:300])
        shutil.rmtree(scratch, ignore_errors=True)
    stats["corruptions_by_file_and_kind"] = dict(sorted(table.items()))
    return stats


# --------------------------------------------------------------------------- fuzz
_JUNK = [
    None,
    "x",
    -1,
    0,
    2**70,
    float("nan"),
    float("inf"),
    True,
    [],
    {},
    [1, "a"],
    {"a": {"b": [None]}},
    "",
    1.5,
]


def _containers(node: Any, out: list[Any]) -> None:
    if isinstance(node, (dict, list)) and node:
        out.append(node)
        for v in node.values() if isinstance(node, dict) else node:
            _containers(v, out)


def _fuzz(data: Any, rng: random.Random) -> Any:
    data = copy.deepcopy(data)
    for _ in range(rng.randint(1, 3)):
        containers = []

        _containers(data, containers)
        if not containers:
            return rng.choice(_JUNK)
        node = rng.choice(containers)
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        action = rng.random()
        if action < 0.2 and isinstance(node, dict):
            del node[key]
        elif action < 0.3:
            node[key] = [node[key]] if rng.random() < 0.5 else {"v": node[key]}  # another type, same content
        else:
            node[key] = copy.deepcopy(rng.choice(_JUNK))
    return data


def fuzz_trials(n: int, rng: random.Random, root: str) -> dict[str, Any]:
    from hf_subset_select import (
        CollectConfig,
        FirstOrderEstimator,
        SelectConfig,
        SourceSelection,
        select_sources,
    )
    from hf_subset_select.collect.cache import GradientCache, GradientCacheError
    from hf_subset_select.collect.meta_init import MetaInitManifestError, read_meta_init_manifest
    from hf_subset_select.config import ConfigError
    from hf_subset_select.demo.synthetic import make_synthetic_cache
    from hf_subset_select.select.selection import SelectionFileError

    cache_dir, meta_dir = os.path.join(root, "cache"), os.path.join(root, "meta")
    _collect(cache_dir)
    _save_meta(meta_dir, seed=1)
    synthetic = make_synthetic_cache(2, 1, 1, dim=12, examples_per_source=16, seed=0)
    sel = select_sources(FirstOrderEstimator(synthetic), method="linear", config=SelectConfig(num_subsets=50))
    sel_path = os.path.join(root, "selection.json")
    sel.save(sel_path)
    originals = {
        "cache_manifest": (
            json.load(open(os.path.join(cache_dir, "manifest.json"))),
            os.path.join(cache_dir, "manifest.json"),
        ),
        "meta_init_manifest": (
            json.load(open(os.path.join(meta_dir, "meta_init.json"))),
            os.path.join(meta_dir, "meta_init.json"),
        ),
        "selection": (json.load(open(sel_path)), sel_path),
        "collect_config": (CollectConfig(proj_dim=64).to_dict(), None),
    }
    loaders = {
        "cache_manifest": (lambda: GradientCache.load(cache_dir), GradientCacheError),
        "meta_init_manifest": (lambda: read_meta_init_manifest(meta_dir), MetaInitManifestError),
        "selection": (lambda: SourceSelection.load(sel_path), SelectionFileError),
    }
    stats: dict[str, Any] = {
        "fuzz_cases": 0,
        "fuzz_unexpected_exceptions": 0,
        "fuzz_loaded": 0,
        "fuzz_refused": 0,
    }
    slowest = 0.0
    unexpected: list[str] = []
    names = list(originals)
    for i in range(n):
        name = names[i % len(names)]
        data, path = originals[name]
        mutated = _fuzz(data, rng)
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if name == "collect_config":
                    CollectConfig.from_dict(mutated)
                else:
                    with open(path, "w") as handle:
                        json.dump(mutated, handle)
                    loaders[name][0]()
            stats["fuzz_loaded"] += 1
        except (ConfigError, GradientCacheError, MetaInitManifestError, SelectionFileError) as exc:
            expected = ConfigError if name == "collect_config" else loaders[name][1]
            if not isinstance(exc, expected):  # another loader's error: not the documented one
                stats["fuzz_unexpected_exceptions"] += 1
                unexpected.append(f"{name}: {type(exc).__name__}: {exc}"[:300])
            stats["fuzz_refused"] += 1
        except Exception as exc:
            stats["fuzz_unexpected_exceptions"] += 1
            unexpected.append(f"{name}: {type(exc).__name__}: {exc}"[:300])
        slowest = max(slowest, time.perf_counter() - t0)
        stats["fuzz_cases"] += 1
    for data, path in originals.values():  # restore
        if path is not None:
            with open(path, "w") as handle:
                json.dump(data, handle)
    stats["fuzz_slowest_case_seconds"] = round(slowest, 4)
    stats["fuzz_unexpected"] = unexpected[:20]
    return stats


def main() -> None:
    parser = benchmark_parser(__doc__, seed=True, threads=1)
    parser.add_argument("--kills", type=int, default=60)
    parser.add_argument("--corruptions", type=int, default=240)
    parser.add_argument("--fuzz", type=int, default=1200)
    args = parser.parse_args()
    limit_threads(args.threads)
    torch.manual_seed(0)
    n_kills, n_corrupt, n_fuzz = (6, 24, 60) if args.quick else (args.kills, args.corruptions, args.fuzz)
    rng = random.Random(args.seed)
    root = tempfile.mkdtemp(prefix="reliability-")
    result: dict[str, Any] = {
        "settings": {"kills": n_kills, "corruptions": n_corrupt, "fuzz": n_fuzz, "seed": args.seed}
    }
    try:
        timings = {}
        for name, fn, count in (
            ("kills", kill_trials, n_kills),
            ("corruptions", corruption_trials, n_corrupt),
            ("fuzz", fuzz_trials, n_fuzz),
        ):
            t0 = time.perf_counter()
            part = fn(count, rng, os.path.join(root, name))
            timings[name] = round(time.perf_counter() - t0, 2)
            result.update(part)
            print(name, {k: v for k, v in part.items() if not isinstance(v, (dict, list))}, flush=True)
        result["seconds"] = timings
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result["corruptions_unexpected"] = result.pop("unexpected", [])[:20]
    result["corruptions_unexpected_exceptions"] = len(result["corruptions_unexpected"])
    result["bar_met"] = bool(
        result["kills"] >= (50 if not args.quick else 1)
        and result["kills_recovered_equal"] == result["kills"]
        and result["killed_dirs_loading_wrong"] == 0
        and result["corruptions_detected"] == result["corruptions"]
        and result["silent_loads_of_corrupt_files"] == 0
        and result["fuzz_unexpected_exceptions"] == 0
        and not math.isnan(result["fuzz_slowest_case_seconds"])
    )
    result["note"] = (
        "CPU only, one torch thread, on a shared machine (see environment.load_average); seconds are wall time of "
        "each part and only indicative."
    )
    write_results(args.output, result)
    print("bar met:", result["bar_met"])


if __name__ == "__main__":
    main()
