"""What "quality" means for each kind of model, on calibration and held-out data.

- causal LM: sensitivity is the KL divergence of next-token distributions from the original's;
  held-out quality is perplexity on English text and on code (the shipped corpus's heldout split).
- seq2seq LM (T5, BART): each window's first half is the source the encoder reads, its second
  half the target the decoder is fed (teacher forcing, after the decoder's start token); sensitivity
  and held-out quality are the causal LM's, over the target's tokens: KL and perplexity of the
  continuation given the source. No paired text is needed, so any calibration text serves.
- encoder: sensitivity is 1 - cosine of mean-pooled, normalised embeddings to the original's;
  held-out quality is that fidelity (mean cosine) and nearest-neighbour agreement.
The held-out data has two disjoint halves: "validation", on which compile chooses the configs it
emits, and "test", which `mpq eval` and the benchmarks report by default, so that the numbers
quoted for the chosen configs are not the ones they were chosen on.
Every evaluation goes through the same functions, for every config and baseline.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F

from mpq.corpus import corpus_chunks, mixed_chunks
from mpq.cpu_matmul import float32_products
from mpq.errors import MpqError
from mpq.hot_rows import count_tokens
from mpq.models import CAUSAL_LM, SEQ2SEQ_LM, model_device
from mpq.spill import kept

BATCH = 8
DEFAULT_CALIB = "mpq corpus, calib split (Python docs + stdlib)"
MIN_SENTENCE_WORDS = 6


def quality_forward(model, **inputs):
    """The model's output on `inputs` for a quality measurement: on a CPU without a 16-bit GEMM its
    16-bit products are computed in float32 (mpq.cpu_matmul: same arithmetic, about 5x faster)."""
    with float32_products(model_device(model)):
        return model(**inputs)


@dataclass
class CalibrationText:
    source: str
    texts: list[str]


EVAL_DATA = ("both", "text", "code")  # what held-out quality (and default calibration) a causal LM targets
EVAL_SPLITS = ("validation", "test")  # the two halves of the held-out data


def heldout_half(split: str, count: int) -> slice:
    """Which of 2 x `count` held-out samples a split evaluates on."""
    if split not in EVAL_SPLITS:
        raise MpqError(f"held-out split {split!r}: use one of {', '.join(EVAL_SPLITS)}")
    return slice(0, count) if split == "validation" else slice(count, 2 * count)


def calibration_text(calib_file: Path | None, target: str = "both") -> CalibrationText:
    """The calibration text: `calib_file`, else the shipped corpus's calib split of the kind targeted."""
    if calib_file is None:
        if target == "both":
            return CalibrationText(DEFAULT_CALIB, mixed_chunks("calib"))
        return CalibrationText(f"mpq corpus, calib split ({target} only)", list(corpus_chunks(target, "calib")))
    path = Path(calib_file)
    if not path.is_file():
        raise MpqError(f"calibration file {path} {'is a folder' if path.is_dir() else 'does not exist'}: give a UTF-8 "
                       "text file (or .jsonl / .json records with a \"text\" field) with --calib")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MpqError(f"calibration file {path} is not UTF-8 text: give a plain text file with --calib") from exc
    if path.suffix.lower() in (".jsonl", ".json"):
        return CalibrationText(str(path), _json_texts(path, text))
    texts = [part for part in text.split("\n\n") if part.strip()]
    return CalibrationText(str(path), texts)


def _json_texts(path: Path, text: str) -> list[str]:
    """The texts of a .jsonl file (one JSON object with a "text" field, or one JSON string, per
    line: what `datasets`' to_json writes) or a .json file (a list of those). Read as plain text,
    such a file would calibrate on its quotes, keys and escapes."""
    jsonl = path.suffix.lower() == ".jsonl"
    pieces = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()] if jsonl else [(0, text)]
    parsed = []
    for number, piece in pieces:
        try:
            parsed.append(json.loads(piece))
        except json.JSONDecodeError as exc:
            raise MpqError(f"calibration file {path} is not valid {path.suffix[1:].upper()} "
                           f"(line {number or exc.lineno}: {exc.msg}): give one JSON object with a \"text\" field "
                           "per line, or a plain text file") from exc
    records = parsed if jsonl else parsed[0]
    if not isinstance(records, list):
        raise MpqError(f"calibration file {path} holds one JSON {type(records).__name__}: give a list of texts, "
                       "or of objects with a \"text\" field")
    texts = []
    for number, record in enumerate(records, 1):
        value = record.get("text") if isinstance(record, dict) else record
        if not isinstance(value, str):
            raise MpqError(f"calibration file {path}, record {number}: no \"text\" string field "
                           f"({'keys: ' + ', '.join(record) if isinstance(record, dict) else type(record).__name__}): "
                           "give each record its text as \"text\"")
        if value.strip():
            texts.append(value)
    return texts


