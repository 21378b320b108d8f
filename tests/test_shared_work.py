"""Sharing a batch's search between the read-ahead thread and the caller (manifpt_cli/shared_work.py)."""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest

from manifpt_cli import attribute
from manifpt_cli.attribute import Attribution
from manifpt_cli.images import decode_folder
from manifpt_cli.manifold import RealIndex
from manifpt_cli.settings import DEFAULT_BATCH_SIZE, SMALL_IMAGE_BATCH_SIZE, RunSettings
from manifpt_cli.shared_work import SharedParts
from manifpt_cli.spaces import PixelEmbedder, Space


def test_each_part_runs_once_in_either_thread_and_results_keep_their_order():
    ran: list = []
    helper_began = threading.Event()

    def part(i: int) -> int:
        ran.append((i, threading.current_thread().name))
        if threading.current_thread().name == "helper":
            helper_began.set()
        else:
            assert helper_began.wait(10), "the helper thread never ran a part"
        time.sleep(0.01)
        return i * i

    shared = SharedParts([lambda i=i: part(i) for i in range(8)])
    helper = threading.Thread(target=shared.run_from_front, name="helper")
    helper.start()
    assert shared.results() == [i * i for i in range(8)]
    helper.join()
    assert sorted(i for i, _ in ran) == list(range(8)), "every part ran exactly once"
    helper_parts = [i for i, who in ran if who == "helper"]
    own_parts = [i for i, who in ran if who != "helper"]
    assert helper_parts and own_parts, "both threads took parts"
    assert max(helper_parts) < min(own_parts), "the helper takes them from the front, the caller from the back"


def test_the_caller_runs_every_part_nobody_began_and_errors_come_back_in_part_order():
    assert SharedParts([lambda i=i: i * i for i in range(3)]).results() == [0, 1, 4]
    assert SharedParts([]).results() == []

    def failing(message: str):
        raise ValueError(message)

    shared = SharedParts([lambda: 1, lambda: failing("second"), lambda: failing("third")])
    with pytest.raises(ValueError, match="second"):
        shared.results()
    # An error in a part the other thread ran comes back in the caller too.
    shared = SharedParts([lambda: failing("run by the helper"), lambda: 2])
    helper = threading.Thread(target=shared.run_from_front)
    helper.start()
    helper.join()
    with pytest.raises(ValueError, match="run by the helper"):
        shared.results()


def test_an_interrupt_in_the_caller_goes_up_at_once_and_stops_the_parts_not_begun():
    ran: list = []
    helper_began = threading.Event()

    def part(i: int) -> None:
        ran.append(i)
        if i == 7:  # the caller's first part (from the back)
            assert helper_began.wait(10)
            raise KeyboardInterrupt
        helper_began.set()
        time.sleep(0.1)

    shared = SharedParts([lambda i=i: part(i) for i in range(8)])
    helper = threading.Thread(target=shared.run_from_front)
    helper.start()
    started = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        shared.results()
    assert time.perf_counter() - started < 0.5, "not after the other parts"
    helper.join()
    assert sorted(ran) == [0, 7], "the helper finished the part it had begun and began no other"


def test_rows_do_not_depend_on_how_a_batch_search_is_split(freq_model, real_index, dataset, tmp_path, monkeypatch):
    """Batches of 6 searched in parts of 3, shared by the two threads, with failed files (one part
    of nothing but failures) give the rows of one search per batch."""
    suspects = tmp_path / "suspects"
    shutil.copytree(dataset / "suspects", suspects)
    good = sum(1 for _ in suspects.rglob("*.png"))
    (suspects / "zz-junk").mkdir()  # discovered last: the last part holds only failures
    for i in range(3 + (3 - good % 3) % 3):
        (suspects / "zz-junk" / f"junk_{i}.png").write_bytes(b"not a PNG")
    settings = RunSettings(batch_size=6)
    with Attribution(freq_model / "freq.onnx", real_index, settings=settings) as run:
        whole = [row for batch in decode_folder([suspects], 32, settings) for row in run.attribute_batch(batch)]
        monkeypatch.setattr(attribute, "SEARCH_PART", 3)
        monkeypatch.setattr(attribute, "SMALLEST_PART", 1)
        searched_by = []
        search_batch = run.search_batch

        def recorded(batch):
            searched_by.append(threading.current_thread().name)
            return search_batch(batch)

        monkeypatch.setattr(run, "search_batch", recorded)
        split = list(run.rows([suspects]))
    assert [row.ok for row in whole] == [True] * good + [False] * (len(whole) - good)
    assert [vars(row) for row in split] == [vars(row) for row in whole]
    assert len(searched_by) == -(-len(whole) // 3), "every part of 3 searched once"
    assert "manifpt-read-ahead" in searched_by, "the read-ahead thread searched parts"


def test_the_attributor_is_a_step_of_its_own_and_rows_need_it(freq_model, real_index, dataset):
    """``predicted`` adds the attributor's outputs to a new batch (the searched one stays as it
    was, so a benchmark can time it again); ``finish_batch`` refuses a batch without them."""
    settings = RunSettings(batch_size=4)
    with Attribution(freq_model / "freq.onnx", real_index, settings=settings) as run:
        batch = next(iter(decode_folder([dataset / "suspects"], 32, settings)))
        searched = run.search_batch(batch)
        with pytest.raises(ValueError, match="predicted"):
            run.finish_batch(searched)
        predicted = run.predicted(searched)
        assert searched.probabilities is None and predicted.probabilities.shape == (4, len(run.model.classes))
        assert [vars(row) for row in run.finish_batch(predicted)] == [vars(row) for row in run.attribute_batch(batch)]


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


def test_the_default_batch_of_small_pixel_images_is_shared_and_a_given_one_wins():
    """Small rgb/freq images get batches that two threads split; backbones and large images keep
    small batches (their memory); a batch size given is used as it is."""
    auto = RunSettings()
    assert auto.batch_for(32) == SMALL_IMAGE_BATCH_SIZE >= 2 * attribute.SMALLEST_PART
    assert auto.batch_for(64) == SMALL_IMAGE_BATCH_SIZE
    assert auto.batch_for(65) == auto.batch_for(32, backbone=True) == DEFAULT_BATCH_SIZE
    assert RunSettings(batch_size=7).batch_for(32) == RunSettings(batch_size=7).batch_for(256, backbone=True) == 7
