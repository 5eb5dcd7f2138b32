"""Tasks over a user's data (`text`, `qa`, `chat`): examples held to hand-built token sequences, chat masks to the
template's own rendering, the data order to its rules, resume in mid-epoch to an uninterrupted run, the chunked head
loss to the plain one in float64, and every malformed input to one line naming the file, the row and the field.

The tokenizers are local: a word-level one built here (one token per word or punctuation run, lowercased, with EOS),
and the Qwen2 fixture (../shared/fixtures) for the chat template.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from retrofit import SleepConfig, apply_sleep
from retrofit.cli import main
from retrofit.engine import next_token_targets
from retrofit.evaluation import evaluate
from retrofit.ops.cross_entropy import head_cross_entropy
from retrofit.tasks import IGNORE_INDEX, build_word_tokenizer, get_task
from retrofit.training.data import collate
from tests.helpers import tiny_hybrid

REPO = Path(__file__).resolve().parents[1]
QWEN_TOKENIZER = REPO.parent / "shared" / "fixtures" / "jet-nemotron"
WORDS = [
    "question",
    "what",
    "is",
    "the",
    "code",
    "of",
    "box",
    "red",
    "blue",
    "green",
    "answer",
    "a",
    "b",
    "c",
    "d",
    "e",
    "f",
    "g",
    "h",
    "1",
    "2",
    "3",
    "4",
    "5",
    "6",
    "7",
    "8",
    "9",
    ":",
    "?",
    ".",
]


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    build_word_tokenizer(WORDS, lowercase=True, split_punctuation=True, eos=True).save_pretrained(path)
    return path


def ids(tokenizer_path: Path, words: str) -> list[int]:
    """Token ids by vocabulary lookup, word by word: independent of the task's tokenization."""
    vocab = json.loads((tokenizer_path / "tokenizer.json").read_text())["model"]["vocab"]
    return [vocab[w] for w in words.split()]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def qa_records(count: int = 40) -> list[dict]:
    colors = ["red", "blue", "green"]
    return [
        {
            "context": " ".join(
                f"the code of box {c} {i % 9 + 1} is {(i + j) % 9 + 1} ." for j, c in enumerate(colors)
            ),
            "question": f"what is the code of box red {i % 9 + 1} ?",
            "answer": str((i % 9) + 1),
            "level": i % 3,
        }
        for i in range(count)
    ]


# ---------------------------------------------------------------------------------------------- examples


@pytest.mark.parametrize("position", ["before", "after"])
def test_a_qa_example_supervises_the_answer_and_its_eos_only(word_tokenizer, tmp_path, position):
    record = {"context": "the code of box red is 7 .", "question": "what is the code ?", "answer": "7"}
    data = write_jsonl(tmp_path / "qa.jsonl", [record] * 10)
    task = get_task("qa", path=str(data), tokenizer=str(word_tokenizer), question_position=position, seq_len=64)
    question, context = "question : what is the code ?", "the code of box red is 7 ."
    prompt = f"{question} {context}" if position == "before" else f"{context} {question}"
    want_prompt, want_answer = ids(word_tokenizer, f"{prompt} answer :"), ids(word_tokenizer, "7 <eos>")
    example = task.train_set[0]
    assert example["input_ids"] == want_prompt + want_answer
    assert example["labels"] == [IGNORE_INDEX] * len(want_prompt) + want_answer
    assert example["attention_mask"] == [1] * len(example["input_ids"])


