"""Loaders on real GSM8K / LogiQA 2.0 rows and hand-written samples of the other formats."""
from __future__ import annotations

import gzip
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from codepmp_jax.data import gsm8k, loaders
from codepmp_jax.data.encode import (EncodeStats, bucket_length, encode_pair, encode_sequence, fit_pair,
                                     fit_sequence)
from codepmp_jax.data.records import BadRecordError, BadRecords, PairRecord, read_json_objects
from codepmp_jax.data.templates import render
from codepmp_jax.data.tokenizer import train_sentencepiece

FINAL = re.compile(r"\nThe answer is (.+)$")


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def _load(paths, fmt, **options):
  bad = BadRecords()
  records = list(loaders.load_records(paths, fmt, bad, loaders.LoaderOptions(**options)))
  return records, bad


@pytest.mark.slow
def test_gsm8k_all_rows_load_and_every_rejected_answer_is_wrong(shared_data):
  for split, rows, num_rejected in (("train", 7473, 1), ("test", 1319, 2)):
    path = shared_data / "gsm8k" / f"{split}.jsonl"
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(raw) == rows
    records, bad = _load([path], "gsm8k", num_rejected=num_rejected)
    counts = bad.to_dict()
    assert sum(counts.values()) - counts["fewer_rejected_than_asked"] == counts["no_valid_perturbation"]
    questions = {r.prompt for r in records}
    # Every row either gives pairs or is counted as having no valid perturbation.
    assert len(questions) + counts["no_valid_perturbation"] == rows
    assert counts["no_valid_perturbation"] < 0.1 * rows
    reference = {render("math", question=r["question"]): r["answer"].rpartition("####")[2].strip()
                 for r in raw}
    for record in records:
      chosen_answer = FINAL.search(record.chosen).group(1)
      rejected_answer = FINAL.search(record.rejected).group(1)
      assert chosen_answer == reference[record.prompt]
      assert float(rejected_answer.replace(",", "")) != float(chosen_answer.replace(",", ""))
      assert "<<" not in record.chosen and "<<" not in record.rejected
      assert record.chosen.rpartition("\n")[0] != record.rejected.rpartition("\n")[0]
    if num_rejected == 2:
      by_prompt = {}
      for record in records:
        by_prompt.setdefault(record.prompt, []).append(record.rejected)
      assert all(len(set(v)) == len(v) for v in by_prompt.values())
      assert sum(len(v) == 2 for v in by_prompt.values()) + counts["fewer_rejected_than_asked"] == len(by_prompt)


def test_gsm8k_rejected_redoes_later_steps_consistently():
  answer = ("She buys 3*4=<<3*4=12>>12 apples.\nShe adds 5 more: 12+5=<<12+5=17>>17.\n"
            "Half of them is 17/2=<<17/2=8.5>>8.5 bags.\n#### 8.5")
  seen_steps = set()
  for seed in range(12):
    pairs = gsm8k.make_pairs(answer, seed, "q")
    assert pairs.chosen == ("She buys 3*4=12 apples.\nShe adds 5 more: 12+5=17.\n"
                            "Half of them is 17/2=8.5 bags.\nThe answer is 8.5")
    first, second, third, last = pairs.rejected[0].split("\n")
    a = float(re.fullmatch(r"She buys 3\*4=(\S+) apples\.", first).group(1))
    b_in, b = map(float, re.fullmatch(r"She adds 5 more: (\S+)\+5=(\S+)\.", second).groups())
    c_in, c = map(float, re.fullmatch(r"Half of them is (\S+)/2=(\S+) bags\.", third).groups())
    # Exactly one computation is wrong and every step after it uses its result correctly.
    wrong = [a != 12, b != b_in + 5, c != c_in / 2]
    assert sum(wrong) == 1 and b_in == a and c_in == b
    assert last == f"The answer is {third.split('=')[1].split(' ')[0]}" and c != 8.5
    seen_steps.add(wrong.index(True))
  assert seen_steps == {0, 1, 2}
  assert gsm8k.make_pairs(answer, 3, "q") == gsm8k.make_pairs(answer, 3, "q")


