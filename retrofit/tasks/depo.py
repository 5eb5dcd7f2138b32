"""Depo (paper §6.2; Physics of LMs Part 4.1): k-hop queries on a shuffled directed cycle, asked after it is evicted.

Layout (L = 75, C = 75 * context_windows, T = C + 4 * num_queries; the paper's C = 300, T = 340 by default):
- positions 0..C-1, the context (`context_windows` windows, 4 in the paper): left padding (`<pad>`, attention_mask
  0), then the n edges of a directed cycle in shuffled order, 4 tokens each: `src -> dst ,`. n <= C / 4 nodes.
- positions C.., the last window: `num_queries` QAs of 4 tokens each: `? h{k} start answer`, with the loss on
  `answer` only (answer = the node k edges after `start`). Each QA opens with the separator `?`, so the first one sits
  at the chunk start (position C) and every answer's context (hop and start tokens) lies in the prediction chunk.

Fewer context windows make a smaller Depo (at most 18 nodes in one window): the cycle is still evicted before the
queries, and a step costs a third of the paper's layout.
Node names are single tokens `n0`..`n99`, sampled without replacement per example. Training draws k ~ U[1, max_hops]
for each query; an example's difficulty is its largest k. Eval examples use one k for all queries (difficulty = k).
"""

from __future__ import annotations

import random
from typing import Any, ClassVar

from transformers import PreTrainedTokenizerFast

from .base import IGNORE_INDEX, Example, FrozenEval, Task, check_int, int_field, record_field
from .tokenizer import build_word_tokenizer

WINDOW = 75
MAX_CONTEXT_WINDOWS = 4  # the paper's layout
EDGE_LEN = 4
QA_LEN = 4
NUM_NODE_TOKENS = 100
MAX_HOPS = 32
ARROW, EDGE_SEP, QUERY_SEP = "->", ",", "?"


def node_token(node: int) -> str:
    """The token of node `node` (0..99)."""
    return f"n{node}"


def hop_token(hops: int) -> str:
    """The token of a hop count k (1..32)."""
    return f"h{hops}"