def _windows(tokenizer, texts: list[str], count: int, seq_len: int, what: str) -> torch.Tensor:
    """`count` consecutive windows of `seq_len` tokens from the texts joined by end-of-text."""
    need = count * seq_len
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise MpqError(f"{what} gives {len(ids)} tokens but {count} samples x {seq_len} tokens = {need} are needed: "
                       f"give more text or lower --samples / --seq-len")
    return torch.tensor(ids[:need], dtype=torch.long).reshape(count, seq_len)


def _sentences(texts: list[str]) -> list[str]:
    out = []
    for text in texts:
        for line in text.replace(". ", ".\n").splitlines():
            line = line.strip()
            if len(line.split()) >= MIN_SENTENCE_WORDS and len(line) < 400:
                out.append(line)
    return out


class CausalLMTask:
    metric = "kl"
    quality_name = "perplexity"
    higher_is_better = False

    def __init__(self, tokenizer, calib: CalibrationText | None, samples: int, seq_len: int,
                 eval_samples: int = 24, eval_seq_len: int = 256, target: str = "both", split: str = "validation") -> None:
        if target not in EVAL_DATA:
            raise MpqError(f"--eval-data {target!r}: use one of {', '.join(EVAL_DATA)}")
        self.tokenizer = tokenizer
        self.target = target
        self.calib = calib
        if calib is not None:  # evaluation alone needs no calibration data
            self.calib_ids = _windows(tokenizer, calib.texts, samples, seq_len, f"calibration text ({calib.source})")
        half = heldout_half(split, eval_samples)
        self.heldout = {kind: _windows(tokenizer, list(corpus_chunks(kind, "heldout")), 2 * eval_samples, eval_seq_len,
                                       f"held-out {kind}")[half] for kind in ("text", "code")}

    @property
    def calib_tokens(self) -> int:
        return self.calib_ids.numel()

    @cached_property
    def token_counts(self) -> Counter:
        """How often each token occurs in the whole calibration text, tokenised as the windows are
        (mpq.hot_rows: which embedding rows a +hot format keeps at int8). Counted once per task:
        every quantiser built from it (one per method tried) reads the same counts."""
        return count_tokens(self.tokenizer(text)["input_ids"] for text in self.calib.texts)

    def model_inputs(self, ids: torch.Tensor) -> dict:
        """The model's keyword arguments for a batch of windows."""
        return {"input_ids": ids, "use_cache": False}

    def scored(self, logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits that predict a token of the windows `ids`, and those tokens."""
        return logits[:, :-1], ids[:, 1:]

    def calibration_inputs(self) -> list[dict]:
        """The model's keyword arguments for each calibration batch, in the order `reference` runs them."""
        return [self.model_inputs(ids) for ids in self.calib_ids.split(BATCH)]

    def inputs_on(self, model, ids: torch.Tensor) -> dict:
        """model_inputs(ids) on the device `model` runs on."""
        device = model_device(model)
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.model_inputs(ids).items()}

    def _logits(self, model, ids: torch.Tensor) -> torch.Tensor:
        return quality_forward(model, **self.inputs_on(model, ids)).logits.float().cpu()

    def loss(self, model, ids: torch.Tensor) -> torch.Tensor:
        """The mean next-token loss of a batch of windows, differentiable (the fisher and hessian
        signals take gradients through it)."""
        logits, labels = self.scored(model(**self.inputs_on(model, ids)).logits, ids.to(model_device(model)))
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())

    @torch.no_grad()
    def reference(self, model, held: bool = False) -> list[torch.Tensor]:
        """Log-probabilities of every calibration window, one tensor per batch. `held`: the caller
        keeps them for long (the divergences' reference), so each is mapped from a file as it is made
        while mpq.spill's `spilling` is active (tokens x vocabulary x 4 bytes); a pass whose outputs
        are compared once or dropped (block replay's) writes nothing."""
        logprobs = (F.log_softmax(self._logits(model, ids), dim=-1) for ids in self.calib_ids.split(BATCH))
        return [kept(batch) if held else batch for batch in logprobs]

    @torch.no_grad()
    def divergence(self, model, reference: list[torch.Tensor]) -> float:
        """Mean per-token KL(original || model) of next-token distributions on calibration data."""
        total, count = 0.0, 0
        for ids, ref in zip(self.calib_ids.split(BATCH), reference):
            logp = F.log_softmax(self._logits(model, ids), dim=-1)
            total += (ref.exp() * (ref - logp)).sum(-1).sum().item()
            count += logp.shape[:-1].numel()
        return max(total / count, 0.0)

    @torch.no_grad()
    def token_losses(self, model, ids: torch.Tensor) -> torch.Tensor:
        """Next-token loss (nats) at every scored position of every window of `ids`: (windows, positions)."""
        losses = []
        for batch in ids.split(BATCH):
            logits, labels = self.scored(self._logits(model, batch), batch)
            nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
            losses.append(nll.view(batch.shape[0], -1))
        return torch.cat(losses)

    def window_losses(self, model) -> torch.Tensor:
        """Mean next-token loss of each held-out window of the targeted data: paired samples on
        which two configs can be compared (their mean is log perplexity: windows are equal length)."""
        kinds = self.heldout if self.target == "both" else {self.target: self.heldout[self.target]}
        return torch.cat([self.token_losses(model, ids).mean(1) for ids in kinds.values()])

    def nll(self, model, ids: torch.Tensor) -> tuple[float, int]:
        """Summed next-token loss over `ids` and the number of tokens it covers."""
        losses = self.token_losses(model, ids)
        return losses.double().sum().item(), losses.numel()

    def prepare_eval(self, model) -> None:
        """Nothing to cache: perplexity needs no reference outputs."""

    def evaluate(self, model) -> dict[str, float]:
        """Held-out perplexity on text, on code, and over both; `loss` is the targeted one (what
        configs are selected by)."""
        return self.evaluate_windows(model)[0]

    def evaluate_windows(self, model) -> tuple[dict[str, float], torch.Tensor]:
        """`evaluate` and `window_losses` from one pass over the held-out windows."""
        out, total, count, windows = {}, 0.0, 0, []
        for kind, ids in self.heldout.items():
            losses = self.token_losses(model, ids)
            out[f"ppl_{kind}"] = math.exp(losses.double().sum().item() / losses.numel())
            total, count = total + losses.double().sum().item(), count + losses.numel()
            if self.target in ("both", kind):
                windows.append(losses.mean(1))
        out["ppl"] = math.exp(total / count)
        out["loss"] = out["ppl"] if self.target == "both" else out[f"ppl_{self.target}"]
        return out, torch.cat(windows)


