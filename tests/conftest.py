"""Real Megatron checkpoints for the tests: trained once per session, in one torchrun launch."""

import pytest

from tests.harness import run_jobs, train_job

# name -> (layout, model overrides). Each trains 3 real steps with the DistributedOptimizer
# on a world of 4 processes (DP fills the rest) and saves a Megatron-LM legacy checkpoint.
SOURCES = {
    "tp2pp2": ({"tp": 2, "pp": 2}, {}),
    "tp1pp2vpp2": ({"tp": 1, "pp": 2, "vpp": 2}, {}),
    "tp4pp1": ({"tp": 4, "pp": 1}, {}),
    "tp1pp4": ({"tp": 1, "pp": 4}, {}),
    "uneven13": ({"tp": 1, "pp": 2, "first": 1, "last": 3}, {}),
    "tied_bf16_tp2pp2": ({"tp": 2, "pp": 2}, {"untie_embeddings": False, "dtype": "bf16"}),
}


class Source:
    def __init__(self, name, root):
        self.name = name
        self.layout, self.model = SOURCES[name]
        self.dir = root / name
        self.truth = root / f"{name}.truth.pt"


@pytest.fixture(scope="session")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    trained = {name: Source(name, root) for name in SOURCES}
    run_jobs([train_job(s.layout, s.dir, s.truth, model=s.model) for s in trained.values()], root / "logs")
    return trained
