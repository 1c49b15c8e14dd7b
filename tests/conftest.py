"""Shared test setup: offline, deterministic, few threads (CI has 2 cores)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic():
    import torch

    torch.manual_seed(0)
    yield


@pytest.fixture
def tokenizer():
    from hf_subset_select.demo.toy import make_tokenizer

    return make_tokenizer()


@pytest.fixture
def toy_sources():
    """Three small prompt/completion sources and a target eval split, tagged."""
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
    target_eval = tag_target_eval(toy_text_dataset("add", 6, seed=99), name="add_eval")
    return train, target_eval


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and spinning threads stall on a shared 2-core CPU.

    Use it per module with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def theta_star():
    """Turn a freshly wrapped LoRA model into a stand-in θ*: LoRA B made non-zero (as after training), so that
    every LoRA gradient is non-trivial. Returns the model in eval mode."""

    from hf_subset_select.demo.toy import perturb_lora

    def make(model, seed: int = 1, scale: float = 0.1):
        return perturb_lora(model, seed, scale).eval()

    return make


@pytest.fixture
def torchrun(tmp_path):
    """Run a worker script in 2 fresh processes with gloo (``torchrun --standalone --nproc_per_node 2``).

    Fresh interpreters, not a fork of the test process: forking after torch has started its intra-op threads can
    deadlock the children. Returns a function ``run(script_text, args, timeout=300)``; a failure shows the output.
    """
    import subprocess
    import sys

    def run(script: str, args: list[str] = (), timeout: int = 300) -> subprocess.CompletedProcess:
        path = tmp_path / "worker.py"
        path.write_text(script)
        env = dict(
            os.environ,
            CUDA_VISIBLE_DEVICES="",
            OMP_NUM_THREADS="1",
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
        )
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(path),
        ]
        proc = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        return proc

    return run


@pytest.fixture(scope="session")
def mutate_json():
    """``mutate(data, doc)``: a copy of the JSON document ``doc`` with 1 to 3 mutations drawn by hypothesis
    (``data`` from ``st.data()``): a key or list item dropped, or a value replaced by null, ``"x"``, -1, a huge
    number, NaN, a wrong-typed or nested junk value, wrapped in a list, or turned into its JSON string. For the
    loader fuzz tests (tests/*/test_fuzz_*.py)."""
    import copy
    import json

    from hypothesis import strategies as st

    fixed = st.sampled_from(
        [
            None,
            "x",
            "",
            -1,
            0,
            1.5,
            True,
            10**30,
            -(10**30),
            float("nan"),
            float("inf"),
            [],
            {},
            [None],
            {"x": {"y": [1, "x"]}},
        ]
    )
    scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6)
    junk = st.recursive(
        scalars,
        lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3),
        max_leaves=6,
    )

    def paths(doc, prefix=()):
        if prefix:
            yield prefix
        if isinstance(doc, dict):
            for key, value in doc.items():
                yield from paths(value, (*prefix, key))
        elif isinstance(doc, list):
            for i, value in enumerate(doc):
                yield from paths(value, (*prefix, i))

    def mutate(data, doc):
        doc = copy.deepcopy(doc)
        for _ in range(data.draw(st.integers(1, 3), label="mutations")):
            where = list(paths(doc))
            if not where:
                break
            path = data.draw(st.sampled_from(where), label="path")
            parent = doc
            for key in path[:-1]:
                parent = parent[key]
            key, old = path[-1], parent[path[-1]]
            op = data.draw(
                st.sampled_from(["drop", "fixed", "junk", "wrap", "stringify", "scale"]), label="op"
            )
            if op == "drop":
                del parent[key]
            elif op == "fixed":  # a copy: a later mutation must not edit the shared value in place
                parent[key] = copy.deepcopy(data.draw(fixed))
            elif op == "junk":
                parent[key] = data.draw(junk)
            elif op == "wrap":
                parent[key] = [old]
            elif op == "stringify":
                parent[key] = json.dumps(old)
            elif isinstance(old, (int, float)) and not isinstance(old, bool):
                parent[key] = old * data.draw(st.sampled_from([-1, 10**20, 0]))
            else:
                parent[key] = copy.deepcopy(data.draw(fixed))
        return doc

    return mutate