class DepoTask(Task):
    """Depo k-hop traversal; difficulty = k (the largest k of the example's queries in training)."""

    name: ClassVar[str] = "depo"
    difficulty_meaning: ClassVar[str] = "the number of hops followed (k)"
    frozen_eval: ClassVar[FrozenEval] = FrozenEval(num_per_difficulty=128)
    frozen_eval_fixed = ("min_nodes", "max_nodes", "num_queries", "context_windows")
    window = WINDOW

    def __init__(
        self,
        *,
        min_nodes: int = 3,
        max_nodes: int = 75,
        max_hops: int = 16,
        num_queries: int = 10,
        context_windows: int = MAX_CONTEXT_WINDOWS,
    ) -> None:
        """Cycles have n ~ U[min_nodes, max_nodes] nodes, written in `context_windows` windows; training hops
        k ~ U[1, max_hops]; `num_queries` QAs."""
        if not 1 <= context_windows <= MAX_CONTEXT_WINDOWS:
            raise ValueError(f"depo context_windows must be in [1, {MAX_CONTEXT_WINDOWS}], got {context_windows}")
        self.context_windows, self.context_len = context_windows, WINDOW * context_windows
        most = self.context_len // EDGE_LEN
        if not 2 <= min_nodes <= max_nodes <= most:
            raise ValueError(
                f"depo needs 2 <= min_nodes <= max_nodes <= {most} (what {context_windows} context window(s) hold), "
                f"got {min_nodes}, {max_nodes}"
            )
        if not 1 <= max_hops <= MAX_HOPS:
            raise ValueError(f"depo max_hops must be in [1, {MAX_HOPS}], got {max_hops}")
        if not 1 <= num_queries <= WINDOW // QA_LEN:
            raise ValueError(
                f"depo num_queries must be in [1, {WINDOW // QA_LEN}] to fit one window, got {num_queries}"
            )
        self.min_nodes, self.max_nodes, self.max_hops, self.num_queries = min_nodes, max_nodes, max_hops, num_queries
        words = [ARROW, EDGE_SEP, QUERY_SEP]
        words += [node_token(i) for i in range(NUM_NODE_TOKENS)] + [hop_token(k) for k in range(1, MAX_HOPS + 1)]
        self._tokenizer = build_word_tokenizer(words)
        self._vocab = self._tokenizer.get_vocab()

    @property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        return self._tokenizer

    @property
    def seq_len(self) -> int:
        return self.context_len + QA_LEN * self.num_queries

    @property
    def eval_difficulties(self) -> list[int]:
        """Powers of two up to `max_hops`, plus `max_hops` itself (1, 2, 4, 8, 16 by default)."""
        buckets = [1 << i for i in range(MAX_HOPS.bit_length()) if 1 << i <= self.max_hops]
        return sorted({*buckets, self.max_hops})

    def sample(self, rng: random.Random, difficulty: int | None = None) -> dict[str, Any]:
        if difficulty is not None and not 1 <= difficulty <= MAX_HOPS:
            raise ValueError(f"depo hops must be in [1, {MAX_HOPS}], got {difficulty}")
        n = rng.randint(self.min_nodes, self.max_nodes)
        cycle = rng.sample(range(NUM_NODE_TOKENS), n)  # cycle[i] -> cycle[i + 1]
        edges = [[cycle[i], cycle[(i + 1) % n]] for i in range(n)]
        rng.shuffle(edges)
        queries = []
        for _ in range(self.num_queries):
            hops = rng.randint(1, self.max_hops) if difficulty is None else difficulty
            start = rng.randrange(n)
            queries.append([hops, cycle[start], cycle[(start + hops) % n]])
        return {"difficulty": max(q[0] for q in queries), "edges": edges, "queries": queries}

    def check_record(self, record: dict[str, Any]) -> None:
        difficulty = int_field(record, "difficulty", 1, MAX_HOPS, "difficulty (hops k)")
        last_node = NUM_NODE_TOKENS - 1
        successor: dict[int, int] = {}
        for i, edge in enumerate(record_field(record, "edges", list)):
            if not isinstance(edge, list) or len(edge) != 2:
                raise ValueError(f"edges[{i}] must be [src, dst], got {edge!r}")
            src, dst = (check_int(node, 0, last_node, f"edges[{i}][{j}] (a node)") for j, node in enumerate(edge))
            if src in successor:
                raise ValueError(f"edges[{i}]: node {src} already has an outgoing edge; a cycle leaves each node once")
            successor[src] = dst
        queries = record_field(record, "queries", list)
        if not 1 <= len(queries) <= WINDOW // QA_LEN:
            raise ValueError(f"queries must hold 1 to {WINDOW // QA_LEN} [hops, start, answer], got {len(queries)}")
        for i, query in enumerate(queries):
            if not isinstance(query, list) or len(query) != 3:
                raise ValueError(f"queries[{i}] must be [hops, start, answer], got {query!r}")
            hops = check_int(query[0], 1, MAX_HOPS, f"queries[{i}][0] (hops)")
            start = check_int(query[1], 0, last_node, f"queries[{i}][1] (start node)")
            answer = check_int(query[2], 0, last_node, f"queries[{i}][2] (answer node)")
            node = start
            for _ in range(hops):
                if node not in successor:
                    raise ValueError(f"queries[{i}]: node {node} has no outgoing edge in edges")
                node = successor[node]
            if answer != node:
                raise ValueError(f"queries[{i}][2]: the node {hops} edges after {start} is {node}, not {answer}")
        if difficulty != max(query[0] for query in queries):
            raise ValueError(f"difficulty must be the largest hop count of the queries, got {difficulty}")

    def encode(self, record: dict[str, Any]) -> Example:
        vocab = self._vocab
        arrow, edge_sep, query_sep = vocab[ARROW], vocab[EDGE_SEP], vocab[QUERY_SEP]
        context = []
        for src, dst in record["edges"]:
            context += [vocab[node_token(src)], arrow, vocab[node_token(dst)], edge_sep]
        num_pad = self.context_len - len(context)
        if num_pad < 0:
            raise ValueError(
                f"a depo record of {len(record['edges'])} edges does not fit {self.context_windows} context window(s) "
                f"({self.context_len // EDGE_LEN} edges); raise context_windows (task.options, or eval.task_options "
                "for the evaluation) or use records made with these options (eval.source: generated)"
            )
        input_ids = [self._tokenizer.pad_token_id] * num_pad + context
        labels = [IGNORE_INDEX] * self.context_len
        for hops, start, answer in record["queries"]:
            qa = [query_sep, vocab[hop_token(hops)], vocab[node_token(start)], vocab[node_token(answer)]]
            input_ids += qa
            labels += [IGNORE_INDEX] * (QA_LEN - 1) + qa[-1:]
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": [0] * num_pad + [1] * (len(input_ids) - num_pad),
            "difficulty": record["difficulty"],
        }
