"""FX capture through torch.export on GPT-2, Llama, Qwen2 and BERT configs (small random weights)."""

import sys

import torch

from mpq.trace import trace_model


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=64)).eval()


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)).eval()


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()


def _bert():
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=128)).eval()


CAUSAL = {"use_cache": False}


def test_gpt2_conv1d_layers_found_and_lm_head_tied():
    graph = trace_model(_gpt2(), {"input_ids": torch.randint(0, 128, (1, 8)), **CAUSAL})
    assert graph.method == "export" and graph.warning is None
    assert [l.kind for l in graph.layers[:4]] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert all(l.module_type == "Conv1D" for l in graph.layers[:-1])
    c_attn = graph.layers[0]
    assert (c_attn.in_features, c_attn.out_features) == (64, 192)
    head = graph.layers[-1]  # an nn.Linear tied to wte: one layer with its table
    assert (head.name, head.module_type, head.tied_table) == ("lm_head", "Linear", "transformer.wte")
    assert "shares its weight with lm_head" in graph.excluded["transformer.wte"]
    assert graph.graph.has_edge("transformer.wte.weight", "lm_head.weight")


def test_llama_shared_inputs_and_untied_head():
    graph = trace_model(_llama(), {"input_ids": torch.randint(0, 128, (1, 8)), **CAUSAL})
    names = [l.name for l in graph.layers]
    # the untied input table first, then 7 linears per block, then the head
    assert len(names) == 1 + 2 * 7 + 1 and names[0] == "model.embed_tokens" and names[-1] == "lm_head"
    assert [l.order for l in graph.layers] == list(range(len(names)))
    table = graph.layers[0]
    assert table.is_embedding and (table.out_features, table.in_features, table.block) == (128, 64, None)
    groups = graph.shared_input_groups()
    assert ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"] in groups
    assert ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"] in groups
    assert len(groups) == 4  # qkv and gate/up in each of 2 blocks
    k_proj = graph.layers[2]
    assert (k_proj.block, k_proj.kind, k_proj.out_features) == (0, "self_attn.k_proj", 32)


def test_qwen2_tied_head_is_a_layer_with_its_table_and_groups():
    graph = trace_model(_qwen2(), {"input_ids": torch.randint(0, 128, (1, 8)), **CAUSAL})
    assert graph.layers[-1].name == "lm_head" and graph.layers[-1].tied_table == "model.embed_tokens"
    assert "lm_head" not in graph.excluded and "shares its weight" in graph.excluded["model.embed_tokens"]
    assert len(graph.layers) == 15 and len(graph.shared_input_groups()) == 4
    assert not any(l.is_embedding for l in graph.layers)
    kept = trace_model(_qwen2(), {"input_ids": torch.randint(0, 128, (1, 8)), **CAUSAL}, embeddings=False)
    assert len(kept.layers) == 14 and "tied" in kept.excluded["lm_head"]


def test_bert_kinds_keep_the_several_dense_layers_apart():
    graph = trace_model(_bert(), {"input_ids": torch.randint(0, 128, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)})
    kinds = {l.kind for l in graph.layers if l.block == 0}
    assert kinds == {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                     "intermediate.dense", "output.dense"}
    assert graph.layers[-1].name == "pooler.dense" and graph.layers[-1].block is None
    assert graph.layers[0].name == "embeddings.word_embeddings" and graph.layers[0].kind == "word_embeddings"
    # position and token-type tables are small and stay as they are
    assert sum(l.is_embedding for l in graph.layers) == 1
    assert ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key",
            "encoder.layer.0.attention.self.value"] in graph.shared_input_groups()


def test_export_failure_falls_back_to_hooks_on_an_eager_forward_with_a_warning(monkeypatch, caplog, capsys):
    """Where export fails, an eager forward's hooks give the same layers, in the same order, and
    the same shared inputs; where the model cannot run either, module discovery is all there is."""
    model, inputs = _llama(), {"input_ids": torch.randint(0, 128, (1, 8)), **CAUSAL}
    exported = trace_model(model, inputs)

    def broken(*args, **kwargs):
        print("def forward(self, arg0_1): ... (a partial graph)", file=sys.stderr)  # as torch.export does
        raise RuntimeError("data-dependent control flow")

    monkeypatch.setattr(torch.export, "export", broken)
    with caplog.at_level("INFO", logger="mpq.trace"):
        graph = trace_model(model, inputs)
    assert "partial graph" not in capsys.readouterr().err and "partial graph" in caplog.text  # `-v` shows it
    assert graph.method == "hooks" and "data-dependent control flow" in graph.warning
    assert [layer.name for layer in graph.layers] == [layer.name for layer in exported.layers]
    assert graph.shared_input_groups() == exported.shared_input_groups() and len(graph.shared_input_groups()) == 4
    assert any("torch.export failed" in r.message for r in caplog.records)
    assert not any(module._forward_pre_hooks for module in model.modules())  # the hooks are gone
    graph = trace_model(model, {"input_ids": torch.full((1, 8), 10_000), **CAUSAL})  # beyond the vocabulary
    assert graph.method == "modules" and "so did an eager forward" in graph.warning
    assert len(graph.layers) == 16 and graph.shared_input_groups() == []


class _Readers(torch.nn.Module):
    """Linears handed the same memory in several ways, and one never called."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (torch.nn.Linear(8, 8) for _ in range(4))
        self.unused = torch.nn.Linear(8, 8)
        self.e, self.f = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, 8)  # a view of x: the same rows
        y = self.a(x) + self.b(flat).view_as(x) + self.c(x.clone())  # a copy is another input
        x = x.transpose(0, 1)
        z = self.d(x).transpose(0, 1)  # the same memory read as other rows
        h = torch.relu(y + z)
        out = self.e(h)
        h.mul_(2)  # changed in place: f reads other values from the same memory
        return out + self.f(h)


def test_the_hooks_share_an_input_only_where_the_same_values_are_read(monkeypatch):
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no")))
    graph = trace_model(_Readers(), {"x": torch.randn(3, 5, 8)})
    assert graph.method == "hooks"
    assert [layer.name for layer in graph.layers] == ["a", "b", "c", "d", "unused", "e", "f"]
    assert graph.shared_input_groups() == [["a", "b"]]


def test_embedding_tables_can_be_left_out_and_subclasses_are_not_taken():
    inputs = {"input_ids": torch.randint(0, 128, (1, 8)), **CAUSAL}
    graph = trace_model(_llama(), inputs, embeddings=False)
    assert not any(l.is_embedding for l in graph.layers) and "asked for" in graph.excluded["model.embed_tokens"]

    class ScaledEmbedding(torch.nn.Embedding):  # as Gemma's: forward does more than a lookup
        def forward(self, ids):
            return super().forward(ids) * 8.0

    model = _llama()
    model.model.embed_tokens = ScaledEmbedding(128, 64)
    graph = trace_model(model, inputs)
    assert not any(l.is_embedding for l in graph.layers)
    assert "ScaledEmbedding" in graph.excluded["model.embed_tokens"]
