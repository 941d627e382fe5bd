"""Answer extraction and checking: real GSM8K references, hand-written tricky answers, MATH pairs."""
from __future__ import annotations

import json
import time
from fractions import Fraction

import pytest

from codepmp_jax.eval import answers, sympy_check


def test_gsm8k_extracts_every_test_reference(shared_data):
  records = [json.loads(line) for line in open(shared_data / "gsm8k" / "test.jsonl")]
  assert len(records) == 1319
  for record in records:
    # Independent reading of the reference: the text after `#### ` on the last line.
    last_line = record["answer"].strip().splitlines()[-1]
    assert last_line.startswith("#### ")
    expected = Fraction(last_line[len("#### "):].replace(",", ""))
    assert answers.extract_gsm8k(record["answer"]) == expected, record["answer"]
    # The same number written as a model would, without `####`, is read too.
    body = record["answer"].rsplit("####", 1)[0]
    assert answers.extract_gsm8k(body + f"The answer is {last_line[5:]}.") == expected


TRICKY_GSM8K = [
    ("#### 1,234", Fraction(1234)),
    ("She pays $1,200.50 in total.\n#### $1,200.50", Fraction("1200.50")),
    ("So 16-3-4=9 eggs are left.", Fraction(9)),
    ("The temperature drops to -5 degrees.", Fraction(-5)),
    ("The answer is -$15.", Fraction(-15)),
    ("The answer is 18.00 dollars.", Fraction(18)),
    ("The answer is 3/4 of a cup", Fraction(3, 4)),
    ("The answer is \\frac{3}{4}", Fraction(3, 4)),
    ("It grows by 50% in the end: 50%", Fraction(50)),
    ("The answer is 5.0", Fraction(5)),
    ("He ran 3 miles, then 4 more, 7 in all.", Fraction(7)),  # no marker: last number
    ("Q: Tom has 3 apples and eats one.\nA: 3 - 1 = 2 apples.", Fraction(2)),
    ("Q: Tom has 3 apples.\nA: I am not sure.", None),  # nothing after `A:`
    ("The answer is 1,000,000.", Fraction(1000000)),
    ("1, 2 and 3 are the options; the answer is 2.", Fraction(2)),
    ("The answer is: 42\n\nI hope it helps with 3 more questions.", Fraction(42)),
    ("#### 12\nThe answer is 13", Fraction(12)),  # `####` first
    ("The final answer is $\\boxed{7}$ after 3 steps", Fraction(7)),
    ("so we get \\boxed{1,250}", Fraction(1250)),
    ("No numbers here.", None),
    ("Profit: .5 million", Fraction(1, 2)),
    ("The smallest value is 1/2.", Fraction(1, 2)),  # a full stop after the denominator
    ("The answer is 3/4.5 hours", Fraction(3)),  # `4.5` is no denominator
]


@pytest.mark.parametrize("text, expected", TRICKY_GSM8K)
def test_gsm8k_tricky_answers(text, expected):
  assert answers.extract_gsm8k(text) == expected


# CHAMP summaries (real ones, from champ-dataset) and the number a reader takes as the answer.
STATED = [
    ("There are 239 strings of length 6 consisting of the digits 1, 2, and 3, where adjacent "
     "digits differ by less than or equal to 1.", Fraction(239)),
    ("The number of different ordered triples (a, b, c) of non-negative integers such that "
     "a + b + c = 99 is 5050.", Fraction(5050)),
    ("The smallest value of the function (x^2 + 2) / sqrt(x^2 + 1) for real x is 2, which occurs "
     "at x = 0.", Fraction(2)),
    ("The possible value of a mod 5, given that f(x) = x^5 - x + a is divisible by x - b, is 0.",
     Fraction(0)),
    ("The difference between the largest and smallest possible values of ab + bc + ac for real "
     "values a, b, c with a^2 + b^2 + c^2 = 1 is 3/2.", Fraction(3, 2)),
    ("The minimum is \\( \\boxed{0} \\), achieved when \\( a = b = c \\).", Fraction(0)),
    ("I found 12 of them in total.", Fraction(12)),  # no stating verb: the GSM8K reading
    ("The answer is not determined.", None),
]