def test_gsm8k_without_computations_is_counted(tmp_path):
  path = _write_jsonl(tmp_path / "g.jsonl", [
      {"question": "q1", "answer": "No arithmetic here.\n#### 4"},
      {"question": "q2", "answer": "no final line"},
      {"question": "q3", "answer": "2+2=<<2+2=4>>4\n#### 4"}])
  records, bad = _load([path], "gsm8k")
  assert len(records) == 1
  assert bad.counts == {"no_valid_perturbation": 1, "bad_value": 1}
  assert bad.examples["no_valid_perturbation"][0].endswith("g.jsonl:1: no single computation change "
                                                          "reaches the final answer")


def test_logiqa2_all_rows_give_gold_vs_each_wrong_option(shared_data):
  for split, rows in (("dev", 1569), ("test", 1572)):
    path = shared_data / "logiqa2" / f"{split}.jsonl"
    raw = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert len(raw) == rows
    records, bad = _load([path], "logiqa2")
    # A wrong option with the gold option's text is an identical pair (counted once per row).
    assert bad.counts == {"identical_pair": sum(r["options"].count(r["options"][r["answer"]]) > 1
                                                for r in raw)}
    expected = []
    for r in raw:
      gold = r["options"][r["answer"]]
      prompt = render("logic", context=r["text"], question=r["question"])
      wrong = []
      for option in r["options"]:
        if option != gold and option not in wrong:
          wrong.append(option)
      expected += [(prompt, gold, option) for option in wrong]
    assert [(r.prompt, r.chosen, r.rejected) for r in records] == expected
    choices = list(loaders.load_multiple_choice([path], BadRecords()))
    assert len(choices) == rows
    assert [c.answer for c in choices] == [r["answer"] for r in raw]
    assert choices[0].prompt.startswith("Instruction: Please answer the following questions based "
                                        "on the passages.\n\nPassage: ")


def test_reclor_field_names(tmp_path):
  row = {"context": "All cats purr.", "question": "Which follows?", "id_string": "train_0",
         "answers": ["Rex purrs.", "Tom purrs.", "Rex purrs.", "No cat purrs."], "label": 1}
  records, bad = _load([_write_jsonl(tmp_path / "r.jsonl", [row])], "reclor")
  assert not bad.total
  assert [(r.chosen, r.rejected, r.id) for r in records] == [
      ("Tom purrs.", "Rex purrs.", "train_0/0"), ("Tom purrs.", "No cat purrs.", "train_0/1")]
  assert records[0].prompt == ("Instruction: Please answer the following questions based on the "
                               "passages.\n\nPassage: All cats purr.\n\nQuestion: Which follows?"
                               "\n\nResponse:")


def test_pairs_from_jsonl_gzip_and_parquet(tmp_path):
  rows = [{"prompt": "p1", "chosen": "a", "rejected": "b", "margin": 2, "id": "x"},
          {"prompt": "p2", "chosen": "c", "rejected": "d", "meta": {"k": 1}}]
  plain = _write_jsonl(tmp_path / "a.jsonl", rows)
  gz = tmp_path / "b.jsonl.gz"
  with gzip.open(gz, "wt") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows))
  parquet = tmp_path / "c.parquet"
  pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]),
                 parquet)
  records, bad = _load([plain, str(gz), str(parquet)], "pairs")
  assert not bad.total
  expected = [PairRecord("p1", "a", "b", 2.0, "x"), PairRecord("p2", "c", "d", meta={"k": 1})]
  assert records == expected + expected + [PairRecord(r.prompt, r.chosen, r.rejected) for r in expected]
  assert [r.to_json() for r in records[:2]] == rows


