"""Sharing a batch's search between the read-ahead thread and the caller (manifpt_cli/shared_work.py)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from manifpt_cli import attribute
from manifpt_cli.attribute import Attribution
from manifpt_cli.images import decode_folder
from manifpt_cli.manifold import RealIndex
from manifpt_cli.settings import RunSettings
from manifpt_cli.shared_work import SharedParts
from manifpt_cli.spaces import PixelEmbedder, Space


def _parts(count: int, ran: list, seconds: float = 0.05):
    def part(i: int):
        ran.append((i, threading.current_thread().name))
        time.sleep(seconds)
        return i * i

    return [lambda i=i: part(i) for i in range(count)]


def test_each_part_runs_once_in_either_thread_and_results_keep_their_order():
    ran: list = []
    shared = SharedParts(_parts(8, ran))
    helper = threading.Thread(target=shared.run_from_front, name="helper")
    helper.start()
    assert shared.results() == [i * i for i in range(8)]
    helper.join()
    assert sorted(i for i, _ in ran) == list(range(8)), "every part ran exactly once"
    by_thread = {name: sorted(i for i, who in ran if who == name) for _, name in ran}
    assert set(by_thread) == {"helper", threading.current_thread().name}, "both threads took parts"
    helper_parts, own_parts = by_thread["helper"], by_thread[threading.current_thread().name]
    assert max(helper_parts) < min(own_parts), "the helper takes them from the front, the caller from the back"


def test_the_caller_runs_every_part_nobody_began_and_errors_come_back_in_part_order():
    ran: list = []
    assert SharedParts(_parts(3, ran, 0)).results() == [0, 1, 4]
    assert len(ran) == 3

    def failing(message: str):
        raise ValueError(message)

    shared = SharedParts([lambda: 1, lambda: failing("second"), lambda: failing("third")])
    with pytest.raises(ValueError, match="second"):
        shared.results()
    assert SharedParts([]).results() == []


def test_rows_do_not_depend_on_how_a_batch_search_is_split(freq_model, real_index, dataset, monkeypatch):
    """Batches of 7 searched in parts of 3 (two threads share them) give the rows of one search per batch."""
    suspects = [dataset / "suspects"]
    settings = RunSettings(batch_size=7)
    with Attribution(freq_model / "freq.onnx", real_index, settings=settings) as run:
        whole = [row for batch in decode_folder(suspects, 32, settings) for row in run.attribute_batch(batch)]
        monkeypatch.setattr(attribute, "SEARCH_PART", 3)
        split = list(run.rows(suspects))
    assert len(whole) > 7 and [row.ok for row in whole] == [True] * len(whole)
    assert [vars(row) for row in split] == [vars(row) for row in whole]


def test_two_threads_searching_at_once_make_the_search_once(real_index, dataset, monkeypatch):
    from PIL import Image

    from manifpt_cli import manifold

    made = []

    class SlowToMake(manifold.ExactSearch):
        def __init__(self, *args, **kwargs):
            made.append(threading.current_thread().name)
            time.sleep(0.3)  # both threads ask while the first is still making it
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(manifold, "ExactSearch", SlowToMake)
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted((dataset / "real").iterdir())[:4]])
    queries = PixelEmbedder(Space.RGB)(pixels)
    found = {}
    with RealIndex(real_index, threads=1) as index:
        threads = [
            threading.Thread(target=lambda k=k: found.update({k: index.nearest(Space.RGB, queries)})) for k in (0, 1)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(made) == 1
    assert np.array_equal(found[0].ids, found[1].ids) and np.array_equal(found[0].ids, np.arange(4))
