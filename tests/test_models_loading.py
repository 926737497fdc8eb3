"""fedtune builds one Hugging Face model at a time per process (models/loading.py): transformers' loading
contexts are process-global, and two threads loading at once (a server thread beside participant threads)
got a weight left on the meta device or uninitialised values."""

from __future__ import annotations

import threading

from fedtune.models import hub
from fedtune.models.loading import HF_LOADING


def _another_thread_can_load() -> bool:
    """Whether a second thread could enter a load now (it releases what it took)."""
    got: list[bool] = []

    def probe() -> None:
        taken = HF_LOADING.acquire(blocking=False)
        got.append(taken)
        if taken:
            HF_LOADING.release()

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    return got[0]


def test_no_other_thread_loads_while_fedtune_loads_a_model() -> None:
    during: list[bool] = []

    class Loader:  # stands in for AutoModelForCausalLM: notes whether another thread could load meanwhile
        @staticmethod
        def from_pretrained(source: str, **kwargs: object) -> str:
            during.append(_another_thread_can_load())
            return f"model from {source}"

    assert hub._from_pretrained(Loader, "folder", "name") == "model from folder"
    assert during == [False]
    assert _another_thread_can_load()  # released afterwards


def test_a_failed_load_releases_the_lock() -> None:
    class Broken:
        @staticmethod
        def from_pretrained(source: str, **kwargs: object) -> str:
            raise OSError("no such folder")

    try:
        hub._from_pretrained(Broken, "folder", "name")
    except Exception as err:  # a ModelError naming the model
        assert "name" in str(err)
    else:
        raise AssertionError("the failed load was not reported")
    assert _another_thread_can_load()