def seq2seq_inputs(ids: torch.Tensor, decoder_start: int) -> dict:
    """An encoder-decoder's keyword arguments for windows `ids`: the first half is the source, the
    second the target, fed to the decoder after its start token (what the demo-t5 is trained on)."""
    half = ids.shape[1] // 2
    start = torch.full((ids.shape[0], 1), decoder_start, dtype=ids.dtype)
    return {"input_ids": ids[:, :half], "decoder_input_ids": torch.cat([start, ids[:, half:-1]], dim=1), "use_cache": False}


class Seq2SeqLMTask(CausalLMTask):
    """A causal LM task whose windows are split into source and target (see the module's notes)."""

    def __init__(self, tokenizer, calib: CalibrationText | None, samples: int, seq_len: int, decoder_start: int,
                 eval_samples: int = 24, eval_seq_len: int = 256, target: str = "both", split: str = "validation") -> None:
        if calib is not None and seq_len < 4:
            raise MpqError(f"--seq-len {seq_len}: a seq2seq model needs at least 4 tokens a window (half source, half target)")
        super().__init__(tokenizer, calib, samples, seq_len, eval_samples, eval_seq_len, target, split)
        self.decoder_start = decoder_start

    def model_inputs(self, ids: torch.Tensor) -> dict:
        return seq2seq_inputs(ids, self.decoder_start)

    def scored(self, logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return logits, ids[:, ids.shape[1] // 2:].to(logits.device)


class EncoderTask:
    metric = "1-cos"
    quality_name = "embedding cosine"
    higher_is_better = True

    def __init__(self, tokenizer, calib: CalibrationText | None, samples: int, seq_len: int, eval_samples: int = 256,
                 split: str = "validation") -> None:
        half = heldout_half(split, eval_samples)
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.calib = calib
        if calib is not None:  # evaluation alone needs no calibration data
            calib_sentences = _sentences(calib.texts)
            if len(calib_sentences) < samples:
                raise MpqError(f"calibration text ({calib.source}) gives {len(calib_sentences)} sentences of {MIN_SENTENCE_WORDS}+ words "
                               f"but --samples {samples} are needed: give more text or lower --samples")
            self.calib_batches = self._encode(calib_sentences[:samples])
        heldout = _sentences(list(corpus_chunks("text", "heldout")))[half]
        self.heldout_batches = self._encode(heldout)
        self.baseline: torch.Tensor | None = None

    def _encode(self, sentences: list[str]) -> list[dict]:
        return [dict(self.tokenizer(sentences[i:i + BATCH * 4], padding=True, truncation=True,
                                    max_length=self.seq_len, return_tensors="pt"))
                for i in range(0, len(sentences), BATCH * 4)]

    def calibration_inputs(self) -> list[dict]:
        """The model's keyword arguments for each calibration batch, in the order `reference` runs them."""
        return [dict(batch) for batch in self.calib_batches]

    @property
    def calib_tokens(self) -> int:
        return int(sum(batch["attention_mask"].sum() for batch in self.calib_batches))

    @cached_property
    def token_counts(self) -> Counter:
        """How often each token occurs over every sentence of the calibration text (not only the
        `samples` the model runs on: counting is cheap), with the [CLS]/[SEP] each lookup adds."""
        sentences = _sentences(self.calib.texts)
        batches = (sentences[i:i + 1024] for i in range(0, len(sentences), 1024))
        return count_tokens(ids for batch in batches
                            for ids in self.tokenizer(batch, truncation=True, max_length=self.seq_len)["input_ids"])

    def pooled(self, model, batch: dict) -> torch.Tensor:
        """Unit-length mean-pooled embeddings of one batch, differentiable (the fisher and hessian
        signals take gradients through it)."""
        device = model_device(model)
        hidden = quality_forward(model, **{k: v.to(device) for k, v in batch.items()}).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float().to(device)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0), dim=-1)

    @torch.no_grad()
    def embeddings(self, model, batches: list[dict]) -> torch.Tensor:
        return torch.cat([self.pooled(model, batch).cpu() for batch in batches])

    def reference(self, model, held: bool = False) -> torch.Tensor:
        """The calibration sentences' embeddings (`held`: as for the LM tasks; these are small)."""
        embeddings = self.embeddings(model, self.calib_batches)
        return kept(embeddings) if held else embeddings

    def divergence(self, model, reference: torch.Tensor) -> float:
        """1 - mean cosine between this model's embeddings and the original's, on calibration data."""
        emb = self.embeddings(model, self.calib_batches)
        return max(1.0 - (emb * reference).sum(-1).mean().item(), 0.0)

    def prepare_eval(self, model) -> None:
        self.baseline = self.embeddings(model, self.heldout_batches)

    @staticmethod
    def _nearest(emb: torch.Tensor) -> torch.Tensor:
        sim = emb @ emb.t()
        sim.fill_diagonal_(-2.0)
        return sim.argmax(-1)

    def window_losses(self, model) -> torch.Tensor:
        """1 - cosine to the original's embedding, per held-out sentence (paired samples)."""
        if self.baseline is None:
            raise RuntimeError("call prepare_eval(original_model) before window_losses()")
        return 1.0 - (self.embeddings(model, self.heldout_batches) * self.baseline).sum(-1)

    def evaluate(self, model) -> dict[str, float]:
        """Fidelity to the original on held-out sentences: mean cosine and nearest-neighbour agreement."""
        return self.evaluate_windows(model)[0]

    def evaluate_windows(self, model) -> tuple[dict[str, float], torch.Tensor]:
        """`evaluate` and `window_losses` from one pass over the held-out sentences."""
        if self.baseline is None:
            raise RuntimeError("call prepare_eval(original_model) before evaluate()")
        emb = self.embeddings(model, self.heldout_batches)
        cosines = (emb * self.baseline).sum(-1)
        agreement = (self._nearest(emb) == self._nearest(self.baseline)).float().mean().item()
        cosine = cosines.mean().item()
        return {"mean_cosine": cosine, "nn_agreement": agreement, "loss": 1.0 - cosine}, 1.0 - cosines


def make_task(task: str, tokenizer, calib: CalibrationText | None, samples: int = 0, seq_len: int = 128,
              target: str = "both", split: str = "validation", decoder_start: int | None = None):
    """The task of a model kind; `target` (causal and seq2seq LMs): the held-out perplexity configs
    are judged by; `split`: which half of the held-out data evaluates (validation: compile's choice;
    test: reports); `decoder_start` (seq2seq LMs): the token the decoder starts from (decoder_start_of)."""
    if task == CAUSAL_LM:
        return CausalLMTask(tokenizer, calib, samples, seq_len, target=target, split=split)
    if task == SEQ2SEQ_LM:
        if decoder_start is None:
            raise ValueError("a seq2seq task needs the decoder's start token (mpq.models.decoder_start_of)")
        return Seq2SeqLMTask(tokenizer, calib, samples, seq_len, decoder_start, target=target, split=split)
    if target == "code":
        raise MpqError("--eval-data code is for causal and seq2seq LMs: encoders are judged on held-out text sentences")
    return EncoderTask(tokenizer, calib, samples, seq_len, split=split)
