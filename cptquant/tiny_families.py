"""Tiny random models of many transformer families, built from configs in code (offline, seconds each).

The architecture matrix (tests/test_architectures.py) exports each of them and loads the result back
with optimum's ORTModelFor* for its task: it is the source of truth for the families the README lists
as tested. Sizes follow cptquant.testing (hidden 64, 2 layers, 4 heads, FFN 128, vocabulary 1000), so
every Linear in-feature is a multiple of the 32-wide quantization block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .testing import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    TINY_FFN,
    TINY_HEADS,
    TINY_HIDDEN,
    TINY_LAYERS,
    TINY_MAX_POSITIONS,
    TINY_VOCAB,
    seeded_model,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Keyword arguments of a transformers config class (ints, floats, flags, strings, lists of strings, None).
ConfigKwargs = dict[str, object]

FEATURES = "feature-extraction"
CLASSIFICATION = "text-classification"
TOKEN_CLASSIFICATION = "token-classification"
MASKED_LM = "fill-mask"
CAUSAL_LM = "text-generation-with-past"
SEQ2SEQ = "text2text-generation-with-past"

_HEADS = {
    FEATURES: "Model",
    CLASSIFICATION: "ForSequenceClassification",
    TOKEN_CLASSIFICATION: "ForTokenClassification",
    MASKED_LM: "ForMaskedLM",
    CAUSAL_LM: "ForCausalLM",
    SEQ2SEQ: "ForConditionalGeneration",
}


@dataclass(frozen=True)
class Family:
    name: str  # the matrix's id for it (model type, plus the head where one family is tested with two)
    config_class: str  # transformers class name
    model_class: str
    task: str
    config: ConfigKwargs

    def build(self, seed: int = 0) -> PreTrainedModel:
        import transformers

        config = getattr(transformers, self.config_class)(**self.config)
        model_class: type[PreTrainedModel] = getattr(transformers, self.model_class)
        return seeded_model(lambda: model_class(config), seed)


def _common(**extra: object) -> ConfigKwargs:
    base: ConfigKwargs = dict(vocab_size=TINY_VOCAB, hidden_size=TINY_HIDDEN, intermediate_size=TINY_FFN,
                num_hidden_layers=TINY_LAYERS, num_attention_heads=TINY_HEADS,
                max_position_embeddings=TINY_MAX_POSITIONS, pad_token_id=PAD_ID, num_labels=2)
    base.update(extra)
    return base


def _decoder(**extra: object) -> ConfigKwargs:
    return _common(bos_token_id=BOS_ID, eos_token_id=EOS_ID, **extra)


_NO_DROPOUT: ConfigKwargs = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

# name -> (config class, model class prefix, task, config kwargs)
_SPECS: dict[str, tuple[str, str, str, ConfigKwargs]] = {
    # Encoders
    "bert": ("BertConfig", "Bert", CLASSIFICATION, _common(**_NO_DROPOUT)),
    "bert-token": ("BertConfig", "Bert", TOKEN_CLASSIFICATION, _common(**_NO_DROPOUT)),
    "roberta": ("RobertaConfig", "Roberta", FEATURES, _common(**_NO_DROPOUT)),
    "distilbert": ("DistilBertConfig", "DistilBert", CLASSIFICATION,
                   dict(vocab_size=TINY_VOCAB, dim=TINY_HIDDEN, hidden_dim=TINY_FFN, n_layers=TINY_LAYERS,
                        n_heads=TINY_HEADS, max_position_embeddings=TINY_MAX_POSITIONS, pad_token_id=PAD_ID,
                        dropout=0.0, attention_dropout=0.0, num_labels=2)),
    "albert": ("AlbertConfig", "Albert", CLASSIFICATION,
               _common(embedding_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                       classifier_dropout_prob=0.0)),
    "electra": ("ElectraConfig", "Electra", CLASSIFICATION, _common(embedding_size=32, **_NO_DROPOUT)),
    "deberta-v2": ("DebertaV2Config", "DebertaV2", CLASSIFICATION,
                   _common(**_NO_DROPOUT, relative_attention=True, position_buckets=16, max_relative_positions=32,
                           pos_att_type=["p2c", "c2p"])),
    "mpnet": ("MPNetConfig", "MPNet", FEATURES, _common(**_NO_DROPOUT)),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRoberta", MASKED_LM, _common(**_NO_DROPOUT)),
    # Decoders
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoX", CAUSAL_LM, _decoder(rotary_pct=0.5, use_parallel_residual=True)),
    "gptj": ("GPTJConfig", "GPTJ", CAUSAL_LM,
             dict(vocab_size=TINY_VOCAB, n_embd=TINY_HIDDEN, n_inner=TINY_FFN, n_layer=TINY_LAYERS,
                  n_head=TINY_HEADS, rotary_dim=8, n_positions=TINY_MAX_POSITIONS, bos_token_id=BOS_ID,
                  eos_token_id=EOS_ID, pad_token_id=PAD_ID, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "falcon": ("FalconConfig", "Falcon", CAUSAL_LM,
               dict(vocab_size=TINY_VOCAB, hidden_size=TINY_HIDDEN, num_hidden_layers=TINY_LAYERS,
                    num_attention_heads=TINY_HEADS, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                    new_decoder_architecture=False, multi_query=True, parallel_attn=True, alibi=False,
                    hidden_dropout=0.0, attention_dropout=0.0)),
    "bloom": ("BloomConfig", "Bloom", CAUSAL_LM,
              dict(vocab_size=TINY_VOCAB, hidden_size=TINY_HIDDEN, n_layer=TINY_LAYERS, n_head=TINY_HEADS,
                   bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, hidden_dropout=0.0,
                   attention_dropout=0.0)),
    "phi": ("PhiConfig", "Phi", CAUSAL_LM, _decoder(partial_rotary_factor=0.5, resid_pdrop=0.0, embd_pdrop=0.0,
                                                    attention_dropout=0.0)),
    # Phi-3 and Gemma-2 with as many key-value heads as query heads: optimum 2.1's ORTModelForCausalLM sizes
    # their empty KV cache by num_attention_heads (its list of GQA model types leaves them out), so a
    # grouped-query Phi-3 / Gemma-2 export runs in onnxruntime and GenAI but not through that class.
    "phi3": ("Phi3Config", "Phi3", CAUSAL_LM, _decoder(num_key_value_heads=TINY_HEADS)),
    "gemma": ("GemmaConfig", "Gemma", CAUSAL_LM, _decoder(num_key_value_heads=1, head_dim=16)),
    "gemma2": ("Gemma2Config", "Gemma2", CAUSAL_LM,
               _decoder(num_key_value_heads=TINY_HEADS, head_dim=16, sliding_window=64)),
    "qwen3": ("Qwen3Config", "Qwen3", CAUSAL_LM, _decoder(num_key_value_heads=2, head_dim=16)),
    "stablelm": ("StableLmConfig", "StableLm", CAUSAL_LM, _decoder(num_key_value_heads=2, partial_rotary_factor=0.5)),
    "mistral": ("MistralConfig", "Mistral", CAUSAL_LM, _decoder(num_key_value_heads=2, sliding_window=None)),
    "llama": ("LlamaConfig", "Llama", CAUSAL_LM, _decoder(num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2", CAUSAL_LM, _decoder(num_key_value_heads=2)),
    "opt": ("OPTConfig", "OPT", CAUSAL_LM,
            dict(vocab_size=TINY_VOCAB, hidden_size=TINY_HIDDEN, word_embed_proj_dim=TINY_HIDDEN, ffn_dim=TINY_FFN,
                 num_hidden_layers=TINY_LAYERS, num_attention_heads=TINY_HEADS,
                 max_position_embeddings=TINY_MAX_POSITIONS, pad_token_id=PAD_ID, bos_token_id=EOS_ID,
                 eos_token_id=EOS_ID, dropout=0.0, attention_dropout=0.0)),
    "gpt2": ("GPT2Config", "GPT2", CAUSAL_LM,
             dict(vocab_size=TINY_VOCAB, n_embd=TINY_HIDDEN, n_inner=TINY_FFN, n_layer=TINY_LAYERS, n_head=TINY_HEADS,
                  n_positions=TINY_MAX_POSITIONS, bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    # Encoder-decoders: three ONNX files (encoder, decoder, decoder with past), one plan
    "t5": ("T5Config", "T5", SEQ2SEQ,
           dict(vocab_size=TINY_VOCAB, d_model=TINY_HIDDEN, d_kv=TINY_HIDDEN // TINY_HEADS, d_ff=TINY_FFN,
                num_layers=TINY_LAYERS, num_heads=TINY_HEADS, pad_token_id=PAD_ID, eos_token_id=EOS_ID,
                decoder_start_token_id=PAD_ID, dropout_rate=0.0)),
    "bart": ("BartConfig", "Bart", SEQ2SEQ,
             dict(vocab_size=TINY_VOCAB, d_model=TINY_HIDDEN, encoder_layers=TINY_LAYERS, decoder_layers=TINY_LAYERS,
                  encoder_attention_heads=TINY_HEADS, decoder_attention_heads=TINY_HEADS, encoder_ffn_dim=TINY_FFN,
                  decoder_ffn_dim=TINY_FFN, max_position_embeddings=TINY_MAX_POSITIONS, pad_token_id=PAD_ID,
                  bos_token_id=BOS_ID, eos_token_id=EOS_ID, decoder_start_token_id=EOS_ID, dropout=0.0,
                  attention_dropout=0.0, activation_dropout=0.0)),
    # No prepare_decoder_input_ids_from_labels (seq2seq_inputs.shifted_right's rule instead); sinusoidal positions
    "m2m_100": ("M2M100Config", "M2M100", SEQ2SEQ,
                dict(vocab_size=TINY_VOCAB, d_model=TINY_HIDDEN, encoder_layers=TINY_LAYERS, decoder_layers=TINY_LAYERS,
                     encoder_attention_heads=TINY_HEADS, decoder_attention_heads=TINY_HEADS, encoder_ffn_dim=TINY_FFN,
                     decoder_ffn_dim=TINY_FFN, max_position_embeddings=TINY_MAX_POSITIONS, pad_token_id=PAD_ID,
                     bos_token_id=BOS_ID, eos_token_id=EOS_ID, decoder_start_token_id=EOS_ID, dropout=0.0,
                     attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.0, decoder_layerdrop=0.0)),
}

# More families, found exportable by an architecture sweep (2026-12-02) and kept as tests: the matrix tier runs
# them (make test-matrix; `EXTENDED` below), so that the default tier stays quick.
_SEQ2SEQ_BART_LIKE: ConfigKwargs = dict(
    vocab_size=TINY_VOCAB, d_model=TINY_HIDDEN, encoder_layers=TINY_LAYERS, decoder_layers=TINY_LAYERS,
    encoder_attention_heads=TINY_HEADS, decoder_attention_heads=TINY_HEADS, encoder_ffn_dim=TINY_FFN,
    decoder_ffn_dim=TINY_FFN, max_position_embeddings=TINY_MAX_POSITIONS, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
    eos_token_id=EOS_ID, decoder_start_token_id=EOS_ID, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
_XLM_LIKE: ConfigKwargs = dict(vocab_size=TINY_VOCAB, emb_dim=TINY_HIDDEN, n_layers=TINY_LAYERS, n_heads=TINY_HEADS,
                               max_position_embeddings=TINY_MAX_POSITIONS, pad_index=PAD_ID, dropout=0.0,
                               attention_dropout=0.0, num_labels=2)
_EXTENDED_SPECS: dict[str, tuple[str, str, str, ConfigKwargs]] = {
    # Encoders
    "mobilebert": ("MobileBertConfig", "MobileBert", CLASSIFICATION,
                   _common(embedding_size=32, intra_bottleneck_size=TINY_HIDDEN, true_hidden_size=TINY_HIDDEN,
                           num_feedforward_networks=1, **_NO_DROPOUT)),
    "squeezebert": ("SqueezeBertConfig", "SqueezeBert", CLASSIFICATION,
                    _common(embedding_size=TINY_HIDDEN, q_groups=1, k_groups=1, v_groups=1, post_attention_groups=1,
                            intermediate_groups=1, output_groups=1, **_NO_DROPOUT)),
    "convbert": ("ConvBertConfig", "ConvBert", CLASSIFICATION, _common(embedding_size=TINY_HIDDEN, head_ratio=2,
                                                                       **_NO_DROPOUT)),
    "camembert": ("CamembertConfig", "Camembert", FEATURES, _common(**_NO_DROPOUT)),
    # its sinusoidal position table is 16 wide per head: blocks of 16 there (options.fitting_block_size)
    "roformer": ("RoFormerConfig", "RoFormer", CLASSIFICATION, _common(embedding_size=TINY_HIDDEN, **_NO_DROPOUT)),
    "rembert": ("RemBertConfig", "RemBert", CLASSIFICATION,
                _common(input_embedding_size=32, output_embedding_size=32, **_NO_DROPOUT)),
    "data2vec-text": ("Data2VecTextConfig", "Data2VecText", FEATURES, _common(**_NO_DROPOUT)),
    "modernbert": ("ModernBertConfig", "ModernBert", CLASSIFICATION,
                   _common(global_attn_every_n_layers=1, local_attention=32)),
    "deberta": ("DebertaConfig", "Deberta", FEATURES, _common(**_NO_DROPOUT)),
    "esm": ("EsmConfig", "Esm", FEATURES, _common(mask_token_id=3, **_NO_DROPOUT)),
    # XLM and FlauBERT add embedding row token_type_ids to every token: zeros are not the same as none (the matrix
    # and the parity check give torch the zeros the ONNX file is fed)
    "xlm": ("XLMConfig", "XLM", FEATURES, _XLM_LIKE),
    "flaubert": ("FlaubertConfig", "Flaubert", CLASSIFICATION, _XLM_LIKE),
    # Decoders
    "granite": ("GraniteConfig", "Granite", CAUSAL_LM, _decoder(num_key_value_heads=2)),
    "olmo": ("OlmoConfig", "Olmo", CAUSAL_LM, _decoder()),
    "olmo2": ("Olmo2Config", "Olmo2", CAUSAL_LM, _decoder(num_key_value_heads=TINY_HEADS)),  # as Phi-3's note above
    "cohere": ("CohereConfig", "Cohere", CAUSAL_LM, _decoder(num_key_value_heads=2)),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCode", CAUSAL_LM, _decoder(n_inner=TINY_FFN)),
    "gpt_neo": ("GPTNeoConfig", "GPTNeo", CAUSAL_LM,
                _decoder(num_layers=TINY_LAYERS, attention_types=[[["global", "local"], 1]], window_size=32)),
    "codegen": ("CodeGenConfig", "CodeGen", CAUSAL_LM, _decoder(n_inner=TINY_FFN, rotary_dim=8,
                                                                n_ctx=TINY_MAX_POSITIONS)),
    "mpt": ("MptConfig", "Mpt", CAUSAL_LM,
            _decoder(d_model=TINY_HIDDEN, n_heads=TINY_HEADS, n_layers=TINY_LAYERS, expansion_ratio=2,
                     max_seq_len=TINY_MAX_POSITIONS)),
    "smollm3": ("SmolLM3Config", "SmolLM3", CAUSAL_LM, _decoder(num_key_value_heads=2)),
    "helium": ("HeliumConfig", "Helium", CAUSAL_LM, _decoder(num_key_value_heads=2, head_dim=16)),
    "nemotron": ("NemotronConfig", "Nemotron", CAUSAL_LM, _decoder(num_key_value_heads=2, head_dim=16)),
    "glm": ("GlmConfig", "Glm", CAUSAL_LM, _decoder(num_key_value_heads=2, head_dim=16)),
    "arcee": ("ArceeConfig", "Arcee", CAUSAL_LM, _decoder(num_key_value_heads=2)),
    # Encoder-decoders
    "mbart": ("MBartConfig", "MBart", SEQ2SEQ, _SEQ2SEQ_BART_LIKE),
    "marian": ("MarianConfig", "Marian", SEQ2SEQ, {**_SEQ2SEQ_BART_LIKE, "decoder_start_token_id": PAD_ID}),
    "pegasus": ("PegasusConfig", "Pegasus", SEQ2SEQ, _SEQ2SEQ_BART_LIKE),
    "blenderbot-small": ("BlenderbotSmallConfig", "BlenderbotSmall", SEQ2SEQ, _SEQ2SEQ_BART_LIKE),
}
_SPECS.update(_EXTENDED_SPECS)
EXTENDED = frozenset(_EXTENDED_SPECS)

_LM_HEAD_CLASS = {"gpt2": "GPT2LMHeadModel", "gptj": "GPTJForCausalLM", "bloom": "BloomForCausalLM"}


def _model_class(prefix: str, task: str, name: str) -> str:
    if task == CAUSAL_LM and name in _LM_HEAD_CLASS:
        return _LM_HEAD_CLASS[name]
    if name == "marian":
        return "MarianMTModel"
    return prefix + _HEADS[task]


FAMILIES: dict[str, Family] = {
    name: Family(name, config_class, _model_class(prefix, task, name), task, config)
    for name, (config_class, prefix, task, config) in _SPECS.items()
}


def build(name: str, seed: int = 0) -> PreTrainedModel:
    """The tiny model of family `name` (a key of FAMILIES), FP32, eval mode, seeded weights."""
    return FAMILIES[name].build(seed)