def test_text_documents_are_cut_or_joined_into_sequences(word_tokenizer, tmp_path):
    docs = ["a b c d e f g", "h 1 2", "3 4 5 6 7"]
    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs] * 4)
    options = {"path": str(data), "tokenizer": str(word_tokenizer), "seq_len": 4, "eval_fraction": 0.25}

    cut = get_task("text", **options)
    pieces = sorted(tuple(x) for x in [*cut.train_set["input_ids"], *cut.eval_set["input_ids"]])
    want = []
    for doc in docs:
        tokens = ids(word_tokenizer, doc + " <eos>")
        want += [tuple(tokens[i : i + 4]) for i in range(0, len(tokens), 4)]
    assert pieces == sorted(want * 4)
    assert all(x["labels"] == x["input_ids"] for x in cut.train_set)

    joined = get_task("text", **options, join_documents=True)
    documents = []
    for split in (joined.train_set, joined.eval_set):
        rows = list(split["input_ids"])
        assert all(len(r) == 4 for r in rows[:-1]) and 0 < len(rows[-1]) <= 4  # full sequences but the last
        assert list(split["labels"]) == rows
        documents += _split([t for r in rows for t in r], ids(word_tokenizer, "<eos>")[0])
    assert sorted(documents) == sorted([tuple(ids(word_tokenizer, d)) for d in docs] * 4)  # one stream, EOS between


def _split(stream: list[int], eos: int) -> list[tuple[int, ...]]:
    """The documents of a joined stream (each ends with EOS)."""
    docs, current = [], []
    for token in stream:
        if token == eos:
            docs.append(tuple(current))
            current = []
        else:
            current.append(token)
    assert not current
    return docs


needs_qwen_tokenizer = pytest.mark.skipif(
    not QWEN_TOKENIZER.is_dir(), reason=f"{QWEN_TOKENIZER} is absent (the fixtures live in ../shared/fixtures)"
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a color."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "Blue, and green."},
]


@needs_qwen_tokenizer
def test_a_chat_example_supervises_each_assistant_turn_through_its_end_token(tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 10)
    task = get_task("chat", path=str(data), tokenizer=str(QWEN_TOKENIZER), seq_len=256)
    example = task.train_set[0]
    tokenizer = task.tokenizer
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert tokenizer.decode(example["input_ids"]) == rendered
    runs, current = [], []  # the supervised runs of tokens, as text
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    runs += [tokenizer.decode(current)] if current else []
    # Qwen's template closes a turn with "<|im_end|>\n"; the assistant header is the prompt, not the answer.
    assert runs == ["Red.<|im_end|>\n", "Blue, and green.<|im_end|>\n"]


# ---------------------------------------------------------------------------------------------- order and padding


def test_each_epoch_is_a_seeded_permutation_of_whole_batches_grouped_by_length(word_tokenizer, tmp_path):
    records = [{"text": " ".join(["a"] * n)} for n in range(1, 61)]
    data = write_jsonl(tmp_path / "docs.jsonl", records)
    options = {"path": str(data), "tokenizer": str(word_tokenizer), "seq_len": 64, "eval_fraction": 0.1}
    grouped, plain = get_task("text", **options), get_task("text", **options, group_by_length=False)
    n = len(grouped.train_set)  # 54 examples: 6 batches of 8 per epoch, 6 left out of each epoch
    for task in (grouped, plain):
        first, second = task.epoch_order(0, 0, 8), task.epoch_order(0, 1, 8)
        assert len(first) == len(second) == n // 8 * 8
        assert len(set(first)) == len(first) and first != second
        assert task.epoch_order(0, 0, 8) == first and task.epoch_order(1, 0, 8) != first  # seeded
        step_9 = [task.train_example(0, 9, i, 8)["input_ids"] for i in range(8)]  # step 9 is epoch 1's fourth
        assert step_9 == [task.train_set[r]["input_ids"] for r in second[24:32]]
    lengths = {r: len(x) for r, x in enumerate(grouped.train_set["input_ids"])}
    batch = [lengths[r] for r in grouped.epoch_order(0, 0, 8)[:8]]
    assert max(batch) - min(batch) < 20  # neighbours in length (the documents span 2 to 61 tokens)
    assert grouped.padding_fraction(0, 8, 4) < plain.padding_fraction(0, 8, 4) / 4