def test_codepmp_uses_code_template_and_counts_empty_responses(tmp_path):
  rows = [{"query": "Add two numbers.", "better": "def add(a, b):\n  return a + b", "worse": "add"},
          {"query": "q", "better": "```python\n```", "worse": "x"},
          {"query": "q", "better": "x", "worse": "   "}]
  records, bad = _load([_write_jsonl(tmp_path / "c.jsonl", rows)], "codepmp")
  assert bad.counts == {"empty_response": 2}
  assert len(records) == 1
  assert records[0].prompt == (
      "### Instruction: Please read the following code description carefully and generate the "
      "actual code implementation based on this description. Please make sure the code is logical "
      "and readable.\n\n### Code Description:\nAdd two numbers.\n\n### Response:")
  assert (records[0].chosen, records[0].rejected) == (rows[0]["better"], rows[0]["worse"])


def test_math_shepherd_removes_step_tags(tmp_path):
  row = {"question": "What is 2+3?", "chosen": "Step 1: 2+3=5 ки\nStep 2: The answer is 5 ки",
         "rejected": "Step 1: 2+3=6 ки\nStep 2: The answer is 6 ки"}
  records, _ = _load([_write_jsonl(tmp_path / "m.jsonl", [row])], "math_shepherd")
  assert records[0].prompt == "Instruction:What is 2+3?\n\nResponse:"
  assert records[0].chosen == "Step 1: 2+3=5\nStep 2: The answer is 5"
  assert records[0].rejected == "Step 1: 2+3=6\nStep 2: The answer is 6"


def test_trl_conversational_implicit_and_explicit_prompt(tmp_path):
  user = {"role": "user", "content": "Sky color?"}
  rows = [{"chosen": [user, {"role": "assistant", "content": "Blue."}],
           "rejected": [user, {"role": "assistant", "content": "Green."}]},
          {"prompt": [user], "chosen": [{"role": "assistant", "content": "Blue."}],
           "rejected": [{"role": "assistant", "content": "Red."}]},
          {"chosen": [user], "rejected": "not messages"}]
  records, bad = _load([_write_jsonl(tmp_path / "t.jsonl", rows)], "trl")
  assert [(r.prompt, r.chosen, r.rejected) for r in records] == [
      ("User: Sky color?\n\nAssistant:", "Blue.", "Green."),
      ("User: Sky color?\n\nAssistant:", "Blue.", "Red.")]
  assert bad.counts == {"bad_value": 1}


