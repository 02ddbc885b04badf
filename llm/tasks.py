"""Tasks with verifiable rewards: arithmetic, Countdown, and user datasets (JSONL / parquet).

Every task hands out :class:`Problem` s (a prompt and a reference answer) and scores a
completion as correct or not. The built-in tasks compare numbers exactly; user datasets are
checked with ``math-verify`` (GSM8K- and MATH-style answers). Training and evaluation problems
are disjoint: the built-in tasks split their problem space by a hash of the problem, user
datasets by a seeded shuffle (or a separate evaluation file).
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import operator
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

__all__ = [
    "Problem",
    "Task",
    "ArithmeticTask",
    "CountdownTask",
    "DatasetTask",
    "TASKS",
    "make_task",
    "load_records",
    "pass_at_k",
    "leading_integer",
]


@dataclass(frozen=True)
class Problem:
    """One prompt with its reference answer (``numbers`` are Countdown's inputs)."""

    prompt: str
    answer: str
    numbers: tuple[int, ...] = field(default=())


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): ``1 - C(n-c, k) / C(n, k)`` for ``c`` correct of ``n``.

    Computed as a product to stay exact for large ``n``; requires ``1 <= k <= n``.
    """
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


_LEADING_INT = re.compile(r"^\s*([-+]?\d+)(?!\d)")


def leading_integer(completion: str) -> int | None:
    """The integer that starts the completion's first line (``" 12\\n..."`` -> 12), else None."""
    m = _LEADING_INT.match(completion.split("\n", 1)[0])
    return int(m.group(1)) if m else None