@pytest.mark.parametrize("text, expected", STATED)
def test_champ_reads_the_stated_number(text, expected):
  assert answers.extract_stated(text) == expected
  checker = answers.AnswerChecker("champ")
  assert checker.key(text) == expected
  assert checker.reference_key("3 is the only possible value") == 3


def test_gsm8k_checker_compares_numbers():
  checker = answers.AnswerChecker("gsm8k")
  assert checker.correct("so she makes $18.00 a day. The answer is 18", "... #### 18")
  assert checker.correct("The answer is 1,600", "#### 1600")
  assert not checker.correct("The answer is 17", "#### 18")
  assert not checker.correct("I do not know.", "#### 18")
  assert checker.key("The answer is 2.50") == checker.key("#### 5/2")


MATH_NORMALISED = [
    ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    ("0.5", "\\frac{1}{2}"),
    ("1/2", "\\frac{1}{2}"),
    ("\\frac12", "\\frac{1}{2}"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("10\\%", "10"),
    ("90^\\circ", "90"),
    ("\\$5", "5"),
    ("x = 5", "5"),
    ("5\\text{ cm}", "5"),
    ("\\sqrt2", "\\sqrt{2}"),
    (".25", "0.25"),
]


@pytest.mark.parametrize("raw, normalised", MATH_NORMALISED)
def test_math_normalisation(raw, normalised):
  assert answers.normalize_math(raw) == normalised


def test_math_boxed_extraction():
  assert answers.last_boxed("so $\\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
  assert answers.last_boxed("\\boxed{1} then \\boxed{\\sqrt{x^{2}}}") == "\\sqrt{x^{2}}"
  assert answers.last_boxed("\\fbox{7}") == "7"
  assert answers.last_boxed("$\\boxed 5$") == "5"
  assert answers.last_boxed("no box") is None
  assert answers.extract_math("We get 7.\nThe answer is: \\frac{3}{4}.") == "\\frac{3}{4}"


# Pairs whose normalised strings differ, so only sympy can decide; hand-checked.
MATH_PAIRS = [
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}", True),
    ("2x+3", "3+2x", True),
    ("x^2-1", "(x-1)(x+1)", True),
    ("\\sqrt[3]{8}", "2", True),
    ("2\\pi", "\\pi+\\pi", True),
    ("10^{3}", "1000", True),
    ("0.75", "\\frac{3}{4}", True),
    ("\\left(1, \\frac{1}{2}\\right)", "(1,0.5)", True),
    ("2\\sqrt{2}", "\\sqrt{8}", True),
    ("3", "4", False),
    ("x^2+1", "(x+1)^2", False),
    ("[1,2)", "(1,2)", False),
    ("(1,2)", "(1,2,3)", False),
    ("\\frac{1}{3}", "0.33", False),
]


@pytest.fixture(scope="module")
def sympy_checker():
  checker = sympy_check.SympyChecker(timeout_s=2.0)
  yield checker
  checker.close()


@pytest.mark.parametrize("a, b, equal", MATH_PAIRS)
def test_math_equivalence(a, b, equal, sympy_checker):
  assert answers.math_equal(a, b, sympy_checker) is equal
  assert answers.math_equal(b, a, sympy_checker) is equal


def test_sympy_timeout_does_not_hang(sympy_checker):
  start = time.monotonic()
  # A 370-million-digit integer: sympy would compute it inside one uninterruptible C call.
  assert sympy_checker.equal("9^{9^{9}}", "2") is False
  assert time.monotonic() - start < 10
  assert sympy_checker.timeouts >= 1
  assert sympy_checker.equal("\\frac{2}{4}", "0.5") is True  # a fresh worker answers again


def test_unsafe_text_never_reaches_the_parser(sympy_checker):
  assert sympy_checker.equal("__import__('os').system('true')", "0") is None
  assert sympy_checker.equal("x.conjugate", "x") is None


def test_math_checker_grades_solutions():
  with answers.AnswerChecker("math", sympy_timeout_s=2.0) as checker:
    assert checker.correct("Thus $x = \\boxed{\\dfrac{1}{2}}$.", "\\boxed{0.5}")
    assert checker.correct("The answer is: \\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}")
    assert not checker.correct("so \\boxed{3}", "4")
    assert not checker.correct("no final answer", "4")
