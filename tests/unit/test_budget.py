"""The budget stop rule and the distillation rows: pure bookkeeping, no engine."""

import pyarrow as pa

from s2d_ray.config import parse_config
from s2d_ray.generation import distill_rows
from s2d_ray.pipeline import _budget
from s2d_ray.rundir import RunDir


def test_token_and_money_budgets(tmp_path):
    run = RunDir(tmp_path).create()
    assert _budget(parse_config({"task": {"name": "last_letter"}}), run) is None  # no budget: never stops
    cfg = parse_config({"task": {"name": "last_letter"}, "budget": {"tokens": 1000, "money": 2.0},
                        "cost": {"device_hour_price": 3.6}, "engine": {"concurrency": [1, 2]}})  # fmt: skip
    stop = _budget(cfg, run)
    assert stop(999, 0.0) is None
    assert stop(1000, 0.0) == "token budget 1,000 reached (1,000 generated)"
    # 2 engines x 3.6 per device-hour = 0.002 per second: 2.0 is spent after 1000 s.
    assert stop(10, 999.0) is None
    assert stop(10, 1000.0).startswith("money budget 2 USD reached")


def test_a_resumed_run_counts_what_it_already_spent(tmp_path):
    run = RunDir(tmp_path).create()
    run.update_run(stages={"generate": {"cost": 1.5}})
    cfg = parse_config({"task": {"name": "last_letter"}, "budget": {"money": 2.0}, "cost": {"device_hour_price": 3.6}})
    assert _budget(cfg, run)(0, 500.0).startswith("money budget")  # 1.5 before + 1.0 now


def test_distill_rows_keep_only_the_final_answer_of_kept_inputs():
    table = pa.table({
        "id": ["a", "b"], "input": ["qa", "qb"], "target": ["Answer: x", None], "kept": [True, False],
        "system2_outputs": [["long reasoning ... Answer: x"], ["..."]],
    })  # fmt: skip
    rows = distill_rows(table).to_pylist()
    assert rows == [{"id": "a", "prompt": "qa", "target": "Answer: x"}]
    assert distill_rows(table.slice(1)).num_rows == 0  # an empty set keeps its schema
