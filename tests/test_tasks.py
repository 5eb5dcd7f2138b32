"""Task generators: determinism, label correctness against slow references, chunk alignment, tokenizers, data/."""

from __future__ import annotations

import itertools
import json
import random
import re
import warnings
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer

from retrofit.evaluation import load_eval_set
from retrofit.recipes.schema import EvalSection
from retrofit.tasks import DATA_DIR, GENERATED_TASKS, IGNORE_INDEX, TASKS, get_task

QWEN_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "jet-nemotron"
SMALL_GSM = {"min_tokens": 120, "max_tokens": 400, "window": 64}
OPTIONS = {"rule110": {"steps_choices": [1, 2, 4, 8, 16, 32]}, "depo": {}, "gsm_infinite": SMALL_GSM}


def _take(iterator, n):
    return list(itertools.islice(iterator, n))


def _supervised_positions(example):
    return [i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX]


# ---------------------------------------------------------------- registry, determinism, common format


def test_registry():
    assert GENERATED_TASKS == ("rule110", "depo", "gsm_infinite")
    assert (*GENERATED_TASKS, "text", "qa", "chat") == TASKS
    with pytest.raises(ValueError, match=r"'nope'.*rule110, depo, gsm_infinite, text, qa, chat"):
        get_task("nope")
    with pytest.raises(ValueError):
        get_task("rule110", steps=0)
    with pytest.raises(ValueError):
        get_task("depo", max_nodes=76)
    with pytest.raises(ValueError):
        get_task("gsm_infinite", min_tokens=400, max_tokens=400)


