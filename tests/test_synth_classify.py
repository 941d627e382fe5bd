"""The type-classification stage against a real OpenAI-compatible HTTP server on localhost."""
from __future__ import annotations

import gzip
import http.server
import json
import pathlib
import sysconfig
import threading

import pytest

from codepmp_jax import cli
from codepmp_jax.synth import __main__ as synth_main
from codepmp_jax.synth import backends, classify
from codepmp_jax.synth.corpus import Document

# File marker -> the classifier's answer (JSON, prose, a percentage, nonsense).
ANSWERS = {
    "ENG_HIGH": '{"type": "engineering", "confidence": 0.9}',
    "ENG_LOW": 'Sure! {"type": "engineering", "confidence": 0.2}',
    "SNIPPET": "This is non-engineering code. Confidence: 0.7",
    "PERCENT": '{"type": "non-engineering", "confidence": 95}',
    "GARBAGE": "I cannot tell.",
}


class Server:
  """Answers classification prompts from the marker in the file; records every prompt."""

  def __init__(self):
    self.prompts: list[str] = []
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def _send(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

      def do_GET(self):
        self._send({"data": [{"id": "classifier"}]})

      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["prompt"]
        server.prompts.append(prompt)
        marker = next((m for m in ANSWERS if m in prompt), None)
        text = ANSWERS[marker] if marker else '{"type": "engineering", "confidence": 0.8}'
        self._send({"choices": [{"text": text}], "model": body["model"]})

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

  def close(self) -> None:
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def server():
  s = Server()
  yield s
  s.close()


def _docs() -> list[Document]:
  return [Document(f"f{i}_{m}.py", f"# {m}\nx = {i}\n", "python")
          for i, m in enumerate(list(ANSWERS) * 2)]


def test_parse_label():
  assert classify.parse_label(ANSWERS["ENG_HIGH"]) == ("engineering", 0.9)
  assert classify.parse_label(ANSWERS["SNIPPET"]) == ("non-engineering", 0.7)
  assert classify.parse_label(ANSWERS["PERCENT"]) == ("non-engineering", 0.95)
  assert classify.parse_label("Non-Engineering, confidence=0.4") == ("non-engineering", 0.4)
  for bad in (ANSWERS["GARBAGE"], '{"type": "engineering"}', '{"type": "test", "confidence": 1}',
              '{"type": "engineering", "confidence": 400}'):
    assert classify.parse_label(bad) is None, bad


def test_select_counts_every_outcome(server):
  backend = backends.OpenAIBackend(server.url, "classifier", max_retries=0)
  settings = classify.ClassifySettings(min_confidence=0.5, batch=3)
  kept, counts = classify.select(_docs(), backend, settings)
  # Of each 5 files: ENG_HIGH, SNIPPET, PERCENT pass; ENG_LOW is below 0.5; GARBAGE has no label.
  assert [d.source_id.split("_", 1)[1] for d in kept] == ["ENG_HIGH.py", "SNIPPET.py",
                                                          "PERCENT.py"] * 2
  assert kept[0].extra == {"code_type": "engineering", "type_confidence": 0.9}
  assert counts == {"classified": 10, "kept": 6, "below_min_confidence": 2, "unparsable_label": 2,
                    "type_engineering": 4, "type_non-engineering": 4}
  # One prompt per file, carrying the file (requests run concurrently: compare as a set).
  assert sorted(server.prompts) == sorted(classify.PROMPT.format(code=d.content) for d in _docs())
  assert '{"type": "engineering", "confidence": 0.9}' in server.prompts[0]
  long = Document("big.py", "@" * 10_000, "python")
  assert classify.classify_prompt(long.content, 4000).count("@") == 4000


@pytest.mark.slow
def test_types_and_ratios_sample_deterministically(server):
  backend = backends.OpenAIBackend(server.url, "classifier", max_retries=0)
  only_eng = classify.ClassifySettings(types=("engineering",))
  kept, counts = classify.select(_docs(), backend, only_eng)
  assert counts["type_not_selected"] == 4 and counts["kept"] == 4
  docs = [Document(f"d{i}.py", f"# ENG_HIGH\nvalue = {i}\n", "python") for i in range(200)]
  half = classify.ClassifySettings(ratios=(("engineering", 0.5), ("non-engineering", 1.0)), seed=3)
  kept, counts = classify.select(docs, backend, half)
  assert counts["kept"] + counts["sampled_out_engineering"] == 200
  assert 70 <= counts["kept"] <= 130  # a 0.5 draw per file (binomial sd 7)
  again, _ = classify.select(list(reversed(docs)), backend, half)
  assert sorted(d.source_id for d in again) == sorted(d.source_id for d in kept)  # order-free
  with pytest.raises(ValueError, match="unknown code types"):
    classify.ClassifySettings(types=("tests",))
  with pytest.raises(ValueError, match="ratios must be in"):
    classify.ClassifySettings(ratios=(("engineering", 2.0),))


def test_synth_run_with_the_stage_counts_it_in_the_manifest(server, tmp_path):
  corpus = tmp_path / "lib"
  corpus.mkdir()
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  for name, marker in (("bisect", "ENG_HIGH"), ("colorsys", "GARBAGE"), ("textwrap", "ENG_LOW")):
    (corpus / f"{name}.py").write_text(f"# {marker}\n" + (stdlib / f"{name}.py").read_text())
  out = tmp_path / "out"
  cli.call(synth_main.main, synth_main.define_flags, [
      f"--source={corpus}", f"--out={out}", "--workers=1", "--decontam_sets=",
      "--mutants_per_function=1", f"--base_url={server.url}", "--classify_model=classifier",
      "--classify_min_confidence=0.5"])
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["counts"]["classify"] == {
      "classified": 3, "kept": 1, "below_min_confidence": 1, "unparsable_label": 1,
      "type_engineering": 2}
  sources = {json.loads(line)["meta"]["source"]
             for p in out.glob("pairs-*.jsonl.gz") for line in gzip.open(p, "rt")}
  assert sources and all("bisect" in s for s in sources)
  assert "classifier@" + server.url + "/v1" in manifest["backend_requests"]