@pytest.mark.parametrize("sleep_on", ["every_chunk", "context_only"])
def test_a_qa_example_has_the_same_loss_alone_and_in_a_padded_mixed_batch(word_tokenizer, tmp_path, sleep_on):
    """The other example's chunks carry its answer where this one has padding: under `context_only` they wake
    where this one would only sleep, which must not change this one's loss."""
    data = write_jsonl(tmp_path / "qa.jsonl", qa_records())
    task = get_task("qa", path=str(data), tokenizer=str(word_tokenizer), seq_len=64)
    short, long = sorted(task.train_set, key=lambda x: len(x["input_ids"]))[:: len(task.train_set) - 1]
    # Three records back to back after 10 unlabelled tokens: no answer in the chunk where the short one's lies.
    long = {key: value[:10] * (key != "labels") + value * 3 for key, value in long.items() if key != "difficulty"}
    long["labels"] = [IGNORE_INDEX] * 10 + long["labels"]
    model = apply_sleep(
        tiny_hybrid(vocab_size=len(task.tokenizer)), SleepConfig(window=16, passes=2, sleep_on=sleep_on)
    )
    pad = task.tokenizer.pad_token_id

    def losses(batch: dict) -> torch.Tensor:
        logits = model(**batch, return_logits=True).logits
        targets = next_token_targets(batch["labels"], batch["attention_mask"].bool())
        token = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
        return token.sum(1) / (targets != IGNORE_INDEX).sum(1)

    def summed_training_loss(examples: list[dict]) -> torch.Tensor:  # the training path: no logits returned
        batch = collate(examples, pad)
        count = (next_token_targets(batch["labels"], batch["attention_mask"].bool()) != IGNORE_INDEX).sum()
        return model(**batch).loss * count

    with torch.no_grad():
        alone = losses(collate([short], pad))[0]
        mixed = losses(collate([long, short], pad))[1]
        apart = summed_training_loss([long]) + summed_training_loss([short])
        together = summed_training_loss([long, short])
    assert len(long["input_ids"]) > 2 * len(short["input_ids"])
    torch.testing.assert_close(mixed, alone, rtol=0, atol=1e-12)
    torch.testing.assert_close(together, apart, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------- training runs


TINY_MODEL = {"model_type": "sleep_hybrid", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 4,
              "num_attention_heads": 2, "linear_num_heads": 2, "linear_head_dim": 8}  # fmt: skip
SHORT_RUN = {"max_steps": 10, "batch_size": 8, "micro_batch_size": 4, "checkpoint_every": 3, "keep_checkpoints": 10,
             "log_every": 1}  # fmt: skip


def data_recipe(tmp_path: Path, name: str, task: dict, tokenizer: Path, **sections) -> Path:
    """A tiny hybrid on a data task, seconds per run: constant LR, a checkpoint every 3 steps, all kept."""
    data = {
        "output_dir": str(tmp_path / name),
        "seed": 0,
        "task": {"name": task.pop("name"), "options": {"tokenizer": str(tokenizer), **task}},
        "model": {"config": dict(TINY_MODEL)},
        "sleep": {"window": 16, "passes": 2, "sleep_on": "context_only"},
        "optimizer": {"name": "adamw", "adamw": {"lr": 3e-3}, "schedule": "constant"},
        "train": dict(SHORT_RUN),
        "eval": {"every_steps": 0, "batch_size": 8},
    }
    data.update(sections)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_resuming_in_mid_epoch_equals_the_uninterrupted_run_bitwise(word_tokenizer, tmp_path, capsys):
    """36 training examples make 4 steps of 8 per epoch: resuming at step 6 restarts in the middle of epoch 2."""
    data = write_jsonl(tmp_path / "qa.jsonl", qa_records())
    recipe = data_recipe(tmp_path, "run", {"name": "qa", "path": str(data), "seq_len": 64}, word_tokenizer)
    assert main(["train", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "36 training and 4 held-out examples; 4 steps per epoch; padding" in out
    run = tmp_path / "run"
    whole = load_file(run / "model" / "model.safetensors")
    assert main(["train", str(recipe), "--resume", str(run / "checkpoints" / "step_000006"), "--overwrite"]) == 0
    resumed = load_file(run / "model" / "model.safetensors")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    results = json.loads((run / "results.json").read_text())
    assert [w["window"] for w in results["windows"]] == [3] and results["window_length"] == 16  # answers: window 3


def test_validate_dry_run_passes_on_each_data_task_with_local_files(word_tokenizer, tmp_path, capsys):
    qa = write_jsonl(tmp_path / "qa.jsonl", qa_records())
    folder = tmp_path / "docs"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"body": "a b c d e f g h " * 4}] * 20)
    (folder / "b.csv").write_text("body\n" + "1 2 3 4 5\n" * 20)
    tasks = [
        {"name": "qa", "path": str(qa), "seq_len": 64, "difficulty_field": "level", "question_position": "after"},
        {"name": "text", "path": str(folder), "seq_len": 32, "text_field": "body", "join_documents": True},
    ]
    if QWEN_TOKENIZER.is_dir():
        chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 20)
        tasks.append({"name": "chat", "path": str(chat), "seq_len": 96, "tokenizer": str(QWEN_TOKENIZER)})
    for i, task in enumerate(tasks):
        tokenizer = Path(task.pop("tokenizer", word_tokenizer))
        recipe = data_recipe(tmp_path, f"r{i}", task, tokenizer)
        assert main(["validate", str(recipe), "--dry-run"]) == 0, capsys.readouterr().err
        assert "one optimizer step on 2 examples" in capsys.readouterr().out