def test_bad_records_are_counted_with_file_and_line_and_strict_raises(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_bytes(b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
                   b'{not json\n'
                   b'{"prompt": "p", "chosen": "a"}\n'
                   b'{"prompt": "p", "chosen": 3, "rejected": "b"}\n'
                   b'{"prompt": "p", "chosen": "a", "rejected": "a"}\n'
                   b'{"prompt": "p", "chosen": "\xff", "rejected": "b"}\n'
                   b'\n'
                   b'{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}\n')
  (tmp_path / "empty.jsonl").write_text("")
  files = [str(path), str(tmp_path / "empty.jsonl")]
  records, bad = _load(files, "pairs")
  assert len(records) == 1
  assert bad.counts == {"invalid_json": 1, "missing_field": 1, "non_string_field": 1,
                        "identical_pair": 1, "invalid_utf8": 1, "bad_value": 1, "empty_file": 1}
  assert bad.examples["missing_field"] == [f"{path}:3: field 'rejected' is missing (the record has: chosen, prompt)"]
  assert bad.examples["invalid_utf8"][0].startswith(f"{path}:6: ")
  with pytest.raises(BadRecordError, match=r"bad\.jsonl:2: invalid_json"):
    list(loaders.load_records(files, "pairs", BadRecords(strict=True)))


def test_truncation_cuts_prompt_left_then_the_response_by_policy_keeping_eos():
  ids, start, eos = [1, 2, 3, 4, 5, 6, 7, 8, 9], 5, 0
  for truncation in ("keep_end", "keep_head"):
    assert fit_sequence(ids, start, eos, 10, truncation).ids == (1, 2, 3, 4, 5, 6, 7, 8, 9, 0)
    cut = fit_sequence(ids, start, eos, 7, truncation)
    assert (cut.ids, cut.response_start, cut.prompt_cut, cut.response_cut) == ((4, 5, 6, 7, 8, 9, 0), 2, 3, 0)
    cut = fit_sequence(ids, start, eos, 5, truncation)
    assert (cut.ids, cut.response_start, cut.prompt_cut) == ((6, 7, 8, 9, 0), 0, 5)
  # The prompt is gone; then keep_end loses the response's start, keep_head its end.
  cut = fit_sequence(ids, start, eos, 3)
  assert (cut.ids, cut.response_cut) == ((8, 9, 0), 2)
  cut = fit_sequence(ids, start, eos, 3, "keep_head")
  assert (cut.ids, cut.response_cut) == ((6, 7, 0), 2)
  assert fit_sequence(ids, start, eos, 9, "drop") is None
  with pytest.raises(ValueError, match="truncation must be one of"):
    fit_sequence(ids, start, eos, 9, "truncate")


def test_the_kept_response_end_holds_the_final_answer_line(shared_data, tmp_path):
  """Real GSM8K solutions cut to a short length: keep_end keeps the `#### answer` line (and the
  end token), keep_head loses it."""
  rows = [json.loads(line) for line in open(shared_data / "gsm8k" / "test.jsonl")][:40]
  tokenizer = train_sentencepiece([r["question"] + r["answer"] for r in rows] * 3, 400, tmp_path / "tok")
  for row in rows:
    prompt = render("math", question=row["question"])
    final = row["answer"].rsplit("\n", 1)[1]
    assert final.startswith("#### ")
    end = encode_sequence(tokenizer, prompt, row["answer"], 40, "keep_end")
    head = encode_sequence(tokenizer, prompt, row["answer"], 40, "keep_head")
    assert end.ids[-1] == head.ids[-1] == tokenizer.eos_id and len(end.ids) == 40
    assert tokenizer.decode(end.ids[:-1]).endswith(final)
    assert final not in tokenizer.decode(head.ids[:-1])


@pytest.mark.parametrize("truncation", ["keep_end", "keep_head"])
def test_a_pair_keeps_one_prompt_after_truncation(truncation):
  rng = np.random.default_rng(0)
  identical = 0
  for _ in range(500):
    prompt = list(rng.integers(10, 100, rng.integers(0, 12)))
    chosen, rejected = (prompt + list(rng.integers(10, 14, rng.integers(1, 12))) for _ in range(2))
    seq_len = int(rng.integers(2, 26))
    stats = EncodeStats()
    pair = fit_pair((chosen, len(prompt)), (rejected, len(prompt)), None, 0, seq_len, truncation, stats)
    if pair is None:  # token-identical once cut: dropped and counted
      identical += 1
      assert stats.dropped_identical == 1 and stats.pairs == 0
      both = [fit_sequence(s, len(prompt), 0, seq_len, truncation) for s in (chosen, rejected)]
      assert len({s.ids for s in both}) == 1 or chosen == rejected
      continue
    c, r = pair.chosen, pair.rejected
    assert c.ids != r.ids
    assert c.ids[:c.response_start] == r.ids[:r.response_start]  # one prompt, cut alike
    assert c.prompt_cut == r.prompt_cut
    for seq, full in ((c, chosen), (r, rejected)):
      assert len(seq.ids) <= seq_len and seq.ids[-1] == 0
      if truncation == "keep_head":
        assert list(seq.ids[:-1]) == full[seq.prompt_cut:len(full) - seq.response_cut]
      else:
        kept_prompt = full[seq.prompt_cut:len(prompt)] if seq.prompt_cut < len(prompt) else []
        assert list(seq.ids[:-1]) == kept_prompt + full[len(prompt) + seq.response_cut:]
    assert stats.truncated_prompt == (c.prompt_cut > 0)
    longest = max(len(chosen), len(rejected)) + 1
    # the prompt loses exactly the larger excess (all of it when that is not enough)
    assert c.prompt_cut == min(max(longest - seq_len, 0), len(prompt))
    dropped = EncodeStats()
    kept = fit_pair((chosen, len(prompt)), (rejected, len(prompt)), None, 0, seq_len, "drop", dropped)
    assert (kept is None) == (longest > seq_len) == (dropped.dropped_overlong == 1)


def test_truncated_gzip_keeps_the_lines_before_the_damage_and_counts_it(tmp_path):
  lines = [json.dumps({"prompt": f"question {i}", "chosen": f"right {i} " * 20,
                       "rejected": f"wrong {i} " * 20}) for i in range(3000)]
  whole = gzip.compress("\n".join(lines).encode() + b"\n")
  path = tmp_path / "cut.jsonl.gz"
  path.write_bytes(whole[:len(whole) // 2])  # a download or copy that stopped half way
  records, bad = _load([str(path)], "pairs")
  assert 0 < len(records) < 3000
  assert [r.prompt for r in records] == [f"question {i}" for i in range(len(records))]
  assert bad.counts == {"corrupt_file": 1}
  assert bad.examples["corrupt_file"][0].startswith(f"{path}:{len(records) + 1}: unreadable")
  with pytest.raises(BadRecordError, match=r"cut\.jsonl\.gz:\d+: corrupt_file"):
    list(loaders.load_records([str(path)], "pairs", BadRecords(strict=True)))
  with pytest.raises(ValueError, match=r"cut\.jsonl\.gz:\d+: unreadable"):
    list(read_json_objects(path))


def test_bucket_lengths_by_hand():
  assert [bucket_length(n) for n in (1, 16, 17, 64, 65, 75, 128, 129, 1000)] == [
      16, 16, 32, 64, 128, 128, 128, 256, 1024]
  quarter = lambda n: bucket_length(n, steps_per_octave=4)  # noqa: E731
  assert [quarter(n) for n in (9, 17, 21, 64, 65, 75, 80, 81, 129, 1000)] == [
      16, 20, 24, 64, 80, 80, 80, 96, 160, 1024]
  assert bucket_length(3, minimum=8) == 8
  for n in range(17, 3000):  # padding never wastes a quarter of the compute
    assert n <= quarter(n) < n * 1.25 + 1
  with pytest.raises(ValueError, match="power of two"):
    bucket_length(10, steps_per_octave=3)


def test_encode_pair_round_trips_through_the_tokenizer(tmp_path):
  texts = ["def add(a, b):\n  return a + b\n", "Instruction: add numbers\n\nResponse:"] * 20
  tokenizer = train_sentencepiece(texts, 300, tmp_path / "tok")
  record = PairRecord("Instruction: add numbers\n\nResponse:", "def add(a, b):\n  return a + b",
                      "def add(a, b):\n  return a - b")
  stats = EncodeStats()
  pair = encode_pair(tokenizer, record, 512, stats=stats)
  for seq, response in ((pair.chosen, record.chosen), (pair.rejected, record.rejected)):
    assert seq.ids[-1] == tokenizer.eos_id
    assert tokenizer.decode(seq.ids[:seq.response_start]) == record.prompt
    assert tokenizer.decode(seq.ids[seq.response_start:-1]) == response
  short = encode_pair(tokenizer, record, len(pair.chosen.ids) - 2, stats=stats)
  assert short.chosen.ids[-1] == tokenizer.eos_id and short.chosen.prompt_cut == 2
  assert encode_pair(tokenizer, record, 8, "drop", stats=stats) is None
  assert (stats.pairs, stats.truncated_prompt, stats.truncated_response, stats.dropped_overlong) == (2, 1, 0, 1)


def test_trl_standard_formats_and_margin(tmp_path):
  rows = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green.", "margin": 2},
          {"chosen": "The sky is blue.", "rejected": "The sky is green."},
          {"chosen": "abc", "rejected": "abd"},
          {"prompt": "p", "chosen": "a", "rejected": 3}]
  records, bad = _load([_write_jsonl(tmp_path / "s.jsonl", rows)], "trl")
  assert [(r.prompt, r.chosen, r.rejected, r.margin) for r in records] == [
      ("The sky is", " blue.", " green.", 2.0), ("The sky is", " blue.", " green.", None),
      ("ab", "c", "d", None)]
  assert bad.counts == {"non_string_field": 1}
  assert loaders.FORMAT_TEMPLATES.keys() == loaders.FORMATS.keys()
