"""Every task: extraction, scoring, and loading each fixture format; bad data is one clear line."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from s2d_ray.errors import DataError
from s2d_ray.tasks import GSM8K, CoinFlip, Pairwise, TriviaQA, UserTask
from s2d_ray.tasks.data import read_records

DATA = Path(__file__).resolve().parents[1] / "fixtures" / "data"


# --- coin flip ------------------------------------------------------------------------------


def test_coin_flip_is_seeded_disjoint_and_labelled_by_parity():
    task = CoinFlip(train=50, test=50, people=3)
    train, test = task.examples("train"), task.examples("test")
    assert train == CoinFlip(train=50, test=50, people=3).examples("train")
    assert not {e.question for e in train} & {e.question for e in test}
    for e in train:
        flips = e.question.count(" flips the coin")
        assert e.answer == ("yes" if flips % 2 == 0 else "no")
        assert e.question.count("the coin.") == 3


def test_coin_flip_extraction():
    task = CoinFlip()
    assert task.extract("So the coin is tails.\nAnswer: No") == "no"
    assert task.extract("The answer is yes.") == "yes"
    assert task.extract("Yes, it is still heads up.") == "yes"
    assert task.extract("It depends.") is None


# --- GSM8K ----------------------------------------------------------------------------------


def test_gsm8k_extracts_the_final_number():
    task = GSM8K()
    assert task.extract("She has 3 + 4 = 7 apples.\nAnswer: 7") == "7"
    assert task.extract("The answer is $1,200.00.") == "1200"
    assert task.extract("#### 42") == "42"
    assert task.extract("First 12, then 30 more, so 42") == "42"  # no marker: last number
    assert task.extract("Answer: -3.50") == "-3.5"
    assert task.extract("I cannot tell.") is None


def test_gsm8k_fixture_loads_with_gold_numbers():
    task = GSM8K(data={"train": str(DATA / "gsm8k/train.jsonl"), "test": str(DATA / "gsm8k/test.jsonl")})
    train, test = task.examples("train"), task.examples("test")
    assert (len(train), len(test)) == (40, 24)
    assert all(e.answer and e.answer.lstrip("-").isdigit() for e in test)
    assert any(int(e.answer) >= 1000 for e in train)  # commas in the solution, not in the label
    assert task.score(task.extract(f"Answer: {test[0].answer}"), test[0].answer) == 1.0


def test_gsm8k_answer_without_marker_is_one_clear_line(tmp_path):
    bad = tmp_path / "g.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "5"}) + "\n")
    with pytest.raises(DataError, match=r"g.jsonl record 1: field 'answer' does not end in '#### <number>'"):
        GSM8K(data={"train": str(bad)}).examples("train")


# --- TriviaQA with biased opinions ----------------------------------------------------------


@pytest.mark.parametrize("path", ["triviaqa/test.jsonl", "triviaqa/test.parquet", "triviaqa/test_hf", "triviaqa/dataset_dict"])
def test_trivia_loads_every_format_alike(path):
    task = TriviaQA(data={"test": str(DATA / path)})
    examples = task.examples("test")
    assert len(examples) == 32
    assert sum(e.group == "biased" for e in examples) == 24 and sum(e.group == "unbiased" for e in examples) == 8
    reference = TriviaQA(data={"test": str(DATA / "triviaqa/test.jsonl")}).examples("test")
    assert [e.id for e in examples] == [e.id for e in reference]


def test_trivia_mix_picks_the_paper_composition():
    task = TriviaQA(data={"test": str(DATA / "triviaqa/test.jsonl")}, mix={"test": {"biased": 10, "unbiased": 3}})
    groups = [e.group for e in task.examples("test")]
    assert groups.count("biased") == 10 and groups.count("unbiased") == 3


def test_trivia_extraction_and_alias_scoring():
    task = TriviaQA()
    gold = json.dumps(["Leonardo da Vinci", "da Vinci", "Leonardo"])
    assert task.extract("The painter was famous.\nAnswer: Leonardo da Vinci.") == "leonardo da vinci"
    assert task.score(task.extract("Answer: It was Leonardo, of course"), gold) == 1.0
    assert task.score(task.extract("Answer: Michelangelo"), gold) == 0.0
    assert task.extract("Paris") == "paris"  # a short bare reply is the answer
    assert task.extract('The answer to the question "How many sides?" is 3. Triangles have three.') == "3"
    assert task.extract("I believe the answer is the U.S. dollar, not the euro.") == "us dollar not euro"
    assert task.extract("Well, " + "many words " * 10) is None  # a long one without a marker is not
    assert task.score(None, gold) == 0.0


def test_trivia_metrics_split_biased_and_unbiased():
    task = TriviaQA()
    gold = json.dumps(["x"])
    m = task.metrics(["x", "y", "x"], [gold] * 3, ["biased", "biased", "unbiased"])
    assert m["accuracy"] == pytest.approx(2 / 3) and m["accuracy_biased"] == 0.5 and m["accuracy_unbiased"] == 1.0


# --- pairwise judge -------------------------------------------------------------------------


def test_pairwise_reads_plain_pairs_and_mtbench_judgments():
    pairs = Pairwise(data={"test": str(DATA / "pairwise/oasst2-test.jsonl")}).examples("test")
    assert len(pairs) == 16 and {e.answer for e in pairs} <= {"A", "B", "C"}
    same = Pairwise(data={"test": str(DATA / "pairwise/oasst2-test.parquet")}).examples("test")
    assert [e.id for e in same] == [e.id for e in pairs]
    mt = Pairwise(data={"test": str(DATA / "mtbench/human_judgments.jsonl")}).examples("test")
    assert len(mt) == 16 and len({e.id for e in mt}) == 16  # two judges of one pair: two inputs
    assert {e.group for e in mt} == {"turn1", "turn2"}
    turn2 = next(e for e in mt if e.group == "turn2")
    assert "(turn 1) user:" in turn2.fields["question_text"] and "(turn 2)" in turn2.fields["response_a"]
    only_first = Pairwise(data={"test": str(DATA / "mtbench/human_judgments.jsonl")}, turns=[1]).examples("test")
    assert len(only_first) == 12


def test_pairwise_verdict_extraction_and_swap_metrics():
    task = Pairwise()
    assert task.extract("Criteria... so [[B]]") == "B"
    assert task.extract("[[A]] at first, but finally [[C]]") == "C"
    assert task.extract("My verdict: A") == "A"
    assert task.extract("Both are fine.") is None
    m = task.metrics(["A", "B", "C", None], ["A", "A", "C", "B"], [None] * 4, perturbed=["A", "A", "C", "B"])
    assert m["agreement"] == 0.5 and m["inconsistent"] == 0.5  # B vs A, and an unparsed verdict


def test_pairwise_bad_winner_is_one_clear_line(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"question": "q", "response_a": "a", "response_b": "b", "winner": "left"}) + "\n")
    with pytest.raises(DataError, match=r"p.jsonl record 1: field 'winner' is 'left'"):
        Pairwise(data={"train": str(bad)}).examples("train")


# --- user task from a job file -------------------------------------------------------------


def test_user_task_with_choices():
    task = UserTask(data={"train": str(DATA / "custom/sentiment.jsonl")}, prompt_field="text",
                    answer_field="label", choices=["positive", "negative"])  # fmt: skip
    examples = task.examples("train")
    assert len(examples) == 40 and {e.answer for e in examples} == {"positive", "negative"}
    assert "one of: positive, negative" in examples[0].question
    assert task.extract("I'd say Positive... no: Answer: NEGATIVE") == "negative"
    assert task.extract("unclear") is None


def test_user_task_with_regex_and_nested_field(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"input": {"text": "2+2?"}, "gold": "4"}) + "\n")
    task = UserTask(data={"test": str(f)}, prompt_field="input.text", answer_field="gold", regex=r"result:\s*(\d+)")
    (e,) = task.examples("test")
    assert e.question.startswith("2+2?") and e.answer == "4"
    assert task.extract("result: 3 ... result: 4") == "4"


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(), "exactly one answer extractor"),
        (dict(regex="(", choices=None), "does not compile"),
        (dict(regex="x", choices=["a"]), "exactly one answer extractor"),
        (dict(choices=["a"], prompt_template="no placeholder"), "must contain {prompt}"),
    ],
)
def test_user_task_config_errors(settings, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        UserTask(prompt_field="text", **settings)


def test_user_task_missing_field_names_file_record_and_field(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"txt": "b"}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl record 2: no field 'text'"):
        UserTask(data={"train": str(f)}, prompt_field="text", choices=["a"]).examples("train")


# --- loaders --------------------------------------------------------------------------------


def test_loader_errors_are_one_line_naming_the_file(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="nowhere.jsonl: file not found"):
        read_records(str(tmp_path / "nowhere.jsonl"))
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(DataError, match=r"b.jsonl line 2: not valid JSON"):
        read_records(str(broken))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown data format .csv"):
        read_records(str(tmp_path / "x.csv"))
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        read_records(str(tmp_path / "bad.parquet"))
    monkeypatch.delenv("S2D_NO_SUCH_VAR", raising=False)
    with pytest.raises(DataError, match="S2D_NO_SUCH_VAR is not set"):
        read_records("$S2D_NO_SUCH_VAR/train.jsonl")
    with pytest.raises(DataError, match="task.data.test: no file given"):
        GSM8K(data={}).examples("test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="folder holds no"):
        read_records(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="no 'validation' split"):
        read_records(str(DATA / "triviaqa/dataset_dict"), "validation")


def test_loader_expands_variables_and_reads_parquet_folders(tmp_path, monkeypatch):
    pq.write_table(pa.table({"question": ["q"], "answer": ["x\n#### 3"]}), tmp_path / "part-0.parquet")
    monkeypatch.setenv("S2D_TEST_DATA", str(tmp_path))
    (e,) = GSM8K(data={"train": "$S2D_TEST_DATA"}).examples("train")
    assert e.answer == "3"


def test_limit_is_a_seeded_subset_in_file_order():
    path = str(DATA / "gsm8k/train.jsonl")
    full = GSM8K(data={"train": path}).examples("train")
    some = GSM8K(data={"train": path}, limit={"train": 10}).examples("train")
    assert len(some) == 10 and some == GSM8K(data={"train": path}, limit={"train": 10}).examples("train")
    positions = [full.index(e) for e in some]
    assert positions == sorted(positions)


# --- bad records: one line naming the file, the record and the field --------------------------


def _jsonl(path, *records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


TRIVIA_OK = {
    "prompt": [{"type": "human", "content": "Who wrote Hamlet? I think Marlowe."}],
    "base": {"question": "Who wrote Hamlet?", "answer": ["Shakespeare", "William Shakespeare"]},
    "metadata": {"prompt_template": "{question} I think the answer is {incorrect_answer}."},
}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"prompt": "Who wrote Hamlet?"}, r"record 2: field 'prompt' should be a list, not str"),
        ({"base": ["Shakespeare"]}, r"record 2: field 'base' should be an object, not list"),
        ({"base": {"question": "q", "answer": 7}}, r"record 2: field 'base.answer' should be a list of alias strings"),
        ({"metadata": {"prompt_template": ["x"]}}, r"record 2: field 'metadata.prompt_template' should be text"),
        ({"prompt": [{"type": "human", "content": {"text": "x"}}]}, r"record 2: field 'prompt' has no human message"),
    ],
)
def test_trivia_wrong_types_at_any_depth(tmp_path, change, message):
    path = _jsonl(tmp_path / "t.jsonl", TRIVIA_OK, {**TRIVIA_OK, **change})
    with pytest.raises(DataError, match=message):
        TriviaQA(data={"test": path}).examples("test")


def test_a_trivia_alias_given_as_a_string_is_one_alias(tmp_path):
    record = {**TRIVIA_OK, "base": {"question": "Who wrote Hamlet?", "answer": "Shakespeare"}}
    (e,) = TriviaQA(data={"test": _jsonl(tmp_path / "t.jsonl", record)}).examples("test")
    assert json.loads(e.answer) == ["Shakespeare"]


@pytest.mark.parametrize(
    "record, message",
    [
        ({"question": ["q"], "response_a": "a", "response_b": "b"}, r"record 1: field 'question' should be text, not list"),
        ({"turn": "two", "conversation_a": [], "conversation_b": []}, r"record 1: field 'turn' should be an integer"),
        ({"turn": 1, "conversation_a": "hi", "conversation_b": []}, r"record 1: field 'conversation_a' should be a list"),
        ({"turn": 1, "conversation_a": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}],
          "conversation_b": []}, r"record 1: field 'conversation_a' has a message whose content is not text"),
    ],
)  # fmt: skip
def test_pairwise_wrong_types(tmp_path, record, message):
    with pytest.raises(DataError, match=message):
        Pairwise(data={"train": _jsonl(tmp_path / "p.jsonl", record)}).examples("train")


def test_non_utf8_and_empty_files_are_one_line(tmp_path):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl line 2: not UTF-8 text"):
        UserTask(data={"train": str(latin)}, prompt_field="text", choices=["a"]).examples("train")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"empty.jsonl: the train split is empty"):
        UserTask(data={"train": str(empty)}, prompt_field="text", choices=["a"]).examples("train")


def test_user_task_ids_labels_and_duplicates(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", {"uid": "r1", "text": "a"}, {"uid": "r2", "text": "b", "label": "x"})
    task = UserTask(data={"train": path}, prompt_field="text", answer_field="label", id_field="uid", choices=["x"])
    first, second = task.examples("train")
    assert (first.id, first.answer) == ("train-r1", None)  # an unlabeled train record is fine
    assert (second.id, second.answer) == ("train-r2", "x")
    dup = _jsonl(tmp_path / "dup.jsonl", {"uid": "r1", "text": "a"}, {"uid": "r1", "text": "b"})
    with pytest.raises(DataError, match=r"dup.jsonl record 2: id 'r1' \(field 'uid'\) repeats record 1"):
        UserTask(data={"train": dup}, prompt_field="text", id_field="uid", choices=["x"]).examples("train")
