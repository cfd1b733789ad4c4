"""Fixtures of the experiment-harness tests.

Real data: the verified copies in the project root's sibling ``shared/data`` (override with
``BNRNN_TEST_DATA_DIR``); tests that need them are skipped when the folder is absent.
text8 is not available offline: `fake_text8_dir` writes a small ``text8/text8.zip``.
Nothing here changes the process environment for other test files: fixtures that set
``BNRNN_DATA_DIR`` / ``BNRNN_RUNS_DIR`` do it through ``monkeypatch``.
"""

from __future__ import annotations

import random
import zipfile
from pathlib import Path

import pytest
import torch
from harness_helpers import REAL_DATA


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a test module (``pytestmark = usefixtures("one_thread")``):
    tiny step loops run several times faster than on two busy threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def runs_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Point BNRNN_DATA_DIR at the real data and BNRNN_RUNS_DIR at a temporary folder,
    which is returned."""
    monkeypatch.setenv("BNRNN_DATA_DIR", str(REAL_DATA))
    monkeypatch.setenv("BNRNN_RUNS_DIR", str(tmp_path / "runs"))
    return tmp_path / "runs"


@pytest.fixture(scope="session")
def fake_text8_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory with a small text8.zip (a-z and space, like the real one)."""
    root = tmp_path_factory.mktemp("text8data")
    rng = random.Random(0)
    words = ["the", "of", "and", "one", "zero", "nine", "in", "a", "to", "is", "batch", "norm"]
    text = " ".join(rng.choice(words) for _ in range(8000))[:30000]
    (root / "text8").mkdir()
    with zipfile.ZipFile(root / "text8" / "text8.zip", "w") as zf:
        zf.writestr("text8", text)
    return root