def test_evaluation_reports_the_loss_of_each_window(word_tokenizer, tmp_path):
    """`evaluate`'s loss by window against a direct computation from the logits of each example alone."""
    docs = [{"text": " ".join("abcdefgh"[(i * j) % 8] for j in range(5 + 4 * i))} for i in range(20)]
    task = get_task("text", path=str(write_jsonl(tmp_path / "d.jsonl", docs)), tokenizer=str(word_tokenizer),
                    seq_len=48, eval_fraction=0.25)  # fmt: skip
    model = apply_sleep(tiny_hybrid(vocab_size=len(task.tokenizer)), SleepConfig(window=8, passes=2))
    from accelerate import Accelerator

    result = evaluate(model, task.held_out(), task=task, step=0, batch_size=3, accelerator=Accelerator(cpu=True),
                      window=8)  # fmt: skip
    sums: dict[int, list[float]] = {}
    with torch.no_grad():
        for example in task.held_out():
            ids = torch.tensor([example["input_ids"]])
            logits = model(ids, return_logits=True).logits[0]
            for t in range(ids.shape[1] - 1):
                loss = F.cross_entropy(logits[t], ids[0, t + 1]).item()
                sums.setdefault((t + 1) // 8 + 1, []).append(loss)
    assert [w.window for w in result.windows] == sorted(sums)
    for w in result.windows:
        assert w.tokens == len(sums[w.window])
        assert w.loss == pytest.approx(sum(sums[w.window]) / w.tokens, rel=1e-6)  # evaluate takes float32 logits
    assert not result.exact_match


# ---------------------------------------------------------------------------------------------- head loss


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_the_chunked_head_loss_equals_the_plain_one_and_its_gradients_in_float64(rows):
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(12, dtype=torch.float64)
    head = torch.nn.Linear(12, 50, bias=False, dtype=torch.float64)
    hidden = torch.randn(23, 12, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    params = [hidden, norm.weight, norm.bias, head.weight]

    def apply(x: torch.Tensor) -> torch.Tensor:
        return head(norm(x))

    plain = F.cross_entropy(apply(hidden), targets, reduction="sum")
    want = torch.autograd.grad(plain, params)
    chunked = head_cross_entropy(apply, hidden, targets, rows=rows)
    got = torch.autograd.grad(chunked, params)
    torch.testing.assert_close(chunked, plain, rtol=1e-12, atol=0)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------- errors

GOOD = {"context": "the code of box red is 7 .", "question": "what is the code ?", "answer": "7"}
BROKEN = {  # the third line of a file of 10 records, and the error it must give
    "not JSON": ('{"context": "a", "question": "b"', r"qa\.jsonl, line 3: not valid JSON"),
    "missing field": (
        json.dumps({"context": "a", "question": "b"}),
        r"qa\.jsonl, row 3: no field 'answer' \(task\.options\.answer_field\)",
    ),
    "empty answer": (json.dumps({**GOOD, "answer": " "}), r"qa\.jsonl, row 3: field 'answer' is empty"),
    "not a string": (
        json.dumps({**GOOD, "question": 5}),
        r"qa\.jsonl, line 3: field 'question' is a int, but a str in earlier records",
    ),
    "too long": (
        json.dumps({**GOOD, "context": "a b " * 40}),
        r"qa\.jsonl, row 3: the example is \d+ tokens, longer than seq_len 64",
    ),
}


@pytest.mark.parametrize("fault", BROKEN)
def test_a_malformed_qa_file_exits_2_with_one_line_naming_the_file_the_row_and_the_field(
    fault, word_tokenizer, tmp_path, capsys
):
    line, message = BROKEN[fault]
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n" + line + "\n" + json.dumps(GOOD) + "\n" * 8)
    recipe = data_recipe(tmp_path, "bad", {"name": "qa", "path": str(data), "seq_len": 64}, word_tokenizer)
    assert main(["validate", str(recipe)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and re.search(message, errors[0]), errors
    assert "Traceback" not in errors[0]


@needs_qwen_tokenizer
def test_a_chat_without_an_assistant_turn_or_a_tokenizer_without_a_template_is_one_line(
    word_tokenizer, tmp_path, capsys
):
    lonely = [{"role": "user", "content": "Hello?"}]
    data = write_jsonl(
        tmp_path / "chat.jsonl", [{"messages": CONVERSATION}, {"messages": lonely}] + [{"messages": CONVERSATION}] * 8
    )
    recipe = data_recipe(tmp_path, "chat", {"name": "chat", "path": str(data), "seq_len": 96}, QWEN_TOKENIZER)
    assert main(["validate", str(recipe)]) == 2
    assert re.search(r"chat\.jsonl, row 2: field 'messages' has no assistant turn", capsys.readouterr().err)
    recipe = data_recipe(tmp_path, "chat2", {"name": "chat", "path": str(data), "seq_len": 96}, word_tokenizer)
    assert main(["validate", str(recipe)]) == 2
    assert "has no chat template" in capsys.readouterr().err


ISSUE_RECIPE = """\
description: my data
output_dir: {output_dir}
seed: 0
task:
  name: qa                      # text | qa | chat
  options:
    path: data/examples/long_qa.jsonl   # a file, a folder, or a Hub dataset name
    eval_fraction: 0.1          # or eval_split: test
    context_field: context      # text: field; chat: messages_field
    question_field: question
    answer_field: answer
    difficulty_field: difficulty
    question_position: before
    seq_len: 256
    tokenizer: ../shared/fixtures/jet-nemotron   # default: the model's (model.pretrained)
model:
  config: {{model_type: sleep_hybrid, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 4,
           num_attention_heads: 2, linear_num_heads: 2, linear_head_dim: 32}}
sleep: {{window: 64, passes: 2}}
optimizer: {{name: adamw, adamw: {{lr: 1.0e-3}}}}
train: {{max_steps: 2, batch_size: 4}}
eval: {{every_steps: 1, batch_size: 4}}
"""


@needs_qwen_tokenizer
def test_the_recipe_of_the_issue_validates_as_it_is(tmp_path, capsys, monkeypatch):
    """The `qa` recipe that issue 21 gives, run from the repository root with the shipped example data; a model built
    from scratch takes its vocabulary from the tokenizer."""
    monkeypatch.chdir(REPO)
    recipe = tmp_path / "my-qa.yaml"
    recipe.write_text(ISSUE_RECIPE.format(output_dir=tmp_path / "my-qa"))
    assert main(["validate", str(recipe), "--dry-run"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "task qa, T=256, L=64, N=2" in out and "one optimizer step on 2 examples" in out
    assert "parameters: 19,5" in out  # embeddings and head of 151,665 x 64 each: the Qwen2 tokenizer's vocabulary
