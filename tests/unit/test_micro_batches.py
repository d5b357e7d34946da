"""plan_micro_batches: consecutive datums, batch size x padded length within the token budget, order kept."""

from __future__ import annotations

import numpy as np

from trainer_consumer.backends.batch import CheckedDatum, plan_micro_batches


def _datum(n: int, first: int = 1) -> CheckedDatum:
    tokens = np.arange(first, first + n, dtype=np.int64)
    return CheckedDatum(tokens=tokens, targets=tokens + 1, inputs={})


def test_datums_are_grouped_in_order_within_the_budget():
    data = [_datum(4), _datum(4), _datum(3), _datum(8)]
    batches = plan_micro_batches(data, max_tokens=12)
    assert [(b.start, b.stop) for b in batches] == [(0, 3), (3, 4)]  # 3 x 4 = 12 fits; 4 x 8 would not
    for batch in batches:
        assert batch.input_ids.shape[0] * batch.input_ids.shape[1] <= 12


def test_padding_is_on_the_right_and_masked():
    batch = plan_micro_batches([_datum(2, first=5), _datum(4, first=1)], max_tokens=100)[0]
    assert batch.input_ids.tolist() == [[5, 6, 0, 0], [1, 2, 3, 4]]
    assert batch.targets.tolist() == [[6, 7, 0, 0], [2, 3, 4, 5]]
    assert batch.mask.tolist() == [[True, True, False, False], [True, True, True, True]]


def test_a_datum_longer_than_the_budget_gets_a_batch_of_its_own():
    batches = plan_micro_batches([_datum(3), _datum(20), _datum(3)], max_tokens=8)
    assert [(b.start, b.stop) for b in batches] == [(0, 1), (1, 2), (2, 3)]
    assert batches[1].input_ids.shape == (1, 20)


def test_no_data_no_batches():
    assert plan_micro_batches([], max_tokens=8) == []