def _stable_hash(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


class Task:
    """Base class: ``train_batch(n, rng)``, ``eval_set(n)``, ``score(problem, completion)``."""

    name = "task"
    #: generation stops at the first newline (one-line answers) as well as at EOS
    stop_at_newline = True

    def train_batch(self, n: int, rng: random.Random) -> list[Problem]:
        raise NotImplementedError

    def eval_set(self, n: int) -> list[Problem]:
        raise NotImplementedError

    def distinct_train_set(self, n: int, rng: random.Random, tries_per_problem: int = 200) -> list[Problem]:
        """``n`` training problems with distinct prompts, in the order ``train_batch`` draws them (a sample
        without replacement: from a pool of ``N`` prompts, a fixed set's mean then deviates from the pool's by
        ``sqrt((N - n) / (N - 1))`` times as much as with repeats, docs/theory.md §5.6b). Raises
        :class:`UserError` when ``tries_per_problem * n`` single draws find fewer than ``n`` distinct prompts."""
        out: list[Problem] = []
        seen: set[str] = set()
        for _ in range(tries_per_problem * max(n, 1)):
            if len(out) == n:
                break
            problem = self.train_batch(1, rng)[0]
            if problem.prompt not in seen:
                seen.add(problem.prompt)
                out.append(problem)
        if len(out) < n:
            raise UserError(f"the training split has only {len(out)} distinct prompts found in "
                            f"{tries_per_problem * n} draws; a set of {n} distinct prompts needs fewer "
                            f"(e.g. --control-prompts {len(out)})")
        return out

    def score(self, problem: Problem, completion: str) -> bool:
        raise NotImplementedError

    def answer_key(self, completion: str) -> str:
        """A canonical form of the completion's answer (for counting distinct answers)."""
        return completion.split("\n", 1)[0].strip()


# ----------------------------------------------------------------------------- arithmetic
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


class ArithmeticTask(Task):
    """``a op b [op c] = `` as a plain few-shot completion, answer on the same line.

    Operands are uniform in ``[low, high]``; ``ops`` is a string of ``+-*``; ``operands`` is 2 or 3.
    The prompt is ``fewshot`` solved examples (one per line) and the question, ending ``= ``.
    One problem in ``1 / eval_every_nth`` (by a hash of the problem) is held out for evaluation.
    """

    name = "arithmetic"

    def __init__(self, low: int = 0, high: int = 9, operands: int = 2, ops: str = "+", fewshot: int = 3,
                 holdout: int = 5) -> None:
        if not (0 <= low <= high):
            raise UserError(f"arithmetic operand range must satisfy 0 <= low <= high, got {low}..{high}")
        if operands not in (2, 3):
            raise UserError(f"arithmetic operands must be 2 or 3, got {operands}")
        if not ops or any(o not in _OPS for o in ops):
            raise UserError(f"arithmetic ops must be characters of '+-*', got {ops!r}")
        if fewshot < 0:
            raise UserError(f"fewshot must be >= 0, got {fewshot}")
        if holdout < 2:
            raise UserError(f"holdout must be >= 2 (one problem in holdout is held out), got {holdout}")
        self.low, self.high, self.operands, self.ops = low, high, operands, ops
        self.holdout = holdout
        space = (high - low + 1) ** operands * len(ops) ** (operands - 1)
        if space < 2 * holdout:
            raise UserError(f"arithmetic problem space too small ({space} problems) for a held-out split")
        if ops == "+" and operands == 2:
            shots = [(2, 3), (4, 1), (6, 2)]  # the measured prompt of docs/llm.md
            self.prefix = "".join(f"{a} + {b} = {a + b}\n" for a, b in shots[:fewshot])
            if fewshot > 3:
                rng = random.Random(12345)
                self.prefix += "".join(self._line(self._draw(rng), True) + "\n" for _ in range(fewshot - 3))
        else:
            rng = random.Random(12345)
            self.prefix = "".join(self._line(self._draw(rng), True) + "\n" for _ in range(fewshot))

    def _draw(self, rng: random.Random) -> tuple[tuple[int, ...], tuple[str, ...]]:
        nums = tuple(rng.randint(self.low, self.high) for _ in range(self.operands))
        ops = tuple(rng.choice(self.ops) for _ in range(self.operands - 1))
        return nums, ops

    @staticmethod
    def _value(nums: Sequence[int], ops: Sequence[str]) -> int:
        expr = " ".join(str(x) for pair in zip(nums, (*ops, "")) for x in pair if x != "")
        return int(_safe_eval(expr))

    def _line(self, draw: tuple[tuple[int, ...], tuple[str, ...]], solved: bool) -> str:
        nums, ops = draw
        expr = " ".join(str(x) for pair in zip(nums, (*ops, "")) for x in pair if x != "")
        return f"{expr} = {self._value(nums, ops)}" if solved else f"{expr} = "

    def _is_eval(self, draw: tuple[tuple[int, ...], tuple[str, ...]]) -> bool:
        return _stable_hash("arith", draw) % self.holdout == 0

    def _problem(self, draw: tuple[tuple[int, ...], tuple[str, ...]]) -> Problem:
        return Problem(self.prefix + self._line(draw, False), str(self._value(*draw)))

    def train_batch(self, n: int, rng: random.Random) -> list[Problem]:
        out: list[Problem] = []
        while len(out) < n:
            draw = self._draw(rng)
            if not self._is_eval(draw):
                out.append(self._problem(draw))
        return out

    def eval_set(self, n: int) -> list[Problem]:
        rng = random.Random(_stable_hash("arith-eval", self.low, self.high, self.operands, self.ops))
        seen: set = set()
        out: list[Problem] = []
        for _ in range(1000 * max(n, 1)):
            if len(out) == n:
                break
            draw = self._draw(rng)
            if self._is_eval(draw) and draw not in seen:
                seen.add(draw)
                out.append(self._problem(draw))
        if not out:
            raise UserError("arithmetic held-out split is empty; widen the operand range")
        return out

    def score(self, problem: Problem, completion: str) -> bool:
        value = leading_integer(completion)
        return value is not None and str(value) == problem.answer


# ----------------------------------------------------------------------------- countdown
_AST_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _safe_eval(expr: str) -> float:
    """Evaluate ``+ - * /`` and parentheses over integer literals; anything else raises ValueError."""
    tree = ast.parse(expr.strip(), mode="eval")

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ValueError("division by zero")
            return _AST_OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        raise ValueError(f"unsupported expression element {type(node).__name__}")

    return walk(tree)


def _literals(expr: str) -> list[int]:
    return [n.value for n in ast.walk(ast.parse(expr.strip(), mode="eval"))
            if isinstance(n, ast.Constant) and isinstance(n.value, int)]


class CountdownTask(Task):
    """Countdown: combine the given numbers (each exactly once) with ``+ - * /`` to hit the target.

    Problems are built from a random expression over the numbers, so each one is solvable.
    The completion's first line must be an expression using exactly the given numbers.
    """

    name = "countdown"

    def __init__(self, count: int = 3, high: int = 9, fewshot: int = 3, holdout: int = 5) -> None:
        if count not in (2, 3, 4):
            raise UserError(f"countdown needs 2, 3 or 4 numbers, got {count}")
        if high < 2:
            raise UserError(f"countdown numbers need high >= 2, got {high}")
        self.count, self.high, self.holdout = count, high, holdout
        rng = random.Random(54321)
        shots = [self._draw(rng) for _ in range(fewshot)]
        self.prefix = "".join(self._question(nums, target) + expr + "\n" for nums, target, expr in shots)

    @staticmethod
    def _question(nums: Sequence[int], target: int) -> str:
        return f"Use {' '.join(map(str, nums))} to make {target}: "

    def _draw(self, rng: random.Random) -> tuple[tuple[int, ...], int, str]:
        while True:
            nums = [rng.randint(1, self.high) for _ in range(self.count)]
            order = nums[:]
            rng.shuffle(order)
            expr = str(order[0])
            for x in order[1:]:
                op = rng.choice("+-*")
                expr = f"({expr}) {op} {x}" if op == "*" and ("+" in expr or "-" in expr) else f"{expr} {op} {x}"
            value = _safe_eval(expr)
            if value == int(value) and 0 < value <= 100:
                return tuple(nums), int(value), expr

    def _problem(self, nums: tuple[int, ...], target: int) -> Problem:
        return Problem(self.prefix + self._question(nums, target), str(target), nums)

    def _is_eval(self, nums: tuple[int, ...], target: int) -> bool:
        return _stable_hash("countdown", tuple(sorted(nums)), target) % self.holdout == 0

    def train_batch(self, n: int, rng: random.Random) -> list[Problem]:
        out: list[Problem] = []
        while len(out) < n:
            nums, target, _ = self._draw(rng)
            if not self._is_eval(nums, target):
                out.append(self._problem(nums, target))
        return out

    def eval_set(self, n: int) -> list[Problem]:
        rng = random.Random(_stable_hash("countdown-eval", self.count, self.high))
        out: list[Problem] = []
        seen: set = set()
        for _ in range(1000 * max(n, 1)):
            if len(out) == n:
                break
            nums, target, _ = self._draw(rng)
            if self._is_eval(nums, target) and (nums, target) not in seen:
                seen.add((nums, target))
                out.append(self._problem(nums, target))
        return out

    def score(self, problem: Problem, completion: str) -> bool:
        line = completion.split("\n", 1)[0].strip()
        if not line or len(line) > 200:
            return False
        try:
            used = _literals(line)
            value = _safe_eval(line)
        except (SyntaxError, ValueError, TypeError, ZeroDivisionError, RecursionError):
            return False
        return sorted(used) == sorted(problem.numbers) and math.isclose(value, int(problem.answer))


# ----------------------------------------------------------------------------- user datasets
PROMPT_FIELDS = ("prompt", "question", "problem", "input", "query")
ANSWER_FIELDS = ("answer", "final_answer", "solution", "output", "target")


def _extract_gold(text: str) -> str:
    """GSM8K puts the final answer after ``####``; MATH keeps a ``\\boxed{}`` that math-verify finds."""
    return text.rsplit("####", 1)[1].strip() if "####" in text else text.strip()


def _record_to_problem(rec: object, where: str) -> Problem:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected an object with a prompt and an answer, got {type(rec).__name__}")
    prompt = next((rec[k] for k in PROMPT_FIELDS if k in rec), None)
    answer = next((rec[k] for k in ANSWER_FIELDS if k in rec), None)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: no prompt (one of the fields {', '.join(PROMPT_FIELDS)}, a non-empty string)")
    if answer is None or (isinstance(answer, float) and math.isnan(answer)) or not str(answer).strip():
        raise ValueError(f"{where}: no answer (one of the fields {', '.join(ANSWER_FIELDS)})")
    return Problem(prompt, _extract_gold(str(answer)))


def load_records(path: str | Path, on_error: str = "skip") -> tuple[list[Problem], list[str]]:
    """Read a JSONL or parquet file of prompt/answer records.

    Returns ``(problems, problems_found)``: each malformed line is reported as ``FILE:LINE: why``;
    with ``on_error="skip"`` they are skipped (and returned as warnings), with ``"error"`` the first
    one raises :class:`UserError`.
    """
    if on_error not in ("skip", "error"):
        raise UserError(f"dataset_errors must be 'skip' or 'error', got {on_error!r}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"dataset {str(path)!r} does not exist")
    warnings: list[str] = []
    problems: list[Problem] = []

    def bad(msg: str) -> None:
        if on_error == "error":
            raise UserError(msg + " (use --dataset-errors skip to skip bad records)")
        warnings.append(msg)

    if p.suffix == ".parquet":
        try:
            import pandas as pd

            frame = pd.read_parquet(p)
        except ImportError as exc:
            raise UserError(f"reading {p.name} needs pandas with pyarrow installed ({exc})") from None
        except Exception as exc:  # noqa: BLE001 - parquet readers raise many types
            raise UserError(f"could not read parquet file {str(path)!r}: {exc}") from None
        for i, rec in enumerate(frame.to_dict(orient="records")):
            try:
                problems.append(_record_to_problem(rec, f"{p.name}: row {i}"))
            except ValueError as exc:
                bad(str(exc))
    elif p.suffix in (".jsonl", ".json", ".ndjson"):
        with p.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{p.name}:{lineno}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    bad(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})")
                    continue
                try:
                    problems.append(_record_to_problem(rec, where))
                except ValueError as exc:
                    bad(str(exc))
    else:
        raise UserError(f"dataset {str(path)!r}: unsupported format {p.suffix!r} (use .jsonl or .parquet)")
    if not problems:
        raise UserError(f"dataset {str(path)!r} has no usable records" + (f" ({warnings[0]})" if warnings else ""))
    return problems, warnings


class DatasetTask(Task):
    """User prompt/answer data scored with ``math-verify``; ``template`` wraps each prompt.

    The held-out split is ``eval_size`` records chosen by a seeded shuffle, or a separate file.
    """

    name = "dataset"
    stop_at_newline = False

    def __init__(self, path: str, template: str = "{prompt}\n", eval_path: str = "", eval_size: int = 64,
                 on_error: str = "skip", seed: int = 0, tokenizer=None, chat_template: bool = False) -> None:
        try:
            from math_verify import parse, verify  # noqa: F401
        except ImportError as exc:
            raise UserError(f"--task dataset needs math-verify (pip install math-verify): {exc}") from None
        if "{prompt}" not in template:
            raise UserError(f"prompt_template must contain '{{prompt}}', got {template!r}")
        records, self.warnings = load_records(path, on_error)
        if eval_path:
            eval_records, more = load_records(eval_path, on_error)
            self.warnings += more
            self.train_records = records
        else:
            order = list(range(len(records)))
            random.Random(seed).shuffle(order)
            n_eval = min(eval_size, len(records) // 2)
            if n_eval < 1:
                raise UserError(f"dataset {path!r} has {len(records)} record(s): too few to hold out an eval split")
            eval_records = [records[i] for i in order[:n_eval]]
            self.train_records = [records[i] for i in order[n_eval:]]
        self.template, self.tokenizer, self.chat_template = template, tokenizer, chat_template
        self.eval_records = eval_records
        self._gold_cache: dict[str, object] = {}

    def _wrap(self, problem: Problem) -> Problem:
        text = self.template.replace("{prompt}", problem.prompt)
        if self.chat_template and self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return Problem(text, problem.answer)

    def train_batch(self, n: int, rng: random.Random) -> list[Problem]:
        return [self._wrap(rng.choice(self.train_records)) for _ in range(n)]

    def eval_set(self, n: int) -> list[Problem]:
        return [self._wrap(p) for p in self.eval_records[:n]]

    def score(self, problem: Problem, completion: str) -> bool:
        from math_verify import parse, verify

        gold = self._gold_cache.get(problem.answer)
        if gold is None:
            gold = parse(problem.answer if "$" in problem.answer or "\\" in problem.answer
                         else f"${problem.answer}$")
            self._gold_cache[problem.answer] = gold
        try:
            return bool(verify(gold, parse(completion)))
        except Exception:  # noqa: BLE001 - the verifier may fail on odd output: count as wrong
            return False

    def answer_key(self, completion: str) -> str:
        from math_verify import parse

        try:
            parsed = parse(completion)
        except Exception:  # noqa: BLE001
            return completion.strip()[-50:]
        return str(parsed[-1]) if parsed else completion.strip()[-50:]


TASKS = ("arithmetic", "countdown", "dataset")


def make_task(cfg, tokenizer=None) -> Task:
    """Build the task a :class:`llm.config.TrainConfig` names."""
    if cfg.task == "arithmetic":
        return ArithmeticTask(cfg.arith_low, cfg.arith_high, cfg.arith_operands, cfg.arith_ops, cfg.fewshot)
    if cfg.task == "countdown":
        return CountdownTask(cfg.countdown_numbers, cfg.countdown_high, cfg.fewshot)
    if cfg.task == "dataset":
        if not cfg.dataset:
            raise UserError("--task dataset needs --dataset FILE (.jsonl or .parquet with prompt/answer fields)")
        return DatasetTask(cfg.dataset, cfg.prompt_template, cfg.eval_dataset, cfg.eval_prompts,
                           cfg.dataset_errors, cfg.seed, tokenizer, cfg.chat_template)
    raise UserError(f"unknown task {cfg.task!r}; expected one of {', '.join(TASKS)}")
