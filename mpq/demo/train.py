"""Train a bundled demo model from a recipe: ``python -m mpq.demo.train recipes/demo.json``.

Trains a byte-level BPE tokenizer and a small model on the shipped corpus's train split, reports
held-out perplexity on text and code, and writes the model (safetensors) and tokenizer to the
recipe's folder under mpq/demo/. The recipe's `architecture` is "llama" (a causal LM: the `demo`)
or "t5" (an encoder-decoder, `demo-t5`, trained on what mpq's seq2seq task measures: each window's
first half is the source, its second half the target the decoder learns to continue with).
Deterministic for a given recipe, torch version and machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch

from mpq.corpus import corpus_chunks
from mpq.tasks import seq2seq_inputs

log = logging.getLogger(__name__)
MODEL_DIR = Path(__file__).parent / "model"
RECIPE_KEYS = {"name", "description", "architecture", "tokenizer", "model", "train", "save_dtype"}
ARCHITECTURES = ("llama", "t5")
EOS = "<|endoftext|>"


def load_recipe(path: Path) -> dict:
    recipe = json.loads(path.read_text())
    unknown = set(recipe) - RECIPE_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown recipe keys {sorted(unknown)}; allowed: {sorted(RECIPE_KEYS)}")
    if recipe.get("architecture", "llama") not in ARCHITECTURES:
        raise ValueError(f"{path}: architecture {recipe['architecture']!r}; use one of {', '.join(ARCHITECTURES)}")
    return recipe


def model_dir(recipe: dict) -> Path:
    """Where a recipe's model is shipped: mpq/demo/model for `demo`, mpq/demo/<name> for others."""
    return MODEL_DIR if recipe["name"] == "demo" else MODEL_DIR.parent / recipe["name"]


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS, unk_token=EOS)


def token_stream(tokenizer, chunks: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for chunk in chunks:
        ids.extend(tokenizer(chunk)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def batch_loss(model, windows: torch.Tensor, seq2seq: bool, start_id: int, reduction: str = "mean") -> torch.Tensor:
    """Next-token loss of windows of seq_len + 1 tokens: a causal LM's over every position; an
    encoder-decoder's over the second half, given the first (as mpq.tasks.Seq2SeqLMTask scores)."""
    if not seq2seq:
        logits = model(input_ids=windows[:, :-1], use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), windows[:, 1:].flatten(), reduction=reduction)
    windows = windows[:, :-1]
    logits = model(**seq2seq_inputs(windows, start_id)).logits
    target = windows[:, windows.shape[1] // 2:]
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction=reduction)


@torch.no_grad()
def perplexity(model, stream: torch.Tensor, seq_len: int, seq2seq: bool = False, start_id: int = 0) -> float:
    model.eval()
    n = (len(stream) - 1) // seq_len
    total, count = 0.0, 0
    for start in range(0, n, 16):
        rows = [stream[i * seq_len:(i + 1) * seq_len + 1] for i in range(start, min(n, start + 16))]
        batch = torch.stack(rows)
        total += batch_loss(model, batch, seq2seq, start_id, reduction="sum").item()
        count += len(rows) * (seq_len - seq_len // 2 if seq2seq else seq_len)
    model.train()
    return math.exp(total / count)


def build_model(recipe: dict, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    eos = tokenizer.eos_token_id
    if recipe.get("architecture") == "t5":  # the decoder starts from the pad token, as T5's do
        return T5ForConditionalGeneration(T5Config(vocab_size=len(tokenizer), pad_token_id=eos, eos_token_id=eos,
                                                   decoder_start_token_id=eos, **recipe["model"]))
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                                        **recipe["model"]))


def train(recipe: dict, out_dir: Path) -> dict:
    cfg = recipe["train"]
    seq2seq = recipe.get("architecture") == "t5"
    torch.manual_seed(cfg["seed"])
    train_text = list(corpus_chunks("text", "train")) * cfg["text_upsample"] + list(corpus_chunks("code", "train"))
    tokenizer = train_tokenizer(train_text, recipe["tokenizer"]["vocab_size"])
    stream = token_stream(tokenizer, train_text)
    heldout = {kind: token_stream(tokenizer, list(corpus_chunks(kind, "heldout"))) for kind in ("text", "code")}
    log.info("train tokens: %d; heldout tokens: %s", len(stream), {k: len(v) for k, v in heldout.items()})

    model = build_model(recipe, tokenizer)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                               {"params": no_decay, "weight_decay": 0.0}], lr=cfg["lr"], betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < cfg["warmup_steps"]:
            return cfg["lr"] * (step + 1) / cfg["warmup_steps"]
        progress = (step - cfg["warmup_steps"]) / max(1, cfg["steps"] - cfg["warmup_steps"])
        return cfg["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    seq_len, batch_size = cfg["seq_len"], cfg["batch_size"]
    generator = torch.Generator().manual_seed(cfg["seed"])
    start_time = time.time()
    for step in range(cfg["steps"]):
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch_size,), generator=generator)
        batch = torch.stack([stream[s:s + seq_len + 1] for s in starts.tolist()])
        for group in optim.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = batch_loss(model, batch, seq2seq, tokenizer.eos_token_id)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        if step % 50 == 0 or step == cfg["steps"] - 1:
            log.info("step %d/%d loss %.3f (%.0fs)", step, cfg["steps"], loss.item(), time.time() - start_time)

    dtype = getattr(torch, recipe["save_dtype"])
    model = model.to(dtype)
    results = {
        "train_tokens": len(stream),
        "steps": cfg["steps"],
        "train_seconds": round(time.time() - start_time, 1),
        "heldout_perplexity": {k: round(perplexity(model, v, seq_len, seq2seq, tokenizer.eos_token_id), 3)
                               for k, v in heldout.items()},
        "uniform_perplexity": len(tokenizer),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # transformers 5 names the class TokenizersBackend, which 4.x cannot resolve; both load this one.
    tok_config = out_dir / "tokenizer_config.json"
    tok_config.write_text(tok_config.read_text().replace('"TokenizersBackend"', '"PreTrainedTokenizerFast"'))
    (out_dir / "training.json").write_text(json.dumps({"recipe": recipe, "results": results}, indent=2) + "\n")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("-o", "--out", type=Path, help="where to write the model (default: the recipe's folder under mpq/demo/)")
    parser.add_argument("--steps", type=int, help="override the recipe's step count (for quick trials)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        recipe = load_recipe(args.recipe)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"mpq.demo.train: error: {exc}")
    if args.steps:
        recipe["train"]["steps"] = args.steps
    print(json.dumps(train(recipe, args.out or model_dir(recipe)), indent=2))


if __name__ == "__main__":
    main()