@pytest.mark.parametrize("name", GENERATED_TASKS)
def test_streams_are_deterministic_and_split_apart(name):
    task = get_task(name, **OPTIONS[name])
    first = _take(task.stream(seed=3), 4)
    assert _take(get_task(name, **OPTIONS[name]).stream(seed=3, split="train"), 4) == first
    for other in (_take(task.stream(seed=3, split="eval"), 4), _take(task.stream(seed=4), 4)):
        assert all(a["input_ids"] != b["input_ids"] for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize("name", GENERATED_TASKS)
def test_example_format(name):
    task = get_task(name, **OPTIONS[name])
    pad = task.tokenizer.pad_token_id
    assert pad is not None
    for ex in _take(task.stream(seed=0), 20):
        assert set(ex) == {"input_ids", "labels", "attention_mask", "difficulty"}
        n = len(ex["input_ids"])
        assert len(ex["labels"]) == len(ex["attention_mask"]) == n <= task.seq_len
        if name != "gsm_infinite":
            assert n == task.seq_len
        for tok, label, mask in zip(ex["input_ids"], ex["labels"], ex["attention_mask"], strict=True):
            assert label in (IGNORE_INDEX, tok)
            assert mask == (tok != pad)
            assert mask or label == IGNORE_INDEX
        # The alignment rule: no supervised token is the first token of a chunk.
        positions = _supervised_positions(ex)
        assert positions and all(p % task.window != 0 for p in positions)


# ---------------------------------------------------------------- rule110


def _slow_rule110_first_cell(state: str, steps: int) -> str:
    n = len(state)
    for _ in range(steps):
        state = "".join(str((110 >> int(state[i - 1] + state[i] + state[(i + 1) % n], 2)) & 1) for i in range(n))
    return state[0]


def test_rule110_known_step():
    from retrofit.tasks.rule110 import first_cell_after

    # A lone live cell at index 1 makes cells 0 and 1 live after one step (Rule 110 grows to the left).
    assert first_cell_after("01" + "0" * 22, 1) == 1
    assert first_cell_after("001" + "0" * 21, 1) == 0
    assert first_cell_after("1" + "0" * 22 + "1", 1) == 1  # periodic: left neighbour of cell 0 is cell 23
    assert _slow_rule110_first_cell("01" + "0" * 22, 1) == "1"


def test_rule110_labels_and_layout():
    task = get_task("rule110", steps_choices=[1, 3, 8, 32])
    assert (task.window, task.seq_len, task.eval_difficulties) == (24, 101, [1, 3, 8, 32])
    seen = set()
    for ex in _take(task.stream(seed=1), 150):
        tokens = task.tokenizer.convert_ids_to_tokens(ex["input_ids"])
        assert set(tokens[:96]) <= {"0", "1"}
        assert tokens[96] == f"<t{ex['difficulty']}>" and 96 % task.window == 0  # the query opens the 5th chunk
        assert _supervised_positions(ex) == [97, 98, 99, 100]
        states = ["".join(tokens[24 * i : 24 * (i + 1)]) for i in range(4)]
        expected = [_slow_rule110_first_cell(s, ex["difficulty"]) for s in states]
        assert tokens[97:] == expected
        seen.add(ex["difficulty"])
    assert seen == {1, 3, 8, 32}
    for ex in _take(task.stream(seed=0, split="eval", difficulty=8), 5):
        assert ex["difficulty"] == 8
    assert get_task("rule110").eval_difficulties == [32]


# ---------------------------------------------------------------- depo


def test_depo_labels_and_layout():
    task = get_task("depo")
    assert (task.window, task.seq_len, task.eval_difficulties) == (75, 340, [1, 2, 4, 8, 16])
    pad = task.tokenizer.pad_token_id
    for ex in _take(task.stream(seed=2), 100):
        tokens = task.tokenizer.convert_ids_to_tokens(ex["input_ids"])
        context = [t for t, m in zip(tokens[:300], ex["attention_mask"][:300], strict=True) if m]
        assert all(i == pad for i in ex["input_ids"][: 300 - len(context)])  # left padding only
        succ = {}
        for src, arrow, dst, comma in zip(*[iter(context)] * 4, strict=True):
            assert (arrow, comma) == ("->", ",") and src not in succ
            succ[src] = dst
        # The edges form one directed cycle through every node.
        node, visited = next(iter(succ)), set()
        for _ in range(len(succ)):
            visited.add(node)
            node = succ[node]
        assert visited == set(succ) and node == next(iter(succ)) and 3 <= len(succ) <= 75
        qas = [tokens[p : p + 4] for p in range(300, 340, 4)]  # position 300 opens the 5th chunk
        assert 300 % task.window == 0 and ex["attention_mask"][299] == 1
        assert _supervised_positions(ex) == list(range(303, 340, 4))
        hops = []
        for sep, hop, start, answer in qas:
            assert sep == "?"
            k = int(hop[1:])
            node = start
            for _ in range(k):
                node = succ[node]
            assert answer == node
            hops.append(k)
        assert ex["difficulty"] == max(hops) and all(1 <= k <= 16 for k in hops)
    for ex in _take(task.stream(seed=2, split="eval", difficulty=4), 5):
        tokens = task.tokenizer.convert_ids_to_tokens(ex["input_ids"])
        assert ex["difficulty"] == 4 and {tokens[p] for p in range(301, 340, 4)} == {"h4"}


def test_depo_with_one_context_window_writes_the_cycle_there_and_asks_in_the_next():
    task = get_task("depo", max_nodes=18, num_queries=1, context_windows=1)
    assert (task.seq_len, task.window) == (79, 75)
    record = {"difficulty": 2, "edges": [[7, 3], [3, 9], [9, 7]], "queries": [[2, 3, 7]]}
    ex = task.encode(record)
    tokens = task.tokenizer.convert_ids_to_tokens(ex["input_ids"])
    cycle = ["n7", "->", "n3", ",", "n3", "->", "n9", ",", "n9", "->", "n7", ","]
    assert tokens == [task.tokenizer.pad_token] * 63 + cycle + ["?", "h2", "n3", "n7"]
    assert ex["attention_mask"] == [0] * 63 + [1] * 16 and _supervised_positions(ex) == [78]
    with pytest.raises(ValueError, match="19 edges does not fit 1 context window"):
        task.encode({**record, "edges": [[i, i + 1] for i in range(19)]})
    with pytest.raises(ValueError, match=r"max_nodes <= 18 \(what 1 context window"):
        get_task("depo", context_windows=1)
    with pytest.raises(ValueError, match="context_windows must be in"):
        get_task("depo", context_windows=5)


# ---------------------------------------------------------------- gsm_infinite

_DEFS = [
    (r"the number of (.+) equals the sum of the number of (.+) and the number of (.+)", lambda y, z: y + z),
    (r"the number of (.+) equals the difference of the number of (.+) and the number of (.+)", lambda y, z: y - z),
    (r"the number of (.+) equals (\d+) more than the number of (.+)", lambda n, y: n + y),
    (r"the number of (.+) equals (\d+) less than the number of (.+)", lambda n, y: y - n),
    (r"the number of (.+) equals (\d+) times the number of (.+)", lambda n, y: n * y),
    (r"the number of (.+) equals (\d+)", None),
]


def _solve_gsm(text: str) -> tuple[int, int]:
    """Re-evaluate a problem from its text: (value of the asked quantity, operations it depends on)."""
    text = re.sub(r"\s*([.?:])", r" \1", text.lower()).strip()
    question, _, context = text.partition(" ? ")
    target = re.fullmatch(r"question : what is the number of (.+)", question).group(1)
    defs = {}
    for sentence in context.split(" . "):
        sentence = sentence.removesuffix(" .")
        for pattern, op in _DEFS:
            m = re.fullmatch(pattern, sentence)
            if m:
                name, *args = m.groups()
                assert name not in defs, f"{name} defined twice"
                for arg in args:  # references point back to earlier sentences
                    assert arg.isdigit() or arg in defs, f"{arg} used before its definition"
                defs[name] = (op, args)
                break
        else:
            raise AssertionError(f"unparsed sentence {sentence!r}")

    def value(name):
        op, args = defs[name]
        if op is None:
            return int(args[0])
        vals = [int(a) if a.isdigit() else value(a) for a in args]
        result = op(*vals)
        assert 0 <= result <= 99
        return result

    def needed_ops(name, seen):
        if name in seen:
            return 0
        seen.add(name)
        op, args = defs[name]
        return (op is not None) + sum(needed_ops(a, seen) for a in args if not a.isdigit())

    return value(target), needed_ops(target, set())


def _check_gsm_example(task, ex):
    tok = task.tokenizer
    ids = [i for i, m in zip(ex["input_ids"], ex["attention_mask"], strict=True) if m]
    positions = _supervised_positions(ex)
    answer_text = tok.decode([ex["input_ids"][p] for p in positions], skip_special_tokens=True)
    assert ex["input_ids"][positions[-1]] == tok.eos_token_id and positions[-1] == len(ex["input_ids"]) - 1
    sep = positions[0] - len(tok(" Answer:", add_special_tokens=False)["input_ids"])
    assert tok.decode(ex["input_ids"][sep : positions[0]]).replace(" ", "").lower() == "answer:"
    value, ops = _solve_gsm(tok.decode(ex["input_ids"][:sep], skip_special_tokens=True))
    assert int(answer_text) == value
    assert ops == ex["difficulty"]
    # The separator and the whole answer lie in one chunk.
    assert sep // task.window == positions[-1] // task.window
    return len(ids)


def test_gsm_labels_difficulty_and_alignment():
    task = get_task("gsm_infinite", **SMALL_GSM)
    assert task.eval_difficulties == list(range(1, 9))
    padded, difficulties = 0, set()
    for ex in _take(task.stream(seed=5), 60):
        length = _check_gsm_example(task, ex)
        assert length >= 120 and len(ex["input_ids"]) <= 400
        padded += ex["attention_mask"][0] == 0
        difficulties.add(ex["difficulty"])
    assert padded > 0  # some answers would have straddled a 64-token chunk boundary
    assert difficulties == set(range(1, 9))
    for ex in _take(task.stream(seed=0, split="eval", difficulty=6), 3):
        assert _check_gsm_example(task, ex) and ex["difficulty"] == 6


def test_gsm_default_lengths():
    task = get_task("gsm_infinite")
    assert (task.window, task.seq_len) == (2000, 3300)
    for ex in _take(task.stream(seed=0), 4):
        length = _check_gsm_example(task, ex)
        assert length >= 2000 and len(ex["input_ids"]) <= 3300


@pytest.mark.skipif(not QWEN_TOKENIZER.exists(), reason="needs the Qwen2 tokenizer fixture")
def test_gsm_with_model_tokenizer():
    task = get_task("gsm_infinite", tokenizer=str(QWEN_TOKENIZER), **SMALL_GSM)
    assert task.tokenizer.vocab_size > 100_000
    for ex in _take(task.stream(seed=1), 10):
        _check_gsm_example(task, ex)
    # Frozen records re-encode with another tokenizer.
    frozen = task.load_frozen_eval()
    assert len(frozen) == 64
    _check_gsm_example(task, frozen[0])


# ---------------------------------------------------------------- tokenizers, datasets, frozen files, scoring


@pytest.mark.parametrize("name", GENERATED_TASKS)
def test_tokenizer_round_trip(name, tmp_path):
    task = get_task(name, **OPTIONS[name])
    task.tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == task.tokenizer.get_vocab()
    assert loaded.pad_token_id == task.tokenizer.pad_token_id
    ex = next(task.stream(seed=0))
    text = loaded.decode(ex["input_ids"])
    assert loaded(text, add_special_tokens=False)["input_ids"] == ex["input_ids"]
    saved = AutoTokenizer.from_pretrained(DATA_DIR / "tokenizers" / name)  # data/ is up to date
    assert saved.get_vocab() == task.tokenizer.get_vocab()


@pytest.mark.parametrize("name", GENERATED_TASKS)
def test_frozen_eval_matches_generator(name):
    spec_file = json.loads((DATA_DIR / name / "spec.json").read_text())
    frozen = get_task(name).frozen_eval
    assert spec_file["options"] == frozen.options and spec_file["num_per_difficulty"] == frozen.num_per_difficulty
    task = get_task(name, **frozen.options)
    with (DATA_DIR / name / "eval.jsonl").open() as f:
        records = [json.loads(line) for line in f]
    assert records == task.eval_records(frozen.num_per_difficulty, frozen.seed)
    loaded = task.load_frozen_eval()
    assert len(loaded) == len(task.eval_difficulties) * frozen.num_per_difficulty
    assert sorted(set(loaded["difficulty"])) == task.eval_difficulties
    fresh = task.eval_dataset(frozen.num_per_difficulty, frozen.seed)
    assert loaded[:3] == fresh[:3]


def test_frozen_eval_keeps_the_trained_difficulties():
    loaded = get_task("rule110").load_frozen_eval()
    assert set(loaded["difficulty"]) == {32} and len(loaded) == 256


@pytest.mark.parametrize("name", GENERATED_TASKS)
def test_datasets_conversion(name):
    task = get_task(name, **OPTIONS[name])
    expected = _take(task.stream(seed=7), 3)
    ds = task.dataset(seed=7, num_examples=3)
    assert isinstance(ds, datasets.Dataset) and len(ds) == 3
    assert [dict(row) for row in ds] == expected
    it = task.iterable_dataset(seed=7)
    assert isinstance(it, datasets.IterableDataset)
    assert [dict(row) for row in it.take(3)] == expected


def test_score():
    task = get_task("depo")
    ex = next(task.stream(seed=0, split="eval", difficulty=2))
    perfect = list(ex["input_ids"])
    assert task.score(ex, perfect) and task.score_answers(ex, perfect) == [True] * 10
    assert task.score(ex, [*perfect[1:], 0], logits_argmax=True)  # argmax entry i predicts token i + 1
    wrong = list(perfect)
    wrong[303] = perfect[307]
    assert not task.score(ex, wrong) and task.score_answers(ex, wrong) == [False] + [True] * 9
    wrong = list(perfect)
    wrong[302] = perfect[303]  # an unsupervised position does not count
    assert task.score(ex, wrong)
    r110 = get_task("rule110")
    ex = next(r110.stream(seed=0))
    wrong = list(ex["input_ids"])
    wrong[100] = 5 - wrong[100]  # "0" <-> "1" (ids 2 and 3)
    assert r110.answer_spans(ex) == [(97, 101)] and not r110.score(ex, wrong)
    with pytest.raises(ValueError):
        r110.score(ex, wrong[:-1])


def test_an_eval_set_that_fits_one_window_is_flagged():
    """The frozen GSM-Infinite set (300-500 tokens) never evicts at the paper's L=2000: that evaluation would not
    measure sleep, so it warns; at a window shorter than the problems it does not."""
    task = get_task("gsm_infinite")
    with pytest.warns(UserWarning, match="every evaluation example fits in one window"):
        load_eval_set(EvalSection(source="frozen"), task, window=2000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_eval_set(EvalSection(source="frozen"), task, window=128)


def _write_records(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _first_frozen(name):
    with (DATA_DIR / name / "eval.jsonl").open() as f:
        return json.loads(f.readline())


def _with(record, path, value):
    """A copy of `record` with the item at `path` (keys and indices) set to `value`; `value=None` removes it."""
    record = json.loads(json.dumps(record))
    *parents, last = path
    node = record
    for key in parents:
        node = node[key]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return record


def _absent_node(record):
    """A node id that is not in the Depo record's cycle."""
    return min(set(range(100)) - {src for src, _ in record["edges"]})


BAD_RECORDS = {
    # case: (task, where the second record is changed, the new value (None: removed), what the error says)
    "depo node outside the vocabulary": (
        "depo",
        ("edges", 2, 0),
        150,
        "edges[2][0] (a node) must be an integer in [0, 99], got 150",
    ),
    "depo node given as true": ("depo", ("edges", 2, 0), True, "edges[2][0] (a node) must be an integer"),
    "depo negative answer node": (
        "depo",
        ("queries", 0, 2),
        -1,
        "queries[0][2] (answer node) must be an integer in [0, 99], got -1",
    ),
    "depo hop count too large": ("depo", ("queries", 3, 0), 33, "queries[3][0] (hops) must be an integer in [1, 32]"),
    "depo difficulty not the largest hop count": (
        "depo",
        ("difficulty",),
        3,
        "difficulty must be the largest hop count of the queries, got 3",
    ),
    "gsm negative answer (was encoded as 97)": (
        "gsm_infinite",
        ("answer",),
        -3,
        "answer must be an integer in [0, 99], got -3",
    ),
    "gsm answer as a string": ("gsm_infinite", ("answer",), "7", "answer must be an integer in [0, 99], got '7'"),
    "rule110 state with another character": (
        "rule110",
        ("states", 1),
        "2" * 24,
        "states must be 4 strings of 24 '0'/'1' characters",
    ),
    "rule110 missing answer": ("rule110", ("answer",), None, "no field 'answer'"),
    "rule110 wrong answer": ("rule110", ("answer",), "2222", "answer must be the first cells after"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_frozen_file_with_a_bad_record_names_file_line_and_field(case, tmp_path):
    name, where, value, expected = BAD_RECORDS[case]
    good = _first_frozen(name)
    task = get_task(name, **get_task(name).frozen_eval.options)
    path = _write_records(tmp_path / "eval.jsonl", [good, _with(good, where, value)])
    with pytest.raises(ValueError) as raised:
        task.load_frozen_eval(path)
    assert str(raised.value).startswith(f"{path}, line 2: {expected}"), raised.value
    assert len(task.load_frozen_eval(_write_records(tmp_path / "ok.jsonl", [good, good]))) == 2


def test_depo_record_with_a_wrong_answer_is_refused(tmp_path):
    good = _first_frozen("depo")
    hops, start, answer = good["queries"][0]
    wrong = _absent_node(good)
    path = _write_records(tmp_path / "eval.jsonl", [_with(good, ("queries", 0, 2), wrong)])
    expected = f"line 1: queries[0][2]: the node {hops} edges after {start} is {answer}, not {wrong}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        get_task("depo").load_frozen_eval(path)


def test_depo_query_from_a_node_outside_the_cycle_is_refused(tmp_path):
    good = _first_frozen("depo")
    outside = _absent_node(good)
    path = _write_records(tmp_path / "eval.jsonl", [_with(good, ("queries", 0, 1), outside)])
    with pytest.raises(ValueError, match=re.escape(f"queries[0]: node {outside} has no outgoing edge")):
        get_task("depo").load_frozen_eval(path)


def test_frozen_file_line_that_is_not_an_object_is_refused(tmp_path):
    path = _write_records(tmp_path / "eval.jsonl", ["[1, 2]"])
    with pytest.raises(ValueError, match="line 1: a record is a JSON object, got list"):
        get_task("depo").load_frozen_eval(path)


CHECKED_SETTINGS = [
    ("depo", {}),
    ("depo", {"context_windows": 1, "max_nodes": 18}),
    ("depo", {"max_hops": 32, "num_queries": 18, "min_nodes": 2}),
    ("rule110", {"steps_choices": [1, 5, 128]}),
    ("gsm_infinite", SMALL_GSM),
]


@pytest.mark.parametrize(("name", "options"), CHECKED_SETTINGS)
def test_generated_records_pass_the_record_check(name, options):
    task = get_task(name, **options)
    rng = random.Random(0)
    records = [task.sample(rng) for _ in range(20)] + [task.sample(rng, d) for d in task.eval_difficulties]
    problems = []
    for record in records:
        try:
            task.check_record(record)
        except ValueError as exc:
            problems.append(str(exc))
    assert problems == []


def test_frozen_file_that_is_not_json_names_the_line(tmp_path):
    path = _write_records(tmp_path / "eval.jsonl", [_first_frozen("depo"), "", "{not json"])
    with pytest.raises(ValueError, match=r"eval.jsonl, line 3: Expecting property name"):
        get_task("depo").load_frozen_eval(path)


def test_gsm_infinite_refuses_a_max_tokens_its_problems_would_not_fit_and_redraws_chains_that_do_not():
    """Refused when the task is built (a recipe's `validate`), naming the least max_tokens it takes; from there on,
    a chain too long to fit is drawn again, so no problem stops training."""
    with pytest.raises(ValueError, match=r"max_tokens=200 is too short for 8-operation problems") as info:
        get_task("gsm_infinite", min_tokens=1, max_tokens=200, window=64)
    least = int(re.search(r"raise it to (\d+)", str(info.value)).group(1))
    task = get_task("gsm_infinite", min_tokens=1, max_tokens=least, window=64)
    lengths = [len(task.example(random.Random(seed), 8)["input_ids"]) for seed in range(300)]
    assert max(lengths) <= least
